"""The ``--show`` picture: both aligned faces side by side, the occlusion heat map over each, and the verdict.

Red means the model suppressed those features as occluded (heat map value near 0), no tint means it kept them; the
predicted occlusion pattern is outlined in yellow. Plain models without an occlusion head show the crops only.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from fromface.errors import ImageError

PANEL = 224  # pixels per face panel


def face_panel(face, size: int = PANEL) -> np.ndarray:
    """One face crop scaled to ``size`` with its heat map blended in and the predicted pattern outlined."""

    crop = cv2.resize(face.crop, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    if face.heatmap is not None:
        occluded = 1.0 - cv2.resize(np.asarray(face.heatmap, np.float32), (size, size),
                                    interpolation=cv2.INTER_LINEAR)
        alpha = np.clip(occluded, 0.0, 1.0)[..., None] * 0.6
        crop = crop * (1.0 - alpha) + np.array([255.0, 0.0, 0.0]) * alpha
    panel = np.clip(crop + 0.5, 0, 255).astype(np.uint8)
    if face.pattern_box is not None and face.pattern:
        h, w = face.crop.shape[:2]
        top, left, bottom, right = face.pattern_box
        p1 = (round(left * size / w), round(top * size / h))
        p2 = (round(right * size / w) - 1, round(bottom * size / h) - 1)
        cv2.rectangle(panel, p1, p2, (255, 220, 0), 2)
    return panel


def _caption(face) -> str:
    if face.visible_fraction is None:
        return f"{face.method}, no occlusion estimate"
    return f"pattern {face.pattern} p={face.pattern_probability:.2f}, visible {face.visible_fraction:.0%}"


def draw_verification(verification, size: int = PANEL) -> np.ndarray:
    """RGB picture of a :class:`~fromface.inference.recognizer.Verification` made with its faces."""

    if verification.faces is None:
        raise ValueError("this verification carries no faces to draw")
    panels = [face_panel(f, size) for f in verification.faces]
    gap, top, bottom = 8, 34, 44
    width = 2 * size + 3 * gap
    canvas = np.full((top + size + bottom + gap, width, 3), 255, np.uint8)
    if any(f.heatmap is not None for f in verification.faces):
        legend = "red: features masked as occluded   yellow: predicted occlusion pattern"
        cv2.putText(canvas, legend, (gap, top + size + 38), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (90, 90, 90), 1,
                    cv2.LINE_AA)
    for k, (panel, face) in enumerate(zip(panels, verification.faces)):
        x = gap + k * (size + gap)
        canvas[top:top + size, x:x + size] = panel
        cv2.putText(canvas, _caption(face), (x, top + size + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1,
                    cv2.LINE_AA)
    verdict = "SAME" if verification.same else "DIFFERENT"
    colour = (0, 140, 0) if verification.same else (200, 0, 0)
    text = f"{verdict}  score {verification.score:.3f} vs {verification.threshold:.3f} ({verification.condition})"
    cv2.putText(canvas, text, (gap, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 2, cv2.LINE_AA)
    return canvas


def save_verification(verification, path: str | os.PathLike, size: int = PANEL) -> Path:
    """Draw and write the picture (format from the file extension)."""

    path = Path(path)
    picture = draw_verification(verification, size)
    if path.parent and not path.parent.exists():
        raise ImageError(path, "output folder does not exist")
    try:
        ok = cv2.imwrite(str(path), picture[..., ::-1])
    except cv2.error:
        ok = False
    if not ok:
        raise ImageError(path, "could not write the picture (unknown extension or unwritable path)")
    return path
