"""A torch Dataset that occludes aligned faces on the fly for FROM training.

Each sample's randomness comes from its own generator seeded by (seed, epoch, index), so the stream is
the same whatever the number of DataLoader workers or their start method, and changes every epoch.
The epoch lives in a shared-memory tensor: :meth:`OccludedFaceDataset.set_epoch` reaches persistent
workers too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fromface.data.images import load_image
from fromface.errors import DataError
from fromface.occlusion.synth import Synthesizer, rng_for

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_identity_folder(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, identity index) for every image under ``root/<identity>/``; identities sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: identity folder does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples += [(p, idx) for p in files]
    if not samples:
        raise DataError(f"{root}: no images found in identity sub-folders (expected root/<identity>/<image>)")
    return samples, classes


def template_landmarks(template: str, size: tuple[int, int]) -> np.ndarray | None:
    """The alignment template's five points scaled to ``size`` = (h, w), or None if the template is unknown."""
    try:
        from fromface.faces.alignment import TEMPLATES
    except ImportError:  # pragma: no cover - inference is part of the package
        return None
    tpl = TEMPLATES.get(template)
    if tpl is None:
        return None
    return tpl.points * np.array([size[1] / tpl.size[1], size[0] / tpl.size[0]])


def to_tensor(image: np.ndarray, preprocess) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> normalised float (3, H, W) tensor in the model's channel order."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    x = x.sub_(mean).div_(std)
    if getattr(preprocess, "channel_order", "RGB").upper() == "BGR":
        x = x.flip(0)
    return x.contiguous()


class OccludedFaceDataset(Dataset):
    """Aligned faces in, ``(image_tensor, identity, pattern_label, occlusion_mask)`` out.

    ``source`` is an identity folder (``root/<identity>/<image>``) or a pair ``(images, labels)`` of
    packed arrays: (N, H, W, 3) uint8 aligned crops and (N,) identity indices. Images whose size is
    not ``preprocess.size`` are resized to it. ``landmarks`` are the template's points in the crop
    (default: from ``preprocess.template``); they steer the category-aware placement. A horizontal
    flip (p = 0.5) is applied before occluding, as in the paper.
    """

    def __init__(self, source: str | os.PathLike | tuple[np.ndarray, Sequence[int]], synthesizer: Synthesizer,
                 preprocess, grid: int = 5, seed: int = 0, landmarks: np.ndarray | None = None, flip: bool = True):
        self.synthesizer = synthesizer
        self.preprocess = preprocess
        self.size = (int(preprocess.size[0]), int(preprocess.size[1]))
        self.grid = int(grid)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.landmarks = landmarks if landmarks is not None else template_landmarks(preprocess.template, self.size)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        if isinstance(source, tuple):
            images, labels = source
            images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64).reshape(-1)
            if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
                raise DataError(f"packed images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
            if len(images) != len(labels):
                raise DataError(f"{len(images)} packed images but {len(labels)} labels")
            self.images, self.labels, self.samples = images, labels, None
            self.classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        else:
            self.samples, self.classes = scan_identity_folder(source)
            self.images = self.labels = None

    def set_epoch(self, epoch: int) -> None:
        """Change the occlusions of the next pass (visible to already-running workers)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples) if self.samples is not None else len(self.images)

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        if self.samples is not None:
            path, identity = self.samples[index]
            image = load_image(path)
        else:
            image, identity = self.images[index], int(self.labels[index])
        h, w = self.size
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        return image, identity

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = rng_for(self.seed, self.epoch, index)
        image, identity = self._load(index)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        result = self.synthesizer.occlude(np.ascontiguousarray(image), rng, landmarks=self.landmarks, grid=self.grid)
        return (to_tensor(result.image, self.preprocess), identity, int(result.pattern_label),
                torch.from_numpy(result.mask))
