"""How an aligned crop becomes network input: the template it is cut with, its size and pixel normalisation.

Every model carries its :class:`Preprocess` (see :mod:`fromface.models.registry`), so a crop made for one network is
never fed to another. This module needs NumPy and OpenCV only, so an exported ONNX model runs without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fromface.errors import ConfigError


@dataclass(frozen=True)
class Preprocess:
    """How an aligned crop is made and scaled before it enters the network."""

    template: str  # alignment template name (see fromface.faces.alignment)
    size: tuple[int, int]  # (height, width) of the network input
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # RGB in [0, 1] space
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"

    def to_input(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB crops ((N,) H, W, 3) -> the network's float32 input (N, 3, H, W): ``(pixel / 255 - mean) / std``.

        The one place a crop becomes network input (inference, ONNX, evaluation, training). Crops of another size
        are resized to :attr:`size`. ``mean``/``std`` are given in RGB order, so a BGR network gets the channels
        and their statistics reversed together.
        """
        if isinstance(crops, np.ndarray) and crops.ndim == 3:
            crops = crops[None]
        h, w = self.size
        sized = [c if c.shape[:2] == (h, w) else cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in crops]
        arr = np.asarray(sized, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ConfigError(f"crops must be (N, H, W, 3) RGB, got shape {arr.shape}")
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if self.channel_order.upper() == "BGR":
            arr, mean, std = arr[..., ::-1], mean[::-1], std[::-1]
        arr = (arr / np.float32(255.0) - mean) / std
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
