"""The one rule by which a score and a threshold make a verdict, shared by verification, search and the metrics
that calibrate the shipped thresholds (so a threshold calibrated for FAR 1e-3 gives FAR 1e-3 where it is applied)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

Score = TypeVar("Score", float, np.ndarray)


def accepts(score: Score, threshold: float) -> Score:
    """"Same" iff ``score > threshold``: strictly above, on scalars and arrays alike."""
    return score > threshold
