"""Occluder library, synthesiser and the on-the-fly training dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from fromface.errors import ConfigError, DataError, ImageError
from fromface.occlusion.occluders import OccluderLibrary, read_anchor_config
from fromface.occlusion.patterns import PatternVocabulary
from fromface.occlusion.synth import PRESETS, Synthesizer, box_label, rng_for
from fromface.occlusion.variation import vary_occluder
from test_patterns import frame_label, nearest_resize

SHARED = SHARED_DATA
HEADER = "file,category,kind,source,licence\n"
CFG = """[test_mask]
template: masks/templates/test_mask.png
size: 80, 60
mask_a: 4, 10
mask_b: 40, 2
mask_c: 76, 10
mask_d: 8, 44
mask_e: 40, 58
mask_f: 72, 44

[empty]
"""


def _write_rgba(path: Path, size: tuple[int, int], seed: int, ellipse: bool) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1 if ellipse else np.ones((h, w), bool)
    rgba[..., 3] = np.where(inside, 255, 0)
    rgba[h // 2, : w // 4, 3] = 100  # some soft alpha
    Image.fromarray(rgba, "RGBA").save(path)


@pytest.fixture()
def occ_folder(tmp_path: Path) -> Path:
    root = tmp_path / "occ"
    root.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "box_cup.png")
    Image.fromarray(rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)).save(root / "box_sun.png")
    _write_rgba(root / "rgba_hand.png", (36, 30), 2, ellipse=True)
    _write_rgba(root / "rgba_mouth_mask_test_mask.png", (40, 30), 3, ellipse=True)  # half of 80x60
    rows = ["box_cup.png,cup,box,test,CC0", "box_sun.png,sunglasses,box,test,CC0", "rgba_hand.png,hand,rgba,test,CC0",
            "rgba_mouth_mask_test_mask.png,mouth_mask,rgba,MaskTheFace masks/templates/test_mask.png,MIT"]
    (root / "occluders.csv").write_text(HEADER + "\n".join(rows) + "\n")
    (root / "masktheface_masks.cfg").write_text(CFG)
    return root


@pytest.fixture()
def face() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(30, 220, (112, 96, 3), dtype=np.uint8)


LANDMARKS = np.array([[30.3, 51.7], [65.5, 51.5], [48.0, 71.7], [33.5, 92.4], [62.7, 92.2]])


def test_library_reads_kinds_alpha_crop_and_anchors(occ_folder: Path) -> None:
    lib = OccluderLibrary.from_folder(occ_folder)
    assert len(lib) == 4 and lib.categories == ["cup", "sunglasses", "hand", "mouth_mask"]
    cup = lib.in_category("cup")[0]
    assert cup.size == (20, 30) and (cup.alpha == 255).all() and cup.anchors is None
    mask = lib.in_category("mouth_mask")[0]
    assert mask.template == "test_mask" and mask.anchors.shape == (6, 2)
    full = np.asarray(Image.open(occ_folder / "rgba_mouth_mask_test_mask.png"))[..., 3]
    ys, xs = np.nonzero(full)
    assert mask.size == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)  # cropped to alpha
    # anchors: scaled by 40/80 and 30/60, then shifted by the crop offset
    np.testing.assert_allclose(mask.anchors[1], [40 * 0.5 - xs.min(), 2 * 0.5 - ys.min()])
    assert list(OccluderLibrary.from_folder(occ_folder, categories=["hand"]).categories) == ["hand"]


@pytest.mark.parametrize("body, problem", [
    ("file,category,kind\nbox_cup.png,cup,box\n", "lacks column"),
    (HEADER + "box_cup.png,cup,box,test,CC0\nbox_sun.png,sunglasses,paste,test,CC0\n", "occluders.csv:3: kind"),
    (HEADER + "box_cup.png,cup,box,test\n", "occluders.csv:2: expected 5 fields"),
    (HEADER, "lists no occluders"),
])
def test_malformed_csv_is_a_clear_data_error(occ_folder: Path, body: str, problem: str) -> None:
    (occ_folder / "occluders.csv").write_text(body)
    with pytest.raises(DataError, match=problem):
        OccluderLibrary.from_folder(occ_folder)


def test_bad_occluder_images_are_clear_image_errors(occ_folder: Path) -> None:
    csv_path = occ_folder / "occluders.csv"
    csv_path.write_text(HEADER + "missing.png,cup,box,test,CC0\n")
    with pytest.raises(ImageError, match="missing.png.*does not exist"):
        OccluderLibrary.from_folder(occ_folder)
    (occ_folder / "junk.png").write_bytes(b"not an image at all")
    csv_path.write_text(HEADER + "junk.png,cup,box,test,CC0\n")
    with pytest.raises(ImageError, match="junk.png: cannot read occluder image"):
        OccluderLibrary.from_folder(occ_folder)
    csv_path.write_text(HEADER + "box_cup.png,cup,rgba,test,CC0\n")
    with pytest.raises(ImageError, match="no alpha channel"):
        OccluderLibrary.from_folder(occ_folder)
    with pytest.raises(DataError, match="unknown category"):
        OccluderLibrary.from_folder(occ_folder, categories=["boat"])
    with pytest.raises(DataError, match="does not exist"):
        OccluderLibrary.from_folder(occ_folder / "nope")
    (occ_folder / "masktheface_masks.cfg").write_text("[x]\ntemplate: a.png\nmask_a: 1, 2\n")
    with pytest.raises(DataError, match=r"\[x\] lacks mask_b"):
        read_anchor_config(occ_folder / "masktheface_masks.cfg")


@pytest.mark.parametrize("preset", ["paper2", "face"])
def test_same_seed_same_bytes(occ_folder: Path, face: np.ndarray, preset: str) -> None:
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder), preset=preset, grid=5)
    a = [synth.occlude(face, rng_for(3, i), landmarks=LANDMARKS) for i in range(12)]
    b = [synth.occlude(face.copy(), rng_for(3, i), landmarks=LANDMARKS) for i in range(12)]
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes() and x.record == y.record and x.pattern_label == y.pattern_label
    seeded = synth.occlude_seeded(face, 3, 5, landmarks=LANDMARKS)
    assert seeded.image.tobytes() == a[5].image.tobytes() and (seeded.record["seed"], seeded.record["index"]) == (3, 5)
    c = [synth.occlude(face, rng_for(4, i), landmarks=LANDMARKS) for i in range(12)]
    assert any(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))


@pytest.mark.parametrize("preset, vary", [("paper", 0.0), ("paper2", 0.0), ("face", 0.0), ("face-train", 0.0),
                                          ("paper2", 1.0), ("face", 1.0)])
def test_mask_pixels_label_and_coverage_agree(occ_folder: Path, face: np.ndarray, preset: str, vary: float) -> None:
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder), preset=preset, grid=4, vary=vary)
    vocab = PatternVocabulary(112, 96, 4)
    kinds = set()
    for i in range(30):
        res = synth.occlude(face, rng_for(11, i), landmarks=LANDMARKS)
        assert res.image.shape == face.shape and res.mask.shape == face.shape[:2] and res.mask.dtype == bool
        # pixels outside the mask are untouched, for box and rgba alike
        assert np.array_equal(res.image[~res.mask], face[~res.mask])
        changed = (res.image != face).any(axis=2)
        assert not (changed & ~res.mask).any()
        assert abs(changed.mean() - res.covered_fraction) < 0.01  # recomputed from pixels (frame = whole crop)
        assert res.covered_fraction == pytest.approx(res.mask.mean())
        assert res.pattern_label == int(vocab.label(res.mask))
        kinds.add(res.record["kind"])
        assert res.record.get("varied", False) == (vary == 1.0 and not res.record["clean"])
    assert kinds >= {"box", "rgba"} or preset in ("paper", "face-train")


def test_rgba_alpha_zero_pixels_untouched(occ_folder: Path, face: np.ndarray) -> None:
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder, categories=["hand"]), preset="paper2")
    for i in range(10):
        res = synth.occlude(face, rng_for(5, i))
        x0, y0, x1, y1 = res.record["pasted_box"]
        x0, y0 = max(0, x0), max(0, y0)
        box = np.zeros(face.shape[:2], bool)
        box[y0:y1, x0:x1] = True
        corner_outside = box & ~res.mask
        assert corner_outside.any()  # an ellipse leaves the corners of its box
        assert np.array_equal(res.image[corner_outside], face[corner_outside])


def test_paper_box_mask_is_the_pasted_box_clipped(occ_folder: Path, face: np.ndarray) -> None:
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder, categories=["cup", "sunglasses"]), preset="paper")
    clean = 0
    for i in range(60):
        res = synth.occlude(face, rng_for(9, i))
        if res.record["clean"]:
            clean += 1
            assert not res.mask.any() and res.pattern_label is None and np.array_equal(res.image, face)
            continue
        x0, y0, x1, y1 = res.record["pasted_box"]
        expect = np.zeros(face.shape[:2], bool)
        expect[max(0, y0):y1, max(0, x0):x1] = True
        assert np.array_equal(res.mask, expect)
        assert res.record["factor"] in PRESETS["paper"].factors
    assert 8 <= clean <= 32  # probability 1/3 of 60


def test_face_preset_hits_coverage_and_places_by_category(occ_folder: Path, face: np.ndarray) -> None:
    lib = OccluderLibrary.from_folder(occ_folder)
    synth = Synthesizer(lib, preset="face", coverage=(0.25, 0.3))
    places = {}
    for i in range(40):
        res = synth.occlude(face, rng_for(2, i), landmarks=LANDMARKS)
        rec = res.record
        places[rec["category"]] = rec["placement"]
        if rec["placement"] != "anchored":
            assert 0.23 <= res.covered_fraction <= 0.32, rec
        ys, xs = np.nonzero(res.mask)
        if rec["category"] == "sunglasses":
            assert abs(ys.mean() - 51.6) < 6 and abs(xs.mean() - 48) < 6
        if rec["category"] == "mouth_mask":
            assert ys.mean() > 71.7 - 5  # below the nose tip, over mouth and chin
    assert places == {"sunglasses": "eyes", "mouth_mask": "anchored", "cup": "anywhere", "hand": "anywhere"}


def test_face_box_frame_and_label_size(occ_folder: Path) -> None:
    photo = np.random.default_rng(0).integers(0, 255, (200, 180, 3), dtype=np.uint8)
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder), preset="face", grid=5)
    box = np.array([50.0, 40.0, 130.0, 150.0])
    res = synth.occlude(photo, rng_for(0, 1), face_box=box)
    assert res.record["frame"] == [50, 40, 130, 150]
    assert res.covered_fraction == pytest.approx(res.mask[40:150, 50:130].mean())
    assert 0 < res.pattern_label < 226


def test_box_label_equals_vocabulary_label() -> None:
    rng = np.random.default_rng(0)
    for h, w, k in [(112, 96, 5), (40, 33, 3)]:
        vocab = PatternVocabulary(h, w, k)
        for _ in range(100):
            m = rng.random((h, w)) < rng.uniform(0, 0.3)
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, h), x:x + rng.integers(1, w)] = True
            assert box_label(vocab, m) == int(vocab.label(m))
        assert box_label(vocab, np.zeros((h, w), bool)) == 0


def test_bad_presets_are_config_errors(occ_folder: Path) -> None:
    lib = OccluderLibrary.from_folder(occ_folder)
    with pytest.raises(ConfigError, match="unknown occlusion preset"):
        Synthesizer(lib, preset="nope")
    with pytest.raises(ConfigError, match="coverage"):
        Synthesizer(lib, preset="face", coverage=(0.5, 0.2))
    with pytest.raises(ConfigError, match="vary must be in"):
        Synthesizer(lib, preset="face", vary=1.5)


def test_varied_occluders_change_colour_and_outline_but_anchored_masks_keep_their_fit(occ_folder: Path) -> None:
    lib = OccluderLibrary.from_folder(occ_folder)
    mask = lib.in_category("mouth_mask")[0]
    cup = lib.in_category("cup")[0]
    outlines, cut = set(), 0
    for seed in range(40):
        worn = vary_occluder(mask, rng_for(seed))
        # the anchors place a mask as worn: its outline and anchor points stay, only its colour changes
        assert np.array_equal(worn.alpha, mask.alpha) and np.array_equal(worn.anchors, mask.anchors)
        assert worn.rgb.shape == mask.rgb.shape and not np.array_equal(worn.rgb, mask.rgb)
        varied = vary_occluder(cup, rng_for(seed))
        assert varied.rgb.shape[:2] == varied.alpha.shape
        assert varied.coverage == pytest.approx((varied.alpha > 0).mean())
        visible = varied.alpha > 0  # cropped to what is left, as the library keeps its occluders
        assert visible[0].any() and visible[-1].any() and visible[:, 0].any() and visible[:, -1].any()
        assert visible.sum() >= 0.3 * cup.alpha.size / 1.5 - cup.size[0]  # a cut keeps 30% of the stretched box
        cut += not visible.all()
        outlines.add(varied.size)
    assert (cup.rgb == lib.in_category("cup")[0].rgb).all()  # the library's own occluder is untouched
    assert len(outlines) > 10 and 10 <= cut <= 35  # stretched to many aspects; cut about two times in three


def test_variation_draws_nothing_when_off_so_seeds_keep_their_bytes(occ_folder: Path, face: np.ndarray) -> None:
    lib = OccluderLibrary.from_folder(occ_folder)
    plain, off, on = (Synthesizer(lib, preset="face", vary=v) for v in (0.0, 0.0, 1.0))
    for i in range(10):
        a, b = plain.occlude(face, rng_for(6, i), landmarks=LANDMARKS), off.occlude(face, rng_for(6, i),
                                                                                    landmarks=LANDMARKS)
        assert a.image.tobytes() == b.image.tobytes() and "varied" not in a.record
    varied = [on.occlude(face, rng_for(6, i), landmarks=LANDMARKS) for i in range(10)]
    again = [on.occlude(face, rng_for(6, i), landmarks=LANDMARKS) for i in range(10)]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(varied, again))
    assert any(x.image.tobytes() != plain.occlude(face, rng_for(6, i), landmarks=LANDMARKS).image.tobytes()
               for i, x in enumerate(varied))


@pytest.mark.data("occluders/occluders.csv")
def test_shared_occluder_library() -> None:
    lib = OccluderLibrary.from_folder(SHARED / "occluders")
    assert len(lib) == 40 and len(lib.categories) == 9
    anchored = [o for o in lib if o.anchors is not None]
    assert len(anchored) == 21 and all(o.category == "mouth_mask" for o in anchored)
    for o in anchored:  # anchors land on the visible mask, give or take MaskTheFace's overhangs
        h, w = o.size
        assert (o.anchors[:, 0] > -0.25 * w).all() and (o.anchors[:, 0] < 1.25 * w).all()
        assert (o.anchors[:, 1] > -0.1 * h).all() and (o.anchors[:, 1] < 1.1 * h).all()


def test_unseen_occluder_tool_writes_a_library_the_face_preset_uses(tmp_path: Path, face: np.ndarray) -> None:
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_unseen_occluders.py"
    subprocess.run([sys.executable, str(tool), str(tmp_path / "unseen"), "--per-category", "2"], check=True,
                   capture_output=True)
    lib = OccluderLibrary.from_folder(tmp_path / "unseen")
    assert len(lib) == 8 and all(c.startswith("unseen_") for c in lib.categories) and len(lib.categories) == 4
    assert all(occ.kind == "rgba" and 0.05 < occ.coverage <= 1.0 for occ in lib)
    synth = Synthesizer(lib, preset="face", coverage=(0.25, 0.3))
    for i in range(12):
        res = synth.occlude(face, rng_for(3, i), landmarks=LANDMARKS)
        assert res.record["placement"] == "anywhere"
        assert 0.2 <= res.covered_fraction <= 0.35, res.record


# --- The pattern label the synthesiser writes, recomputed by brute force on the face frame -----------------------

def test_nearest_rule_is_opencvs() -> None:
    import cv2

    rng = np.random.default_rng(4)
    for src_h, src_w in [(72, 36), (136, 144), (110, 80), (125, 125), (7, 300)]:
        mask = rng.random((src_h, src_w)) < 0.5
        for h, w in [(112, 96), (112, 112)]:
            ref = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            assert np.array_equal(nearest_resize(mask, h, w), ref)


@pytest.mark.parametrize("preset,grid", [("paper", 5), ("face", 4)])
def test_label_on_an_aligned_crop_is_brute_force_argmax_iou(occ_folder: Path, face: np.ndarray, preset: str,
                                                           grid: int) -> None:
    """Whole-image frame (an aligned 112x96 crop): the label is computed at the crop's own resolution."""
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder), preset=preset, grid=grid, clean_prob=0.0)
    at_border = 0
    for i in range(40):
        res = synth.occlude(face, rng_for(21, i), landmarks=LANDMARKS)
        assert res.record["frame"] == [0, 0, 96, 112]
        assert res.pattern_label == frame_label(res.mask, (0, 0, 96, 112), face.shape, grid), (i, res.record)
        edge = res.mask[0].any() or res.mask[-1].any() or res.mask[:, 0].any() or res.mask[:, -1].any()
        at_border += bool(edge)
    assert at_border >= 5  # occluders clipped by the image edge are among the cases checked


@pytest.mark.parametrize("label_size", [(112, 96), (112, 112)])
def test_label_on_a_photo_uses_the_face_frame(occ_folder: Path, label_size: tuple[int, int]) -> None:
    """Original photo with a face box: only the mask inside the frame counts, resized to the label size."""
    photo = np.random.default_rng(0).integers(0, 255, (150, 170, 3), dtype=np.uint8)
    lib = OccluderLibrary.from_folder(occ_folder)
    synth = Synthesizer(lib, preset="paper", grid=5, clean_prob=0.0, label_size=label_size)
    boxes = {  # face box -> the frame it must give: inside the photo, and past its top-left and bottom-right edges
        (40.0, 30.0, 120.0, 130.0): (40, 30, 120, 130),
        (-20.5, -10.2, 60.0, 70.0): (0, 0, 60, 70),
        (100.3, 80.7, 190.0, 171.0): (100, 80, 170, 150),
    }
    past_frame = past_image = 0
    for n, (face_box, frame) in enumerate(boxes.items()):
        for i in range(25):
            res = synth.occlude(photo, rng_for(8, n, i), face_box=np.array(face_box))
            assert tuple(res.record["frame"]) == frame
            x0, y0, x1, y1 = frame
            assert res.covered_fraction == pytest.approx(res.mask[y0:y1, x0:x1].mean())
            assert res.pattern_label == frame_label(res.mask, frame, photo.shape, 5, label_size), (n, i)
            px0, py0, px1, py1 = res.record["pasted_box"]
            past_frame += px0 < x0 or py0 < y0 or px1 > x1 or py1 > y1
            past_image += px0 < 0 or py0 < 0 or px1 > photo.shape[1] or py1 > photo.shape[0]
    assert past_frame >= 10 and past_image >= 5  # occluders cut by the frame and by the image edge were checked


def test_label_ignores_the_mask_outside_the_frame(occ_folder: Path) -> None:
    """A box pasted half outside the frame: the label is the pattern of the part inside, not of the whole box."""
    photo = np.full((200, 200, 3), 128, np.uint8)
    synth = Synthesizer(OccluderLibrary.from_folder(occ_folder, categories=["cup"]), preset="paper", grid=3,
                        clean_prob=0.0, factors=(5.0,), label_size=(30, 30))
    frame = (50, 50, 150, 150)
    seen_outside = 0
    for i in range(30):
        res = synth.occlude(photo, rng_for(1, i), face_box=np.array(frame, float))
        inside = res.mask[50:150, 50:150]
        if inside.sum() < res.mask.sum():
            seen_outside += 1
        assert res.pattern_label == frame_label(res.mask, frame, photo.shape, 3, (30, 30))
        if not inside.any():
            assert res.pattern_label == 0
            continue
        # the 100-pixel frame maps onto the 30-pixel label crop at 10/3 pixels per label pixel: the label's box
        # drawn back onto the frame overlaps the mask inside it
        top, left, bottom, right = PatternVocabulary(30, 30, 3).boxes[res.pattern_label]
        back = np.zeros((100, 100), bool)
        back[top * 10 // 3:bottom * 10 // 3 + 1, left * 10 // 3:right * 10 // 3 + 1] = True
        assert (back & inside).any()
    assert seen_outside >= 10
