"""The REST service, tested against real uvicorn servers on 127.0.0.1 in subprocesses (bounded requests).

Three servers, one per kind, each started once for the module: ``server`` (untrained model, centre-crop fallback, an
empty gallery), ``bare`` (no gallery, no fallback) and ``crowded`` (a gallery of more identities than /identify may
return, no fallback). The limits checked are the documented ones (docs/security.md), not the constants in the app.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, serving

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

TIMEOUT = 60  # seconds per request


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
    tmp = tmp_path_factory.mktemp("serve")
    yield from serving(["--db", str(tmp / "gallery.db"), "--model", "from_mobilefacenet", "--fallback",
                       "--max-upload-mb", "0.05", "--max-pixels", "250000"], tmp)


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


# ---------------------------------------------------------------------------------------- limits, 404, 422, top_k
#: docs/security.md, "The REST service": files in one /enroll, and the range /identify's top_k is clamped to.
DOCUMENTED_MAX_FILES = 20
DOCUMENTED_MAX_TOP_K = 100
NO_GALLERY = "no gallery configured: start the server with --db gallery.db"


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


def blank_png(size: int = 112) -> bytes:
    """A flat grey picture: no detector finds a face in it."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small FROM checkpoint (128-d): a model file, so a gallery can be filled for it before the server starts."""
    import torch

    from fromface.models import create_model

    torch.manual_seed(0)
    net = create_model("from_mobilefacenet", embedding_dim=128)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128},
                "state_dict": net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def bare(tmp_path_factory, ckpt):
    """No --db and no --fallback."""
    yield from serving(["--model", str(ckpt)], tmp_path_factory.mktemp("bare"))


CROWD = 120  # identities in the crowded gallery: more than /identify may return


@pytest.fixture(scope="module")
def crowded(tmp_path_factory, ckpt):
    """A gallery of CROWD identities enrolled for ``ckpt`` before the server starts, and no --fallback."""
    import hashlib

    from fromface.inference.gallery import Gallery, Template

    tmp = tmp_path_factory.mktemp("crowded")
    rng = np.random.default_rng(7)
    people = {f"p{i:03d}": [Template(rng.standard_normal(128))] for i in range(CROWD)}
    model_id = "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()  # how a model file is named in a gallery
    with Gallery(tmp / "gallery.db") as g:
        assert g.enroll_many(people, model=model_id, source=str(ckpt.resolve())) == CROWD
    yield from serving(["--db", str(tmp / "gallery.db"), "--model", str(ckpt)], tmp)


def test_enroll_file_count_limit(server):
    before = health(server)["gallery"]
    files = [("images", f"f{k}.png", png(1000 + k)) for k in range(DOCUMENTED_MAX_FILES + 1)]  # all distinct
    status, body = post(server + "/enroll", files, {"name": "crowd"})
    assert status == 413, body
    assert f"{DOCUMENTED_MAX_FILES + 1} files" in body["detail"]
    assert f"the limit is {DOCUMENTED_MAX_FILES}" in body["detail"]
    assert health(server)["gallery"] == before  # nothing enrolled, not even the first 20
    status, body = post(server + "/enroll", files[:DOCUMENTED_MAX_FILES], {"name": "crowd"})
    assert status == 200, body
    assert body == {"name": "crowd", "added": DOCUMENTED_MAX_FILES, "skipped": [],
                    "templates": DOCUMENTED_MAX_FILES}
    after = health(server)["gallery"]
    assert after["identities"] == before["identities"] + 1
    assert after["templates"] == before["templates"] + DOCUMENTED_MAX_FILES


def test_identify_top_k_is_clamped(server):
    for k, name in enumerate(("tk-a", "tk-b", "tk-c")):
        status, body = post(server + "/enroll", [("images", f"{name}.png", png(2000 + k))], {"name": name})
        assert status == 200 and body["added"] == 1, body
    identities = health(server)["gallery"]["identities"]
    assert 3 <= identities < DOCUMENTED_MAX_TOP_K
    probe = [("image", "q.png", png(2000))]  # tk-a's own photo: tk-a scores 1.0
    for top_k, want in (("0", 1), ("-5", 1), ("2", 2), (str(10**9), identities)):
        status, body = post(server + "/identify", probe, {"top_k": top_k})
        assert status == 200, (top_k, body)
        names = [m["name"] for m in body["matches"]]
        assert len(names) == want and len(set(names)) == want, (top_k, names)
        assert names[0] == "tk-a" and body["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [m["score"] for m in body["matches"]]
        assert scores == sorted(scores, reverse=True)


def test_no_gallery_is_404(bare):
    assert health(bare)["gallery"] is None
    status, body = post(bare + "/identify", [("image", "q.png", png(1))])
    assert (status, body) == (404, {"error": "HTTPError", "detail": NO_GALLERY})
    status, body = post(bare + "/enroll", [("images", "a.png", png(1))], {"name": "ann"})
    assert (status, body) == (404, {"error": "HTTPError", "detail": NO_GALLERY})


def test_no_face_is_422_naming_field_and_file(bare, crowded):
    # _status_of maps NoFaceError to 422; the detail names the form field and the uploaded file.
    status, body = post(bare + "/verify", [("a", "grey.png", blank_png()), ("b", "b.png", png(1))])
    assert (status, body) == (422, {"error": "NoFaceError", "detail": "field 'a' (grey.png): no face found"})
    before = health(crowded)["gallery"]
    status, body = post(crowded + "/identify", [("image", "q.png", blank_png())])
    assert (status, body) == (422, {"error": "NoFaceError", "detail": "field 'image' (q.png): no face found"})
    status, body = post(crowded + "/enroll", [("images", "e0.png", blank_png(120)), ("images", "e1.png", blank_png())],
                        {"name": "nobody"})
    assert (status, body) == (422, {"error": "NoFaceError", "detail": "field 'images[0]' (e0.png): no face found"})
    assert health(crowded)["gallery"] == before


@pytest.mark.data("lfw/images")
def test_no_face_in_one_file_enrols_none_of_them(crowded):
    face = (LFW_IMAGES / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").read_bytes()
    before = health(crowded)["gallery"]
    status, body = post(crowded + "/enroll", [("images", "face.jpg", face), ("images", "grey.png", blank_png())],
                        {"name": "aaron"})
    assert (status, body) == (422, {"error": "NoFaceError", "detail": "field 'images[1]' (grey.png): no face found"})
    assert health(crowded)["gallery"] == before == {"name": "gallery.db", "identities": CROWD, "templates": CROWD}


@pytest.mark.data("lfw/images")
def test_huge_top_k_stops_at_the_documented_limit(crowded):
    probe = [("image", "face.jpg", (LFW_IMAGES / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").read_bytes())]
    assert health(crowded)["gallery"]["identities"] == CROWD > DOCUMENTED_MAX_TOP_K
    for top_k, want in ((str(10**9), DOCUMENTED_MAX_TOP_K), (str(DOCUMENTED_MAX_TOP_K + 1), DOCUMENTED_MAX_TOP_K),
                        ("0", 1)):
        status, body = post(crowded + "/identify", probe, {"top_k": top_k})
        assert status == 200, body
        names = [m["name"] for m in body["matches"]]
        assert len(names) == want and len(set(names)) == want and set(names) <= {f"p{i:03d}" for i in range(CROWD)}
        scores = [m["score"] for m in body["matches"]]
        assert scores == sorted(scores, reverse=True)
