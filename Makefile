# Set-up and everyday jobs. `make test` and `make demo` build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt

.PHONY: test demo lint peers clean mutation browser

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base | browser
	$(PIP) -q -e '.[test,onnx,serve,train]'
	# face_recognition declares dlib (a source build) as a dependency; dlib-bin provides it.
	$(PIP) -q --no-deps face_recognition
	touch $@

# The browser test (tests/test_web.py) drives Debian's Chromium through chromedriver. Checked on every `make test`;
# installed with apt only when missing and when run as root (CI); otherwise a note says how (the test then skips,
# or fails under CI=true).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (apt) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "note: chromium/chromedriver not found; install them (sudo apt-get install chromium chromium-driver)" \
			"or tests/test_web.py skips"; \
	fi

test: $(VENV)/.test
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m pytest -q

# Three verifications on the bundled example photos (examples/README.md); the occluded pair is drawn.
demo: $(VENV)/.base
	@mkdir -p out
	$(VENV)/bin/fromface verify examples/person_a_1.jpg examples/person_a_2.jpg
	$(VENV)/bin/fromface verify examples/person_a_1.jpg examples/person_a_2_occluded.png \
		--show out/demo.png
	$(VENV)/bin/fromface verify examples/person_a_1.jpg examples/person_b.jpg

peers: $(VENV)/.base
	$(PIP) -q -e '.[peers]'
	$(PIP) -q --no-deps face_recognition

# Mutation testing of the core modules (not part of CI; takes a while): per-module scores for docs/testing.md.
mutation: $(VENV)/.test
	$(PIP) -q -e '.[test,onnx,serve,train,mutation]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results --all true | $(PY) tools/mutation_scores.py

lint: $(VENV)/.test
	$(PY) -m ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info
