"""FROM's occlusion-pattern vocabulary: every grid-aligned rectangle of a K x K grid, plus "clean".

Pattern 0 is the empty pattern (no occlusion). The others are all rectangles whose corners lie on
the grid lines, so N = (K(K+1)/2)^2 + 1. Grid lines are placed at round(i * size / K); the last
line is exactly the image edge, so rectangles touching the border include the last row/column.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def num_patterns(grid: int) -> int:
    """N = (K(K+1)/2)^2 + 1."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return (grid * (grid + 1) // 2) ** 2 + 1


def grid_lines(size: int, grid: int) -> np.ndarray:
    """The K+1 pixel positions of the grid lines along one axis, 0 and ``size`` included."""
    return np.floor(np.arange(grid + 1) * size / grid + 0.5).astype(np.int64)


def pattern_boxes(height: int, width: int, grid: int) -> np.ndarray:
    """(N, 4) boxes (top, left, bottom, right) in pixels, bottom/right exclusive; row 0 is empty."""
    rows, cols = grid_lines(height, grid), grid_lines(width, grid)
    spans = [(a, b) for a in range(grid) for b in range(a + 1, grid + 1)]
    boxes = [(0, 0, 0, 0)]
    boxes += [(rows[r0], cols[c0], rows[r1], cols[c1]) for r0, r1 in spans for c0, c1 in spans]
    return np.asarray(boxes, dtype=np.int64)


@lru_cache(maxsize=16)
def _patterns_cached(height: int, width: int, grid: int) -> np.ndarray:
    boxes = pattern_boxes(height, width, grid)
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for i, (top, left, bottom, right) in enumerate(boxes):
        masks[i, top:bottom, left:right] = True
    masks.setflags(write=False)
    return masks


def patterns(height: int, width: int, grid: int) -> np.ndarray:
    """The N binary pattern masks, shape (N, height, width), pattern 0 empty. Read-only, cached."""
    if height < grid or width < grid:
        raise ValueError(f"a {grid}x{grid} grid needs an image of at least {grid}x{grid} pixels")
    return _patterns_cached(int(height), int(width), int(grid))


def _argmax_iou(masks: np.ndarray, flat_vocab: np.ndarray, vocab_area: np.ndarray) -> np.ndarray:
    single = masks.ndim == 2
    batch = masks[None] if single else masks
    flat = batch.reshape(len(batch), -1).astype(np.float32)
    if flat.shape[1] != flat_vocab.shape[1]:
        raise ValueError(f"masks are {batch.shape[1:]} but the vocabulary has {flat_vocab.shape[1]} pixels")
    inter = flat @ flat_vocab.T
    area = flat.sum(1)
    union = area[:, None] + vocab_area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    labels = iou.argmax(axis=1)
    labels[area == 0] = 0
    return labels[0] if single else labels


def label_patterns(masks: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Index of the pattern with the highest IoU for each occlusion mask; empty masks get 0.

    ``masks`` is (B, H, W) or (H, W) boolean, ``vocabulary`` the (N, H, W) output of
    :func:`patterns`. One matrix product, no Python loop over patterns.
    """
    flat_vocab = vocabulary.reshape(len(vocabulary), -1).astype(np.float32)
    return _argmax_iou(np.asarray(masks), flat_vocab, flat_vocab.sum(1))


@dataclass(frozen=True)
class PredictedPattern:
    """What a pattern head's logits say about one face: the most likely pattern, its probability, the probability
    that something covers the face (1 - P(pattern 0)), its box (top, left, bottom, right) in crop pixels and the
    visible fraction it leaves (1 - box area / crop area)."""

    pattern: int
    probability: float
    occlusion_probability: float
    box: tuple[int, int, int, int]
    visible_fraction: float


def predicted_pattern(logits: np.ndarray, boxes: np.ndarray, height: int, width: int) -> PredictedPattern:
    """Softmax over one face's pattern logits and the argmax's box: the one reading of a pattern head, shared by
    :class:`~fromface.inference.recognizer.FaceRecognizer` (what users are shown) and the evaluation that scores
    it. ``boxes``: :func:`pattern_boxes` for the crop's ``height`` x ``width``."""
    logits = np.asarray(logits, dtype=np.float64)
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    idx = int(prob.argmax())
    top, left, bottom, right = (int(v) for v in boxes[idx])
    visible = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return PredictedPattern(idx, float(prob[idx]), float(1.0 - prob[0]), (top, left, bottom, right), visible)


class PatternVocabulary:
    """The vocabulary for one input size and grid, its float matrix kept for fast labelling."""

    def __init__(self, height: int, width: int, grid: int):
        self.height, self.width, self.grid = height, width, grid
        self.masks = patterns(height, width, grid)
        self.boxes = pattern_boxes(height, width, grid)
        self._flat = self.masks.reshape(len(self.masks), -1).astype(np.float32)
        self._area = self._flat.sum(1)

    def __len__(self) -> int:
        return len(self.masks)

    def label(self, masks: np.ndarray) -> np.ndarray:
        """Argmax-IoU pattern index for one (H, W) or a batch (B, H, W) of occlusion masks."""
        return _argmax_iou(np.asarray(masks), self._flat, self._area)
