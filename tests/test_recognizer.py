"""FaceRecognizer: embeddings with occlusion estimates, image kinds, batches, thresholds and bad inputs.

Most tests use an untrained FROM MobileFaceNet on synthetic photos with the centre-crop fallback (no data needed);
tests marked ``data`` use real LFW photos from ../shared/data and skip when it is absent.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES, SHARED_DATA
from fromface.errors import ImageError, NoFaceError

DATA = SHARED_DATA
LFW = LFW_IMAGES


class NoDetector:
    """Finds nothing, so synthetic photos go straight to the centre-crop fallback (keeps the tests fast)."""

    score_threshold = 0.6

    def detect(self, image_rgb, score_threshold=None):
        return []


@pytest.fixture(scope="module")
def recognizer():
    import torch

    from fromface.inference.recognizer import FaceRecognizer

    torch.manual_seed(0)
    return FaceRecognizer("from_mobilefacenet", fallback=True, detector=NoDetector())


def photo(seed: int, size: int = 160) -> np.ndarray:
    """A smooth random RGB picture (no face: embedding relies on the centre-crop fallback)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def lfw(name: str, i: int = 1) -> Path:
    return LFW / name / f"{name}_{i:04d}.jpg"


def test_embed_returns_occlusion_estimate(recognizer):
    faces = recognizer.embed(photo(1))
    assert len(faces) == 1
    f = faces[0]
    assert f.method == "fallback" and f.embedding.shape == (512,) and f.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(f.embedding)) - 1.0) < 1e-5
    assert f.heatmap.shape == (7, 7) and 0.0 <= f.heatmap.min() <= f.heatmap.max() <= 1.0
    assert 0 <= f.pattern < 226 and 0.0 < f.pattern_probability <= 1.0
    top, left, bottom, right = f.pattern_box
    assert 0 <= top <= bottom <= 112 and 0 <= left <= right <= 112
    pattern_visible = 1.0 - (bottom - top) * (right - left) / 112**2
    from fromface.occlusion.heatmap import shown_visible_fraction
    assert f.visible_fraction == pytest.approx(shown_visible_fraction(f.heatmap, pattern_visible, (112, 112)))
    assert f.crop.shape == (112, 112, 3) and f.box.shape == (4,) and f.landmarks.shape == (5, 2)
    d = f.to_dict()
    assert d["method"] == "fallback" and len(d["embedding"]) == 512 and len(d["heatmap"]) == 7


def test_visible_fraction_is_read_from_the_heat_map_where_the_mask_suppresses_features(recognizer, monkeypatch):
    """A mask that dims the lower 3 of 7 rows gives the crop rows under them as covered, even when the pattern head
    says "clean" (its box leaves everything visible); a mask that dims nothing keeps the pattern box's figure."""
    logits = np.full((1, 226), -10.0, np.float32)
    logits[0, 0] = 10.0  # pattern 0 (clean), confidently
    mask = np.ones((1, 1, 7, 7), np.float32)
    mask[0, 0, 4:] = 0.1
    monkeypatch.setattr(recognizer, "forward", lambda x: (np.ones((len(x), 512), np.float32), mask, logits))
    f = recognizer.embed(photo(3))[0]
    covered_rows = int(np.count_nonzero(np.arange(112) * 7 // 112 >= 4))
    assert f.pattern == 0 and f.pattern_box == (0, 0, 0, 0)
    assert f.visible_fraction == pytest.approx(1.0 - covered_rows / 112)
    assert f.occluded is True  # 43% of the face dimmed: the occluded threshold applies
    mask[:] = 0.8
    f = recognizer.embed(photo(3))[0]
    assert f.visible_fraction == 1.0 and f.occluded is False


def test_image_kinds_give_the_same_embedding(recognizer, tmp_path):
    arr = photo(2)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    embs = [faces[0].embedding for faces in recognizer.embed([arr, str(path), path, buf.getvalue(),
                                                              Image.fromarray(arr)])]
    for e in embs[1:]:
        np.testing.assert_allclose(e, embs[0], atol=1e-5)


def test_batch_matches_single(recognizer):
    imgs = [photo(3), photo(4)]
    batch = recognizer.embed(imgs)
    assert len(batch) == 2 and all(len(faces) == 1 for faces in batch)
    for img, faces in zip(imgs, batch):
        np.testing.assert_allclose(faces[0].embedding, recognizer.embed(img)[0].embedding, atol=1e-4)
    assert recognizer.embed([]) == []


def test_embed_each_keeps_going_past_a_bad_image(recognizer, tmp_path):
    from fromface.errors import ImageError

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    imgs = [photo(5), str(broken), photo(6)]
    results = recognizer.embed_each(imgs)
    assert isinstance(results[1], ImageError) and "broken.jpg" in str(results[1])
    for img, faces in zip([imgs[0], imgs[2]], [results[0], results[2]]):
        np.testing.assert_allclose(faces[0].embedding, recognizer.embed(img)[0].embedding, atol=1e-4)
    with pytest.raises(ImageError, match="broken.jpg"):
        recognizer.embed(imgs)  # embed raises on the first bad image
    assert recognizer.embed_each([]) == []


def test_verify_uncalibrated_and_identical(recognizer):
    v = recognizer.verify(photo(6), photo(6))
    assert v.score == pytest.approx(1.0, abs=1e-5) and v.same
    assert v.reason == "uncalibrated" and v.threshold == 0.35 and v.condition in ("clean", "occluded")
    w = recognizer.verify(photo(6), photo(7))
    assert w.score < 0.9999
    assert w.to_dict()["faces"][0]["method"] == "fallback"


def test_verify_uses_calibrated_threshold_per_condition(recognizer, monkeypatch):
    from fromface.inference.recognizer import FaceRecognizer
    from fromface.models import get_spec

    spec = get_spec("from_mobilefacenet")
    monkeypatch.setattr(spec, "pretrained", {"unit": {"thresholds": {
        "clean": {"far1e-3": 0.41, "far1e-2": 0.3}, "occluded": {"far1e-3": 0.27}}}})
    reloaded = FaceRecognizer("from_mobilefacenet", fallback=True, detector=NoDetector())
    assert (reloaded.tag, reloaded.thresholds["occluded"]) == ("unit", {"far1e-3": 0.27})
    monkeypatch.setattr(recognizer, "tag", reloaded.tag)
    monkeypatch.setattr(recognizer, "thresholds", reloaded.thresholds)
    a, b = recognizer.embed([photo(8), photo(9)])
    a, b = a[0], b[0]
    a.pattern, a.visible_fraction = 0, 1.0
    b.pattern, b.visible_fraction = 0, 1.0
    clean = recognizer.verify(a, b)
    assert (clean.condition, clean.threshold) == ("clean", 0.41) and clean.reason.startswith("calibrated (unit")
    b.pattern, b.visible_fraction, b.pattern_probability = 12, 0.6, 0.9
    occ = recognizer.verify(a, b)
    assert (occ.condition, occ.threshold) == ("occluded", 0.27)
    assert occ.same == (occ.score > 0.27)
    monkeypatch.setattr(recognizer, "far", "far1e-2")
    assert recognizer.verify(a, a).threshold == 0.3


def test_thresholds_have_one_schema():
    from fromface.errors import ConfigError
    from fromface.inference.face_model import checked_thresholds

    assert checked_thresholds({"occluded": {"far1e-2": 0.2}}, "t") == {"occluded": {"far1e-2": 0.2}}
    assert checked_thresholds(None, "t") == {}
    for flat in ({"clean_far1e-3": 0.5}, {"clean/far1e-3": 0.5}, {"clean": {"far1e-3": "high"}}):
        with pytest.raises(ConfigError, match="^tag x: thresholds must be"):
            checked_thresholds(flat, "tag x")


def test_user_threshold_and_plain_model():
    from fromface.inference.recognizer import FaceRecognizer

    r = FaceRecognizer("mobilefacenet", fallback=True, threshold=0.9, detector=NoDetector())
    f = r.embed(photo(10))[0]
    assert f.heatmap is None and f.pattern is None and f.visible_fraction is None and f.occluded is None
    v = r.verify(f, f)
    assert v.threshold == 0.9 and v.reason == "user threshold" and v.condition == "clean"


def test_no_face_corrupt_and_missing(recognizer, tmp_path):
    from fromface.inference.recognizer import FaceRecognizer

    strict = FaceRecognizer(recognizer.torch_model)  # the real YuNet detector, no fallback
    with pytest.raises(NoFaceError, match="no face"):
        strict.embed(np.full((96, 96, 3), 128, np.uint8))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        recognizer.embed(bad)
    with pytest.raises(ImageError, match="missing.png"):
        recognizer.verify(tmp_path / "missing.png", photo(1))


def test_bad_arguments():
    from fromface.errors import ConfigError
    from fromface.inference.recognizer import FaceRecognizer

    with pytest.raises(ConfigError, match="backend"):
        FaceRecognizer("mobilefacenet", backend="tensorflow")
    with pytest.raises(ConfigError, match="select"):
        FaceRecognizer("mobilefacenet", select="smallest")
    with pytest.raises(ConfigError, match="unknown model"):
        FaceRecognizer("mobilefacenett")


def test_default_model_resolves():
    import warnings

    from fromface.inference.face_model import PLAIN_TRUNK_MODEL, default_model_name
    from fromface.models import get_spec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = default_model_name()
    assert name == "from_sface_net" and not caught  # the shipped tag marked default
    spec = get_spec("from_sface_net")
    saved = spec.pretrained
    try:
        spec.pretrained = {}  # a stripped install: the plain SFace port, said out loud
        with pytest.warns(UserWarning, match="no shipped model is marked default"):
            assert default_model_name() == PLAIN_TRUNK_MODEL
    finally:
        spec.pretrained = saved


@pytest.mark.data("lfw/images")
def test_real_faces_detected_and_many_faces(recognizer):
    from fromface.inference.recognizer import FaceRecognizer, ManyFacesError

    a, b = lfw("Aaron_Peirsol", 1), lfw("Aaron_Peirsol", 3)
    recognizer = FaceRecognizer(recognizer.torch_model)
    fa = recognizer.embed(a)[0]
    assert fa.method in ("detected", "retry") and fa.score > 0.5
    assert 40 < fa.box[0] < fa.box[2] < 210
    two = np.concatenate([np.asarray(Image.open(a)), np.asarray(Image.open(b))], axis=1)
    single = FaceRecognizer(recognizer.torch_model, select="single")
    with pytest.raises(ManyFacesError, match="2 faces"):
        single.embed(two)
    both = FaceRecognizer(recognizer.torch_model, select="all").embed(two)
    assert len(both) == 2


def test_top_level_exports_are_lazy():
    import subprocess
    import sys

    code = ("import sys, fromface; assert 'torch' not in sys.modules; "
            "from fromface import FaceRecognizer, Gallery; assert FaceRecognizer.__name__ == 'FaceRecognizer'; "
            "assert Gallery.__name__ == 'Gallery'; assert 'torch' not in sys.modules")
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); {code}"], check=True, timeout=60)


def test_pretrained_tag_weights_default_and_thresholds(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from fromface.errors import ConfigError
    from fromface.inference.face_model import default_model_name
    from fromface.inference.recognizer import FaceRecognizer
    from fromface.models import create_model, get_spec

    torch.manual_seed(1)
    trained = create_model("mobilefacenet").eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    torch.save({"model_name": "mobilefacenet", "model_kwargs": {}, "state_dict": trained.state_dict()},
               tmp_path / "w.pt")
    info = {"file": str(weights), "default": True, "thresholds": {"clean": {"far1e-3": 0.5}}}
    monkeypatch.setattr(get_spec("mobilefacenet"), "pretrained", {"v1": info})
    monkeypatch.setattr(get_spec("from_sface_net"), "pretrained", {})  # the shipped default steps aside
    assert default_model_name() == "mobilefacenet"  # a tag marked default takes over
    by_name = FaceRecognizer(fallback=True, detector=NoDetector())
    assert by_name.model_name == "mobilefacenet" and by_name.tag == "v1"
    from_ckpt = FaceRecognizer(str(tmp_path / "w.pt"), fallback=True, detector=NoDetector())
    img = photo(11)
    np.testing.assert_allclose(by_name.embed(img)[0].embedding, from_ckpt.embed(img)[0].embedding, atol=1e-5)
    v = by_name.verify(img, img)
    assert v.threshold == 0.5 and v.reason.startswith("calibrated (v1, clean, far1e-3")
    assert from_ckpt.verify(img, img).reason == "uncalibrated"  # a checkpoint's weights are not the tag's
    with pytest.raises(ConfigError, match="no pretrained tag 'v9'"):
        FaceRecognizer("mobilefacenet", tag="v9")


def test_occluded_flag():
    from fromface.inference.recognizer import FaceEmbedding

    def face(pattern, visible, probability=None):
        return FaceEmbedding(np.ones(4, np.float32), np.zeros(4), np.zeros((5, 2)), "detected", 1.0,
                             np.zeros((112, 112, 3), np.uint8), pattern=pattern, visible_fraction=visible,
                             pattern_probability=probability)

    assert face(None, None).occluded is None
    assert face(0, 1.0).occluded is False
    assert face(5, 0.95).occluded is True
    assert face(0, 0.0).occluded is True  # a fully hidden face, even if the pattern head said clean
    # The switch needs a confident prediction: a grayscale photo's 2%-probability pattern is not an occlusion.
    assert face(5, 0.6, probability=0.02).occluded is False
    assert face(5, 0.6, probability=0.049).occluded is False and face(5, 0.6, probability=0.05).occluded is True


@pytest.mark.data("lfw/pairs.txt", "lfw/images")
def test_default_model_verifies_lfw_pairs():
    """The default (pretrained) model with its calibrated threshold gets the first LFW pairs right."""
    from fromface.data.pairs import read_pairs
    from fromface.inference.recognizer import FaceRecognizer

    lfw_root = DATA / "lfw"
    pairs = read_pairs(lfw_root / "pairs.txt", root=lfw_root / "images", format="lfw")
    chosen = [p for p in pairs if p.same][:2] + [p for p in pairs if not p.same][:2]
    rec = FaceRecognizer(select="central", fallback=True)
    results = [rec.verify(p.path1, p.path2) for p in chosen]
    assert [v.same for v in results] == [p.same for p in chosen], [round(v.score, 3) for v in results]
    assert all(v.reason == "uncalibrated" or v.reason.startswith("calibrated") for v in results)


# ---------------------------------------------------------------------------------------- the shipped default model
DEFAULT_TAG = "celeba1140-photometric"


@pytest.fixture(scope="module")
def default_recognizer():
    from fromface.inference.recognizer import FaceRecognizer

    return FaceRecognizer()  # from_sface_net:celeba1140-photometric, with its align head


def tag_thresholds() -> dict:
    """The calibrated thresholds as shipped in the registry, {condition: {far: value}}."""
    from fromface.models import get_spec

    return get_spec("from_sface_net").pretrained[DEFAULT_TAG]["thresholds"]


@pytest.mark.data("lfw/images")
def test_default_model_picks_the_probe_out_of_a_lineup(default_recognizer):
    """One photo each of three LFW people; another photo of each is verified against all three: only its own
    person passes, by a clear margin; a person not in the line-up passes against no one."""
    rec = default_recognizer
    people = ("Abdullah_Gul", "Alejandro_Toledo", "Angelina_Jolie")
    lineup = [sorted((LFW / p).iterdir())[0] for p in people]
    probes = [sorted((LFW / p).iterdir())[2] for p in people] + [sorted((LFW / "Alan_Greenspan").iterdir())[0]]
    faces = [found[0] for found in rec.embed(lineup + probes)]
    known, asked = faces[:len(lineup)], faces[len(lineup):]
    clean = tag_thresholds()["clean"]["far1e-3"]
    for k, probe in enumerate(asked):
        results = [rec.verify(probe, face) for face in known]
        scores = [v.score for v in results]
        np.testing.assert_allclose(scores, [float(probe.embedding @ f.embedding) for f in known], atol=1e-6)
        assert all((v.condition, v.threshold) == ("clean", clean) for v in results)
        ranked = sorted(range(len(known)), key=lambda j: -scores[j])
        if k < len(people):
            assert ranked[0] == k and scores[k] - scores[ranked[1]] > 0.3, scores
            assert [v.same for v in results] == [j == k for j in range(len(known))]
        else:
            assert max(scores) < clean - 0.1 and not any(v.same for v in results), scores


@pytest.mark.data("lfw/images", "occluders")
def test_default_model_switches_condition_both_ways(default_recognizer, monkeypatch):
    """A clean LFW pair is compared under the tag's "clean" threshold; the same pair with a mouth mask pasted on one
    photo under its "occluded" one, whichever side the occluded photo is on; the verdict is score > threshold."""
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer, rng_for

    rec = default_recognizer
    thresholds = tag_thresholds()
    a, b = lfw("Angelina_Jolie", 1), lfw("Angelina_Jolie", 2)
    fa, fb = (found[0] for found in rec.embed([a, b]))
    assert fa.occluded is False and fb.occluded is False
    masks = Synthesizer(OccluderLibrary.from_folder(DATA / "occluders", categories=["mouth_mask"]), "face",
                        coverage=(0.4, 0.45))
    covered = masks.occlude(b, rng_for(0, 2), face_box=fb.box, landmarks=fb.landmarks)
    assert covered.covered_fraction > 0.35
    fo = rec.embed(covered.image)[0]
    assert fo.occluded is True and fo.pattern != 0, (fo.pattern, fo.pattern_probability)

    clean = rec.verify(fa, fb)
    assert (clean.condition, clean.threshold) == ("clean", thresholds["clean"]["far1e-3"])
    assert clean.reason.startswith(f"calibrated ({DEFAULT_TAG}, clean, far1e-3")
    for occ in (rec.verify(fa, fo), rec.verify(fo, fa)):
        assert (occ.condition, occ.threshold) == ("occluded", thresholds["occluded"]["far1e-3"])
        assert occ.reason.startswith(f"calibrated ({DEFAULT_TAG}, occluded, far1e-3")
    assert thresholds["occluded"]["far1e-3"] != thresholds["clean"]["far1e-3"]  # else the switch would not show
    for v in (clean, rec.verify(fa, fo)):
        assert v.same is (v.score > v.threshold) and v.same  # the same person, clean or masked
    monkeypatch.setattr(rec, "far", "far1e-2")
    assert rec.verify(fa, fb).threshold == thresholds["clean"]["far1e-2"]
    assert rec.verify(fa, fo).threshold == thresholds["occluded"]["far1e-2"]
    # The verdict rule at its edge: a threshold equal to the score rejects, one just below accepts.
    score = clean.score
    monkeypatch.setattr(rec, "thresholds", {"clean": {"far1e-2": score}})
    assert rec.verify(fa, fb).threshold == score and rec.verify(fa, fb).same is False
    monkeypatch.setattr(rec, "thresholds", {"clean": {"far1e-2": float(np.nextafter(score, -1.0))}})
    assert rec.verify(fa, fb).same is True
