"""How right is what a FROM model tells users about occlusion? Its estimate scored against the manifest's truth.

A FROM model reports, per face, a predicted occlusion pattern (a grid rectangle on the aligned crop), the visible
fraction that rectangle leaves and a heat map (its feature mask); :class:`~fromface.inference.recognizer.FaceEmbedding`
shows them to users and calls the face "occluded" from them. ``fromface occlude-pairs`` knows the truth, but in the
photo. The truth is carried into the crop with the same similarity transform the aligner warped the face with (the
face's final landmarks onto the model's template, then the resize to the network input), so both sides are pixel
masks on the same grid and the scores are plain set arithmetic:

* IoU of the predicted region with the true one (both empty: 1; the predicted pattern 0 is the empty region);
* visible-fraction error: ``|predicted visible fraction - (1 - share of the crop the occluder covers)|``, for the
  visible fraction users are shown (:func:`~fromface.occlusion.heatmap.shown_visible_fraction`: the heat map's where
  it marks anything, else the pattern box's) and for each of its two sources alone;
* the false "occluded" rate on the clean images of the set, by the product's own rule (``FaceEmbedding.occluded``).

Two references are scored beside the pattern box: the heat map thresholded (cells below
:data:`~fromface.occlusion.heatmap.HEAT_OCCLUDED_BELOW`) and a fixed guess, the lower half of the crop (what a model
that always says "mask" would score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fromface.evaluation.embedding import OcclusionEstimate
from fromface.faces.alignment import get_template, similarity_transform
from fromface.inference.recognizer import FaceEmbedding
from fromface.occlusion.heatmap import heat_mask

#: Manifest ``kind`` -> what it means for the outline: a pasted photo is a rectangle, an RGBA cut-out a shape.
KIND_LABELS = {"box": "rectangular", "rgba": "shaped"}


@dataclass
class TrueRegion:
    """Where an occluder lies in its photo: ``box`` (x0, y0, x1, y1), exclusive, in photo pixels, and ``mask`` the
    exact occluder pixels inside that box (True = covered), or None when only the box is known (then the whole box
    counts as covered)."""

    category: str
    kind: str
    box: tuple[int, int, int, int]
    mask: np.ndarray | None = None


def crop_matrix(landmarks: np.ndarray, template: str, size: tuple[int, int]) -> np.ndarray:
    """2x3 affine map from photo pixels to network-input pixels of the crop warped from ``landmarks``.

    The aligner warps the photo so the landmarks land on the template's points (``warp_face``); when the network
    input ``size`` (height, width) differs from the template's, the crop is then resized, which maps pixel centres
    as ``(p + 0.5) * scale - 0.5``. Both steps are composed here, so a photo point lands where the model sees it.
    """
    tpl = get_template(template)
    to_template = similarity_transform(np.asarray(landmarks, dtype=np.float64), tpl.points)
    sy, sx = size[0] / tpl.size[0], size[1] / tpl.size[1]
    resize = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return (resize @ np.vstack([to_template, [0.0, 0.0, 1.0]]))[:2]


def region_in_crop(region: TrueRegion, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width) bool: the crop pixels whose centre falls on a covered photo pixel (nearest pixel).

    Each crop pixel centre is mapped back into the photo through the inverse of ``matrix`` and looked up there:
    inside the box, and, when the exact mask is known, on one of its pixels.
    """
    h, w = size
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    px = np.floor(inverse[0, 0] * u + inverse[0, 1] * v + inverse[0, 2] + 0.5).astype(np.int64)
    py = np.floor(inverse[1, 0] * u + inverse[1, 1] * v + inverse[1, 2] + 0.5).astype(np.int64)
    x0, y0, x1, y1 = region.box
    inside = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
    if region.mask is None:
        return inside
    out = np.zeros((h, w), dtype=bool)
    out[inside] = region.mask[py[inside] - y0, px[inside] - x0]
    return out


def box_mask(box: tuple[int, int, int, int] | None, size: tuple[int, int]) -> np.ndarray:
    """(height, width) bool of a (top, left, bottom, right) box, bottom/right exclusive; None or empty: nothing."""
    out = np.zeros(size, dtype=bool)
    if box is not None:
        top, left, bottom, right = (int(v) for v in box)
        out[max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = True
    return out


def lower_half(size: tuple[int, int]) -> np.ndarray:
    """The fixed reference guess: the lower half of the crop covered."""
    return box_mask((size[0] // 2, 0, size[0], size[1]), size)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a and b| / |a or b| of two bool masks; 1.0 when both are empty (they agree that nothing is there)."""
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def visible_fraction_error(predicted: float, truth: np.ndarray) -> float:
    """|predicted visible fraction - the share of the crop the true region leaves uncovered|."""
    return abs(float(predicted) - (1.0 - float(np.mean(truth))))


def called_occluded(estimate: OcclusionEstimate) -> bool:
    """Whether users are told the face is occluded: ``FaceEmbedding.occluded``, the rule that also picks the
    occluded threshold, applied to the estimate (so a change of the rule changes this number too)."""
    face = FaceEmbedding(np.zeros(1, np.float32), np.zeros(4), np.zeros((5, 2)), "", 0.0, np.zeros((1, 1, 3)),
                         heatmap=estimate.heatmap, pattern=estimate.pattern,
                         pattern_probability=estimate.pattern_probability,
                         visible_fraction=estimate.shown_visible_fraction)
    return bool(face.occluded)


def score_face(estimate: OcclusionEstimate, region: TrueRegion) -> dict:
    """One occluded face: the true region in its crop and every score of the estimate against it."""
    size = (int(estimate.size[0]), int(estimate.size[1]))
    truth = region_in_crop(region, crop_matrix(estimate.landmarks, estimate.template, size), size)
    heat = heat_mask(estimate.heatmap, size) if estimate.heatmap is not None else None
    out = {"category": region.category, "kind": region.kind, "true_covered_fraction": float(truth.mean()),
           "iou": iou(box_mask(estimate.pattern_box, size), truth) if estimate.pattern is not None else None,
           "iou_heatmap": iou(heat, truth) if heat is not None else None,
           "iou_lower_half": iou(lower_half(size), truth), "called_occluded": called_occluded(estimate),
           "visible_fraction_error": None, "visible_fraction_error_pattern": None,
           "visible_fraction_error_heatmap": visible_fraction_error(1.0 - heat.mean(), truth) if heat is not None
           else None}
    shown = estimate.shown_visible_fraction
    if shown is not None:
        out["visible_fraction_error"] = visible_fraction_error(shown, truth)
    if estimate.visible_fraction is not None:
        out["visible_fraction_error_pattern"] = visible_fraction_error(estimate.visible_fraction, truth)
    return out


_MEANS = ("iou", "iou_heatmap", "iou_lower_half", "visible_fraction_error", "visible_fraction_error_pattern",
          "visible_fraction_error_heatmap",
          "true_covered_fraction")


def _mean(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarise(faces: list[dict]) -> dict:
    """Means over scored faces (a score a model cannot give stays None), and the share called occluded."""
    out: dict = {"n_images": len(faces)}
    for key in _MEANS:
        out[f"{key}_mean"] = _mean([f[key] for f in faces])
    out["called_occluded_rate"] = _mean([float(f["called_occluded"]) for f in faces])
    return out


def _grouped(faces: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for f in faces:
        groups.setdefault(key(f), []).append(f)
    return {name: summarise(groups[name]) for name in sorted(groups)}


def estimate_section(paths: list[Path], estimates: list[OcclusionEstimate | None], methods: list[str],
                     regions: dict[Path, TrueRegion], clean: set[Path], truth_note: str = "") -> dict:
    """The occlusion-estimate section of one model's results.

    ``paths``/``estimates``/``methods``: the run's images (resolved paths), the model's estimate of each (None
    where the face was not found) and how each face was found. ``regions``: the true region of every occluded
    image; ``clean``: the images of the set that are not occluded. Images without an estimate (no face found) are
    counted, not scored.
    """
    faces, clean_calls, unscored = [], [], {"occluded": 0, "clean": 0}
    for path, est, method in zip(paths, estimates, methods):
        kind = "occluded" if path in regions else "clean" if path in clean else None
        if kind is None:
            continue
        if est is None or method == "failed":
            unscored[kind] += 1
        elif kind == "occluded":
            faces.append(score_face(est, regions[path]))
        else:
            clean_calls.append(called_occluded(est))
    return {"estimate": True, "truth": truth_note, "occluded": summarise(faces),
            "occluded_without_estimate": unscored["occluded"],
            "per_category": _grouped(faces, lambda f: f["category"]),
            "per_kind": _grouped(faces, lambda f: KIND_LABELS.get(f["kind"], f["kind"] or "unknown")),
            "clean": {"n_images": len(clean_calls), "called_occluded": int(sum(clean_calls)),
                      "false_occluded_rate": _mean([float(c) for c in clean_calls]),
                      "without_estimate": unscored["clean"]}}


def no_estimate_section() -> dict:
    """What a model without an occlusion head (plain trunks, peers) gets in place of the section."""
    return {"estimate": False, "note": "no estimate"}
