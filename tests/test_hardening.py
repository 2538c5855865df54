"""Hostile and careless use: nothing in a file runs code, nothing a user owns is overwritten, nothing enrolled is lost.

Each test reproduces a defect a user could hit (a crafted checkpoint or gallery, an output path that is a folder, a
second person under an existing name, a chunked upload past the limit, ...) and checks the one-line refusal or the
kept data. Synthetic photos go through the centre-crop fallback, so only the group-photo test needs LFW.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, start_server
from fromface.cli.main import main
from fromface.errors import ConfigError, DataError, ImageError

LFW = LFW_IMAGES
TIMEOUT = 60


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file, as an attacker's code would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def save(path: Path, seed: int, size: int = 96) -> str:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR).save(path)
    return str(path)


def write_ckpt(path: Path, seed: int) -> str:
    import torch

    from fromface.models import create_model

    torch.manual_seed(seed)
    net = create_model("from_mobilefacenet", embedding_dim=128)
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128},
                "state_dict": net.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return write_ckpt(tmp_path_factory.mktemp("ckpt") / "model.pt", 0)


@pytest.fixture()
def evil(tmp_path):
    """A checkpoint that runs code when unpickled, and the file its payload would create."""
    import torch

    from fromface.models import create_model

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    net = create_model("from_mobilefacenet", embedding_dim=128)
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128},
                "state_dict": net.state_dict(), "extra": Payload(marker)}, path)
    return path, marker


# ---------------------------------------------------------------------------------------- 1. no code from data
def test_malicious_checkpoint_is_refused_not_run(evil, tmp_path, capsys):
    from fromface.evaluation.embedders import load_embedder
    from fromface.inference.recognizer import FaceRecognizer

    path, marker = evil
    with pytest.raises(ConfigError, match="never runs code"):
        FaceRecognizer(str(path))
    with pytest.raises(ConfigError, match="never runs code"):
        load_embedder(str(path))  # fromface eval --model evil.pt
    a = save(tmp_path / "a.png", 1)
    assert main(["verify", a, a, "--model", str(path), "--fallback"]) == 2
    assert "never runs code" in capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's payload ran"


def _gallery_naming(db: Path, source: str, model: str, schema: int) -> None:
    """A gallery file as someone else could hand it over: its meta names a model file."""
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE schema_version (version INTEGER NOT NULL);"
                      "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL);"
                      "CREATE TABLE templates (id INTEGER PRIMARY KEY, identity_id INTEGER NOT NULL, embedding BLOB, "
                      "dim INTEGER, occluded INTEGER, pattern INTEGER, visible_fraction REAL, source TEXT, "
                      "created REAL);")
    if schema >= 2:
        con.execute("ALTER TABLE templates ADD COLUMN digest TEXT")
    con.execute("INSERT INTO schema_version VALUES (?)", (schema,))
    meta = {"dim": "128", "model": model, "source": source}
    if schema >= 2:
        meta["model_id"] = model
    con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
    con.execute("INSERT INTO identities VALUES (1, 'victim', 0)")
    con.execute("INSERT INTO templates(id, identity_id, embedding, dim, occluded, pattern, visible_fraction, source, "
                "created) VALUES (1, 1, ?, 128, 0, 0, 1.0, 'x', 0)", (np.ones(128, "<f4").tobytes(),))
    con.commit()
    con.close()


@pytest.mark.parametrize("schema", [1, 2])
def test_gallery_naming_a_model_file_loads_nothing(evil, tmp_path, capsys, schema):
    path, marker = evil
    db = tmp_path / f"g{schema}.db"
    _gallery_naming(db, str(path), "from_mobilefacenet" if schema == 1 else "sha256:" + "0" * 64, schema)
    probe = save(tmp_path / "probe.png", 3)
    for argv in (["identify", probe, "--db", str(db), "--fallback"],
                 ["enroll", probe, "--name", "x", "--db", str(db), "--fallback"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not load a model a gallery names" in err and "--model PATH" in err
    assert not marker.exists(), "a model named by the gallery was loaded"


# ---------------------------------------------------------------------------------------- 2. nothing overwritten
def test_export_refuses_to_overwrite_and_leaves_nothing_behind(ckpt, tmp_path, capsys, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the user's file")
    assert main(["export", "onnx", str(target), "--model", ckpt]) == 2
    assert "already exists; use --force" in capsys.readouterr().err
    assert target.read_bytes() == b"the user's file"
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    assert main(["export", "onnx", str(folder), "--model", ckpt]) == 2
    assert "is a folder" in capsys.readouterr().err and list(folder.iterdir()) == []
    assert main(["export", "onnx", "/proc/model.onnx", "--model", ckpt]) == 2  # not writable, even by root
    err = capsys.readouterr().err
    assert "cannot write into /proc" in err and "Traceback" not in err
    # A failure after the graph was written (disk full, say) removes the temporary file too.
    pytest.importorskip("onnxscript")
    import onnx

    from fromface.inference.onnx_backend import export_onnx
    from fromface.models.checkpoint import load_model

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match="No space left"):
        export_onnx(load_model(ckpt), out / "m.onnx")
    assert list(out.iterdir()) == []


def test_align_keeps_images_that_share_a_name(tmp_path, capsys):
    src = tmp_path / "src"
    for ext in ("jpg", "png"):
        save(src / "person" / f"face.{ext}", 1 if ext == "jpg" else 2, size=120)
    save(src / "person" / "other.png", 3, size=120)
    dst = tmp_path / "dst"
    assert main(["align", str(src), str(dst), "--fallback", "--no-progress"]) == 0
    capsys.readouterr()
    import csv

    rows = {r["source"]: r for r in csv.DictReader((dst / "align_results.csv").open())}
    outputs = {k: r["outputs"] for k, r in rows.items()}
    assert outputs == {"person/face.jpg": "person/face_jpg.png", "person/face.png": "person/face_png.png",
                       "person/other.png": "person/other.png"}
    a, b = (np.asarray(Image.open(dst / outputs[f"person/face.{e}"])) for e in ("jpg", "png"))
    assert a.shape == b.shape and not np.array_equal(a, b)  # two crops, of two photos


def test_outputs_are_checked_before_the_work(ckpt, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    save(imgs / "a.png", 5)
    a_file = tmp_path / "exists.txt"
    a_file.write_text("keep me")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(f"{imgs / 'a.png'}\t{imgs / 'a.png'}\t1\n")
    assert main(["eval", "--pairs", str(pairs), "--model", ckpt, "--out", str(a_file)]) == 2
    assert "is a file, expected an output folder" in capsys.readouterr().err and a_file.read_text() == "keep me"
    old = tmp_path / "old.npz"
    old.write_bytes(b"earlier embeddings")
    for out, problem in ((tmp_path / "missing" / "e.npz", "does not exist"), (tmp_path, "is a folder"),
                         (old, "already exists; use --force")):
        assert main(["embed", str(imgs), "-o", str(out), "--model", ckpt, "--fallback"]) == 2
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, err
    assert old.read_bytes() == b"earlier embeddings"


# ---------------------------------------------------------------------------------------- 3. nothing lost or merged
def test_enrol_modes_digests_and_remove(ckpt, tmp_path, capsys):
    people = tmp_path / "people"
    for k, name in enumerate(("ann", "bob")):
        save(people / name / "1.png", 10 + 2 * k)
        save(people / name / "2.png", 11 + 2 * k)
    db = str(tmp_path / "g.db")
    base = ["--db", db, "--model", ckpt, "--fallback"]
    assert main(["enroll", str(people), *base]) == 0
    capsys.readouterr()
    assert main(["enroll", str(people), *base]) == 0  # a re-run (after a kill, say) adds nothing twice
    out = capsys.readouterr()
    assert "enrolled ann: 0 templates added, 2 already enrolled" in out.out and "2 identities, 4 templates" in out.out
    assert "already enrolled as 'ann'" in out.err
    stranger = save(tmp_path / "stranger.png", 30)
    assert main(["enroll", stranger, "--name", "ann", *base]) == 1  # another person under a taken name: skipped
    err = capsys.readouterr().err
    assert "'ann' is already enrolled (2 templates)" in err and "--add" in err and "mode=" not in err
    assert main(["enroll", stranger, "--name", "ann", "--add", *base]) == 0
    assert "enrolled ann: 1 template added (3 in all)" in capsys.readouterr().out
    assert main(["remove", "ann", "--db", db]) == 0
    assert "removed ann: 3 templates" in capsys.readouterr().out
    assert main(["remove", "ann", "--db", db]) == 1
    assert "ann: not enrolled" in capsys.readouterr().err


def test_identify_with_another_model_is_refused(ckpt, tmp_path, capsys):
    other = write_ckpt(tmp_path / "other.pt", 1)  # same architecture and embedding size, other weights
    db = str(tmp_path / "g.db")
    assert main(["enroll", save(tmp_path / "a.png", 1), "--name", "ann", "--db", db, "--model", ckpt,
                 "--fallback"]) == 0
    capsys.readouterr()
    assert main(["identify", save(tmp_path / "q.png", 2), "--db", db, "--model", other, "--fallback"]) == 2
    err = capsys.readouterr().err
    digest = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert f"enrolled with model sha256:{digest}" in err and ckpt in err
    assert "sha256:" + hashlib.sha256(Path(other).read_bytes()).hexdigest() in err


def test_read_only_commands_never_write(ckpt, tmp_path, capsys):
    probe = save(tmp_path / "q.png", 2)
    empty = tmp_path / "empty.db"
    empty.touch()
    foreign = tmp_path / "notes.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    assert main(["identify", probe, "--db", str(empty), "--model", ckpt, "--fallback"]) == 2
    assert "empty file, not a fromface gallery" in capsys.readouterr().err
    assert empty.stat().st_size == 0
    for command in (["identify", probe], ["enroll", probe, "--name", "x"]):
        assert main([*command, "--db", str(foreign), "--model", ckpt, "--fallback"]) == 2
        assert "not a fromface gallery" in capsys.readouterr().err
    assert foreign.read_bytes() == before and not Path(f"{foreign}-wal").exists()  # still in its own journal mode
    from fromface.inference.gallery import Gallery, Template

    db = tmp_path / "g.db"
    with Gallery(db) as g:
        g.enroll_templates("ann", [Template(np.ones(8))])
    stamp = (db.read_bytes(), db.stat().st_mtime_ns)
    with Gallery(db, read_only=True) as g:
        assert g.counts() == {"ann": 1} and g.search(np.ones(8))[0].name == "ann"
        with pytest.raises(DataError, match="read-only"):
            g.enroll_templates("bob", [Template(np.ones(8))])
    assert (db.read_bytes(), db.stat().st_mtime_ns) == stamp


def test_identity_names_are_checked(tmp_path):
    from fromface.errors import AlreadyEnrolledError
    from fromface.inference.gallery import Gallery, Template, check_name

    assert check_name("  Zoë O'Neil-Ng  ") == "Zoë O'Neil-Ng"
    with Gallery(tmp_path / "g.db") as g:
        for bad, why in (("x" * 1_000_000, "over the limit of 200"), ("ann\x00", "control character"),
                         ("two\nlines", "control character")):
            with pytest.raises(DataError, match=why):
                g.enroll_templates(bad, [Template(np.ones(8))])
        assert g.names() == []
        with pytest.raises(AlreadyEnrolledError):
            g.enroll_templates("ann", [Template(np.ones(8))])
            g.enroll_templates("ann", [Template(-np.ones(8))])
        with pytest.raises(ConfigError, match="top_k must be at least 1"):
            g.search(np.ones(8), top_k=0)


# ---------------------------------------------------------------------------------------- 4. the REST service
def _start(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    proc, base, _ = start_server(args, tmp_path)
    return proc, base


def _multipart(files: list[tuple[str, str, bytes]], fields: dict | None = None) -> tuple[bytes, str]:
    boundary = "fromfaceboundary"
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(base: str, route: str, files, fields=None, headers=None) -> tuple[int, dict]:
    body, kind = _multipart(files, fields)
    req = urllib.request.Request(base + route, data=body, method="POST",
                                 headers={"Content-Type": kind, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png(seed: int) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.BILINEAR).save(
        buf, format="PNG")
    return buf.getvalue()


TOKEN = "s3cret-token-for-the-tests-only"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, ckpt):
    """A real `fromface serve` with a token, small limits, a gallery and no centre-crop fallback."""
    tmp = tmp_path_factory.mktemp("guarded")
    (tmp / "token").write_text(TOKEN + "\n")
    proc, base = _start(["--db", str(tmp / "gallery.db"), "--model", ckpt, "--token-file", str(tmp / "token"),
                         "--max-upload-mb", "0.05", "--allow-origin", "https://app.example.org"], tmp)
    yield base
    proc.kill()
    proc.wait(timeout=20)


def test_chunked_upload_over_the_limit_is_cut_off(guarded):
    from urllib.parse import urlparse

    url = urlparse(guarded)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    sent = 0

    def chunks():
        nonlocal sent
        yield b'--fromfaceboundary\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n\r\n'
        for _ in range(300):  # 300 MB announced nowhere: no Content-Length, chunked transfer encoding
            sent += 1
            yield b"\0" * (1 << 20)

    try:
        conn.request("POST", "/identify", body=chunks(), encode_chunked=True,
                     headers={"Content-Type": "multipart/form-data; boundary=fromfaceboundary",
                              "Authorization": f"Bearer {TOKEN}"})
    except OSError:  # the server answered and closed while we were still sending: what it should do
        pass
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and body["error"] == "UploadTooLarge", body
    assert sent < 300, "the whole body was read before the limit applied"


def test_token_and_origin(guarded):
    with urllib.request.urlopen(guarded + "/health", timeout=TIMEOUT) as resp:  # open to monitors
        health = json.loads(resp.read())
    assert health["gallery"]["name"] == "gallery.db" and "path" not in health["gallery"]
    files = [("image", "q.png", _png(1))]
    assert _post(guarded, "/identify", files)[0] == 401
    assert _post(guarded, "/identify", files, headers={"Authorization": "Bearer wrong"})[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body = _post(guarded, "/identify", files, headers=auth)
    assert status == 422 and body["detail"] == "field 'image' (q.png): no face found"  # past the token check
    evil_page = {**auth, "Origin": "https://evil.example"}
    status, body = _post(guarded, "/identify", files, headers=evil_page)
    assert status == 403 and "--allow-origin https://evil.example" in body["detail"]
    assert _post(guarded, "/identify", files, headers={**auth, "Origin": "https://app.example.org"})[0] == 422
    status, body = _post(guarded, "/enroll", files=[("images", "a.png", _png(1))],
                         fields={"name": "x" * 1000}, headers=auth)
    assert status == 400 and "over the limit of 200" in body["detail"]
    status, body = _post(guarded, "/enroll", files=[("images", "a.png", _png(1))],
                         fields={"name": "bad\x01name"}, headers=auth)
    assert status == 400 and "control character" in body["detail"]


def test_sigterm_leaves_every_enrolment_in_the_db_file(ckpt, tmp_path):
    db = tmp_path / "gallery.db"
    proc, base = _start(["--db", str(db), "--model", ckpt, "--fallback"], tmp_path)
    try:
        status, body = _post(base, "/enroll", [("images", "a.png", _png(1)), ("images", "b.png", _png(2))],
                             {"name": "ann"})
        assert status == 200 and body["added"] == 2
        status, body = _post(base, "/enroll", [("images", "a.png", _png(1))], {"name": "ann", "mode": "add"})
        assert status == 200 and body["added"] == 0 and "already enrolled as 'ann'" in body["skipped"][0]
        assert _post(base, "/enroll", [("images", "c.png", _png(3))], {"name": "ann"})[0] == 409
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    copy = tmp_path / "copy" / "gallery.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)  # the .db alone, without its -wal
    con = sqlite3.connect(copy)
    assert con.execute("SELECT name FROM identities").fetchall() == [("ann",)]
    assert con.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 2
    con.close()


def test_serve_validates_its_port_first(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--port", "99999", "--model", ckpt])
    assert stop.value.code == 2 and "port must be between 1 and 65535" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", ckpt]) == 2
    out = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in out.err and "serving" not in out.out


@pytest.mark.data("lfw/images")
def test_rest_reports_how_many_faces_were_found(guarded):
    a, b = LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg", LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
    import io

    buf = io.BytesIO()
    group = np.concatenate([np.asarray(Image.open(a)), np.asarray(Image.open(b))], axis=1)
    Image.fromarray(group).resize((250, 125)).save(buf, format="JPEG", quality=80)  # under the 0.05 MB limit
    status, body = _post(guarded, "/verify", [("a", "group.jpg", buf.getvalue()), ("b", "a.jpg", a.read_bytes())],
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    faces = body["faces"]
    assert faces[0]["faces_found"] == 2 and faces[0]["selected"] == "largest" and faces[1]["faces_found"] == 1


# ---------------------------------------------------------------------------------------- 5. smaller things
def test_folder_scans_list_what_they_skip(ckpt, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    save(imgs / "a.png", 1)
    Image.open(save(imgs / "b.png", 2)).save(imgs / "c.gif")
    (imgs / "b.png").unlink()
    (imgs / "notes.txt").write_text("not a photo")
    (imgs / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64)
    out = tmp_path / "e.npz"
    assert main(["embed", str(imgs), "-o", str(out), "--model", ckpt, "--fallback"]) == 0
    err = capsys.readouterr().err
    data = np.load(out)
    assert sorted(data["paths"]) == ["a.png", "c.gif"]
    assert "notes.txt: not an image file (extension .txt" in err
    assert "phone.heic: HEIC/HEIF images are not supported; convert it to JPEG" in err
    with pytest.raises(ImageError, match="HEIC/HEIF"):
        from fromface.data.images import load_image

        load_image(imgs / "phone.heic")


def test_config_and_cli_wording(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["train", str(config), "--print-config"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    good = tmp_path / "ok.yaml"
    good.write_text("name: run\ndata: {train: somewhere}\n")
    assert main(["train", str(good), "--print-config", "optim.lr=0.5", "seed=7"]) == 0  # overrides after a flag
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "seed: 7" in printed
    blank = tmp_path / "blank.png"
    Image.new("RGB", (96, 96), (128, 128, 128)).save(blank)
    assert main(["verify", str(blank), str(blank), "--model", "from_mobilefacenet"]) == 2
    err = capsys.readouterr().err
    assert "use --fallback" in err and "fallback=True" not in err
    with pytest.raises(SystemExit):
        main(["identify", str(blank), "--db", str(tmp_path / "g.db"), "--top", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_default_names_the_default_model(capsys):
    from fromface.evaluation.embedders import load_embedder
    from fromface.inference.face_model import default_model_spec
    from fromface.inference.recognizer import FaceRecognizer

    spec = default_model_spec()
    rec = FaceRecognizer("default")
    assert rec.model_id == spec and ":" in spec
    assert load_embedder("default").name == spec  # fromface eval --model default
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    name, tag = spec.split(":")
    terms = rows[name]["tags"][tag]
    assert terms["default"] and "non-commercial" in terms["licence"]
    assert any("CelebA" in d["name"] for d in terms["training_data"])
    assert terms["trunk"]["licence"] == "Apache-2.0" and rows[name]["licence"] == "non-commercial"
