"""Identity folders and the packed training format.

An identity folder is ``root/<identity>/<image>``. A *pack* holds the same faces already aligned and
resized to one model input size: ``images.npy`` (one uint8 (N, H, W, 3) RGB array, read through a
memory map) plus ``index.json`` (identity names, one label and source file per row, what was skipped
and why). Training on CPU from a pack is not bound by JPEG decoding, and aligning an unaligned folder
once (through the model's own alignment template) is what the cache stores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from fromface.data.files import atomic_write
from fromface.data.images import IMAGE_EXTENSIONS, load_image, scan_images
from fromface.errors import ConfigError, DataError, FromfaceError
from fromface.faces.aligner import FaceAligner
from fromface.faces.alignment import context_geometry, get_template, warp_face
from fromface.training.config import TrainConfig, cache_folder

PACK_FORMAT = "fromface-pack"
PACK_VERSION = 1


@dataclass
class FaceList:
    """Image files with integer identity labels (``identities[label]`` is the folder name)."""

    files: list[Path]
    labels: np.ndarray
    identities: list[str]


def scan_identity_folder(root: str | os.PathLike, min_images: int = 1) -> FaceList:
    """List ``root/<identity>/<image>`` files; identities are sorted by name so labels are stable.

    Images are what :func:`fromface.data.images.scan_images` calls images, HEIC/HEIF included: such a file is not
    passed over but fails to load with how to convert it (a pack lists it as skipped, with that reason).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: training folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder of identity sub-folders, got a file")
    files, labels, identities = [], [], []
    loose = 0
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            loose += entry.suffix.lower() in IMAGE_EXTENSIONS
            continue
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        images, _ = scan_images(entry, recursive=True)  # other files are not faces: not listed
        if len(images) < max(min_images, 1):
            continue
        files += images
        labels += [len(identities)] * len(images)
        identities.append(entry.name)
    if not identities:
        extra = f" ({loose} images lie directly in it, not in identity sub-folders)" if loose else ""
        raise DataError(f"{root}: no identity sub-folders with at least {max(min_images, 1)} image(s) "
                        f"(expected root/<identity>/<image>){extra}")
    return FaceList(files, np.asarray(labels, dtype=np.int64), identities)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = image.shape[0] > h or image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_face(path: Path, size: tuple[int, int], aligner=None, context: float = 1.0) -> np.ndarray:
    """One training face at ``size``: aligned with ``aligner`` when given, else the image resized.

    ``context`` > 1 (aligned faces only) returns the wider canvas around the aligned crop instead.
    """
    image = load_image(path)
    if aligner is not None:
        face = aligner.align_array(image, str(path))[0]
        if context > 1.0:
            return np.ascontiguousarray(warp_face(image, face.landmarks, aligner.template, context))
        image = face.crop
    return np.ascontiguousarray(_resize(image, size))


def _make_aligner(template: str, fallback: bool) -> FaceAligner:
    return FaceAligner(template, select="largest", fallback=fallback)


_WORKER: dict = {}


def _worker_setup(*, size: tuple[int, int], template: str | None, aligned: bool, fallback: bool,
                  context: float) -> None:
    cv2.setNumThreads(1)  # one image per process: parallelism comes from the processes
    _WORKER.update(size=size, aligner=None if aligned else _make_aligner(template, fallback), context=context)


def _worker_face(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(crop, None) or (None, reason): errors travel back as text, never as a dead pool."""
    try:
        return load_face(path, _WORKER["size"], _WORKER["aligner"], _WORKER["context"]), None
    except FromfaceError as exc:
        return None, str(exc)


def _faces_in_order(files: list[Path], workers: int, **loading):
    """Yield (crop | None, reason | None) per file, in order, from ``workers`` processes (1: this one); ``loading``
    holds :func:`_worker_setup`'s settings."""
    if workers <= 1:
        _worker_setup(**loading)
        yield from map(_worker_face, files)
        return
    with mp.get_context("spawn").Pool(workers, functools.partial(_worker_setup, **loading)) as pool:
        yield from pool.imap(_worker_face, files, chunksize=8)


def pack_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: tuple[int, int],
    template: str | None = None,
    *,
    aligned: bool = True,
    fallback: bool = False,
    min_images: int = 1,
    progress: bool = True,
    workers: int = 1,
    context: float = 1.0,
) -> Path:
    """Decode (and, when ``aligned`` is False, detect and align) every image once into a pack.

    Unreadable images and, without ``fallback``, images with no detected face are skipped and listed
    in the index. The pack is written to a temporary folder and renamed, so a crash never leaves a
    half-written pack that looks complete. ``workers`` > 1 decodes and aligns in that many processes.
    ``context`` > 1 stores each aligned crop with that much more of the photo around it (the crop is the
    centre window), so training can occlude the wider view and re-detect the face (``occlusion.realign``).
    """
    faces = scan_identity_folder(root, min_images)
    h, w = _stored_size(size, template, aligned=aligned, fallback=fallback, context=context)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    array = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(faces.files), h, w, 3))
    kept, skipped = [], []
    results = _faces_in_order(faces.files, workers, size=tuple(size), template=template, aligned=aligned,
                              fallback=fallback, context=context)
    bar = tqdm(results, total=len(faces.files), desc="pack", unit="img", dynamic_ncols=True, disable=not progress)
    for i, (crop, problem) in enumerate(bar):
        if crop is None:
            skipped.append([str(faces.files[i].relative_to(root)), problem])
            continue
        array[len(kept)] = crop
        kept.append(i)
    array.flush()
    if not kept:
        raise DataError(f"{root}: none of the {len(faces.files)} images could be packed "
                        f"(first problem: {skipped[0][1] if skipped else 'none'})")
    if len(kept) < len(faces.files):
        _keep_first_rows(tmp / "images.npy", array, len(kept))
    index = _index(faces, kept, skipped, root=Path(root), size=size, template=template, aligned=aligned,
                   context=context)
    (tmp / "index.json").write_text(json.dumps(index), encoding="utf-8")
    del array
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _stored_size(size: tuple[int, int], template: str | None, *, aligned: bool, fallback: bool,
                 context: float) -> tuple[int, int]:
    """The (height, width) of each stored image (the wider canvas with ``context``), once the settings are checked;
    fails here, clearly, before any image is read or any worker starts."""
    if not aligned and template is None:
        raise DataError("aligning a folder needs the model's alignment template")
    if context != 1.0 and (aligned or context < 1.0):
        raise DataError(f"context={context}: a wider canvas needs faces to align (not --aligned) and a factor >= 1")
    if not aligned:
        _make_aligner(template, fallback)
    if context <= 1.0:
        return tuple(size)
    if get_template(template).size != tuple(size):
        raise DataError(f"context needs crops at the template's own size {get_template(template).size}, "
                        f"not {tuple(size)}")
    return context_geometry(template, context)[0]


def _keep_first_rows(path: Path, array: np.ndarray, count: int) -> None:
    """Rewrite the image array at ``path`` (open as ``array``) with only its first ``count`` rows, the kept faces."""
    with atomic_write(path) as tmp:
        small = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count,) + array.shape[1:])
        for start in range(0, count, 1024):
            stop = min(start + 1024, count)
            small[start:stop] = array[start:stop]
        small.flush()
        del small


def _index(faces: FaceList, kept: list[int], skipped: list, *, root: Path, size: tuple[int, int],
           template: str | None, aligned: bool, context: float) -> dict:
    """The pack's ``index.json``: its settings, and identity and source file per kept row (emptied identities
    dropped), and what was skipped and why."""
    old_labels = faces.labels[kept]
    present = np.unique(old_labels)
    remap = {int(old): new for new, old in enumerate(present)}
    return {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "size": list(size),
        "template": template,
        "context": context,
        "aligned_by": "input" if aligned else "fromface.inference.FaceAligner",
        "source": str(root),
        "count": len(kept),
        "identities": [faces.identities[int(old)] for old in present],
        "labels": [remap[int(label)] for label in old_labels],
        "files": [str(faces.files[i].relative_to(root)) for i in kept],
        "skipped": skipped,
    }


class PackedFaces:
    """Read-only view of a pack: ``images`` is a memory-mapped (N, H, W, 3) uint8 array."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index_path, images_path = self.root / "index.json", self.root / "images.npy"
        for p in (index_path, images_path):
            if not p.is_file():
                raise DataError(f"{p}: missing; a pack needs index.json and images.npy (see `fromface pack`)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{index_path}: not valid JSON ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
            raise DataError(f"{index_path}: not a fromface pack index (format != {PACK_FORMAT!r})")
        try:
            self.images = np.load(images_path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{images_path}: cannot read the image array ({exc})") from None
        self.size = tuple(int(v) for v in index["size"])
        self.template = index.get("template")
        self.identities = list(index["identities"])
        self.labels = np.asarray(index["labels"], dtype=np.int64)
        self.files = list(index["files"])
        self.skipped = index.get("skipped", [])
        self.context = float(index.get("context") or 1.0)
        self._window = None  # (top, left) of the aligned crop inside each stored canvas
        stored = self.size
        if self.context > 1.0:
            stored, offset = context_geometry(self.template, self.context)
            self._window = (int(offset[1]), int(offset[0]))
        expected = (len(self.labels), *stored, 3)
        if self.images.dtype != np.uint8 or tuple(self.images.shape) != expected:
            raise DataError(f"{images_path}: array is {self.images.dtype} {tuple(self.images.shape)}, "
                            f"index.json describes uint8 {expected}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.identities)):
            raise DataError(f"{index_path}: labels fall outside the {len(self.identities)} identities")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """The aligned crop (the centre window of the stored canvas in a context pack)."""
        if self._window is None:
            return np.array(self.images[i])
        (top, left), (h, w) = self._window, self.size
        return np.array(self.images[i, top:top + h, left:left + w])

    def context_image(self, i: int) -> np.ndarray:
        """The whole stored canvas: the aligned crop with ``context`` times its width of photo around it."""
        if self._window is None:
            raise DataError(f"{self.root}: this pack stores bare crops; re-pack with `fromface pack --context 2` "
                            "to train with occlusion.realign")
        return np.array(self.images[i])

    def __getstate__(self) -> dict:
        # Loader workers started with "spawn" would otherwise receive a pickled copy of the whole array.
        state = dict(self.__dict__)
        state["images"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(self.root / "images.npy", mmap_mode="r")


class FolderFaces:
    """An identity folder of already aligned crops, decoded on every read (no pack needed)."""

    def __init__(self, root: str | os.PathLike, size: tuple[int, int], min_images: int = 1):
        found = scan_identity_folder(root, min_images)
        self.root, self.size = Path(root), tuple(size)
        self.files, self.labels, self.identities = found.files, found.labels, found.identities

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        try:
            return load_face(self.files[i], self.size)
        except FromfaceError as exc:  # DataError survives a loader worker's re-raise (one-argument constructor)
            raise DataError(f"{exc}; `fromface pack` the folder to skip unreadable images") from None


def is_pack(path: str | os.PathLike) -> bool:
    return (Path(path) / "index.json").is_file() and (Path(path) / "images.npy").is_file()


def cache_key(root: Path, *, size: tuple[int, int], template: str | None, fallback: bool, min_images: int) -> str:
    """Changes when any file is added, removed or rewritten, or the alignment settings change."""
    digest = hashlib.sha1(f"{root.resolve()}|{size}|{template}|{fallback}|{min_images}".encode())
    for path in scan_identity_folder(root, min_images).files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def open_training_faces(cfg: TrainConfig, preprocess, *, progress: bool = True,
                        build: bool = True) -> PackedFaces | FolderFaces:
    """A config's ``data.train`` as the trainer reads it (:func:`open_faces` with the ``data`` section's settings and
    the model's ``preprocess``; unaligned folders are packed once into :func:`cache_folder`)."""
    data = cfg.data
    if not data.train:
        raise ConfigError("data.train is empty: point it at an identity folder or a pack")
    return open_faces(data.train, size=preprocess.size, template=preprocess.template, fmt=data.format,
                      aligned=data.aligned, fallback=data.align_fallback, cache_dir=cache_folder(cfg),
                      min_images=data.min_images, progress=progress, build=build, workers=max(1, data.num_workers))


def open_faces(path: str | os.PathLike, *, size: tuple[int, int], template: str | None = None, fmt: str = "auto",
               aligned: bool = True, fallback: bool = False, cache_dir: str | os.PathLike | None = None,
               min_images: int = 1, progress: bool = True, build: bool = True,
               workers: int = 1) -> PackedFaces | FolderFaces:
    """The training faces at ``path``: a pack, an aligned folder, or an unaligned folder packed once into the cache.

    With ``build=False`` (every rank but the main one under torchrun) a missing cache pack is waited for,
    not written, so processes never write the same pack at once.
    """
    path = Path(path)
    if fmt not in ("auto", "folder", "packed"):
        raise DataError(f"data.format must be auto, folder or packed; got {fmt!r}")
    if fmt == "packed" or (fmt == "auto" and is_pack(path)):
        pack = PackedFaces(path)
        if pack.size != tuple(size):
            raise DataError(f"{path}: pack holds {pack.size[0]}x{pack.size[1]} crops but the model takes "
                            f"{size[0]}x{size[1]}; re-pack with `fromface pack --model ...`")
        return pack
    if aligned:
        return FolderFaces(path, size, min_images)
    cache = Path(cache_dir) if cache_dir else path.parent / ".fromface-cache"
    key = cache_key(path, size=size, template=template, fallback=fallback, min_images=min_images)
    target = cache / f"{path.name}-{key}"
    if not is_pack(target) and build:
        cache.mkdir(parents=True, exist_ok=True)
        pack_folder(path, target, size, template, aligned=False, fallback=fallback, min_images=min_images,
                    progress=progress, workers=workers)
    while not is_pack(target):  # other ranks wait for the main one (no collective: packing can take hours)
        time.sleep(5.0)
    return PackedFaces(target)
