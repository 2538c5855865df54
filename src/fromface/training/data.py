"""Training data: identity split, seeded augmentation (flip + occlusion), the batch, a resumable sampler, validation
pairs.

Every random choice about a sample is drawn from ``numpy.random.default_rng([seed, epoch, index])``,
so an epoch looks the same whatever the number of loader workers or processes, and a resumed run
sees exactly the images, flips and occluders the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from fromface.errors import ConfigError, DataError
from fromface.faces.aligner import FaceAligner, covers_centre, refined_landmarks
from fromface.faces.alignment import context_geometry, get_template, similarity_transform, transform_points, warp_face
from fromface.occlusion.occluders import OccluderLibrary
from fromface.occlusion.patterns import PatternVocabulary
from fromface.occlusion.synth import Synthesizer, box_label


@dataclass
class Split:
    """Row indices of the training and held-out (validation) identities, with contiguous train labels."""

    train_rows: np.ndarray
    train_labels: np.ndarray
    num_classes: int
    val_rows: np.ndarray
    val_labels: np.ndarray


def split_by_identity(labels: np.ndarray, val_identities: float, seed: int) -> Split:
    """Hold out whole identities (a fraction when < 1, else a count) for validation; never the test sets."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    n_val = int(round(val_identities * len(ids))) if val_identities < 1 else int(val_identities)
    if n_val >= len(ids):
        raise DataError(f"cannot hold out {n_val} of {len(ids)} identities for validation and still train")
    held = np.random.default_rng([seed, 1]).permutation(ids)[:n_val]
    is_val = np.isin(labels, held)
    train_rows = np.flatnonzero(~is_val)
    train_ids = np.unique(labels[train_rows])
    remap = np.full(labels.max() + 1, -1, dtype=np.int64)
    remap[train_ids] = np.arange(len(train_ids))
    val_rows = np.flatnonzero(is_val)
    return Split(train_rows, remap[labels[train_rows]], len(train_ids), val_rows, labels[val_rows])


def make_pairs(rows: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(P, 3) int array of (row_a, row_b, same): half positives, half negatives, seeded and distinct."""
    rng = np.random.default_rng([seed, 2])
    by_id: dict[int, np.ndarray] = {}
    for label in np.unique(labels):
        by_id[int(label)] = rows[labels == label]
    multi = [k for k, v in by_id.items() if len(v) >= 2]
    if len(by_id) < 2 or not multi:
        raise DataError("validation pairs need held-out identities with at least two images each "
                        f"(have {len(by_id)} identities, {len(multi)} with two or more images)")
    keys = list(by_id)
    seen, pairs = set(), []
    for _ in range(count * 20):
        if len(pairs) >= count:
            break
        same = len(pairs) % 2 == 0
        if same:
            a, b = rng.choice(by_id[multi[rng.integers(len(multi))]], 2, replace=False)
        else:
            i, j = rng.choice(len(keys), 2, replace=False)
            a, b = rng.choice(by_id[keys[i]]), rng.choice(by_id[keys[j]])
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            pairs.append((a, b, int(same)))
    return np.asarray(pairs, dtype=np.int64)


class RandomBoxOccluder:
    """Built-in occluder when no occluder images are configured: a noise or solid box at a random place.

    Sides are drawn from 20-70% of the crop, the mask is the box clipped to the image (as in FROM).
    """

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        bh, bw = (rng.uniform(0.2, 0.7, 2) * (h, w)).astype(int) + 1
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        top, left = max(cy - bh // 2, 0), max(cx - bw // 2, 0)
        bottom, right = min(cy + (bh + 1) // 2, h), min(cx + (bw + 1) // 2, w)
        out = image.copy()
        if rng.random() < 0.5:
            out[top:bottom, left:right] = rng.integers(0, 256, 3, dtype=np.uint8)
        else:
            out[top:bottom, left:right] = rng.integers(0, 256, (bottom - top, right - left, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=bool)
        mask[top:bottom, left:right] = True
        return out, mask


class SynthesizerOccluder:
    """Adapter to ``fromface.occlusion``'s Synthesizer: real occluders pasted on the aligned crop.

    The trainer decides clean vs occluded itself (``occlusion.clean_prob``), so the preset's own clean
    probability is set to 0; the template's landmarks, scaled to the crop, steer category-aware presets.
    """

    def __init__(self, folder: str, *, size: tuple[int, int], categories: list[str] | None = None,
                 preset: str = "from", template: str | None = None, vary: float = 0.0):
        self.synth = Synthesizer(OccluderLibrary.from_folder(folder, categories=categories), preset=preset,
                                 clean_prob=0.0, vary=vary)
        self.landmarks = None
        if template is not None:
            tpl = get_template(template)
            scale = np.array([size[1] / tpl.size[1], size[0] / tpl.size[0]])
            self.landmarks = tpl.points * scale

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        result = self.synth.occlude(image, rng, landmarks=self.landmarks)
        return np.ascontiguousarray(result.image), np.asarray(result.mask, dtype=bool)


class RealigningOccluder:
    """Occlude the wider view around an aligned face, then detect and align the face again, as the product does.

    A detector's landmarks move when part of a face is covered (on occluded LFW YuNet's points move by 0.13-0.21
    of the eye distance on average; docs/training.md), so a model trained on occluders pasted onto perfectly
    aligned crops never sees the shifted crops it meets at test time. Takes the canvas of a context pack
    (``fromface pack --context``) and returns the re-aligned crop and its occlusion mask; where no face
    covering the centre is found, the clean alignment is kept. Also returns where the clean alignment's points
    lie in the new crop, as a shift from the template's points in fractions of the crop size (the target of
    FROM's align head).
    """

    needs_context = True

    def __init__(self, occluder: SynthesizerOccluder, template: str, context: float):
        self.occluder, self.template = occluder, get_template(template)
        _, offset = context_geometry(self.template, context)
        h, w = self.template.size
        self.box = np.array([offset[0], offset[1], offset[0] + w, offset[1] + h])
        self.landmarks = self.template.points + offset
        self._aligner = None
        self.refine = None  # optional FaceAligner-style refine step, applied after re-detection

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _aligner=None, refine=None)  # each loader worker opens its own detector

    def __call__(self, canvas: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._aligner is None:
            self._aligner = FaceAligner(self.template.name, select="central")
        result = self.occluder.synth.occlude(canvas, rng, face_box=self.box, landmarks=self.landmarks)
        height, width = canvas.shape[:2]
        faces, _ = self._aligner.detect(result.image)
        chosen = self._aligner.choose(faces, height, width)
        found = chosen and covers_centre(chosen[0], height, width)
        points = chosen[0].landmarks if found else self.landmarks
        crop = warp_face(result.image, points, self.template)
        if self.refine is not None:  # what the product does with FROM's align head (validation, calibration)
            points = refined_landmarks(self.refine([crop])[0], points, self.template.name)
            crop = warp_face(result.image, points, self.template)
        size = (self.template.size[1], self.template.size[0])
        matrix = similarity_transform(points, self.template.points)
        mask = cv2.warpAffine(result.mask.astype(np.uint8), matrix, size, flags=cv2.INTER_NEAREST)
        shift = (transform_points(matrix, self.landmarks) - self.template.points) / np.array(size, dtype=np.float64)
        return np.ascontiguousarray(crop), mask.astype(bool), shift.astype(np.float32)


NO_SHIFT = np.zeros((5, 2), dtype=np.float32)


def occlude_sample(occluder, image: np.ndarray, rng: np.random.Generator, *, source, row: int,
                   flipped: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, mask, landmark shift): ``occluder`` applied to a sample's crop, or to its (equally flipped) canvas
    from ``source`` when the occluder re-aligns. The shift is zero unless re-alignment moved the crop."""
    if not getattr(occluder, "needs_context", False):
        return (*occluder(image, rng), NO_SHIFT)
    canvas = source.context_image(row)
    return occluder(np.ascontiguousarray(canvas[:, ::-1]) if flipped else canvas, rng)


@dataclass
class TrainBatch:
    """What one training step reads, by name; a dataset item is a batch of one, without the batch dimension.

    A batch holds either ``images`` (network input) or ``maps`` (the frozen trunk's stored stage maps,
    :mod:`fromface.training.feature_cache`); the optional fields are there when a loss term needs them.
    """

    labels: torch.Tensor  # identity, 0..num_classes-1
    patterns: torch.Tensor  # occlusion-pattern label (0: clean)
    images: torch.Tensor | None = None  # (N, 3, H, W) network input
    maps: list[torch.Tensor] | None = None  # or the stored stage maps below (and at) FROM's mask
    clean: torch.Tensor | None = None  # the images before occlusion (the teacher's input for consistency)
    keys: torch.Tensor | None = None  # 2 x row + flip: where the teacher's embedding of ``clean`` is cached
    targets: torch.Tensor | None = None  # stored consistency targets (the starting model's clean embeddings)
    shifts: torch.Tensor | None = None  # stored landmark shifts from re-alignment (the align head's target)
    covered: torch.Tensor | None = None  # (H, W) fraction of each pixel or mask cell the occluder covers

    def __post_init__(self):
        if (self.images is None) == (self.maps is None):
            raise ValueError("a TrainBatch holds either images or stored maps")

    @classmethod
    def collate(cls, items: list[TrainBatch]) -> TrainBatch:
        """The DataLoader's ``collate_fn``: each field stacked over the items as torch stacks a tuple's."""
        def stack(values: list):
            return None if values[0] is None else default_collate(values)

        return cls(**{f.name: stack([getattr(item, f.name) for item in items]) for f in fields(cls)})

    def _map(self, fn) -> TrainBatch:
        """A new batch of ``fn(tensor, is_image)`` applied to every tensor (those of ``maps`` one by one)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                out[f.name] = [fn(v, True) for v in value]
            elif value is not None:
                out[f.name] = fn(value, f.name in ("images", "clean"))
        return TrainBatch(**out)

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> TrainBatch:
        """On ``device``; image-like fields (images, clean twins, stage maps) in ``memory_format``."""
        return self._map(lambda t, image: t.to(device, memory_format=memory_format) if image else t.to(device))

    def pin_memory(self) -> TrainBatch:  # what DataLoader(pin_memory=True) calls on a custom batch
        return self._map(lambda t, image: t.pin_memory())

    def chunk(self, n: int) -> list[TrainBatch]:
        """``n`` consecutive parts (``data.accumulate``); the batch size must be divisible by ``n``."""
        parts: list[dict] = [{} for _ in range(n)]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            pieces = list(zip(*(m.chunk(n) for m in value))) if isinstance(value, list) else value.chunk(n)
            for part, piece in zip(parts, pieces, strict=True):
                part[f.name] = list(piece) if isinstance(value, list) else piece
        return [TrainBatch(**part) for part in parts]


#: ITU-R BT.601 weights of R, G and B in perceived brightness
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def photometric(image: np.ndarray, rng: np.random.Generator, *, grayscale_prob: float,
                jitter: float) -> np.ndarray:
    """An RGB uint8 image as another camera might have taken it: brightness, contrast and saturation each
    scaled by a factor from ``[1 - jitter, 1 + jitter]`` (in random order), then grey with ``grayscale_prob``.

    Occlusion patterns do not change: a grey or dim photo is still a clean face, which is what keeps a
    grey-scale photo from being called occluded (docs/api.md).
    """
    out = image.astype(np.float32)
    if jitter > 0:
        for op in rng.permutation(3):
            factor = float(rng.uniform(1.0 - jitter, 1.0 + jitter))
            if op == 0:  # brightness
                out = out * factor
            elif op == 1:  # contrast, around the mean grey level
                grey = float((out @ LUMA).mean())
                out = grey + (out - grey) * factor
            else:  # saturation, around each pixel's grey level
                grey = (out @ LUMA)[..., None]
                out = grey + (out - grey) * factor
    if grayscale_prob > 0 and rng.random() < grayscale_prob:
        out = np.repeat((out @ LUMA)[..., None], 3, axis=-1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class TrainFaces(torch.utils.data.Dataset):
    """Augmented training images as :class:`TrainBatch` items; index with ``(row, epoch)`` from :class:`EpochBatches`.

    ``with_clean`` adds each image's clean twin and its key (row and flip), for the consistency term's teacher;
    ``with_covered`` the occluder's pixels, for the mask term with ``loss.mask_truth: occluder``.
    """

    def __init__(self, source, rows: np.ndarray, labels: np.ndarray, *, preprocess, seed: int, flip: bool = True,
                 occluder=None, clean_prob: float = 1.0, grid: int | None = None, with_clean: bool = False,
                 with_covered: bool = False, grayscale_prob: float = 0.0, colour_jitter: float = 0.0):
        self.source, self.rows, self.labels = source, rows, labels
        self.grayscale_prob, self.colour_jitter = grayscale_prob, colour_jitter
        self.with_clean, self.with_covered = with_clean, with_covered
        self.preprocess, self.seed, self.flip = preprocess, seed, flip
        self.occluder, self.clean_prob = occluder, clean_prob
        h, w = preprocess.size
        self.vocab = PatternVocabulary(h, w, grid) if grid else None

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int, epoch: int) -> tuple[np.ndarray, int, np.ndarray, bool, np.ndarray, np.ndarray]:
        """The augmented uint8 image, its occlusion-pattern label (0 = clean), the image before occlusion,
        whether it was flipped, the landmark shift from re-alignment (:class:`RealigningOccluder`) and the
        occluder's pixels in the crop (a bool map, all False for a clean face)."""
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        row = int(self.rows[i])
        image = self.source.image(row)
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            image = np.ascontiguousarray(image[:, ::-1])
        clean, pattern, shift = image, 0, NO_SHIFT
        covered = np.zeros(image.shape[:2], dtype=bool)
        if self.occluder is not None and rng.random() >= self.clean_prob:
            image, covered, shift = occlude_sample(self.occluder, image, rng, source=self.source, row=row,
                                                   flipped=flipped)
            if self.vocab is not None:
                pattern = box_label(self.vocab, covered)
        if self.grayscale_prob > 0 or self.colour_jitter > 0:
            image = photometric(image, rng, grayscale_prob=self.grayscale_prob, jitter=self.colour_jitter)
        return image, pattern, clean, flipped, shift, covered

    def item(self, i: int, epoch: int, *, with_clean: bool = False, with_shift: bool = False,
             with_covered: bool = False) -> TrainBatch:
        """Sample ``i`` of ``epoch`` as network input, with its clean twin and key, its landmark shift and the
        occluder's pixels, each when asked for."""
        image, pattern, clean, flipped, shift, covered = self.sample(i, epoch)
        to_input = self.preprocess.to_input
        return TrainBatch(images=torch.from_numpy(to_input(image))[0], labels=torch.tensor(int(self.labels[i])),
                          patterns=torch.tensor(int(pattern)),
                          clean=torch.from_numpy(to_input(clean))[0] if with_clean else None,
                          keys=torch.tensor(2 * int(i) + int(flipped)) if with_clean else None,
                          shifts=torch.from_numpy(shift) if with_shift else None,
                          covered=torch.from_numpy(covered.astype(np.float32)) if with_covered else None)

    def __getitem__(self, key: tuple[int, int]) -> TrainBatch:
        i, epoch = key
        return self.item(i, epoch, with_clean=self.with_clean, with_covered=self.with_covered)


def check_batching(n: int, global_batch: int, world: int, accumulate: int = 1) -> None:
    """Refuse a global batch that the processes and accumulation chunks cannot share evenly, or a split too small."""
    if global_batch % (world * accumulate):
        raise ConfigError(f"data.batch_size={global_batch} must be divisible by the {world} processes x "
                          f"data.accumulate={accumulate}")
    if n < global_batch:
        raise DataError(f"the training split has {n} images, fewer than one batch of {global_batch}")


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch: a seeded permutation cut into global batches, each split over ranks.

    ``start`` skips batches already consumed before a checkpoint, so a resumed run continues mid-epoch
    with the same order. Incomplete last batches are dropped, so every rank takes the same number of steps.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start: int = 0, accumulate: int = 1):
        check_batching(n, batch_size, world, accumulate)
        self.n, self.batch, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.n // self.batch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, 3, self.epoch]).permutation(self.n)
        per_rank = self.batch // self.world
        for b in range(self.start, self.n // self.batch):
            chunk = order[b * self.batch + self.rank * per_rank: b * self.batch + (self.rank + 1) * per_rank]
            yield [(int(i), self.epoch) for i in chunk]


class PlainFaces(torch.utils.data.Dataset):
    """Validation images as network input, unaugmented (optionally occluded with a fixed per-row seed)."""

    def __init__(self, source, rows: np.ndarray, preprocess, occluder=None, seed: int = 0):
        self.source, self.rows, self.preprocess, self.occluder, self.seed = source, rows, preprocess, occluder, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = int(self.rows[i])
        image = self.source.image(row)
        if self.occluder is not None:
            image, _, _ = occlude_sample(self.occluder, image, np.random.default_rng([self.seed, 4, row]),
                                         source=self.source, row=row)
        return torch.from_numpy(self.preprocess.to_input(image))[0]
