"""Training on stored trunk outputs: FROM's frozen lower trunk runs once per augmented image, not every epoch.

With the trunk frozen below the mask, most of a CPU training step is spent recomputing the same lower
stage maps. Here each training image gets ``variants`` augmented versions (flip and synthetic
occlusion drawn exactly as :class:`TrainFaces` draws them for epochs ``0..variants-1``); the lower
trunk's maps of each version, its pattern label and the starting model's unmasked embedding of the
clean twin (the consistency target) are written once to ``.npy`` files. Each epoch then shows every
image in one of its versions, and only the layers above the mask run. The files are keyed by a
fingerprint of everything they depend on, so runs that differ only above the mask share them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fromface.errors import ConfigError
from fromface.training.data import TrainFaces, to_tensor

FORMAT_VERSION = 1


def lower_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the maps below (and at) the mask depend on: these stay frozen."""
    h, w = model.input_size
    x = torch.zeros(1, 3, h, w)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            maps = model.backbone.forward_until(x, model.mask_stage)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            grads = torch.autograd.grad(sum(m.sum() for m in maps), [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    return {n for (n, _), g in zip(named, grads) if g is not None}


def maps_needed(model: nn.Module) -> int:
    """How many stage maps (ending at the masked one) the part above the stored maps reads."""
    return 3 if getattr(model, "pyramid", None) is not None else 1


#: model options that change only what lies above the stored maps (runs differing in these share the files)
ABOVE_MASK_OPTIONS = ("mask_shape", "mask_target", "mask_source", "pyramid_channels", "mask_init", "mask_init_std",
                      "use_mask", "head_rank", "align_head")


def stored_outputs_key(cfg, model: nn.Module, images: int) -> dict:
    """Everything the stored files depend on: the trunk below the mask, the data, the augmentation."""
    from fromface.training.config import config_to_dict

    occlusion = config_to_dict(cfg)["occlusion"]
    occlusion.pop("val", None)
    from fromface.models.weights import state_digest

    # the trunk's own weights (its package may ship new ones); FROM's new parts do not shape what is stored
    trunk = f"{state_digest(model.backbone)}:{state_digest(model.head)}"
    return {"version": 1, "model": cfg.model.name, "init": cfg.model.init, "trunk": trunk, "maps": maps_needed(model),
            "kwargs": {k: v for k, v in cfg.model.kwargs.items() if k not in ABOVE_MASK_OPTIONS},
            "mask_stage": model.mask_stage, "train": str(Path(cfg.data.train).resolve()), "images": images,
            "val_identities": cfg.data.val_identities, "seed": cfg.seed, "flip": cfg.data.flip,
            "occlusion": occlusion, "variants": cfg.data.feature_cache_variants}


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Variants(torch.utils.data.Dataset):
    """(augmented image, clean twin, pattern, flipped, landmark shift) for version ``v`` of training image ``i``;
    with ``shifts_only`` just the shift (re-played to add it to stores made before it was stored)."""

    def __init__(self, faces: TrainFaces, variants: int, shifts_only: bool = False):
        self.faces, self.variants, self.shifts_only = faces, variants, shifts_only

    def __len__(self) -> int:
        return len(self.faces) * self.variants

    def __getitem__(self, k: int):
        i, v = divmod(k, self.variants)
        image, pattern, clean, flipped, shift = self.faces.sample(i, v)
        if self.shifts_only:
            return torch.from_numpy(shift)
        p = self.faces.preprocess
        return (to_tensor(image, p.mean, p.std, p.channel_order), to_tensor(clean, p.mean, p.std, p.channel_order),
                pattern, int(flipped), torch.from_numpy(shift))


@torch.no_grad()
def build_feature_cache(model: nn.Module, faces: TrainFaces, variants: int, folder: Path, key: dict,
                        batch_size: int = 8, workers: int = 0, progress: bool = True) -> Path:
    """Write (or reuse) the stored maps of ``variants`` versions of every image in ``faces``; returns the folder.

    Small NHWC batches are the fastest way through SFace-style depthwise convolutions on a CPU (about
    3x faster than batches of 64 on 2 cores), hence the default ``batch_size``.
    """
    if variants < 1:
        raise ConfigError(f"data.feature_cache_variants must be >= 1 to store trunk outputs, got {variants}")
    folder = Path(folder) / f"features-{fingerprint(key)}"
    if (folder / "meta.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    n, k_maps = len(faces), maps_needed(model)
    shapes = model.backbone.stage_shapes(*model.input_size)[model.mask_stage - k_maps + 1: model.mask_stage + 1]
    maps = [np.lib.format.open_memmap(tmp / f"maps{j}.npy", "w+", np.float16, (n * variants, *s))
            for j, s in enumerate(shapes)]
    patterns = np.zeros(n * variants, dtype=np.int64)
    flips = np.zeros(n * variants, dtype=np.int64)
    shifts = np.zeros((n * variants, 5, 2), dtype=np.float32)
    targets = np.zeros((n, 2, model.embedding_dim), dtype=np.float32)  # per image and flip
    have = np.zeros((n, 2), dtype=bool)
    loader = torch.utils.data.DataLoader(_Variants(faces, variants), batch_size=batch_size, num_workers=workers,
                                         generator=torch.Generator())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * variants, desc="storing trunk outputs", unit="img", dynamic_ncols=True)
    start = 0
    for images, clean, pattern, flipped, shift in loader:
        images = images.contiguous(memory_format=torch.channels_last)
        clean = clean.contiguous(memory_format=torch.channels_last)
        rows = np.arange(start, start + len(images))
        for j, m in enumerate(model.backbone.forward_until(images, model.mask_stage)[-k_maps:]):
            maps[j][rows] = m.contiguous().numpy().astype(np.float16)
        patterns[rows], flips[rows], shifts[rows] = pattern.numpy(), flipped.numpy(), shift.numpy()
        image_ids, flip = rows // variants, flipped.numpy()
        todo = ~have[image_ids, flip]
        todo &= ~_seen_earlier(image_ids * 2 + flip)
        if todo.any():
            out = model(clean[torch.from_numpy(todo)])
            emb = out.features if out.features is not None else out.embedding
            targets[image_ids[todo], flip[todo]] = emb.float().numpy()
            have[image_ids[todo], flip[todo]] = True
        start += len(images)
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    for m in maps:
        m.flush()
    np.save(tmp / "patterns.npy", patterns)
    np.save(tmp / "shifts.npy", shifts)
    np.save(tmp / "targets.npy", targets[np.arange(n * variants) // variants, flips])
    (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "images": n, "variants": variants,
                                               "maps": k_maps, "key": key}, indent=2, default=str))
    del maps
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first
        if not (folder / "meta.json").exists():
            raise
    return folder


def _seen_earlier(keys: np.ndarray) -> np.ndarray:
    """True where a key already appeared earlier in the same batch (compute each target once)."""
    _, first = np.unique(keys, return_index=True)
    seen = np.ones(len(keys), dtype=bool)
    seen[first] = False
    return seen


def add_stored_shifts(faces: TrainFaces, folder: Path, workers: int = 0, progress: bool = True) -> None:
    """Write ``shifts.npy`` into a store made before landmark shifts were stored, by re-playing its seeded samples
    (the same occluders and detections, without running the trunk)."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    loader = torch.utils.data.DataLoader(_Variants(faces, meta["variants"], shifts_only=True), batch_size=64,
                                         num_workers=workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="re-playing landmark shifts", unit="batch", dynamic_ncols=True)
    shifts = torch.cat(list(loader)).numpy()
    np.save(Path(folder) / f"shifts.tmp{os.getpid()}.npy", shifts)
    os.replace(Path(folder) / f"shifts.tmp{os.getpid()}.npy", Path(folder) / "shifts.npy")


class StoredFaces(torch.utils.data.Dataset):
    """Samples ``(maps, identity, pattern, target, landmark shift)``; index with ``(row, epoch)`` like
    :class:`TrainFaces`.

    Each epoch shows every image once, in version ``(epoch + offset_i) % variants`` (``offset_i`` seeded
    per image), so all stored versions are used before any repeats.
    """

    def __init__(self, folder: Path, labels: np.ndarray, seed: int):
        meta = json.loads((Path(folder) / "meta.json").read_text())
        self.variants, n = meta["variants"], meta["images"]
        if n != len(labels):
            raise ConfigError(f"{folder}: stored outputs of {n} images, the training split has {len(labels)}")
        self.maps = [np.load(Path(folder) / f"maps{j}.npy", mmap_mode="r") for j in range(meta["maps"])]
        self.patterns = np.load(Path(folder) / "patterns.npy")
        self.targets = np.load(Path(folder) / "targets.npy")
        shifts = Path(folder) / "shifts.npy"
        self.shifts = np.load(shifts) if shifts.is_file() else np.zeros((n * self.variants, 5, 2), np.float32)
        self.labels = labels
        self.offsets = np.random.default_rng([seed, 5]).integers(0, self.variants, n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        k = i * self.variants + (epoch + int(self.offsets[i])) % self.variants
        maps = [torch.from_numpy(np.asarray(m[k], dtype=np.float32)) for m in self.maps]
        return (maps, int(self.labels[i]), int(self.patterns[k]), torch.from_numpy(self.targets[k]),
                torch.from_numpy(self.shifts[k]))


def stored_dataset(cfg, model: nn.Module, faces: TrainFaces, labels: np.ndarray, distributed: bool = False,
                   progress: bool = True) -> StoredFaces:
    """The trainer's entry point: freeze the trunk below the mask, store its outputs once, return the dataset."""
    if not hasattr(model, "forward_maps"):
        raise ConfigError(f"data.feature_cache_variants needs a FROM model; {cfg.model.name} has no mask stage")
    if distributed:
        raise ConfigError("data.feature_cache_variants is for single-process training; set it to 0 under torchrun")
    lower = lower_parameter_names(model)
    for name, param in model.named_parameters():
        if name in lower:
            param.requires_grad_(False)
    root = Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")
    folder = build_feature_cache(model, faces, cfg.data.feature_cache_variants, root,
                                 stored_outputs_key(cfg, model, len(faces)), workers=cfg.data.num_workers,
                                 progress=progress)
    if cfg.loss.align_weight > 0 and not (folder / "shifts.npy").is_file():
        add_stored_shifts(faces, folder, cfg.data.num_workers, progress)
    return StoredFaces(folder, labels, cfg.seed)
