"""``fromface occlude-pairs``: reproducible files, a truthful manifest, a pair list that reads back."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from fromface.cli.main import main
from fromface.data.images import load_image
from fromface.data.pairs import read_pairs
from test_patterns import frame_label

SHARED = SHARED_DATA
HEADER = "file,category,kind,source,licence\n"


@pytest.fixture()
def setup(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    occ = tmp_path / "occ"
    occ.mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(occ / "box_cup.png")
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[4:16, 2:18, 3] = 255
    Image.fromarray(rgba, "RGBA").save(occ / "rgba_glasses.png")
    (occ / "occluders.csv").write_text(HEADER + "box_cup.png,cup,box,t,CC0\nrgba_glasses.png,eyeglasses,rgba,t,CC0\n")
    root = tmp_path / "imgs"
    for name in ("ann", "ben", "cat"):
        (root / name).mkdir(parents=True)
        for j in (1, 2):
            img = rng.integers(20, 235, (90, 80, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{j}.jpg", quality=90)
    lines = ["ann/ann_1.jpg\tann/ann_2.jpg\t1", "ben/ben_1.jpg\tben/ben_2.jpg\t1", "ann/ann_1.jpg\tcat/cat_2.jpg\t0",
             "cat/cat_1.jpg\tben/ben_2.jpg\t0"]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join(lines) + "\n")
    return {"occ": occ, "root": root, "pairs": pairs, "tmp": tmp_path}


def _run(s: dict, out: Path, *extra: str) -> int:
    return main(["occlude-pairs", "--pairs", str(s["pairs"]), "--root", str(s["root"]), "--occluders", str(s["occ"]),
                 "--out", str(out), "--seed", "5", "--detector", "none", *extra])


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_runs_same_seed_identical_files(setup: dict) -> None:
    a, b, c = setup["tmp"] / "a", setup["tmp"] / "b", setup["tmp"] / "c"
    assert _run(setup, a) == 0 and _run(setup, b) == 0
    files_a = _files(a)
    assert files_a == _files(b)
    assert sorted(files_a) == ["images/ann/ann_2.png", "images/ben/ben_2.png", "images/cat/cat_2.png", "manifest.csv",
                              "pairs.tsv"]
    assert main(["occlude-pairs", "--pairs", str(setup["pairs"]), "--root", str(setup["root"]), "--occluders",
                 str(setup["occ"]), "--out", str(c), "--seed", "6", "--detector", "none"]) == 0
    assert _files(c)["images/ben/ben_2.png"] != files_a["images/ben/ben_2.png"]


def test_manifest_matches_written_pixels_and_pairs_read_back(setup: dict) -> None:
    out = setup["tmp"] / "o"
    assert _run(setup, out, "--preset", "face", "--coverage", "0.2", "0.4") == 0
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert [r["source"] for r in rows] == ["ann/ann_2.jpg", "ben/ben_2.jpg", "cat/cat_2.jpg"]
    for r in rows:
        written = (out / r["output"]).read_bytes()
        assert hashlib.sha256(written).hexdigest() == r["sha256"]
        occluded, original = load_image(out / r["output"]), load_image(setup["root"] / r["source"])
        changed = (occluded != original).any(axis=2)
        x0, y0, x1, y1 = (int(v) for v in r["frame"].split())
        assert r["face"] == "centre-box" and len(r["box"].split()) == 4
        recomputed = changed[y0:y1, x0:x1].sum() / float((y1 - y0) * (x1 - x0))
        assert abs(recomputed - float(r["covered_fraction"])) < 0.01, r
        assert 0.15 < float(r["covered_fraction"]) < 0.45
        assert r["seed"] == "5" and r["preset"] == "face" and r["category"] in ("cup", "eyeglasses")
    pairs = read_pairs(out / "pairs.tsv")
    assert len(pairs) == 4 and [p.same for p in pairs] == [True, True, False, False]
    assert pairs[0].path1.resolve() == (setup["root"] / "ann/ann_1.jpg").resolve()  # first image: the original
    assert pairs[0].path2.resolve() == (out / "images/ann/ann_2.png").resolve()
    assert pairs[3].path2 == pairs[1].path2  # an image in two pairs is occluded once


def test_both_and_overwrite_rules(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["tmp"] / "both"
    assert _run(setup, out, "--both", "--preset", "paper2", "--categories", "cup") == 0
    pairs = read_pairs(out / "pairs.tsv")
    assert all("images" in p.path1.parts and "images" in p.path2.parts for p in pairs)
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 6 and {r["category"] for r in rows} == {"cup"} and {r["factor"] for r in rows} == {"2.0"}
    assert _run(setup, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert _run(setup, out, "--force") == 0
    assert len(list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))) == 3


def test_missing_image_and_bad_options_are_one_line_errors(setup: dict, capsys: pytest.CaptureFixture) -> None:
    (setup["root"] / "cat" / "cat_2.jpg").unlink()
    assert _run(setup, setup["tmp"] / "m") == 2
    err = capsys.readouterr().err
    assert "cat_2.jpg" in err and "does not exist" in err and "Traceback" not in err
    assert not (setup["tmp"] / "m").exists()
    assert _run(setup, setup["tmp"] / "m2", "--categories", "boat") == 2
    assert "unknown category" in capsys.readouterr().err
    assert _run(setup, setup["tmp"] / "m3", "--coverage", "0.6", "0.2") == 2
    assert "coverage" in capsys.readouterr().err


@pytest.mark.data("lfw/pairs.txt", "lfw/images", "occluders")
def test_lfw_pairs_with_detector(tmp_path: Path) -> None:
    out = tmp_path / "lfw"
    lfw = SHARED / "lfw"
    assert main(["occlude-pairs", "--pairs", str(lfw / "pairs.txt"), "--root", str(lfw / "images"), "--occluders",
                 str(SHARED / "occluders"), "--out", str(out), "--seed", "100", "--limit", "6"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert len(rows) >= 5 and all(r["face"] in ("detected", "retry") for r in rows)
    assert len(read_pairs(out / "pairs.tsv")) == 6


def test_mfr2_format_pairs(setup: dict) -> None:
    root = setup["tmp"] / "mfr2"
    rng = np.random.default_rng(3)
    for name in ("Ann_Lee", "Bo_Ma"):
        (root / name).mkdir(parents=True)
        for j in (1, 2):
            Image.fromarray(rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(root / name / f"{name}_000{j}.png")
    (root / "pairs.txt").write_text("Ann_Lee 1 2\nAnn_Lee 1 Bo_Ma 2\n")
    out = setup["tmp"] / "mfr2_out"
    assert main(["occlude-pairs", "--pairs", str(root / "pairs.txt"), "--format", "mfr2", "--occluders",
                 str(setup["occ"]), "--out", str(out), "--detector", "none"]) == 0
    pairs = read_pairs(out / "pairs.tsv")
    assert [p.same for p in pairs] == [True, False]
    assert [p.path2.name for p in pairs] == ["Ann_Lee_0002.png", "Bo_Ma_0002.png"]
    assert pairs[0].path1.resolve() == (root / "Ann_Lee" / "Ann_Lee_0001.png").resolve()


@pytest.mark.parametrize("preset,grid", [("paper2", "5"), ("paper", "3")])
def test_manifest_pattern_label_is_argmax_iou_of_the_recorded_box(setup: dict, preset: str, grid: str) -> None:
    """``box`` occluders paste their whole rectangle, so the recorded box is the mask: its label, recomputed by brute
    force on the face frame (resized to 112x96, nearest), must be the manifest's ``pattern_label``."""
    out = setup["tmp"] / f"labels_{preset}"
    assert _run(setup, out, "--both", "--preset", preset, "--categories", "cup", "--grid", grid) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 6
    labels = set()
    for r in rows:
        assert r["kind"] == "box" and r["grid"] == grid
        original = load_image(setup["root"] / r["source"])
        changed = (load_image(out / r["output"]) != original).any(axis=2)
        x0, y0, x1, y1 = (int(v) for v in r["box"].split())
        mask = np.zeros(original.shape[:2], bool)
        mask[y0:y1, x0:x1] = True
        assert changed.any() and not (changed & ~mask).any()  # the recorded box is where the occluder went
        frame = tuple(int(v) for v in r["frame"].split())
        assert r["pattern_label"] == str(frame_label(mask, frame, original.shape, int(grid))), r
        labels.add(r["pattern_label"])
    assert len(labels) >= 3  # not one constant label
