"""The occlusion report: which of the eyes, nose and mouth the model sees as covered, on hand-made inputs and on a
masked LFW photo through FaceRecognizer."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LFW_IMAGES, SHARED_DATA
from fromface.faces.alignment import get_template
from fromface.inference.occlusion_report import REGIONS, face_regions, occlusion_report

SIZE = (112, 112)
POINTS = get_template("arcface112").points_at(SIZE)


def report(box=None, pattern=5, occluded=True, heatmap=None):
    return occlusion_report(heatmap, box, pattern, occluded, SIZE, POINTS)


def test_regions_sit_where_the_template_puts_the_face():
    regions = face_regions(POINTS)
    assert list(regions) == list(REGIONS)
    for name, point in zip(("left eye", "right eye", "nose"), POINTS[:3]):
        top, left, bottom, right = regions[name]
        assert top < point[1] < bottom and left < point[0] < right
    assert regions["left eye"][2] < regions["nose"][0] < regions["nose"][2] < regions["mouth"][0]
    top, left, bottom, right = regions["mouth"]
    assert left < POINTS[3, 0] and POINTS[4, 0] < right and top < POINTS[3:, 1].mean() < bottom


def test_lower_half_box_covers_mouth_and_nose():
    out = report(box=(60, 0, 112, 112))
    assert out["covered"] == ["nose", "mouth"] and out["visible"] == ["eyes"]
    assert out["summary"] == "mouth and nose covered; compared mostly on the eyes"


def test_eye_band_covers_the_eyes():
    out = report(box=(38, 0, 62, 112))
    assert out["covered"] == ["eyes"]
    assert out["summary"] == "eyes covered; compared mostly on the nose and mouth"


def test_one_side_and_whole_face():
    left_half = report(box=(0, 0, 112, 50))
    assert "left eye" in left_half["covered"] and "right eye" in left_half["visible"]
    whole = report(box=(0, 0, 112, 112))
    assert whole["covered"] == ["eyes", "nose", "mouth"] and "little of the face left" in whole["summary"]


def test_clean_face_says_nothing_covered():
    # A clean verdict wins over a stray box or a dark heat map: the report never contradicts the condition.
    out = report(box=(60, 0, 112, 112), pattern=0, occluded=False, heatmap=np.zeros((7, 7)))
    assert out == {"covered": [], "visible": ["eyes", "nose", "mouth"], "summary": "nothing covered"}


def test_plain_model_has_no_report():
    assert occlusion_report(None, None, None, None, SIZE, POINTS) is None


def test_heat_map_marks_what_it_suppresses():
    heat = np.ones((7, 7))
    heat[5:, :] = 0.1  # bottom two rows of a 7x7 grid: the mouth band
    out = report(box=None, pattern=None, heatmap=heat)
    assert out["covered"] == ["mouth"] and out["summary"] == "mouth covered; compared mostly on the eyes and nose"
    assert report(box=None, pattern=None, heatmap=np.full((7, 7), 0.9))["covered"] == []  # kept everywhere


def test_occluded_but_away_from_the_features():
    out = report(box=(0, 0, 20, 112))  # a hat brim
    assert out["covered"] == [] and "away from the eyes, nose and mouth" in out["summary"]


@pytest.mark.data("lfw/images/George_W_Bush", "occluders")
def test_masked_lfw_photo_through_the_recognizer():
    from fromface.data.images import load_image
    from fromface.faces.aligner import FaceAligner
    from fromface.inference.recognizer import FaceRecognizer
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer

    photo = load_image(sorted((LFW_IMAGES / "George_W_Bush").glob("*.jpg"))[0])
    aligner = FaceAligner("arcface112", select="central")
    faces, _ = aligner.detect(photo)
    face = aligner.choose(faces, *photo.shape[:2])[0]
    synth = Synthesizer(OccluderLibrary.from_folder(SHARED_DATA / "occluders", categories=["mouth_mask"]),
                        preset="face", clean_prob=0.0)
    masked = synth.occlude_seeded(photo, 0, 0, face_box=face.box, landmarks=face.landmarks).image
    rec = FaceRecognizer()
    points = get_template(rec.preprocess.template).points_at(rec.preprocess.size)
    seen = {}
    for name, image in (("clean", photo), ("masked", masked)):
        fe = rec.embed_one(image)
        seen[name] = occlusion_report(fe.heatmap, fe.pattern_box, fe.pattern, fe.occluded, rec.preprocess.size,
                                      points)
        assert fe.occlusion_report == seen[name] and fe.to_dict()["occlusion_report"] == seen[name]  # wired in
    assert seen["clean"]["summary"] == "nothing covered"
    assert "mouth" in seen["masked"]["covered"] and "eyes" in seen["masked"]["visible"]
    assert seen["masked"]["summary"].startswith("mouth")
