"""Reading FROM's heat map (its feature mask averaged over channels) as a region of the aligned crop.

The heat map runs from 1 (features kept) to 0 (suppressed as occluded) on the last feature map's grid. Thresholded,
it marks the covered part of the face more finely than the predicted occlusion pattern, which is one rectangle of a
K x K grid; on shaped occluders and on occluders unlike the training ones it also measures closer to the truth
(docs/results.md, occlusion estimate). The visible fraction users are shown is therefore read from the heat map
wherever the mask suppresses anything, and from the pattern box otherwise: a model whose mask never dims a cell below
the threshold (one trained without pixel supervision) keeps the pattern box's figure.
"""

from __future__ import annotations

import numpy as np

#: A heat-map cell counts as occluded below this.
HEAT_OCCLUDED_BELOW = 0.5


def heat_mask(heatmap: np.ndarray, size: tuple[int, int], below: float = HEAT_OCCLUDED_BELOW) -> np.ndarray:
    """(height, width) bool: crop pixels whose heat-map cell is below ``below`` (the map spans the whole crop)."""
    heat = np.asarray(heatmap, dtype=np.float64)
    gh, gw = heat.shape
    rows = np.arange(size[0]) * gh // size[0]
    cols = np.arange(size[1]) * gw // size[1]
    return heat[rows[:, None], cols[None, :]] < below


def shown_visible_fraction(heatmap: np.ndarray | None, pattern_visible: float | None,
                           size: tuple[int, int]) -> float | None:
    """The visible fraction a face is reported with: 1 - the share of the crop the heat map marks as occluded, or
    ``pattern_visible`` (the predicted pattern box's) when there is no heat map or it marks nothing."""
    if heatmap is None:
        return pattern_visible
    covered = heat_mask(heatmap, size)
    if not covered.any():
        return pattern_visible
    return float(1.0 - covered.mean())
