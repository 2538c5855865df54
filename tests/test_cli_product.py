"""The product commands end to end, in process: verify (--json, --show), enroll, identify, embed; bad inputs.

A seeded checkpoint stands in for a trained model so every command loads the same weights; synthetic photos go
through the centre-crop fallback (``--fallback``), so no data is needed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES
from fromface.cli.main import main


def save(path, seed: int, size: int = 96):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR).save(path)
    return str(path)


def test_verify_json_and_show(ckpt, tmp_path, capsys):
    a, b = save(tmp_path / "a.png", 1), save(tmp_path / "b.png", 2)
    show = tmp_path / "pair.png"
    assert main(["verify", a, a, "--json", "--model", ckpt, "--fallback", "--show", str(show)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is True and out["score"] == pytest.approx(1.0, abs=1e-4) and out["reason"] == "uncalibrated"
    assert out["model"] == "from_mobilefacenet" and out["faces"][0]["method"] == "fallback"
    picture = np.asarray(Image.open(show))
    assert picture.shape[1] > 2 * 224 and picture.shape[2] == 3 and picture.std() > 10
    assert main(["verify", a, b, "--model", ckpt, "--fallback", "--threshold", "0.99"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("different people: score") and "user threshold" in text and "visible" in text


def test_verify_bad_inputs(ckpt, tmp_path, capsys):
    a = save(tmp_path / "a.png", 1)
    assert main(["verify", a, str(tmp_path / "nope.jpg"), "--model", ckpt, "--fallback"]) == 2
    assert "nope.jpg: no such file" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert main(["verify", a, str(corrupt), "--model", ckpt, "--fallback"]) == 2
    assert "corrupt.jpg" in capsys.readouterr().err
    blank = tmp_path / "blank.png"
    Image.new("RGB", (96, 96), (128, 128, 128)).save(blank)
    assert main(["verify", str(blank), a, "--model", ckpt]) == 2
    err = capsys.readouterr().err
    assert "blank.png: no face found" in err and "Traceback" not in err
    assert main(["verify", a, a, "--model", ckpt, "--show", str(tmp_path / "no" / "dir.png"), "--fallback"]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_enroll_identify(ckpt, tmp_path, capsys):
    people = tmp_path / "people"
    for k, name in enumerate(("ann", "bob")):
        save(people / name / "1.png", 10 + 2 * k)
        save(people / name / "2.png", 11 + 2 * k)
    (people / "cid").mkdir()
    (people / "cid" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    db = str(tmp_path / "g.db")
    assert main(["enroll", str(people), "--db", db, "--model", ckpt, "--fallback"]) == 1  # cid skipped
    captured = capsys.readouterr()
    assert "enrolled ann: 2 templates" in captured.out and "skipped cid" in captured.err
    assert "2 identities, 4 templates" in captured.out
    extra = save(tmp_path / "dan.png", 20)
    assert main(["enroll", extra, "--db", db, "--name", "dan", "--model", ckpt, "--fallback"]) == 0
    capsys.readouterr()
    assert main(["identify", str(people / "bob" / "2.png"), "--db", db, "--top", "2", "--json",
                 "--model", ckpt, "--fallback"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gallery_templates"] == 5 and len(out["matches"]) == 2
    assert out["matches"][0]["name"] == "bob" and out["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["identify", extra, "--db", db, "--fallback"]) == 2  # a gallery never picks the model file to load
    assert "does not load a model a gallery names" in capsys.readouterr().err
    assert main(["identify", extra, "--db", db, "--fallback", "--model", ckpt]) == 0
    assert "looks like dan" in capsys.readouterr().out


def test_enroll_and_identify_bad_inputs(ckpt, tmp_path, capsys):
    single = save(tmp_path / "one.png", 3)
    assert main(["enroll", single, "--db", str(tmp_path / "g.db"), "--model", ckpt]) == 2
    assert "needs --name" in capsys.readouterr().err
    flat = tmp_path / "flat"
    save(flat / "x.png", 4)
    assert main(["enroll", str(flat), "--db", str(tmp_path / "g.db"), "--model", ckpt]) == 2
    assert "no identity sub-folders" in capsys.readouterr().err
    assert main(["identify", single, "--db", str(tmp_path / "missing.db"), "--model", ckpt]) == 2
    assert "gallery not found" in capsys.readouterr().err


def test_embed_folder(ckpt, tmp_path, capsys):
    root = tmp_path / "imgs"
    save(root / "a.png", 5)
    save(root / "sub" / "b.png", 6)
    (root / "sub" / "c.jpg").write_bytes(b"nope")
    out = tmp_path / "emb.npz"
    assert main(["embed", str(root), "-o", str(out), "--model", ckpt, "--fallback", "--batch", "2"]) == 0
    assert "2 embeddings (128-d" in capsys.readouterr().out
    data = np.load(out)
    assert list(data["paths"]) == ["a.png", "sub/b.png"] and data["embeddings"].shape == (2, 128)
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    assert len(data["skipped"]) == 1 and data["skipped"][0].startswith("sub/c.jpg")
    assert set(data["methods"]) == {"fallback"} and (data["pattern"] >= 0).all()
    assert main(["embed", str(tmp_path / "none"), "-o", str(out), "--model", ckpt]) == 2


@pytest.mark.data("lfw/images")
def test_verify_refuses_group_photo_with_select_single(ckpt, tmp_path, capsys):
    lfw = LFW_IMAGES
    a, b = lfw / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg", lfw / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
    group = tmp_path / "group.png"
    Image.fromarray(np.concatenate([np.asarray(Image.open(a)), np.asarray(Image.open(b))], axis=1)).save(group)
    assert main(["verify", str(group), str(a), "--model", ckpt, "--select", "single"]) == 2
    assert "group.png: 2 faces found" in capsys.readouterr().err
    assert main(["verify", str(group), str(a), "--model", ckpt, "--json"]) == 0  # largest face by default
    assert json.loads(capsys.readouterr().out)["faces"][0]["method"] == "detected"
