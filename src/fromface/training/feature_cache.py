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
from tqdm import tqdm

from fromface.errors import ConfigError
from fromface.models.weights import state_digest
from fromface.training.config import TrainConfig, cache_folder, config_to_dict
from fromface.training.data import TrainBatch, TrainFaces

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


def stored_outputs_key(cfg: TrainConfig, model: nn.Module, images: int) -> dict:
    """Everything the stored files depend on: the trunk below the mask, the data, the augmentation."""
    occlusion = config_to_dict(cfg)["occlusion"]
    occlusion.pop("val", None)
    if not occlusion.get("vary"):
        occlusion.pop("vary", None)  # as with the photometric options: stores written before it existed stay valid
    # the trunk's own weights (its package may ship new ones); FROM's new parts do not shape what is stored
    trunk = f"{state_digest(model.backbone)}:{state_digest(model.head)}"
    # photometric options join the key only when set, so stores written before they existed stay valid
    photometric = {k: getattr(cfg.data, k) for k in ("grayscale_prob", "colour_jitter") if getattr(cfg.data, k)}
    key = {"version": 1, "model": cfg.model.name, "init": cfg.model.init, "trunk": trunk, "maps": maps_needed(model),
           "kwargs": {k: v for k, v in cfg.model.kwargs.items() if k not in ABOVE_MASK_OPTIONS},
           "mask_stage": model.mask_stage, "train": str(Path(cfg.data.train).resolve()), "images": images,
           "val_identities": cfg.data.val_identities, "seed": cfg.seed, "flip": cfg.data.flip,
           "occlusion": occlusion, "variants": cfg.data.feature_cache_variants}
    return {**key, "photometric": photometric} if photometric else key


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Variants(torch.utils.data.Dataset):
    """Version ``v`` of training image ``i`` (item ``i * variants + v``) with its clean twin, landmark shift and
    occluder pixels."""

    def __init__(self, faces: TrainFaces, variants: int):
        self.faces, self.variants = faces, variants

    def __len__(self) -> int:
        return len(self.faces) * self.variants

    def __getitem__(self, k: int) -> TrainBatch:
        i, v = divmod(k, self.variants)
        return self.faces.item(i, v, with_clean=True, with_shift=True, with_covered=True)


def build_feature_cache(model: nn.Module, faces: TrainFaces, *, variants: int, folder: Path, key: dict,
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
    loader = torch.utils.data.DataLoader(_Variants(faces, variants), batch_size=batch_size, num_workers=workers,
                                         collate_fn=TrainBatch.collate, generator=torch.Generator())
    k_maps = maps_needed(model)
    _write_store(model, loader, tmp, images=len(faces), variants=variants, k_maps=k_maps, progress=progress)
    (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "images": len(faces),
                                               "variants": variants, "maps": k_maps, "key": key}, indent=2,
                                              default=str))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first
        if not (folder / "meta.json").exists():
            raise
    return folder


@torch.no_grad()
def _write_store(model: nn.Module, loader, tmp: Path, *, images: int, variants: int, k_maps: int,
                 progress: bool) -> None:
    """The store's arrays: the last ``k_maps`` stage maps up to the mask (float16, ``maps{j}.npy``), pattern labels,
    landmark shifts, the occluder's coverage of each cell of the masked map (uint8, 255 = covered) and, per
    version, the consistency target of its clean twin (computed once per image and flip)."""
    n = images * variants
    shapes = model.backbone.stage_shapes(*model.input_size)[model.mask_stage - k_maps + 1: model.mask_stage + 1]
    maps = [np.lib.format.open_memmap(tmp / f"maps{j}.npy", "w+", np.float16, (n, *s)) for j, s in enumerate(shapes)]
    patterns = np.zeros(n, dtype=np.int64)
    flips = np.zeros(n, dtype=np.int64)
    shifts = np.zeros((n, 5, 2), dtype=np.float32)
    covered = np.zeros((n, *shapes[-1][1:]), dtype=np.uint8)
    targets = np.zeros((images, 2, model.embedding_dim), dtype=np.float32)  # per image and flip
    have = np.zeros((images, 2), dtype=bool)
    bar = tqdm(total=n, desc="storing trunk outputs", unit="img", dynamic_ncols=True, disable=not progress)
    start = 0
    for batch in loader:
        batch_images = batch.images.contiguous(memory_format=torch.channels_last)
        clean = batch.clean.contiguous(memory_format=torch.channels_last)
        rows = np.arange(start, start + len(batch_images))
        for j, m in enumerate(model.backbone.forward_until(batch_images, model.mask_stage)[-k_maps:]):
            maps[j][rows] = m.contiguous().numpy().astype(np.float16)
        flip = (batch.keys % 2).numpy()
        patterns[rows], flips[rows], shifts[rows] = batch.patterns.numpy(), flip, batch.shifts.numpy()
        cells = torch.nn.functional.adaptive_avg_pool2d(batch.covered[:, None], covered.shape[1:])[:, 0]
        covered[rows] = (cells * 255).round().to(torch.uint8).numpy()
        image_ids = rows // variants
        todo = ~have[image_ids, flip]
        todo &= ~_seen_earlier(image_ids * 2 + flip)
        if todo.any():
            out = model(clean[torch.from_numpy(todo)])
            emb = out.features if out.features is not None else out.embedding
            targets[image_ids[todo], flip[todo]] = emb.float().numpy()
            have[image_ids[todo], flip[todo]] = True
        start += len(batch_images)
        bar.update(len(batch_images))
    bar.close()
    for m in maps:
        m.flush()
    del maps
    np.save(tmp / "patterns.npy", patterns)
    np.save(tmp / "shifts.npy", shifts)
    np.save(tmp / "covered.npy", covered)
    np.save(tmp / "targets.npy", targets[np.arange(n) // variants, flips])


def _seen_earlier(keys: np.ndarray) -> np.ndarray:
    """True where a key already appeared earlier in the same batch (compute each target once)."""
    _, first = np.unique(keys, return_index=True)
    seen = np.ones(len(keys), dtype=bool)
    seen[first] = False
    return seen


class StoredFaces(torch.utils.data.Dataset):
    """The stored versions as :class:`TrainBatch` items of maps, identity, pattern, target and landmark shift; index
    with ``(row, epoch)`` like :class:`TrainFaces`.

    Each epoch shows every image once, in version ``(epoch + offset_i) % variants`` (``offset_i`` seeded
    per image), so all stored versions are used before any repeats.
    """

    with_clean = False  # the consistency targets are stored: no clean twins, no teacher

    def __init__(self, folder: Path, labels: np.ndarray, seed: int):
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.variants, n = meta["variants"], meta["images"]
        if n != len(labels):
            raise ConfigError(f"{folder}: stored outputs of {n} images, the training split has {len(labels)}")
        self.maps = [np.load(folder / f"maps{j}.npy", mmap_mode="r") for j in range(meta["maps"])]
        self.patterns = np.load(folder / "patterns.npy")
        self.targets = np.load(folder / "targets.npy")
        self.shifts = np.load(folder / "shifts.npy") if (folder / "shifts.npy").is_file() else None
        self.covered = np.load(folder / "covered.npy", mmap_mode="r") if (folder / "covered.npy").is_file() else None
        self.labels = labels
        self.offsets = np.random.default_rng([seed, 5]).integers(0, self.variants, n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> TrainBatch:
        i, epoch = key
        k = i * self.variants + (epoch + int(self.offsets[i])) % self.variants
        return TrainBatch(maps=[torch.from_numpy(np.asarray(m[k], dtype=np.float32)) for m in self.maps],
                          labels=torch.tensor(int(self.labels[i])), patterns=torch.tensor(int(self.patterns[k])),
                          targets=torch.from_numpy(self.targets[k]),
                          shifts=None if self.shifts is None else torch.from_numpy(self.shifts[k]),
                          covered=None if self.covered is None else torch.from_numpy(self.covered[k] / 255.0).float())


def stored_dataset(cfg: TrainConfig, model: nn.Module, faces: TrainFaces, labels: np.ndarray, *,
                   distributed: bool = False, progress: bool = True) -> StoredFaces:
    """The trainer's entry point: freeze the trunk below the mask, store its outputs once, return the dataset."""
    if not hasattr(model, "forward_maps"):
        raise ConfigError(f"data.feature_cache_variants needs a FROM model; {cfg.model.name} has no mask stage")
    if distributed:
        raise ConfigError("data.feature_cache_variants is for single-process training; set it to 0 under torchrun")
    lower = lower_parameter_names(model)
    for name, param in model.named_parameters():
        if name in lower:
            param.requires_grad_(False)
    folder = build_feature_cache(model, faces, variants=cfg.data.feature_cache_variants, folder=cache_folder(cfg),
                                 key=stored_outputs_key(cfg, model, len(faces)), workers=cfg.data.num_workers,
                                 progress=progress)
    if cfg.loss.align_weight > 0 and not (folder / "shifts.npy").is_file():
        raise ConfigError(f"{folder}: stored by an older fromface without landmark shifts (loss.align_weight needs "
                          "them); delete the folder to store it again")
    if cfg.loss.mask_weight > 0 and cfg.loss.mask_truth == "occluder" and not (folder / "covered.npy").is_file():
        raise ConfigError(f"{folder}: stored by an older fromface without the occluders' pixels (loss.mask_truth: "
                          "occluder needs them); delete the folder to store it again")
    return StoredFaces(folder, labels, cfg.seed)
