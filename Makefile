# Set-up and everyday jobs. `make test` and `make demo` build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -c constraints.txt

.PHONY: test demo lint peers clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -q -e '.[test,onnx,serve,train]'
	# face_recognition declares dlib (a source build) as a dependency; dlib-bin provides it.
	$(PIP) -q --no-deps face_recognition
	touch $@

test: $(VENV)/.test
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m pytest -q

demo: $(VENV)/.base
	$(PY) tools/demo.py

peers: $(VENV)/.base
	$(PIP) -q -e '.[peers]'
	$(PIP) -q --no-deps face_recognition

lint: $(VENV)/.test
	$(PY) -m ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info
