"""The web page of `fromface serve`, driven in headless Chromium (Selenium) against a real server on 127.0.0.1.

One server for the module (the default model, an empty gallery, a token, a 0.5 MB upload limit) and one browser.
Each test opens the page afresh, types the token into its Token field and reads what the page says, as a user would.
Chromium and chromedriver are Debian's packages (``make test`` installs them): without them the tests skip, except
under ``CI=true``, where they fail. Screenshots of each tab go to the test's tmp folder and, when
``FROMFACE_SCREENSHOTS`` names a folder (``FROMFACE_SCREENSHOTS=docs/img``), there as well.
"""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, serving

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WAIT = 90  # seconds for one answer on the page (a CPU embeds two faces in about a second)
WIDTH = 1100  # screenshot width in CSS pixels
UPLOAD_LIMIT_MB = 0.5


def _missing(what: str) -> None:
    """Skip for a missing browser or package, but fail under CI, whose set-up installs them."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what}: `make test` installs it in CI, so the browser test may not skip")
    pytest.skip(what)


def _need_modules() -> None:
    import importlib.util

    for module in ("fastapi", "uvicorn", "selenium"):
        if importlib.util.find_spec(module) is None:
            _missing(f"needs the Python package {module!r} (pip install -e '.[test,serve]')")
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        _missing("needs the Python package 'python-multipart' (pip install -e '.[serve]')")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, token) of a real `fromface serve` with the default model and an empty gallery."""
    _need_modules()
    tmp = tmp_path_factory.mktemp("web")
    token = secrets.token_urlsafe(24)
    (tmp / "token").write_text(token + "\n")
    for base in serving(["--db", str(tmp / "gallery.db"), "--token-file", str(tmp / "token"),
                         "--max-upload-mb", str(UPLOAD_LIMIT_MB)], tmp):
        yield base, token


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver, both found on PATH (no download: Selenium Manager is not used)."""
    _need_modules()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _missing("needs Chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},900", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------------ helpers
def open_tab(browser, server, tab: str, token: str | None = None) -> None:
    """Load the page on ``tab``, wait until it has read the service's limits, and type the token (the right one
    unless given)."""
    from selenium.webdriver.support.ui import WebDriverWait

    base, right = server
    browser.get("about:blank")
    browser.get(f"{base}/#{tab}")
    WebDriverWait(browser, WAIT).until(lambda d: "model " in d.find_element("id", "service").text)
    field = browser.find_element("id", "token")
    field.clear()
    field.send_keys(right if token is None else token)
    assert browser.find_element("id", f"panel-{tab}").is_displayed()


def pick(browser, input_id: str, *paths: Path) -> None:
    """Choose files in a file input, as the file picker would."""
    browser.find_element("id", input_id).send_keys("\n".join(str(p) for p in paths))


def outcome(browser, prefix: str) -> tuple[str, str]:
    """Submit ``prefix``'s form and wait for its answer: ("error", the error line) or ("result", the result area)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element("id", f"{prefix}-go").click()

    def answered(d):
        error = d.find_element("id", f"{prefix}-error")
        if error.is_displayed():
            return "error", error.text
        if d.find_elements("id", f"{prefix}-verdict"):
            return "result", d.find_element("id", f"{prefix}-result").text
        return False

    return WebDriverWait(browser, WAIT).until(answered)


def screenshot(browser, name: str, tmp_path: Path) -> Path:
    """The whole page as PNG in tmp_path, copied to $FROMFACE_SCREENSHOTS when that is set."""
    height, chrome = browser.execute_script("return [document.documentElement.scrollHeight, "
                                            "window.outerHeight - window.innerHeight]")
    browser.set_window_size(WIDTH, max(600, min(int(height) + 16, 2400)) + int(chrome))
    path = tmp_path / f"web-{name}.png"
    assert browser.save_screenshot(str(path))
    browser.set_window_size(WIDTH, 900)
    with Image.open(path) as shot:
        assert shot.width >= WIDTH * 0.9 and len(np.unique(np.asarray(shot.convert("L")))) > 50  # not a blank
    out = os.environ.get("FROMFACE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
    return path


def faces_shown(browser, prefix: str) -> list[str]:
    """Captions of the faces in a result, checking that each face picture was received and decoded."""
    figures = browser.find_elements("css selector", f"#{prefix}-result figure.face")
    for fig in figures:
        img = fig.find_element("tag name", "img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 224
    return [fig.find_element("tag name", "figcaption").text for fig in figures]


def image_file(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------------------ the page itself
def test_page_loads_without_token_but_the_api_needs_it(server):
    base, _ = server
    with urllib.request.urlopen(base + "/", timeout=WAIT) as resp:
        html, headers = resp.read().decode(), resp.headers
    assert headers["Content-Type"].startswith("text/html") and 'id="panel-verify"' in html
    assert "default-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert "http" not in html.replace(" http-equiv", "")  # nothing fetched from elsewhere: it works offline
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{base}/static/{name}", timeout=WAIT) as resp:
            assert resp.headers["Content-Type"].startswith(kind) and resp.read()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/static/secrets.py", timeout=WAIT)
    assert missing.value.code == 404
    req = urllib.request.Request(base + "/verify", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=WAIT)
    assert refused.value.code == 401


def test_wrong_token_says_how_to_fix_it(server, browser):
    open_tab(browser, server, "verify", token="not-the-token")
    pick(browser, "verify-a", EXAMPLES / "person_a_1.jpg")
    pick(browser, "verify-b", EXAMPLES / "person_a_2.jpg")
    kind, text = outcome(browser, "verify")
    assert kind == "error" and "Authorization: Bearer" in text and "Token field" in text


# ------------------------------------------------------------------------------------------------ Verify
@pytest.mark.data("lfw/images")
def test_verify_two_lfw_photos_of_one_person_says_same(server, browser):
    a, b = (LFW_IMAGES / "Aaron_Peirsol" / f"Aaron_Peirsol_000{k}.jpg" for k in (1, 3))
    open_tab(browser, server, "verify")
    pick(browser, "verify-a", a)
    pick(browser, "verify-b", b)
    kind, text = outcome(browser, "verify")
    assert kind == "result", text
    assert browser.find_element("id", "verify-verdict").text == "Same person"
    facts = dict(zip(*[[e.text for e in browser.find_elements("css selector", f"#verify-result .facts {t}")]
                       for t in ("dt", "dd")]))
    assert float(facts["score"]) >= float(facts["threshold"]) > 0 and facts["condition"] == "clean"
    captions = faces_shown(browser, "verify")
    assert [c.splitlines()[0] for c in captions] == ["A: Aaron_Peirsol_0001.jpg", "B: Aaron_Peirsol_0003.jpg"]
    assert all("visible" in c for c in captions)


def test_verify_masked_pair_shows_the_occlusion(server, browser, tmp_path):
    open_tab(browser, server, "verify")
    pick(browser, "verify-a", EXAMPLES / "person_a_1.jpg")
    pick(browser, "verify-b", EXAMPLES / "person_a_2_occluded.png")
    kind, text = outcome(browser, "verify")
    assert kind == "result", text
    assert browser.find_element("id", "verify-verdict").text == "Same person" and "occluded" in text
    a, b = faces_shown(browser, "verify")
    assert "clean: pattern 0" in a and "occluded: pattern" in b
    assert "nothing covered" in a and "mouth" in b and "covered" in b  # the occlusion report, in words
    screenshot(browser, "verify", tmp_path)


def test_verify_two_people_says_different(server, browser):
    open_tab(browser, server, "verify")
    pick(browser, "verify-a", EXAMPLES / "person_a_2.jpg")
    pick(browser, "verify-b", EXAMPLES / "person_b.jpg")
    kind, text = outcome(browser, "verify")
    assert kind == "result", text
    assert browser.find_element("id", "verify-verdict").text == "Different people"


@pytest.mark.parametrize("case", ["not an image", "no face", "too large", "too large, checked by the service"])
def test_bad_uploads_show_a_clear_message(server, browser, tmp_path, case):
    rng = np.random.default_rng(0)
    if case == "not an image":
        bad = tmp_path / "notes.txt"
        bad.write_text("just some notes, not a photo\n")
        want = "field 'a' (notes.txt): not a recognised image format"  # the service's own detail
    elif case == "no face":
        bad = image_file(tmp_path / "grey.png", np.full((160, 160, 3), 128, np.uint8))
        want = "field 'a' (grey.png): no face found"
    else:
        bad = image_file(tmp_path / "big.png", rng.integers(0, 256, (600, 600, 3), dtype=np.uint8))  # ~1 MB
        want = f"Too large: big.png is 1.0 MB; the service accepts files up to {UPLOAD_LIMIT_MB:.2f} MB."
    open_tab(browser, server, "verify")
    if case.endswith("by the service"):  # past the page's own check: the service's 413 detail is shown
        browser.execute_script("service.limits.max_upload_bytes = 1e9")
        want = f"Too large: field 'a' (big.png): upload is over the limit of {int(UPLOAD_LIMIT_MB * 2**20):,} bytes."
    pick(browser, "verify-a", bad)
    pick(browser, "verify-b", EXAMPLES / "person_a_1.jpg")
    kind, text = outcome(browser, "verify")
    assert kind == "error" and want in text, text
    assert browser.find_element("id", "verify-result").text == ""  # no stale verdict next to the error


def test_a_dropped_file_is_the_one_sent(server, browser):
    open_tab(browser, server, "verify")
    browser.execute_script("""
        const files = new DataTransfer();
        files.items.add(new File(["a note, dropped"], "dropped.txt", {type: "text/plain"}));
        document.getElementById("drop-a").dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true}));
    """)
    assert browser.find_element("css selector", "#drop-a .hint").text == "dropped.txt"
    pick(browser, "verify-b", EXAMPLES / "person_a_1.jpg")
    kind, text = outcome(browser, "verify")
    assert kind == "error" and "field 'a' (dropped.txt): not a recognised image format" in text, text


# ------------------------------------------------------------------------------------------------ Enrol, Identify
def test_enrol_then_identify(server, browser, tmp_path):
    again = tmp_path / "person_a_1_again.jpg"
    shutil.copy(EXAMPLES / "person_a_1.jpg", again)
    open_tab(browser, server, "enrol")
    browser.find_element("id", "enrol-name").send_keys("Colin Powell")
    pick(browser, "enrol-images", EXAMPLES / "person_a_1.jpg", EXAMPLES / "person_a_2.jpg", again)
    kind, text = outcome(browser, "enrol")
    assert kind == "result", text
    assert browser.find_element("id", "enrol-verdict").text == \
        "Added 2 photos to Colin Powell; Colin Powell now has 2 templates."
    skipped = [li.text for li in browser.find_elements("css selector", "#enrol-skipped li")]
    assert skipped == ["person_a_1_again.jpg: same image as person_a_1.jpg"]
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT).until(lambda d: "1 identity, 2 templates" in d.find_element("id", "service").text)
    screenshot(browser, "enrol", tmp_path)
    kind, text = outcome(browser, "enrol")  # the same name again, without "add to this name"
    assert kind == "error" and "'Colin Powell' is already enrolled" in text

    open_tab(browser, server, "identify")
    pick(browser, "identify-image", EXAMPLES / "person_a_2_occluded.png")
    kind, text = outcome(browser, "identify")
    assert kind == "result", text
    assert browser.find_element("id", "identify-verdict").text == "Best match: Colin Powell"
    rows = [[td.text for td in tr.find_elements("tag name", "td")]
            for tr in browser.find_elements("css selector", "#identify-matches tbody tr")]
    assert len(rows) == 1 and rows[0][0] == "Colin Powell" and rows[0][4:] == ["match", "clean"]
    assert float(rows[0][1]) >= float(rows[0][2]) and rows[0][3] == "occluded"
    (caption,) = faces_shown(browser, "identify")
    assert "occluded: pattern" in caption
    screenshot(browser, "identify", tmp_path)

    pick(browser, "identify-image", EXAMPLES / "person_b.jpg")
    kind, text = outcome(browser, "identify")
    assert kind == "result", text
    assert browser.find_element("id", "identify-verdict").text.startswith("Unknown")
    assert [td.text for td in browser.find_elements("css selector", "#identify-matches td")][4] == "below threshold"


def test_occlusion_report_summary_is_shown_under_each_face(server, browser):
    """The service adds ``occlusion_report`` to each face (None for plain models): its summary goes under the face;
    a face without one still shows its pattern line. Rendered by the page's own code from a made-up answer."""
    open_tab(browser, server, "verify")
    face = {"source": "a.jpg", "method": "detected", "occluded": True, "pattern": 202, "pattern_probability": 0.3,
            "visible_fraction": 0.84, "faces_found": 1, "selected": "largest", "heatmap": [[1.0]], "panel": None,
            "occlusion_report": {"covered": ["mouth", "nose"],
                                 "summary": "mouth and nose covered; compared mostly on the eyes"}}
    plain = {**face, "source": "b.jpg", "occluded": None, "pattern": None, "pattern_probability": None,
             "visible_fraction": None, "heatmap": None, "occlusion_report": None}
    answer = {"same": False, "score": 0.1, "threshold": 0.4, "condition": "occluded", "reason": "calibrated",
              "faces": [face, plain]}
    captions = browser.execute_script(
        "return Array.from(renderVerify(arguments[0])[2].querySelectorAll('figcaption'), "
        "(c) => Array.from(c.children, (line) => line.textContent).join('\\n'))", answer)
    assert captions == ["A: a.jpg\noccluded: pattern 202 (p=0.30), visible 84%\n"
                        "mouth and nose covered; compared mostly on the eyes",
                        "B: b.jpg\ndetected, no occlusion estimate"]
