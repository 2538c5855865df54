"""Group the faces of a photo collection by person, without enrolment, with the model's calibrated thresholds.

Two faces "match" when their cosine score passes the threshold calibrated for their condition: the occluded one
when either face is occluded (so a masked and a clean photo of one person are compared the way ``verify`` compares
them), the clean one otherwise. Clustering works on each pair's *margin*, ``score - threshold(pair)``, so one cut
at 0 applies both thresholds at once.

Memory stays linear in the number of faces: scores are computed a block of rows at a time and only each face's
``neighbours`` best candidates (margin above ``-slack``) are kept, in a sparse matrix. On that graph:

* ``linkage="average"`` (default): scikit-learn's connectivity-constrained average-linkage
  :class:`~sklearn.cluster.AgglomerativeClustering`, run on each connected component of the candidate graph, cut
  where the average margin between two groups drops to 0. Averaging is what keeps one chance match between two
  people (at FAR 1e-3, a collection of 1,000 faces has ~500 such pairs) from chaining them together: the
  near-miss pairs kept by ``slack`` vote against the merge.
* ``linkage="single"``: connected components (scipy) of the pairs that pass their threshold -- what "every pair
  that verifies is the same person" means literally; it chains, and is kept for comparison.

``benchmarks/cluster_quality.py`` measures both (docs/app.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from fromface.data.images import scan_images
from fromface.errors import DataError, FromfaceError

#: Candidates kept per face (its best-scoring others): bounds memory at n x NEIGHBOURS edges. Too few cuts away the
#: near misses that vote against a merge: on 150 LFW people with occluded copies (benchmarks/cluster_quality.py),
#: BCubed F was 0.835 with 30, 0.912 with 60, 0.927 with 100 and 0.930 with no limit.
NEIGHBOURS = 100
#: Pairs whose margin is above -SLACK enter the graph, so near misses count against a merge in average linkage.
SLACK = 0.15
#: Rows of the score matrix computed at once (BLOCK x n float32 scores at a time).
BLOCK = 512
LINKAGES = ("average", "single")
#: Cluster id of a face that matched no other face.
ALONE = -1


@dataclass
class ClusteredFace:
    """One face of the collection: where it is (``file`` relative to the folder, ``face`` its index in the image),
    its cluster (``ALONE`` when it matched nobody) and what the model saw of it."""

    file: str
    face: int
    faces_in_image: int
    box: np.ndarray
    score: float
    occluded: bool | None
    embedding: np.ndarray = field(repr=False)
    cluster: int = ALONE


@dataclass
class Collection:
    """The result of :func:`cluster_folder`: every face with its cluster, and what was passed over and why."""

    root: Path
    faces: list[ClusteredFace]
    skipped: list[tuple[str, str]]  # (file relative to root, why)
    images: int  # image files found
    embed_seconds: float = 0.0
    cluster_seconds: float = 0.0

    @property
    def clusters(self) -> dict[int, list[ClusteredFace]]:
        """Cluster id -> its faces (ids 0.. by decreasing size; faces alone are not included)."""
        out: dict[int, list[ClusteredFace]] = {}
        for f in self.faces:
            if f.cluster != ALONE:
                out.setdefault(f.cluster, []).append(f)
        return dict(sorted(out.items()))

    @property
    def embedded_images(self) -> int:
        """Images in which at least one face was found."""
        return len({f.file for f in self.faces})

    @property
    def multi_face_images(self) -> list[tuple[str, int]]:
        """(file, faces) for the images in which several faces were found and clustered."""
        return sorted({(f.file, f.faces_in_image) for f in self.faces if f.faces_in_image > 1})


def pair_thresholds(recognizer: Any) -> tuple[float, float]:
    """(clean, occluded) cosine thresholds of a :class:`~fromface.inference.recognizer.FaceRecognizer`: the calibrated
    ones, the user's ``threshold``, or the uncalibrated default, as ``verify`` would use them."""
    return float(recognizer.condition_threshold(False)[0]), float(recognizer.condition_threshold(True)[0])


def _prepared(embeddings: np.ndarray, occluded: Sequence[bool | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise DataError(f"embeddings must be an (n, d) array, got shape {emb.shape}")
    flags = np.array([bool(o) for o in occluded], dtype=bool)  # None (no estimate) compares as clean
    if len(flags) != len(emb):
        raise DataError(f"{len(flags)} occlusion flags for {len(emb)} embeddings")
    norms = np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb / norms, flags


def margin_graph(embeddings: np.ndarray, occluded: Sequence[bool | None] | np.ndarray, clean_threshold: float,
                 occluded_threshold: float, slack: float = SLACK, neighbours: int | None = NEIGHBOURS,
                 block: int = BLOCK) -> sparse.csr_matrix:
    """Sparse symmetric (n, n) matrix of margins ``cosine - threshold(pair)`` for the candidate pairs: margin above
    ``-slack`` and among either face's ``neighbours`` best (None: no limit). Computed ``block`` rows at a time, so
    memory is ``block x n`` scores plus the kept edges, never n x n."""
    emb, flags = _prepared(embeddings, occluded)
    n = len(emb)
    rows, cols, vals = [], [], []
    for start in range(0, n, max(int(block), 1)):
        stop = min(start + max(int(block), 1), n)
        scores = emb[start:stop] @ emb.T
        either = flags[start:stop, None] | flags[None, :]
        margin = scores - np.where(either, np.float32(occluded_threshold), np.float32(clean_threshold))
        margin[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # a face is not its own neighbour
        r, c = _kept(margin, slack, neighbours)
        rows.append(r + start)
        cols.append(c)
        vals.append(margin[r, c])
    graph = sparse.coo_matrix((np.concatenate(vals) if vals else np.zeros(0, np.float32),
                               (np.concatenate(rows) if rows else np.zeros(0, int),
                                np.concatenate(cols) if cols else np.zeros(0, int))), shape=(n, n)).tocsr()
    # Union of both directions: a pair is kept if it is among the best of either face. Margins are symmetric, so
    # the elementwise maximum of the matrix and its transpose is the margin itself wherever either one has it.
    return graph.maximum(graph.T).tocsr()


def _kept(margin: np.ndarray, slack: float, neighbours: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the entries of one block that enter the graph."""
    keep = margin > -slack
    if neighbours is None:
        return np.nonzero(keep)
    k = max(int(neighbours), 1)
    crowded = np.flatnonzero(keep.sum(axis=1) > k)  # only these rows need a top-k (most have a few candidates)
    if len(crowded):
        top = np.argpartition(-margin[crowded], k - 1, axis=1)[:, :k]
        keep[crowded] = False
        keep[crowded[:, None], top] = True
    return np.nonzero(keep)


def cluster_embeddings(embeddings: np.ndarray, occluded: Sequence[bool | None] | np.ndarray, clean_threshold: float,
                       occluded_threshold: float, linkage: str = "average", slack: float = SLACK,
                       neighbours: int | None = NEIGHBOURS, block: int = BLOCK) -> np.ndarray:
    """Cluster id per face: 0, 1, ... by decreasing cluster size (ties: first face first), ``ALONE`` (-1) for a
    face that matched nobody. See the module docstring for the two linkages."""
    if linkage not in LINKAGES:
        raise DataError(f"linkage must be one of {', '.join(LINKAGES)}; got {linkage!r}")
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=int)
    graph = margin_graph(embeddings, occluded, clean_threshold, occluded_threshold,
                         slack=0.0 if linkage == "single" else slack, neighbours=neighbours, block=block)
    if linkage == "single":
        _, raw = connected_components(graph, directed=False)
    else:
        raw = _average_linkage(graph)
    return _relabel(raw)


def _average_linkage(graph: sparse.csr_matrix) -> np.ndarray:
    """Average linkage on the candidate graph, component by component, cut at margin 0.

    Each connected component goes to scikit-learn on its own: a connected ``connectivity`` is what keeps
    scikit-learn from completing the graph with all-pairs distances between components (quadratic). The distance of
    a pair is ``1 - margin``, so "merge while the average distance is below 1" is "while the average margin is above
    0" (strictly, as in :func:`~fromface.inference.decision.accepts`). scikit-learn computes a distance only for the
    pairs in ``connectivity``, through ``metric``; the samples it passes are one-number rows holding the face's
    index, so that the metric can read the stored margin instead of scikit-learn copying an embedding per edge.
    """
    from sklearn.cluster import AgglomerativeClustering

    n_parts, part = connected_components(graph, directed=False)
    labels = np.arange(graph.shape[0]) + graph.shape[0]  # faces alone keep ids no component label can take
    next_id = 0
    for members in _members(part, n_parts):
        if len(members) < 2:
            continue
        sub = graph[members][:, members].tocsr()
        model = AgglomerativeClustering(n_clusters=None, distance_threshold=1.0, linkage="average",
                                        metric=_stored_distance(sub), connectivity=sub)
        local = model.fit_predict(np.arange(len(members), dtype=np.float64)[:, None])
        labels[members] = local + next_id
        next_id += int(local.max()) + 1
    return labels


def _members(part: np.ndarray, n_parts: int) -> list[np.ndarray]:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_parts)]


def _stored_distance(sub: sparse.csr_matrix) -> Callable[[np.ndarray, np.ndarray], float]:
    """scikit-learn metric over index rows: ``1 - margin`` of the stored pair (never called for pairs not stored)."""
    coo = sub.tocoo()
    margins = {(int(i), int(j)): float(v) for i, j, v in zip(coo.row, coo.col, coo.data)}

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return max(1.0 - margins[int(a[0]), int(b[0])], 0.0)

    return distance


def _relabel(raw: np.ndarray) -> np.ndarray:
    """Ids 0.. by decreasing size (ties by first face), ALONE for groups of one."""
    _, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    order = sorted(range(len(counts)), key=lambda g: (-counts[g], first[g]))
    new = np.full(len(counts), ALONE)
    next_id = 0
    for g in order:
        if counts[g] > 1:
            new[g] = next_id
            next_id += 1
    return new[inverse.ravel()]


# ---------------------------------------------------------------------------------------------- photo folders
def list_images(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``root`` (recursively) and (path, why) for everything passed over; one clear error for a
    folder that is missing, not a folder, unreadable, or holds no images."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    try:
        with os.scandir(root) as entries:
            next(entries, None)
    except OSError as exc:
        raise DataError(f"{root}: cannot read the folder ({exc.strerror or exc})") from None
    unreadable: list[tuple[Path, str]] = []
    for _ in os.walk(root, onerror=lambda e: unreadable.append((Path(e.filename), "cannot read the folder "
                                                                 f"({e.strerror or e})"))):
        pass
    files, passed = scan_images(root, recursive=True)
    if not files:
        others = len(passed) + len(unreadable)
        raise DataError(f"{root}: no images found" + (f" ({others} other files or folders)" if others else ""))
    return files, unreadable + passed


Embedded = list[tuple[Path, list]]
Skipped = list[tuple[Path, str]]


def embed_files(recognizer: Any, files: Sequence[Path], batch: int = 16,
                progress: Callable[[int], None] | None = None) -> tuple[Embedded, Skipped]:
    """Every face of each file, through ``recognizer.embed`` in batches: ([(file, faces)], [(file, why skipped)]).
    A batch that fails (one photo with no face fails all of it) is split in halves and retried, so a bad photo costs
    a few extra passes over its own half-batches, not one pass per photo of the batch. ``progress(k)`` is called
    after each ``k`` images."""
    done: Embedded = []
    skipped: Skipped = []
    step = max(int(batch), 1)
    for start in range(0, len(files), step):
        chunk = list(files[start:start + step])
        _embed_chunk(recognizer, chunk, done, skipped)
        if progress is not None:
            progress(len(chunk))
    return done, skipped


def _embed_chunk(recognizer: Any, chunk: list[Path], done: Embedded, skipped: Skipped) -> None:
    try:
        done.extend(zip(chunk, recognizer.embed([str(f) for f in chunk])))
    except FromfaceError as exc:
        if len(chunk) == 1:
            skipped.append((chunk[0], _without_name(str(exc), chunk[0])))
            return
        half = len(chunk) // 2
        _embed_chunk(recognizer, chunk[:half], done, skipped)
        _embed_chunk(recognizer, chunk[half:], done, skipped)


def _without_name(message: str, path: Path) -> str:
    """An error message without its leading "<path>: ", which the report prints itself."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def cluster_folder(recognizer: Any, root: str | os.PathLike, batch: int = 16, linkage: str = "average",
                   progress: Callable[[int], None] | None = None, files: Sequence[Path] | None = None,
                   passed: Sequence[tuple[Path, str]] = ()) -> Collection:
    """Embed every face of every image under ``root`` and cluster them (see :func:`cluster_embeddings`); images
    with no usable face are listed in ``Collection.skipped`` with the reason. ``files``/``passed``: an earlier
    :func:`list_images` of ``root`` (the CLI lists first, to size its progress bar)."""
    root = Path(root)
    if files is None:
        files, passed = list_images(root)
    start = time.perf_counter()
    done, failed = embed_files(recognizer, files, batch=batch, progress=progress)
    embedded = time.perf_counter()
    faces = [ClusteredFace(file=_relative(f, root), face=k, faces_in_image=len(found), box=np.asarray(fe.box),
                           score=float(fe.score), occluded=fe.occluded, embedding=fe.embedding)
             for f, found in done for k, fe in enumerate(found)]
    skipped = [(_relative(p, root), why) for p, why in [*passed, *failed]]
    if not faces:
        example = f"; e.g. {_relative(failed[0][0], root)}: {failed[0][1]}" if failed else ""
        raise DataError(f"{root}: no face found in any of {len(files)} images{example}")
    clean, occluded = pair_thresholds(recognizer)
    labels = cluster_embeddings(np.stack([f.embedding for f in faces]), [f.occluded for f in faces], clean, occluded,
                                linkage=linkage)
    for f, label in zip(faces, labels):
        f.cluster = int(label)
    return Collection(root=root, faces=faces, skipped=sorted(skipped), images=len(files),
                      embed_seconds=embedded - start, cluster_seconds=time.perf_counter() - embedded)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- outputs
CSV_COLUMNS = ("file", "face", "faces_in_image", "cluster", "cluster_size", "occluded", "x1", "y1", "x2", "y2",
               "detection_score")


def write_csv(collection: Collection, path: str | os.PathLike) -> None:
    """One row per face (``cluster`` -1: matched nobody; ``occluded`` empty: the model gives no estimate)."""
    import csv

    sizes = {cid: len(members) for cid, members in collection.clusters.items()}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for f in collection.faces:
            occluded = "" if f.occluded is None else str(bool(f.occluded)).lower()
            writer.writerow([f.file, f.face, f.faces_in_image, f.cluster, sizes.get(f.cluster, 1), occluded,
                             *(f"{float(v):.1f}" for v in f.box[:4]), f"{f.score:.4f}"])


def folder_name(cluster: int) -> str:
    """Folder of a cluster under ``--link-to``: ``person-0000``...; faces that matched nobody go to ``alone``."""
    return "alone" if cluster == ALONE else f"person-{cluster:04d}"


def link_clusters(collection: Collection, out: str | os.PathLike) -> int:
    """One folder per cluster under ``out`` with a symlink to each photo (absolute target; the link is named after
    the photo's path under the collection, ``/`` as ``__``). Existing files are never replaced: a link name that
    exists raises :class:`DataError` (the caller clears the folder first, see :func:`clear_links`). Returns the
    number of links made."""
    out = Path(out)
    made = 0
    for face in collection.faces:
        target = (collection.root / face.file).resolve()
        link = out / folder_name(face.cluster) / face.file.replace("/", "__")
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue  # the same photo, another face of it in the same cluster
        if link.exists() or link.is_symlink():
            raise DataError(f"{link}: already exists; not overwriting it")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        made += 1
    return made


def clear_links(out: str | os.PathLike) -> None:
    """Remove the cluster folders of an earlier run under ``out`` (``person-*`` and ``alone`` holding only
    symlinks); anything else there is left alone, and a cluster folder holding a real file is refused."""
    out = Path(out)
    ours = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()
            and (p.name == "alone" or p.name.startswith("person-"))]
    for folder in ours:
        real = [p for p in folder.iterdir() if not p.is_symlink()]
        if real:
            raise DataError(f"{real[0]}: not a link made by `fromface cluster`; not removing {folder}")
    for folder in ours:
        for link in folder.iterdir():
            link.unlink()
        folder.rmdir()


# ---------------------------------------------------------------------------------------------- quality
def pair_counts(labels: Sequence[int], truth: Sequence[Any]) -> tuple[float, float]:
    """Pairwise (precision, recall): of the pairs put together, the share that are one person; of the pairs of one
    person, the share put together. Faces ``ALONE`` are clusters of one."""
    table = _contingency(labels, truth)
    together = _pairs(table.sum(axis=1))
    same = _pairs(table.sum(axis=0))
    both = _pairs(table.data) if sparse.issparse(table) else _pairs(table.ravel())
    return (both / together if together else 1.0), (both / same if same else 1.0)


def bcubed(labels: Sequence[int], truth: Sequence[Any]) -> tuple[float, float, float]:
    """BCubed (precision, recall, F): per face, the share of its cluster that is its person and the share of its
    person in its cluster, averaged over faces (Bagga & Baldwin 1998; Amigo et al. 2009)."""
    table = sparse.coo_matrix(_contingency(labels, truth))
    rows, cols = np.asarray(table.sum(axis=1)).ravel(), np.asarray(table.sum(axis=0)).ravel()
    n = float(rows.sum())
    precision = float((table.data ** 2 / rows[table.row]).sum() / n)
    recall = float((table.data ** 2 / cols[table.col]).sum() / n)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _contingency(labels: Sequence[int], truth: Sequence[Any]) -> sparse.csr_matrix:
    lab = np.asarray(labels)
    lab = np.where(lab == ALONE, -1 - np.arange(len(lab)), lab)  # each lone face its own cluster
    _, li = np.unique(lab, return_inverse=True)
    _, ti = np.unique(np.asarray(truth), return_inverse=True)
    return sparse.coo_matrix((np.ones(len(lab)), (li.ravel(), ti.ravel()))).tocsr()


def _pairs(counts: Any) -> float:
    c = np.asarray(counts, dtype=np.float64).ravel()
    return float((c * (c - 1) / 2).sum())
