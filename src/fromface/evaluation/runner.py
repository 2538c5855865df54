"""Embed a list of images once per model, with a persistent cache so a second run is fast.

The cache is one SQLite file per embedder setting (named by a hash of its ``cache_key``), holding one row
per image keyed by a digest of the image file's bytes: an edited image is embedded again, while an
unchanged one is found even after the data is copied, moved or touched (a key of path and modification
time missed every time the data folder was restored). Rows are committed every batch, so an
interrupted run resumes.

Cache format 2 adds a table ``estimate`` (image key -> a FROM model's occlusion estimate, see
:class:`~fromface.evaluation.embedding.OcclusionEstimate`) beside the unchanged ``emb`` table, in the same file
under the same name: a format-1 cache keeps every embedding, and an estimate missing from it is computed (the
cached embedding kept) only when a run asks for estimates. Older code reading a format-2 file sees ``emb`` as before.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import re
import sqlite3
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fromface.data.images import load_image
from fromface.errors import DataError, FromfaceError
from fromface.evaluation.embedders import load_embedder
from fromface.evaluation.embedding import Embedder, EmbedResult, OcclusionEstimate


def image_key(path: Path) -> str:
    """Cache key of an image file: a digest of its bytes (identical files share their embedding)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"blake2b:{digest.hexdigest()}"


#: Written to the cache's ``meta`` table: 2 since occlusion estimates are stored beside the embeddings.
CACHE_FORMAT = 2


class EmbeddingCache:
    """SQLite store of (image key -> method, embedding, occlusion estimate) for one embedder setting."""

    def __init__(self, folder: Path, embedder_key: str, label: str = "model"):
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40]
        digest = hashlib.sha256(embedder_key.encode()).hexdigest()[:16]
        self.path = folder / f"{slug}-{digest}.sqlite"
        self.db = sqlite3.connect(str(self.path), timeout=120)  # other runs may share the cache
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, method TEXT, vec BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS estimate (key TEXT PRIMARY KEY, data TEXT, heat BLOB)")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (embedder_key,))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, EmbedResult]:
        out: dict[str, EmbedResult] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, method, vec in self.db.execute(f"SELECT key, method, vec FROM emb WHERE key IN ({marks})",
                                                    chunk):
                emb = None if vec is None else np.frombuffer(vec, dtype=np.float32).copy()
                out[key] = EmbedResult(emb, method)
            for key, data, heat in self.db.execute(f"SELECT key, data, heat FROM estimate WHERE key IN ({marks})",
                                                   chunk):
                if key in out:
                    out[key].estimate = OcclusionEstimate.from_row(data, heat)
        return out

    def put_many(self, items: list[tuple[str, EmbedResult]]) -> None:
        rows = [(k, r.method, None if r.embedding is None else np.asarray(r.embedding, np.float32).tobytes())
                for k, r in items]
        self.db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)", rows)
        self.db.executemany("INSERT OR REPLACE INTO estimate VALUES (?, ?, ?)",
                            [(k, *r.estimate.to_row()) for k, r in items if r.estimate is not None])
        self.db.commit()

    def close(self) -> None:
        self.db.close()


@dataclass
class EmbeddingSet:
    """Embeddings of a list of images (NaN rows where the pipeline failed) and how each face was found."""

    paths: list[Path]
    embeddings: np.ndarray
    methods: list[str]
    seconds: float = 0.0
    computed: int = 0
    cached: int = 0
    index: dict = field(default_factory=dict)
    estimates: list[OcclusionEstimate | None] = field(default_factory=list)  # per path, None: no estimate
    estimates_added: int = 0  # cached images embedded again only to add their occlusion estimate

    def __post_init__(self) -> None:
        self.index = {p: i for i, p in enumerate(self.paths)}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.methods:
            out[m] = out.get(m, 0) + 1
        return out


def check_images_exist(paths: list[Path], what: str = "pair list") -> None:
    """Fail early, naming the first missing files, instead of an hour into a run."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} image(s) named by the {what} do not exist: {shown}{more} "
                        "(check --root)")


def _progress(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)


_WORKER: dict = {}


def _worker_init(spec: str, options: dict) -> None:
    _WORKER["embedder"] = load_embedder(spec, **options)


def _worker_embed(paths: list[Path]) -> list[EmbedResult]:
    try:
        return _WORKER["embedder"].embed_batch([load_image(p) for p in paths])
    except FromfaceError as exc:  # re-raised in the parent: keep the message, use a type that pickles plainly
        raise DataError(str(exc)) from None


def _batches(embedder: Embedder, todo: list[tuple[Path, str]], workers: int):
    """Yield (keys, results) per batch, in a pool of worker processes when asked and possible."""
    step = max(1, embedder.batch_size)
    chunks = [todo[s:s + step] for s in range(0, len(todo), step)]
    if workers > 1 and embedder.factory is not None and len(chunks) > 1:
        spec, options = embedder.factory
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(spec, options)) as pool:
            for chunk, out in zip(chunks, pool.map(_worker_embed, [[p for p, _ in c] for c in chunks])):
                yield [k for _, k in chunk], out
        return
    for chunk in chunks:
        yield [k for _, k in chunk], embedder.embed_batch([load_image(p) for p, _ in chunk])


def _merged(old: EmbedResult | None, new: EmbedResult) -> EmbedResult:
    """A fresh result, or for an image cached without an estimate, the cached embedding with the new estimate (the
    run's numbers stay those of the cache; an image whose face was found another way keeps no estimate)."""
    if old is None:
        return new
    return replace(old, estimate=new.estimate if new.method == old.method else None)


def embed_images(embedder: Embedder, paths: list[Path], cache_dir: Path | None = None,
                 progress: bool = True, workers: int = 1, estimates: bool = False) -> EmbeddingSet:
    """Embed every image (cached ones are read back), returning rows in ``paths`` order.

    ``workers`` > 1 embeds in that many processes (each builds its own copy of the embedder). ``estimates``: for an
    embedder that gives occlusion estimates, images cached without one (format-1 caches) are embedded again to
    add it; otherwise cached rows are used as they are.
    """
    start = time.perf_counter()
    keys = [image_key(p) for p in paths]
    cache = EmbeddingCache(cache_dir, embedder.cache_key, embedder.name) if cache_dir is not None else None
    results: dict[str, EmbedResult] = cache.get_many(keys) if cache else {}
    cached = sum(1 for k in keys if k in results)
    lacking = estimates and embedder.gives_estimate
    stale = {k for k, r in results.items() if lacking and r.estimate is None and r.method != "failed"}
    todo = [(p, k) for p, k in zip(paths, keys) if k not in results or k in stale]
    bar = _progress(len(todo), embedder.name, progress and bool(todo))
    try:
        for chunk_keys, out in _batches(embedder, todo, workers):
            items = [(k, _merged(results.get(k) if k in stale else None, r)) for k, r in zip(chunk_keys, out)]
            results.update(items)
            if cache:
                cache.put_many(items)
            if bar:
                bar.update(len(items))
    finally:
        if bar:
            bar.close()
        if cache:
            cache.close()
    matrix, methods = _matrix(embedder, results, keys, len(paths))
    added = sum(1 for p, k in todo if k in stale)
    return EmbeddingSet(list(paths), matrix, methods, time.perf_counter() - start, len(todo) - added, cached,
                        estimates=[results[k].estimate for k in keys], estimates_added=added)


def _matrix(embedder: Embedder, results: dict[str, EmbedResult], keys: list[str], n: int
            ) -> tuple[np.ndarray, list[str]]:
    """The (n, dim) embedding rows in ``keys`` order (NaN where the face was not found) and each face's method."""
    dims = {r.embedding.size for r in results.values() if r.embedding is not None}
    if len(dims) > 1:
        raise DataError(f"{embedder.name}: embeddings of different sizes {sorted(dims)} (stale cache?)")
    dim = dims.pop() if dims else 1
    matrix = np.full((n, dim), np.nan, dtype=np.float32)
    methods = []
    for i, k in enumerate(keys):
        r = results[k]
        if r.embedding is not None:
            matrix[i] = r.embedding
        methods.append(r.method)
    return matrix, methods


def pair_scores(embeddings: EmbeddingSet, path1: list[Path], path2: list[Path], metric: str = "cosine"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Score every pair (higher = more alike) and flag pairs where either image failed.

    Failed pairs get a score below every real one (-1 for cosine), so every threshold calls them different.
    """
    i1 = np.array([embeddings.index[p] for p in path1], dtype=np.int64)
    i2 = np.array([embeddings.index[p] for p in path2], dtype=np.int64)
    a, b = embeddings.embeddings[i1].astype(np.float64), embeddings.embeddings[i2].astype(np.float64)
    failed = np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1)
    if metric == "cosine":
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        scores = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)
        floor = -1.0
    elif metric == "euclidean":
        scores = -np.linalg.norm(a - b, axis=1)
        valid = scores[~failed]
        floor = float(valid.min()) - 1.0 if valid.size else -1.0
    else:
        raise DataError(f"unknown score metric {metric!r}")
    scores = np.where(failed, floor, scores)
    return scores, failed
