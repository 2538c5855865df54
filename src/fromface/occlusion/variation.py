"""Occluder variation: a new colour, outline and aspect for an occluder each time it is pasted.

The occluder library holds a few dozen photos of real objects, most of them mouth masks, so a model
trained on them can learn what those objects look like instead of "something covers this part of the
face". Varying each paste keeps the objects' real textures and edges but breaks the link between an
occluder's exact colour or outline and "occluded": the colour is turned round the hue circle or tinted,
the outline is mirrored, stretched and sometimes cut to an ellipse or by a straight edge. Mouth masks
placed by their anchor points only change colour, so that they still sit on the face as worn.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from fromface.occlusion.occluders import Occluder, crop_to_alpha

#: Widest aspect change: the width is scaled by a factor in [1 / MAX_STRETCH, MAX_STRETCH].
MAX_STRETCH = 1.5
#: A cut that would leave less than this fraction of the occluder is not made.
MIN_KEPT = 0.3


def vary_occluder(occ: Occluder, rng: np.random.Generator) -> Occluder:
    """A varied copy of ``occ``: recoloured always; mirrored, stretched and cut unless it has anchors."""
    rgb, alpha = occ.rgb, occ.alpha
    if occ.anchors is None:
        if rng.random() < 0.5:
            rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
        rgb, alpha = _stretched(rgb, alpha, math.exp(rng.uniform(-math.log(MAX_STRETCH), math.log(MAX_STRETCH))))
        alpha = _cut(alpha, rng)
        rgb, alpha, _ = crop_to_alpha(rgb, alpha)
    return dataclasses.replace(occ, rgb=_recoloured(rgb, rng), alpha=np.ascontiguousarray(alpha))


def _recoloured(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Either turn the hue and scale saturation and brightness, or tint the shading with a random colour.

    The hue turn keeps a coloured object's texture; the tint also gives colour to white, grey and black
    occluders (most masks), whose hue a turn cannot change.
    """
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + float(rng.integers(180))) % 180
        hsv[..., 1] *= rng.uniform(0.5, 1.5)
        hsv[..., 2] *= rng.uniform(0.6, 1.3)
        hsv = np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    shade = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None] / 255.0
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    strength = rng.uniform(0.4, 1.0)
    tinted = strength * shade * colour * 1.5 + (1 - strength) * rgb.astype(np.float32)
    return np.clip(tinted, 0, 255).astype(np.uint8)


def _stretched(rgb: np.ndarray, alpha: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Width scaled by ``factor``, height kept (at least 2 pixels wide)."""
    height, width = alpha.shape
    new_width = max(2, int(round(width * factor)))
    if new_width == width:
        return rgb, alpha
    size = (new_width, height)
    return (cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(np.ascontiguousarray(alpha), size, interpolation=cv2.INTER_NEAREST))


def _cut(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A third of the time the outline is kept, a third cut to the inscribed ellipse, a third by a straight edge
    through the middle half of the occluder at a random angle."""
    choice = rng.random()
    if choice < 1 / 3:
        return alpha
    height, width = alpha.shape
    keep = np.zeros((height, width), np.uint8)
    if choice < 2 / 3:
        cv2.ellipse(keep, (width // 2, height // 2), (max(1, width // 2), max(1, height // 2)), 0, 0, 360, 1, -1)
    else:
        px, py = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        keep[(xs - px) * math.cos(angle) + (ys - py) * math.sin(angle) <= 0] = 1
    cut = alpha * keep
    if np.count_nonzero(cut) < MIN_KEPT * np.count_nonzero(alpha):
        return alpha
    return cut

