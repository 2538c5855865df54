"""Bulk work on large photo collections: a deterministic split into shards, embedding that survives a kill, and
enrolment of ready-made embeddings in large batches.

Why these three: a collection of millions of photos is embedded by many jobs at once (a cluster's job array,
several machines), each of which may be killed and restarted by its scheduler, and the embedding is the expensive
part, so the gallery is filled afterwards from the embeddings, without running the network again.

Shards. An item belongs to shard ``K`` of ``N`` when ``sha256(key)[:8] mod N == K - 1`` (the first 8 bytes of the
digest of the UTF-8 key as a big-endian number), where the key is the path of an image relative to the folder given
(``/`` separated), or an identity's name when identities are split. A hash, not a position in the sorted list: the
jobs of an array list the folder each on its own, often minutes apart, and a photo copied in between would shift
every position after it, so that some files land in two shards and some in none. With a hash a file's shard depends
on its own path only: it stays in its shard when others are added or removed, and every job agrees. Shard sizes
are equal up to the binomial spread (about ``sqrt(n/N)`` items), which is nothing for a large collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np

from fromface.data.files import atomic_write
from fromface.errors import AlreadyEnrolledError, ConfigError, DataError, FromfaceError
from fromface.inference.gallery import Gallery, Template, check_name, image_digest

T = TypeVar("T")

#: Identities per enrolment transaction in :func:`enroll_in_batches`.
ENROL_BATCH = 1000
_PARTIAL_FORMAT = 1
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


# ---------------------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``: which items one job of a split takes (see the module docstring)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    def select(self, items: Iterable[T], key: Callable[[T], str]) -> list[T]:
        """The items of this shard, in their order."""
        return [item for item in items if self.holds(key(item))]


def shard_of(key: str, count: int) -> int:
    """The shard (1..count) of ``key``: its sha256 modulo ``count``, the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % count + 1


def parse_shard(text: str | None) -> Shard | None:
    """``"K/N"`` (1 <= K <= N) as a :class:`Shard`; None for None. Anything else is a one-line ConfigError."""
    if text is None:
        return None
    found = _SHARD.fullmatch(text)
    if not found:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. 1/4 for the first of four shards")
    index, count = int(found[1]), int(found[2])
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: K must be between 1 and N (1/{max(count, 1)} .. "
                          f"{max(count, 1)}/{max(count, 1)}); shards are numbered from 1")
    return Shard(index, count)


def relative_key(path: Path, root: Path) -> str:
    """The shard key of an image: its path under ``root`` with ``/`` separators (the same on every system)."""
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------------------------------- partial runs
def partial_folder(output: Path) -> Path:
    """Where the finished batches of ``output`` wait until it is written: a hidden folder beside it."""
    return output.with_name(f".{output.name}.partial")


class PartialRun:
    """Finished batches of one job, one ``.npz`` per batch, written atomically in a hidden folder beside the output.

    ``job`` describes the run (inputs, model, shard, batch size); the folder records it in ``job.json`` and a later
    run with another description is refused (``force`` discards the old folder instead), so results of different
    runs are never mixed. The folder appears complete or not at all (made under a temporary name, then renamed).
    """

    def __init__(self, output: Path, job: Mapping[str, Any], force: bool = False):
        self.folder = partial_folder(output)
        self.job = {"format": _PARTIAL_FORMAT, **job}
        if self.folder.exists() and not self._matches(force):
            shutil.rmtree(self.folder)
        if not self.folder.exists():
            self._create()
        for stale in self.folder.glob(".*.tmp"):  # left by a write that was killed half-way
            stale.unlink(missing_ok=True)
        for stale in self.folder.parent.glob(f"{self.folder.name}.*"):  # a creation or removal killed half-way
            if stale.suffix in (".tmp", ".done") and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def _matches(self, force: bool) -> bool:
        """Whether the existing folder belongs to this job; with ``force``, False (it is discarded) instead of an
        error when it does not."""
        try:
            old = json.loads((self.folder / "job.json").read_text())
        except (OSError, ValueError):
            old = None
        if old == self.job:
            return True
        if force:
            return False
        if not isinstance(old, dict):
            raise DataError(f"{self.folder}: not a fromface partial folder (no readable job.json); remove it")
        key = next(k for k in [*self.job, *old] if old.get(k) != self.job.get(k))  # the job's order: root first
        raise DataError(f"{self.folder}: partial results of a run with other arguments ({key}: {old.get(key)!r} "
                        f"there, {self.job.get(key)!r} now); use --force to discard them, or remove the folder")

    def _create(self) -> None:
        tmp = self.folder.with_name(f"{self.folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            (tmp / "job.json").write_text(json.dumps(self.job, indent=1, sort_keys=True))
            os.replace(tmp, self.folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{self.folder}: cannot create the partial folder ({exc.strerror or exc})") from None

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.npz"

    def done(self, index: int) -> bool:
        return self._path(index).is_file()

    def save(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write batch ``index`` atomically and to disk (a kill or a crash leaves it whole or absent)."""
        write_npz(self._path(index), arrays, compress=False)

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self._path(index), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def remove(self) -> None:
        """Drop the folder (after the output was written)."""
        remove_partial(self.folder)


def remove_partial(folder: Path) -> None:
    """Remove a partial folder: renamed first, so it vanishes at once even if the removal is killed half-way."""
    if not folder.exists():
        return
    gone = folder.with_name(f"{folder.name}.{os.getpid()}.done")
    os.replace(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- embedding
@dataclass
class EmbedJob:
    """The images one ``fromface embed`` job embeds (``files`` under ``root``, already split by ``shard``), how,
    and where the result goes; :func:`embed_collection` runs it."""

    root: Path
    files: list[Path]
    output: Path
    batch: int = 256
    shard: Shard | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # recognizer options that change the embeddings

    def batches(self) -> list[list[Path]]:
        size = max(int(self.batch), 1)
        return [self.files[start:start + size] for start in range(0, len(self.files), size)]

    def description(self, recognizer: Any) -> dict[str, Any]:
        """What ``job.json`` records: a partial folder is resumed only by a run with the same description."""
        listing = hashlib.sha256("\n".join(relative_key(f, self.root) for f in self.files).encode()).hexdigest()
        return {"root": str(self.root.resolve()), "images": len(self.files), "image_list_sha256": listing,
                "shard": str(self.shard) if self.shard else "all", "batch": max(int(self.batch), 1),
                "model_id": recognizer.model_id, "model": recognizer.model_name,
                "backend": getattr(recognizer, "backend", None), **self.settings}


def embed_collection(recognizer: Any, job: EmbedJob, force: bool = False,
                     progress: Callable[[int], None] | None = None,
                     wording: Callable[[str], str] = str) -> tuple[dict[str, np.ndarray], int]:
    """Embed ``job``'s images batch by batch, each finished batch saved in the partial folder, skipping batches a
    killed run of the same job already finished; returns (the arrays of the output, images found done).

    ``progress(n)`` is called with the number of images found done (once, when a run is resumed), then with that
    of each batch as it is finished; ``wording`` turns an error into the reason recorded under ``skipped``. The
    caller writes the output with :func:`write_embeddings` (which removes the partial folder)."""
    partial = PartialRun(job.output, job.description(recognizer), force=force)
    batches = job.batches()
    resumed = sum(len(b) for k, b in enumerate(batches) if partial.done(k))
    if resumed and progress is not None:
        progress(resumed)
    for k, files in enumerate(batches):
        if partial.done(k):
            continue
        partial.save(k, embed_batch(recognizer, job.root, files, wording))
        if progress is not None:
            progress(len(files))
    chunks = [partial.load(k) for k in range(len(batches))]
    return _join(chunks, recognizer, job), resumed


def embed_batch(recognizer: Any, root: Path, files: Sequence[Path],
                wording: Callable[[str], str] = str) -> dict[str, np.ndarray]:
    """The arrays of one batch: the selected face of each image that has one, and "path: reason" for the others."""
    kept, faces, skipped = [], [], []
    for f, found in zip(files, recognizer.embed_each([str(f) for f in files])):
        if isinstance(found, FromfaceError):  # this file is reported; the rest of the batch is kept
            skipped.append(f"{f.relative_to(root)}: {wording(str(found))}")
        else:
            kept.append(f)
            faces.append(found[0])
    embeddings = np.stack([f.embedding for f in faces]).astype(np.float32) if faces else np.zeros((0, 0), np.float32)
    return {
        "embeddings": embeddings,
        "paths": np.array([relative_key(f, root) for f in kept], dtype=str),  # "/" on every system
        "boxes": np.array([f.box for f in faces], dtype=np.float32).reshape(len(faces), 4),
        "methods": np.array([f.method for f in faces], dtype=str),
        "pattern": np.array([-1 if f.pattern is None else f.pattern for f in faces], dtype=np.int64),
        "visible_fraction": np.array([np.nan if f.visible_fraction is None else f.visible_fraction for f in faces],
                                     dtype=np.float64),
        "occluded": np.array([-1 if f.occluded is None else int(f.occluded) for f in faces], dtype=np.int8),
        "digests": np.array([image_digest(f) for f in kept], dtype=str),
        "skipped": np.array(skipped, dtype=str),
    }


def _join(chunks: list[dict[str, np.ndarray]], recognizer: Any, job: EmbedJob) -> dict[str, np.ndarray]:
    """One output from the batches, in the job's order, with what a gallery needs to enrol from it."""
    full = [c for c in chunks if len(c["paths"])]
    out: dict[str, np.ndarray] = {}
    for key in ("embeddings", "paths", "boxes", "methods", "pattern", "visible_fraction", "occluded", "digests"):
        out[key] = np.concatenate([c[key] for c in full]) if full else chunks[0][key] if chunks else np.array([])
    out["skipped"] = np.concatenate([c["skipped"] for c in chunks]).astype(str) if chunks else np.array([], str)
    out.update(model=np.array(recognizer.model_name), model_id=np.array(recognizer.model_id),
               model_source=np.array(recognizer.model_source or ""), root=np.array(str(job.root)),
               shard=np.array(str(job.shard) if job.shard else ""))
    return out


def write_embeddings(job: EmbedJob, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the output ``.npz`` atomically (readers never see half of it), then remove the partial folder."""
    write_npz(job.output, arrays, compress=True)
    remove_partial(partial_folder(job.output))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray], compress: bool) -> None:
    """``np.savez`` through :func:`atomic_write`, flushed to disk; a failure (disk full) is a one-line DataError."""
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------- enrolling from .npz
@dataclass
class EmbeddingFile:
    """What ``fromface enroll --from`` reads of a ``fromface embed`` output."""

    path: Path
    model_id: str
    model_source: str
    root: str
    paths: list[str]
    embeddings: np.ndarray
    occluded: np.ndarray
    pattern: np.ndarray
    visible_fraction: np.ndarray
    digests: list[str]

    def template(self, k: int) -> Template:
        """Template ``k`` as ``fromface enroll DIR`` would have stored it (its source is the image's path as it
        was given to ``fromface embed``)."""
        occluded, pattern, visible = int(self.occluded[k]), int(self.pattern[k]), float(self.visible_fraction[k])
        source = str(Path(self.root) / self.paths[k]) if self.root else self.paths[k]
        return Template(self.embeddings[k], None if occluded < 0 else bool(occluded), None if pattern < 0 else pattern,
                        None if np.isnan(visible) else visible, source, self.digests[k] or None)


def read_embeddings(path: str | os.PathLike) -> EmbeddingFile:
    """Load a ``fromface embed`` output, refusing files it cannot enrol from with a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single array, not the .npz file fromface embed writes")
        with data:
            arrays = {k: data[k] for k in data.files}
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error):  # not a zip, pickled data, a damaged member
        raise DataError(f"{path}: not a readable .npz file (damaged, or not written by fromface embed)") from None
    absent = [k for k in ("embeddings", "paths", "pattern", "visible_fraction") if k not in arrays]
    if absent:
        raise DataError(f"{path}: not an output of fromface embed (no {', '.join(absent)})")
    missing = [k for k in ("model_id", "occluded", "digests") if k not in arrays]
    if missing:
        raise DataError(f"{path}: made by an older fromface embed (no {', '.join(missing)}); re-embed the folder "
                        "with `fromface embed` to enrol from it")
    n = len(arrays["paths"])
    shapes = {k: len(arrays[k]) for k in ("embeddings", "occluded", "digests", "pattern", "visible_fraction")}
    if any(v != n for v in shapes.values()) or arrays["embeddings"].ndim != 2:
        raise DataError(f"{path}: arrays of different lengths ({n} paths, {shapes}); the file is damaged")
    return EmbeddingFile(path, str(arrays["model_id"]), str(arrays.get("model_source", "")),
                         str(arrays.get("root", "")), [str(p) for p in arrays["paths"]],
                         arrays["embeddings"].astype(np.float32), arrays["occluded"], arrays["pattern"],
                         arrays["visible_fraction"], [str(d) for d in arrays["digests"]])


def identity_of(relative: str) -> str | None:
    """The identity of an embedded image: the first component of its path (the identity sub-folder), None for an
    image at the top of the folder."""
    parts = PurePosixPath(relative).parts  # fromface embed writes "/" separated paths
    return parts[0] if len(parts) > 1 else None


def group_templates(files: Sequence[EmbeddingFile], name: str | None = None, shard: Shard | None = None
                    ) -> tuple[dict[str, list[Template]], list[str]]:
    """({identity: templates}, "path: reason" for the images left out): identities from each image's first path
    component, or all ``name``; ``shard`` keeps the identities of one shard (by name, so an identity's photos
    stay together, as ``fromface enroll DIR --shard`` splits them)."""
    _check_one_model(files)
    people: dict[str, list[Template]] = {}
    skipped: list[str] = []
    for f in files:
        for k, rel in enumerate(f.paths):
            person = name if name is not None else identity_of(rel)
            if person is None:
                skipped.append(f"{f.path}: {rel}: not in an identity sub-folder (give --name NAME to enrol the "
                               "images as one person)")
            elif shard is None or shard.holds(person):
                people.setdefault(person, []).append(f.template(k))
    return people, skipped


def _check_one_model(files: Sequence[EmbeddingFile]) -> None:
    for f in files[1:]:
        if f.model_id != files[0].model_id:
            raise ConfigError(f"{f.path}: embedded with model {f.model_id}, but {files[0].path} with "
                              f"{files[0].model_id}; enrol files of one model into one gallery")


def check_gallery_model(gallery: Gallery, file: EmbeddingFile) -> None:
    """Refuse embeddings of another model than the gallery's, by the gallery's own check, naming the file too."""
    try:
        gallery.check_model(file.model_id)
    except ConfigError as exc:
        raise ConfigError(f"{file.path}: embedded with model {file.model_id}; {exc}") from None


@dataclass
class BulkEnrolment:
    """What :func:`enroll_in_batches` did: identities written, templates added, templates already in the gallery
    (or repeated in the input), identities with nothing new, and the identities refused with the reason."""

    identities: int = 0
    added: int = 0
    already: int = 0
    unchanged: int = 0
    refused: dict[str, str] = field(default_factory=dict)


def enroll_in_batches(gallery: Gallery, people: Mapping[str, Sequence[Template]], model: str, source: str | None,
                      mode: str = "new", batch: int = ENROL_BATCH,
                      progress: Callable[[int], None] | None = None) -> BulkEnrolment:
    """Enrol ready-made templates, ``batch`` identities per transaction (:meth:`Gallery.enroll_many`).

    Like ``fromface enroll DIR``: an image already in the gallery (same digest) is left out, so a re-run after a
    kill adds nothing twice and finishes the job; in ``mode="new"`` an identity already enrolled is refused unless
    all its images are already in (then it is unchanged). A batch that fails is retried one identity at a time, so
    one bad identity (or a name a concurrent job just enrolled) costs only itself."""
    result = BulkEnrolment()
    existing = set(gallery.names())
    seen: set[str] = set()
    names = list(people)
    with gallery.bulk(sum(len(ts) for ts in people.values())):
        for start in range(0, len(names), max(int(batch), 1)):
            chunk = names[start:start + max(int(batch), 1)]
            todo = _new_templates(gallery, {n: people[n] for n in chunk}, existing, seen, mode, result)
            if todo:
                _write_batch(gallery, todo, model, source, mode, result)
                existing.update(todo)
            if progress is not None:
                progress(len(chunk))
    return result


def _new_templates(gallery: Gallery, people: Mapping[str, Sequence[Template]], existing: set[str], seen: set[str],
                   mode: str, result: BulkEnrolment) -> dict[str, list[Template]]:
    """The templates of ``people`` that are not in the gallery yet, per identity; the others are counted and
    identities the gallery refuses are recorded in ``result``."""
    known = gallery.known_digests([t.digest for ts in people.values() for t in ts if t.digest])
    todo: dict[str, list[Template]] = {}
    for raw, templates in people.items():
        try:
            name = check_name(raw)
        except FromfaceError as exc:
            result.refused[str(raw)] = str(exc)
            continue
        fresh = [t for t in templates if not t.digest or (t.digest not in known and t.digest not in seen)]
        result.already += len(templates) - len(fresh)
        if not fresh:
            result.unchanged += 1
            continue
        if mode == "new" and name in existing:
            try:
                gallery.refuse_existing(name, mode, len(fresh))
            except AlreadyEnrolledError as exc:
                result.refused[name] = str(exc)
                continue
        todo[name] = fresh
        seen.update(t.digest for t in fresh if t.digest)  # the same photo twice in the input goes in once
    return todo


def _write_batch(gallery: Gallery, todo: Mapping[str, list[Template]], model: str, source: str | None, mode: str,
                 result: BulkEnrolment) -> None:
    try:
        result.added += gallery.enroll_many(todo, model=model, source=source or None, mode=mode)
        result.identities += len(todo)
        return
    except ConfigError:
        raise  # the gallery's model or size: every identity would fail the same way
    except FromfaceError:
        pass
    for name, templates in todo.items():  # one at a time: only the identity at fault is refused
        try:
            result.added += gallery.enroll_many({name: templates}, model=model, source=source or None, mode=mode)
            result.identities += 1
        except ConfigError:
            raise
        except FromfaceError as exc:
            result.refused[name] = str(exc)


__all__ = ["BulkEnrolment", "EmbedJob", "EmbeddingFile", "PartialRun", "Shard", "embed_batch", "embed_collection",
           "enroll_in_batches", "group_templates", "identity_of", "parse_shard", "partial_folder", "read_embeddings",
           "shard_of", "write_embeddings"]
