"""What the model sees as covered, in words: "mouth and nose covered; compared mostly on the eyes".

A FROM model returns a predicted occlusion pattern (a box on the aligned crop) and a heat map (its feature mask).
Those are numbers on a grid; people ask which parts of the face were hidden. The crop is aligned to a template, so
the five alignment points (eyes, nose tip, mouth corners) sit at known places in it, and regions around them can
be tested against the box and the heat map.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: A region counts as covered when at least this share of its area lies inside the predicted pattern box.
BOX_SHARE = 0.5
#: ... or when the heat map, averaged over the region, is below this (the mask runs from 1 kept to 0 suppressed).
HEAT_BELOW = 0.5
#: Region order in the report and the words for groups of regions.
REGIONS = ("left eye", "right eye", "nose", "mouth")


def face_regions(points: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
    """(top, left, bottom, right) in crop pixels of each region, sized by the distance ``d`` between the eyes.

    ``points``: the five alignment points (x, y) in the crop, in the detector's order: left eye, right eye (as seen
    in the image), nose tip, left and right mouth corners. Eyes: ``0.5 d`` wide, ``0.36 d`` high around each eye.
    Nose: ``0.44 d`` wide, from a quarter of ``d`` below the eye line to just under the tip. Mouth: the corners
    plus ``0.12 d`` on each side, ``0.3 d`` high around their line.
    """
    p = np.asarray(points, dtype=np.float64).reshape(5, 2)
    d = float(np.linalg.norm(p[1] - p[0])) or 1.0
    eye_y = (p[0, 1] + p[1, 1]) / 2
    mouth_y = (p[3, 1] + p[4, 1]) / 2

    def around(x: float, y: float, half_w: float, half_h: float) -> tuple[float, float, float, float]:
        return (y - half_h * d, x - half_w * d, y + half_h * d, x + half_w * d)

    return {
        "left eye": around(p[0, 0], p[0, 1], 0.25, 0.18),
        "right eye": around(p[1, 0], p[1, 1], 0.25, 0.18),
        "nose": (eye_y + 0.25 * d, p[2, 0] - 0.22 * d, p[2, 1] + 0.1 * d, p[2, 0] + 0.22 * d),
        "mouth": (mouth_y - 0.15 * d, p[3, 0] - 0.12 * d, mouth_y + 0.15 * d, p[4, 0] + 0.12 * d),
    }


def _box_share(region: tuple[float, ...], box: tuple[int, int, int, int]) -> float:
    top, left, bottom, right = region
    b_top, b_left, b_bottom, b_right = box
    inter_h = max(0.0, min(bottom, b_bottom) - max(top, b_top))
    inter_w = max(0.0, min(right, b_right) - max(left, b_left))
    area = max((bottom - top) * (right - left), 1e-9)
    return inter_h * inter_w / area


def _heat_mean(region: tuple[float, ...], heatmap: np.ndarray, crop_size: tuple[int, int]) -> float:
    """Mean of the heat map over the grid cells the region touches (the map spans the whole crop)."""
    gh, gw = heatmap.shape[:2]
    h, w = crop_size
    top, left, bottom, right = region
    r0, r1 = int(np.clip(np.floor(top / h * gh), 0, gh - 1)), int(np.clip(np.ceil(bottom / h * gh), 1, gh))
    c0, c1 = int(np.clip(np.floor(left / w * gw), 0, gw - 1)), int(np.clip(np.ceil(right / w * gw), 1, gw))
    return float(heatmap[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)].mean())


def _words(regions: list[str]) -> list[str]:
    """Both eyes read as "eyes"."""
    if "left eye" in regions and "right eye" in regions:
        regions = ["eyes" if r == "left eye" else r for r in regions if r != "right eye"]
    return regions


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _summary(covered: list[str]) -> str:
    if not covered:
        return "occlusion predicted away from the eyes, nose and mouth; compared on the whole face"
    seen = [r for r in REGIONS if r not in covered]
    said = _join(list(reversed(_words(covered))))  # lower regions first: "mouth and nose covered"
    if not seen:
        return f"{said} covered; little of the face left to compare"
    return f"{said} covered; compared mostly on the {_join(_words(seen))}"


def occlusion_report(heatmap: np.ndarray | None, pattern_box: tuple[int, int, int, int] | None, pattern: int | None,
                     occluded: bool | None, crop_size: tuple[int, int], points: np.ndarray) -> dict[str, Any] | None:
    """Which of the eyes, nose and mouth the model sees as covered, and a sentence saying so.

    Returns ``{"covered": [...], "visible": [...], "summary": "..."}`` with regions from :data:`REGIONS`, or None
    for a model without an occlusion estimate (``occluded``, ``pattern`` and ``heatmap`` all None).

    The rule: nothing is covered unless the face is called occluded (``occluded`` True, the same flag that picks
    the occluded threshold), so the report never contradicts the verdict's condition. Then a region (located from
    ``points``, the template's five points in the crop of ``crop_size = (height, width)``, see
    :func:`face_regions`) is covered when at least :data:`BOX_SHARE` of it lies inside ``pattern_box`` (top, left,
    bottom, right in crop pixels; pattern 0 has no box), or when the heat map averages below :data:`HEAT_BELOW`
    over it. The box is the main evidence: the shipped model's mask stays near 0.9 everywhere (docs/default-model.md
    says it does little), so its heat map alone rarely marks anything.
    """
    if occluded is None and pattern is None and heatmap is None:
        return None
    regions = face_regions(points)
    covered: list[str] = []
    if occluded:
        box = pattern_box if pattern_box is not None and pattern not in (None, 0) else None
        heat = None if heatmap is None else np.asarray(heatmap, dtype=np.float64)
        for name in REGIONS:
            by_box = box is not None and _box_share(regions[name], box) >= BOX_SHARE
            by_heat = heat is not None and heat.ndim == 2 and _heat_mean(regions[name], heat, crop_size) < HEAT_BELOW
            if by_box or by_heat:
                covered.append(name)
    visible = [r for r in REGIONS if r not in covered]
    summary = _summary(covered) if occluded else "nothing covered"
    return {"covered": _words(covered), "visible": _words(visible), "summary": summary}
