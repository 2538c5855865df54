"""The embedded default: a gallery in one SQLite file, searched in memory.

Why SQLite: one file, safe for several processes (WAL journal, ``BEGIN IMMEDIATE`` writes), and atomic commits, so a
crash in the middle of an enrolment never leaves half an identity behind. Templates are float32 blobs with their
occlusion state; the search matrix is loaded once and kept up to date (``PRAGMA data_version`` sees other
processes' commits; new templates are appended, a removal reloads it). Search is exact up to ``EXACT_UP_TO``
templates and goes through an approximate FAISS HNSW index above it, when FAISS is installed.
Read-only opens use ``mode=ro`` and never write to the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fromface.errors import ConfigError, DataError
from fromface.storage.base import (
    Hits,
    Person,
    Store,
    Template,
    best_per_identity,
    model_meta,
    read_only_error,
    refuse_existing,
)

SCHEMA_VERSION = 2  # 2: templates.digest (sha256 of the enrolled image), so the same image is never enrolled twice
READABLE_VERSIONS = (1, 2)
#: Exact search up to this many templates; above it an approximate index when FAISS is installed
#: (benchmarks/gallery_scale.py measures both; docs/gallery.md).
EXACT_UP_TO = 1_000_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL, dim INTEGER NOT NULL,
    occluded INTEGER, pattern INTEGER, visible_fraction REAL, source TEXT, created REAL NOT NULL, digest TEXT);
CREATE INDEX IF NOT EXISTS templates_identity ON templates(identity_id);
CREATE INDEX IF NOT EXISTS templates_digest ON templates(digest);
"""
_FROMFACE_TABLES = {"schema_version", "meta", "identities", "templates"}


class HnswIndex:
    """FAISS's HNSW graph over unit embeddings (inner product = cosine): approximate nearest templates in
    logarithmic time. Templates are added as they are enrolled; a removal rebuilds it (HNSW cannot delete)."""

    M = 32  # links per node: recall against memory (about 4 x M x 4 bytes a template on top of the vectors)
    #: candidates kept while searching (at least twice the templates asked for): recall against time
    #: (benchmarks/gallery_scale.py --ef measures both)
    ef_search = 512

    def __init__(self, faiss: Any, mat: np.ndarray):
        self.index = faiss.IndexHNSWFlat(mat.shape[1], self.M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 80
        self.add(mat)

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def search(self, query: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of about the ``count`` nearest templates, best first."""
        self.index.hnsw.efSearch = max(self.ef_search, 2 * count)
        scores, rows = self.index.search(query[None].astype(np.float32), count)
        found = rows[0] >= 0
        return rows[0][found].astype(np.int64), scores[0][found]


class SqliteStore(Store):
    """A gallery in the SQLite file ``path``; safe across threads and processes. ``use_faiss``: ``"auto"`` (an
    approximate FAISS HNSW index above ``exact_up_to`` templates, if FAISS is installed; exact search below), True
    (always the index), False (always exact)."""

    def __init__(self, path: str | Path, read_only: bool = False, timeout: float = 60.0,
                 use_faiss: bool | str = "auto", exact_up_to: int = EXACT_UP_TO):
        self.path = Path(path)
        self.location = str(self.path)
        self.name = self.path.name
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a folder, expected a gallery database file")
        self.read_only = bool(read_only)
        if self.read_only and not self.path.is_file():
            raise DataError(f"{self.path}: gallery not found (create it with `fromface enroll ... --db {self.path}`)")
        self.use_faiss = use_faiss
        self.exact_up_to = int(exact_up_to)
        self._lock = threading.RLock()
        self._cache: tuple | None = None
        self._seen_version: tuple[int, int] | None = None
        self._own_changes = 0
        self._ann: HnswIndex | None = None
        self._removals_seen: tuple | None = None
        try:
            self._conn = self._connect(timeout)
            if self.read_only:
                self._check_schema()
            else:
                self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a usable gallery database ({exc})") from None

    # ------------------------------------------------------------------ schema and transactions
    def _connect(self, timeout: float) -> sqlite3.Connection:
        """Read-only: ``mode=ro`` (``immutable=1`` where SQLite cannot make its shared-memory file, e.g. in a
        read-only folder, so nothing can be writing). Read-write: refuse another application's SQLite file before
        anything (even the WAL switch) is written to it."""
        kw = {"timeout": timeout, "isolation_level": None, "check_same_thread": False}
        if self.read_only:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, **kw)
            try:
                conn.execute("SELECT name FROM sqlite_master").fetchall()
            except sqlite3.OperationalError:
                conn.close()
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, **kw)
            return conn
        conn = sqlite3.connect(str(self.path), **kw)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not _FROMFACE_TABLES <= tables:
            conn.close()
            raise DataError(f"{self.path}: an SQLite database of another application (tables "
                            f"{', '.join(sorted(tables)[:5])}), not a fromface gallery; it was left untouched")
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise DataError(f"{self.path}: cannot open the gallery for writing ({exc}); is the file or its folder "
                            "read-only?") from None
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not _FROMFACE_TABLES <= tables:
            what = "an empty file" if not tables else "an SQLite database of another application"
            raise DataError(f"{self.path}: {what}, not a fromface gallery")
        row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None or row[0] not in READABLE_VERSIONS:
            raise DataError(f"{self.path}: gallery schema version {row and row[0]}, this fromface reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")

    def _init_schema(self) -> None:
        with self._write() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit early
                if "templates_digest" in statement:
                    continue  # after the migration below, which adds the column to older galleries
                conn.execute(statement)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] == 1:  # version 1 had no digest column
                conn.execute("ALTER TABLE templates ADD COLUMN digest TEXT")
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise DataError(f"{self.path}: gallery schema version {row[0]}, this fromface reads {SCHEMA_VERSION}")
            conn.execute("CREATE INDEX IF NOT EXISTS templates_digest ON templates(digest)")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) under the thread lock: one writer at a
        time across processes, and a crash before COMMIT leaves nothing behind."""
        if self.read_only:
            raise read_only_error(self.location)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise DataError(f"{self.path}: cannot write to the gallery ({exc})") from None
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                self._conn.execute("ROLLBACK")
                if "readonly" in str(exc) or "read-only" in str(exc):
                    raise DataError(f"{self.path}: the gallery is read-only ({exc})") from None
                raise
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._own_changes += 1

    def close(self) -> None:
        """Close the file; a writer first folds the write-ahead log into it, so the ``.db`` alone holds everything."""
        with self._lock:
            if not self.read_only:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    # ------------------------------------------------------------------ writing
    def write(self, people: Sequence[Person], dim: int, model: str | None, source: str | None, mode: str) -> int:
        added = 0
        with self._write() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            for key, value in model_meta(self.location, meta, dim, model, source).items():
                conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, value))
            for name, rows in people:
                refuse_existing(name, self._template_count(conn, name), len(rows), mode)
            for name, rows in people:
                new = [(emb, t) for emb, t in rows if not (t.digest and conn.execute(
                    "SELECT 1 FROM templates WHERE digest = ?", (t.digest,)).fetchone())]
                if not new:
                    continue  # every image is enrolled already: no identity without templates
                conn.execute("INSERT OR IGNORE INTO identities(name, created) VALUES (?, ?)", (name, time.time()))
                identity_id = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()[0]
                now = time.time()
                conn.executemany(
                    "INSERT INTO templates(identity_id, embedding, dim, occluded, pattern, visible_fraction, source, "
                    "created, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(identity_id, emb.astype("<f4").tobytes(), emb.size,
                      None if t.occluded is None else int(bool(t.occluded)), t.pattern, t.visible_fraction,
                      t.source, now, t.digest) for emb, t in new])
                added += len(new)
        return added

    def remove(self, name: str) -> int:
        with self._write() as conn:
            row = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                return 0
            count = conn.execute("SELECT COUNT(*) FROM templates WHERE identity_id = ?", (row[0],)).fetchone()[0]
            conn.execute("DELETE FROM templates WHERE identity_id = ?", (row[0],))
            conn.execute("DELETE FROM identities WHERE id = ?", (row[0],))
            # readers that keep templates in memory reload them whole after a removal (additions they append)
            conn.execute("INSERT INTO meta(key, value) VALUES ('removals', '1') ON CONFLICT(key) DO UPDATE SET "
                         "value = CAST(value AS INTEGER) + 1")
        return int(count)

    # ------------------------------------------------------------------ reading
    def meta(self) -> dict[str, str]:
        with self._lock:
            return {k: v for k, v in self._conn.execute("SELECT key, value FROM meta") if k != "removals"}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT i.name, COUNT(t.id) FROM identities i LEFT JOIN templates t "
                                           "ON t.identity_id = i.id GROUP BY i.id ORDER BY i.name").fetchall())

    def names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT name FROM identities ORDER BY name")]

    @staticmethod
    def _template_count(conn: sqlite3.Connection, name: str) -> int | None:
        row = conn.execute("SELECT (SELECT COUNT(*) FROM templates t WHERE t.identity_id = i.id) FROM identities i "
                           "WHERE i.name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def template_count(self, name: str) -> int | None:
        with self._lock:
            return self._template_count(self._conn, name)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

    def known_digests(self, digests: Sequence[str]) -> dict[str, str]:
        with self._lock:
            out = {}
            for start in range(0, len(digests), 500):
                chunk = list(digests[start:start + 500])
                marks = ",".join("?" * len(chunk))
                out.update(self._conn.execute(f"SELECT t.digest, i.name FROM templates t JOIN identities i ON "
                                              f"i.id = t.identity_id WHERE t.digest IN ({marks})", chunk).fetchall())
            return out

    def people(self, batch: int = 1000) -> Iterator[list[Person]]:
        with self._lock:
            identities = self._conn.execute("SELECT id, name FROM identities ORDER BY id").fetchall()
        for start in range(0, len(identities), max(int(batch), 1)):
            chunk = dict(identities[start:start + max(int(batch), 1)])
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._conn.execute(
                    "SELECT identity_id, embedding, occluded, pattern, visible_fraction, source, digest FROM "
                    f"templates WHERE identity_id IN ({marks}) ORDER BY id", list(chunk)).fetchall()
            found: dict[int, list] = {k: [] for k in chunk}
            for owner, blob, occluded, pattern, visible, source, digest in rows:
                emb = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                found[owner].append((emb, Template(emb, None if occluded is None else bool(occluded), pattern,
                                                   visible, source or "", digest)))
            yield [(chunk[k], templates) for k, templates in found.items() if templates]

    def _version(self) -> tuple[int, int]:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0]), self._own_changes

    def matrix(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
        """(embeddings (N, D), template ids, identity names, identity index per row, occluded per row), kept in
        memory and brought up to date after a change by this or another process: templates added since are
        appended (an enrolment never reloads the gallery), a removal reloads it whole. Rows are in the order they
        were enrolled, not grouped by identity."""
        with self._lock:
            version = self._version()
            if self._cache is not None and version == self._seen_version:
                return self._cache
            removals = self._conn.execute("SELECT value FROM meta WHERE key = 'removals'").fetchone()
            cache = self._cache if self._cache is not None and removals == self._removals_seen else None
            cache = self._appended(cache) if cache is not None else None
            self._cache = cache if cache is not None else self._rows_after(None, 0)
            self._removals_seen, self._seen_version = removals, version
            return self._cache

    def _appended(self, cache: tuple) -> tuple | None:
        """``cache`` with the templates enrolled since it was read; None when rows it holds are gone."""
        ids = cache[1]
        last = int(ids.max()) if len(ids) else 0
        kept = self._conn.execute("SELECT COUNT(*) FROM templates WHERE id <= ?", (last,)).fetchone()[0]
        if kept != len(ids):  # removed by a writer that does not record removals
            return None
        return self._rows_after(cache, last)

    def _rows_after(self, cache: tuple | None, last: int) -> tuple:
        """Templates with id > ``last`` read from the file and put after ``cache``'s rows (or alone)."""
        rows = self._conn.execute("SELECT t.id, t.embedding, t.dim, t.occluded, i.name FROM templates t JOIN "
                                  "identities i ON i.id = t.identity_id WHERE t.id > ? ORDER BY t.id",
                                  (last,)).fetchall()
        mat, ids, names, owner, occluded = cache if cache is not None else (
            np.zeros((0, rows[0][2] if rows else 0), np.float32), np.zeros(0, np.int64), [], np.zeros(0, np.int64),
            np.zeros(0, np.int8))
        if not rows:
            return mat, ids, names, owner, occluded
        index = {name: k for k, name in enumerate(names)}
        for r in rows:
            index.setdefault(r[4], len(index))
        names = list(index)
        new = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), rows[0][2])
        self._ann = None if cache is None else self._ann  # an index over ``cache`` takes the new rows below
        out = (np.concatenate([mat, new.astype(np.float32)]) if len(mat) else new.astype(np.float32),
               np.concatenate([ids, np.array([r[0] for r in rows], np.int64)]), names,
               np.concatenate([owner, np.array([index[r[4]] for r in rows], np.int64)]),
               np.concatenate([occluded, np.array([-1 if r[3] is None else r[3] for r in rows], np.int8)]))
        if self._ann is not None:
            self._ann.add(out[0][len(mat):])
        return out

    def search(self, query: np.ndarray, top_k: int) -> Hits:
        """:meth:`Store.search` over one snapshot of the in-memory rows (the widening never mixes two)."""
        nearest, total = self._snapshot_nearest(query)
        return best_per_identity(nearest, total, top_k)

    def nearest(self, query: np.ndarray, count: int) -> Hits:
        return self._snapshot_nearest(query)[0](count)

    def _snapshot_nearest(self, query: np.ndarray) -> tuple[Callable[[int], Hits], int]:
        """(``nearest(count)`` over the rows as of now, how many rows that is)."""
        with self._lock:
            snapshot = self.matrix()
            ann = self._ann_index(snapshot[0])
        return _snapshot_nearest(snapshot, ann, self._lock, query), len(snapshot[0])

    def _ann_index(self, mat: np.ndarray) -> HnswIndex | None:
        """The approximate index over ``mat`` (the current rows; call with the lock held) for a gallery above
        ``exact_up_to`` templates (FAISS HNSW), or None: exact search."""
        wanted = self.use_faiss is True or (self.use_faiss == "auto" and len(mat) > self.exact_up_to)
        if not wanted or len(mat) == 0:
            return None
        if self._ann is None:
            try:
                import faiss  # optional (pip install 'fromface[index]'): exact NumPy search without it
            except ImportError:
                if self.use_faiss is True:
                    raise ConfigError("use_faiss=True needs the faiss package (pip install faiss-cpu)") from None
                return None
            self._ann = HnswIndex(faiss, mat)
        return self._ann


def _snapshot_nearest(snapshot: tuple, ann: HnswIndex | None, lock: threading.RLock,
                      query: np.ndarray) -> Callable[[int], Hits]:
    """``nearest(count)`` over one snapshot of a :class:`SqliteStore`'s rows: exact (one matrix-vector product,
    computed once however often the search widens) or through the HNSW index, which may hold rows enrolled after
    the snapshot (they are left out)."""
    mat, ids, identities, owner, occluded = snapshot
    exact = mat @ query if ann is None else None

    def nearest(count: int) -> Hits:
        if ann is not None:
            with lock:  # FAISS may not search while matrix() adds rows to it in another thread
                rows, scores = ann.search(query, count)
            known = rows < len(mat)
            rows, scores = rows[known], scores[known]
        else:
            rows = np.argpartition(-exact, count - 1)[:count] if count < len(exact) else np.arange(len(exact))
            scores = exact[rows]
        order = np.argsort(-scores, kind="stable")
        rows, scores = rows[order], scores[order]
        return Hits(ids[rows], scores, [identities[owner[r]] for r in rows],
                    [None if occluded[r] < 0 else bool(occluded[r]) for r in rows])

    return nearest


__all__ = ["EXACT_UP_TO", "HnswIndex", "SqliteStore"]
