"""The REST service, tested against a real uvicorn server on 127.0.0.1 in a subprocess (bounded requests)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 60  # seconds per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, files: list[tuple[str, str, bytes]], fields: dict | None = None) -> tuple[int, dict]:
    """multipart/form-data POST with the standard library; returns (status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for key, value in (fields or {}).items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, filename, data in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return _send(req)


def _send(req) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    db = tmp_path_factory.mktemp("serve") / "gallery.db"
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r}); from fromface.cli.main import main; "
           "sys.exit(main())", "serve", "--port", str(port), "--db", str(db), "--model", "from_mobilefacenet",
           "--fallback", "--max-upload-mb", "0.05", "--max-pixels", "250000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /health within 120 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_health(server):
    with urllib.request.urlopen(server + "/health", timeout=TIMEOUT) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "ok" and body["model"] == "from_mobilefacenet" and body["gallery"]["templates"] == 0


def test_verify_enroll_identify(server):
    status, v = post(server + "/verify", [("a", "a.png", png(1)), ("b", "b.png", png(1))])
    assert status == 200 and v["same"] is True and v["score"] == pytest.approx(1.0, abs=1e-4)
    assert v["reason"] == "uncalibrated" and v["faces"][0]["source"] == "a.png"
    assert len(v["faces"][1]["heatmap"]) == 7 and v["faces"][1]["method"] == "fallback"
    status, e = post(server + "/enroll", [("images", "x1.png", png(2)), ("images", "x2.png", png(3))],
                     {"name": "xavier"})
    assert status == 200 and e == {"name": "xavier", "added": 2, "skipped": [], "templates": 2}
    status, e = post(server + "/enroll", [("images", "y.png", png(4))], {"name": "yvonne"})
    assert status == 200
    status, ident = post(server + "/identify", [("image", "q.png", png(3))], {"top_k": "2"})
    assert status == 200 and [m["name"] for m in ident["matches"]] == ["xavier", "yvonne"]
    assert ident["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4) and ident["matches"][0]["same"] is True


def test_errors_are_json(server):
    status, body = post(server + "/verify", [("a", "broken.jpg", b"\xff\xd8 not a jpeg"), ("b", "b.png", png(1))])
    assert status == 400 and body["error"] == "ImageError" and "broken.jpg" in body["detail"]
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # ~120 kB as PNG > 0.05 MB
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    status, body = post(server + "/verify", [("a", "big.png", buf.getvalue()), ("b", "b.png", png(1))])
    assert status == 413 and body["error"] == "UploadTooLarge" and "big.png" in body["detail"]
    wide = io.BytesIO()
    Image.new("RGB", (600, 600), (90, 120, 150)).save(wide, format="PNG")  # small file, 360,000 pixels > 250,000
    status, body = post(server + "/verify", [("a", "wide.png", wide.getvalue()), ("b", "b.png", png(1))])
    assert status == 400 and "over the limit" in body["detail"] and "wide.png" in body["detail"]
    status, body = post(server + "/verify", [("a", "a.png", png(1))])
    assert status == 400 and body["error"] == "BadRequest" and "b" in body["detail"]
    status, body = post(server + "/enroll", [("images", "e.png", b"")], {"name": "empty"})
    assert status == 400 and "empty" in body["detail"]
    # A body announced as too large is refused from its headers alone, before any of it is sent.
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    conn.putrequest("POST", "/identify")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and body["error"] == "UploadTooLarge" and "over the limit" in body["detail"]


def test_concurrent_requests(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int):
        return post(server + "/verify", [("a", "a.png", png(seed)), ("b", "b.png", png(seed))])

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(one, [11, 12, 13]))
    assert all(status == 200 and body["same"] for status, body in answers)
