"""The occlusion-estimate section of ``fromface eval --manifest``: the geometry and scores on hand-made cases, the
truth carried into the aligned crop, the exact masks rebuilt from a manifest, the cache, and the section in the reports.

Expected values are worked out by hand in the comments (pixel counts of boxes, where a point lands under a known
scale and shift), not computed with the code under test.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fromface.cli.main import main
from fromface.data.images import load_image
from fromface.data.pairs import Pair, read_pairs, write_pairs_tsv
from fromface.evaluation.embedding import Embedder, EmbedResult, OcclusionEstimate
from fromface.evaluation.occlusion_estimate import (
    TrueRegion,
    box_mask,
    called_occluded,
    crop_matrix,
    estimate_section,
    iou,
    region_in_crop,
    visible_fraction_error,
)
from fromface.evaluation.occlusion_truth import set_truth
from fromface.evaluation.runner import EmbeddingCache, embed_images
from fromface.faces.alignment import get_template, warp_face
from fromface.occlusion.heatmap import heat_mask

ARC = get_template("arcface112")


# ---------------------------------------------------------------- scores on hand-made masks
def test_iou_of_hand_made_boxes() -> None:
    a = box_mask((0, 0, 4, 4), (8, 8))  # 16 pixels
    b = box_mask((2, 0, 6, 4), (8, 8))  # 16 pixels, rows 2-3 shared: 8
    assert iou(a, b) == pytest.approx(8 / 24)
    assert iou(a, a) == 1.0
    assert iou(a, box_mask((4, 4, 8, 8), (8, 8))) == 0.0  # touching corners only
    empty = box_mask(None, (8, 8))
    assert iou(empty, empty) == 1.0 and iou(empty, a) == 0.0
    assert box_mask((0, 0, 0, 0), (8, 8)).sum() == 0  # pattern 0's box is empty


def test_box_mask_is_exclusive_at_bottom_and_right() -> None:
    m = box_mask((1, 2, 3, 5), (4, 6))
    assert np.argwhere(m).tolist() == [[1, 2], [1, 3], [1, 4], [2, 2], [2, 3], [2, 4]]


def test_visible_fraction_error_by_hand() -> None:
    truth = box_mask((0, 0, 5, 5), (10, 10))  # 25 of 100 pixels covered: 0.75 visible
    assert visible_fraction_error(0.7, truth) == pytest.approx(0.05)
    assert visible_fraction_error(0.75, truth) == pytest.approx(0.0)
    assert visible_fraction_error(1.0, np.zeros((10, 10), bool)) == 0.0


def test_heat_mask_marks_cells_below_the_threshold() -> None:
    heat = np.array([[0.9, 0.2], [0.6, 0.4]])  # on a 4x4 crop each cell is 2x2 pixels
    m = heat_mask(heat, (4, 4))
    assert m.tolist() == [[False, False, True, True], [False, False, True, True],
                          [False, False, True, True], [False, False, True, True]]


def _est(pattern=None, prob=None, box=None, vf=None, heat=None, landmarks=None, size=(112, 112)) -> OcclusionEstimate:
    lms = ARC.points.copy() if landmarks is None else landmarks
    return OcclusionEstimate(lms, "arcface112", size, pattern, prob, None if prob is None else 1 - prob, box, vf, heat)


def test_called_occluded_follows_the_product_rule() -> None:
    assert called_occluded(_est(pattern=0, prob=0.9, box=(0, 0, 0, 0), vf=1.0)) is False
    assert called_occluded(_est(pattern=7, prob=0.5, box=(56, 0, 112, 112), vf=0.5)) is True
    # a pattern other than 0 but predicted with 1% probability: not confident, users see "clean"
    assert called_occluded(_est(pattern=7, prob=0.01, box=(56, 0, 112, 112), vf=0.5)) is False


# ---------------------------------------------------------------- the truth in the crop
def test_crop_mapping_of_a_box_under_known_scale_and_shift() -> None:
    # the face is the template's points, twice as large, shifted by (30, 40): photo (x, y) -> crop ((x-30)/2, (y-40)/2)
    landmarks = ARC.points * 2 + np.array([30.0, 40.0])
    m = crop_matrix(landmarks, "arcface112", (112, 112))
    assert m == pytest.approx(np.array([[0.5, 0, -15], [0, 0.5, -20]]), abs=1e-9)
    # photo box x 50..90, y 60..100 (exclusive): crop pixel u is inside when 50 <= 2u + 30 < 90, i.e. 10 <= u < 30
    truth = region_in_crop(TrueRegion("cup", "box", (50, 60, 90, 100)), m, (112, 112))
    assert truth.sum() == 20 * 20 and truth[10:30, 10:30].all()
    # a network input half the template's size: the resize halves it again, 5 <= u < 15
    half = region_in_crop(TrueRegion("cup", "box", (50, 60, 90, 100)), crop_matrix(landmarks, "arcface112", (56, 56)),
                          (56, 56))
    assert half.sum() == 10 * 10 and half[5:15, 5:15].all()
    # the resize maps pixel centres, (p + 0.5) * 0.5 - 0.5: a quarter pixel up and left of plain halving
    expected = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25]])
    assert crop_matrix(ARC.points, "arcface112", (56, 56)) == pytest.approx(expected)


def _disk_photo() -> tuple[np.ndarray, np.ndarray]:
    """A 300x260 black photo with a white disk (radius 30 at (150, 170)) and its exact mask."""
    yy, xx = np.mgrid[0:300, 0:260]
    mask = (xx - 150) ** 2 + (yy - 170) ** 2 <= 30 ** 2
    photo = np.zeros((300, 260, 3), np.uint8)
    photo[mask] = 255
    return photo, mask


@pytest.mark.parametrize("size", [(112, 112), (56, 56)])
def test_true_mask_lands_where_the_aligner_puts_the_occluder(size: tuple[int, int]) -> None:
    """A rotated, scaled face: the mapped mask covers the same crop pixels as the occluder in the real aligned crop."""
    photo, mask = _disk_photo()
    angle, scale, shift = np.deg2rad(20), 1.7, np.array([40.0, 60.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARC.points @ rot.T + shift
    crop = warp_face(photo, landmarks, "arcface112")
    if size != ARC.size:
        crop = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    seen = crop[..., 0] >= 128
    assert seen.sum() > 100  # the disk is in the crop
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    region = TrueRegion("blob", "rgba", box, mask[box[1]:box[3], box[0]:box[2]])
    mapped = region_in_crop(region, crop_matrix(landmarks, "arcface112", size), size)
    assert iou(mapped, seen) > 0.9
    boxed = region_in_crop(TrueRegion("blob", "rgba", box), crop_matrix(landmarks, "arcface112", size), size)
    assert iou(boxed, seen) < 0.85 and (mapped & ~boxed).sum() == 0  # the box holds the disk, and more


# ---------------------------------------------------------------- the section on a hand-made set
def test_section_scores_each_image_and_counts_clean_ones() -> None:
    lms = ARC.points.copy()  # photo = crop: the truth box is the crop box
    regions = {Path("/o/a.png"): TrueRegion("cup", "box", (0, 56, 112, 112)),  # lower half: x 0..112, y 56..112
               Path("/o/b.png"): TrueRegion("eyeglasses", "rgba", (0, 0, 112, 28)),  # top quarter
               Path("/o/c.png"): TrueRegion("cup", "box", (0, 0, 10, 10))}  # no face found: not scored
    paths = [Path("/o/a.png"), Path("/o/b.png"), Path("/o/c.png"), Path("/c/1.png"), Path("/c/2.png")]
    estimates = [_est(5, 0.8, (56, 0, 112, 112), 0.5, landmarks=lms),  # exactly right: IoU 1, VF error 0
                 _est(5, 0.8, (0, 0, 56, 112), 0.5, landmarks=lms),  # top half for a top quarter: IoU 0.5, |0.5-0.75|
                 None,
                 _est(3, 0.6, (0, 0, 56, 112), 0.5, landmarks=lms),  # clean image called occluded
                 _est(0, 0.9, (0, 0, 0, 0), 1.0, landmarks=lms)]
    methods = ["detected", "detected", "failed", "detected", "detected"]
    s = estimate_section(paths, estimates, methods, regions, {Path("/c/1.png"), Path("/c/2.png")}, "box")
    assert s["occluded"]["n_images"] == 2 and s["occluded_without_estimate"] == 1
    assert s["occluded"]["iou_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["occluded"]["visible_fraction_error_mean"] == pytest.approx((0.0 + 0.25) / 2)
    assert s["per_kind"]["rectangular"]["iou_mean"] == pytest.approx(1.0)
    assert s["per_kind"]["shaped"]["iou_mean"] == pytest.approx(0.5)
    assert s["per_category"]["cup"]["n_images"] == 1
    assert s["occluded"]["iou_heatmap_mean"] is None  # no heat map given
    assert s["occluded"]["iou_lower_half_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["clean"] == {"n_images": 2, "called_occluded": 1, "false_occluded_rate": 0.5, "without_estimate": 0}


def test_heat_map_visible_fraction_is_scored_beside_the_pattern_box() -> None:
    """The heat map's own visible fraction (cells >= 0.5) against the truth: the lower 4 of 7 rows dimmed leave
    3/7 visible, the truth (lower half covered) leaves 1/2. Users are shown the heat map's figure (it marks
    something), so the reported error is the heat map's; the pattern box alone is scored beside it."""
    heat = np.ones((7, 7))
    heat[3:] = 0.2
    regions = {Path("/o/a.png"): TrueRegion("cup", "box", (0, 56, 112, 112))}
    est = _est(5, 0.8, (56, 0, 112, 112), 0.5, heat=heat, landmarks=ARC.points.copy())
    s = estimate_section([Path("/o/a.png")], [est], ["detected"], regions, set(), "box")
    rows_dimmed = int(np.count_nonzero(np.arange(112) * 7 // 112 >= 3))  # crop rows on heat-map rows 3..6
    assert s["occluded"]["visible_fraction_error_heatmap_mean"] == pytest.approx(abs((112 - rows_dimmed) / 112 - 0.5))
    heat_error = abs((112 - rows_dimmed) / 112 - 0.5)
    assert s["occluded"]["visible_fraction_error_mean"] == pytest.approx(heat_error)  # what users are shown
    assert s["occluded"]["visible_fraction_error_pattern_mean"] == pytest.approx(0.0)  # the box is exactly right
    est.heatmap = np.ones((7, 7))  # a mask that dims nothing: users are shown the pattern box's figure
    s = estimate_section([Path("/o/a.png")], [est], ["detected"], regions, set(), "box")
    assert s["occluded"]["visible_fraction_error_mean"] == pytest.approx(0.0)


def test_a_clean_face_whose_heat_map_dims_a_tenth_of_the_crop_is_called_occluded() -> None:
    """The false-occluded rate uses the visible fraction users are shown, so a heat map that dims enough cells
    counts even when the pattern head says "clean"."""
    heat = np.ones((7, 7))
    heat[6] = 0.2  # the bottom row: 1/7 of the crop
    clean = {Path("/c/a.png"), Path("/c/b.png")}
    dimmed, plain = _est(0, 0.9, (0, 0, 0, 0), 1.0, heat=heat), _est(0, 0.9, (0, 0, 0, 0), 1.0, heat=np.ones((7, 7)))
    s = estimate_section(sorted(clean), [dimmed, plain], ["detected"] * 2, {}, clean, "box")
    assert s["clean"]["called_occluded"] == 1


# ---------------------------------------------------------------- exact masks rebuilt from a manifest
HEADER = "file,category,kind,source,licence\n"


def _occluder_folder(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(folder / "box_cup.png")
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[4:16, 2:18, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba_glasses.png")
    rows = "box_cup.png,cup,box,t,CC0\nrgba_glasses.png,eyeglasses,rgba,t,CC0\n"
    (folder / "occluders.csv").write_text(HEADER + rows)
    return folder


@pytest.fixture()
def occluded_set(tmp_path: Path) -> dict:
    """A tiny `occlude-pairs` set (centre box, no detector) of noise photos, second image of each pair occluded."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for name in ("ann", "ben", "cat", "dan"):
        (root / name).mkdir(parents=True)
        for j in (1, 2):
            Image.fromarray(rng.integers(20, 235, (90, 80, 3), dtype=np.uint8)).save(root / name / f"{name}_{j}.png")
    lines = [f"{n}/{n}_1.png\t{n}/{n}_2.png\t1" for n in ("ann", "ben", "cat", "dan")]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    occ = _occluder_folder(tmp_path / "occ")
    out = tmp_path / "set"
    assert main(["occlude-pairs", "--pairs", str(tmp_path / "pairs.txt"), "--root", str(root), "--occluders", str(occ),
                 "--out", str(out), "--seed", "3", "--detector", "none"]) == 0
    return {"root": root, "occ": occ, "out": out, "tmp": tmp_path}


def _records(out: Path) -> dict[Path, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {(out / r["output"]).resolve(): r for r in csv.DictReader(fh)}


def test_rebuilt_masks_are_the_pixels_the_synthesiser_changed(occluded_set: dict) -> None:
    out, root = occluded_set["out"], occluded_set["root"]
    pairs, records = read_pairs(out / "pairs.tsv"), _records(out)
    truth = set_truth(pairs, records, occluded_set["occ"], progress=False)  # the source root is found from pairs
    assert "for 4 of 4 images, manifest box for 0" in truth.note
    assert len(truth.clean) == 4 and not truth.clean & set(truth.regions)
    for path, region in truth.regions.items():
        row = records[path]
        assert region.box == tuple(int(v) for v in row["box"].split())  # the mask's bounding box is the manifest's
        full = np.zeros((90, 80), bool)
        x0, y0, x1, y1 = region.box
        full[y0:y1, x0:x1] = region.mask
        changed = (load_image(path).astype(int) != load_image(root / row["source"]).astype(int)).any(-1)
        assert not (changed & ~full).any()  # nothing changed outside the mask
        assert changed[full].mean() > 0.9  # and nearly every mask pixel was painted


def test_a_different_occluder_folder_falls_back_to_the_box(occluded_set: dict) -> None:
    out = occluded_set["out"]
    other = _occluder_folder(occluded_set["tmp"] / "other", seed=9)  # same names, other pixels
    truth = set_truth(read_pairs(out / "pairs.tsv"), _records(out), other, progress=False)
    assert "for 0 of 4 images, manifest box for 4" in truth.note
    assert all(r.mask is None for r in truth.regions.values())
    boxed = set_truth(read_pairs(out / "pairs.tsv"), _records(out), None, progress=False)
    assert boxed.note.startswith("manifest box") and all(r.mask is None for r in boxed.regions.values())


# ---------------------------------------------------------------- the cache keeps estimates, old caches stay valid
class EstimatingEmbedder(Embedder):
    """Test double: embedding = mean colour + ``offset`` (so a recomputed embedding is told from a cached one), and
    an estimate whose visible fraction is the image's red level."""

    def __init__(self, gives_estimate: bool, offset: float = 0.0):
        super().__init__(name="est", source="test", info={"kind": "test-estimate"})
        self.gives_estimate, self.offset, self.calls = gives_estimate, offset, 0

    def embed_batch(self, images):
        self.calls += len(images)
        out = []
        for im in images:
            vec = (im.reshape(-1, 3).mean(0) + self.offset).astype(np.float32)
            est = None
            if self.gives_estimate:
                est = OcclusionEstimate(ARC.points + 1.0, "arcface112", (112, 112), 3, 0.5, 0.6, (0, 0, 56, 112),
                                        float(im[0, 0, 0]) / 255, np.full((7, 7), 0.25, np.float32))
            out.append(EmbedResult(vec, "detected", est))
        return out


def _colour_images(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for k in range(3):
        p = folder / f"{k}.png"
        Image.fromarray(np.full((8, 8, 3), 40 + 50 * k, np.uint8)).save(p)
        paths.append(p)
    return paths


def test_format_1_cache_keeps_its_embeddings_and_gets_estimates_added(tmp_path: Path) -> None:
    paths, cache = _colour_images(tmp_path / "img"), tmp_path / "cache"
    first = embed_images(EstimatingEmbedder(False), paths, cache, progress=False)
    # make the file exactly what format 1 wrote: no estimate table, no format row
    db = sqlite3.connect(str(EmbeddingCache(cache, EstimatingEmbedder(False).cache_key, "est").path))
    db.execute("DROP TABLE estimate")
    db.execute("DELETE FROM meta WHERE key = 'format'")
    db.commit()
    db.close()
    newer = EstimatingEmbedder(True, offset=100.0)
    plain = embed_images(newer, paths, cache, progress=False)  # no estimates asked: the cache is used as it is
    assert newer.calls == 0 and plain.estimates == [None, None, None]
    added = embed_images(newer, paths, cache, progress=False, estimates=True)
    assert newer.calls == 3 and added.estimates_added == 3 and added.computed == 0 and added.cached == 3
    assert np.array_equal(added.embeddings, first.embeddings)  # the cached embeddings, not the recomputed ones
    assert [round(e.visible_fraction, 4) for e in added.estimates] == [round(v / 255, 4) for v in (40, 90, 140)]
    again = EstimatingEmbedder(True, offset=100.0)
    read = embed_images(again, paths, cache, progress=False, estimates=True)
    assert again.calls == 0 and read.estimates_added == 0
    e = read.estimates[1]
    assert e.pattern_box == (0, 0, 56, 112) and e.template == "arcface112" and e.size == (112, 112)
    assert e.landmarks == pytest.approx(ARC.points + 1.0, abs=1e-4) and e.heatmap.shape == (7, 7)
    assert e.heatmap == pytest.approx(0.25) and e.visible_fraction == pytest.approx(90 / 255)


# ---------------------------------------------------------------- through `fromface eval`
def _checkpoint(path: Path, name: str) -> Path:
    import torch

    from fromface.models import create_model

    torch.manual_seed(0)
    net = create_model(name, embedding_dim=128)
    torch.save({"model_name": name, "model_kwargs": {"embedding_dim": 128}, "state_dict": net.state_dict()}, path)
    return path


def test_cli_eval_reports_the_section_for_from_and_no_estimate_for_plain(tmp_path: Path) -> None:
    """Flat 250x250 photos: no face, so every crop is the centre-box fallback, which lies inside the photo."""
    pairs, rows = [], ["output,category,kind,box,covered_fraction"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for k in range(4):
        first, second = tmp_path / "a" / f"{k}.png", tmp_path / "b" / f"{k}.png"
        Image.fromarray(np.full((250, 250, 3), 60 + 40 * k, np.uint8)).save(first)
        Image.fromarray(np.full((250, 250, 3), 60 + 40 * k, np.uint8)).save(second)
        pairs.append(Pair(first, second, True, k % 2))
        pairs.append(Pair(first, tmp_path / "b" / f"{(k + 1) % 4}.png", False, k % 2))
        # k even: a box over the whole photo (the whole crop is covered); odd: a corner the crop never reaches
        box, kind = ("0 0 250 250", "box") if k % 2 == 0 else ("0 0 5 5", "rgba")
        rows.append(f"b/{k}.png,cup,{kind},{box},0.3")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    tsv = write_pairs_tsv(pairs, tmp_path / "pairs.tsv", relative_to=tmp_path)
    from_ckpt = _checkpoint(tmp_path / "from.pt", "from_mobilefacenet")
    plain_ckpt = _checkpoint(tmp_path / "plain.pt", "mobilefacenet")
    out = tmp_path / "out"
    assert main(["eval", "--pairs", str(tsv), "--model", str(from_ckpt), "--model", str(plain_ckpt), "--out", str(out),
                 "--quiet", "--manifest", str(tmp_path / "manifest.csv"), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    est, plain = (m["occlusion_estimate"] for m in report["models"])
    assert plain == {"estimate": False, "note": "no estimate"}
    assert est["estimate"] is True and est["occluded"]["n_images"] == 4 and est["clean"]["n_images"] == 4
    assert set(est["per_kind"]) == {"rectangular", "shaped"}
    full, corner = est["per_kind"]["rectangular"], est["per_kind"]["shaped"]
    assert full["true_covered_fraction_mean"] == 1.0 and corner["true_covered_fraction_mean"] == 0.0
    # the whole crop covered: IoU = predicted area share = 1 - predicted visible fraction, and the error is vf itself
    vf = 1.0 - full["iou_mean"]
    assert full["visible_fraction_error_mean"] == pytest.approx(vf, abs=1e-9)
    # the fixed lower-half guess: half of a fully covered crop (56 x 112 of 112 x 112), nothing of an empty truth
    assert full["iou_lower_half_mean"] == 0.5 and corner["iou_lower_half_mean"] == 0.0
    assert est["clean"]["called_occluded"] in range(5) and 0.0 <= est["clean"]["false_occluded_rate"] <= 1.0
    md = (out / "report.md").read_text()
    section = md.split("### Occlusion estimate")[1]
    assert "no estimate" in section and "IoU, predicted pattern box vs true region (mean)" in section
    assert "| rectangular | 2 |" in section and "| shaped | 2 |" in section
    assert "True region: manifest box" in section
