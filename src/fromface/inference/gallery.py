"""A persistent gallery of enrolled identities on SQLite, searched by exact cosine similarity in NumPy.

Why SQLite: one file, safe for several processes (WAL journal, ``BEGIN IMMEDIATE`` writes), and atomic commits, so a
crash in the middle of an enrolment never leaves half an identity behind. Templates are float32 blobs with their
occlusion state; the search matrix is loaded once and reloaded only when the file changed (``PRAGMA data_version``
sees other processes' commits). For very large galleries an optional FAISS inner-product index is used if installed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fromface.errors import ConfigError, DataError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL, dim INTEGER NOT NULL,
    occluded INTEGER, pattern INTEGER, visible_fraction REAL, source TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS templates_identity ON templates(identity_id);
"""


@dataclass
class Template:
    """One stored embedding with the occlusion state the model saw when it was enrolled."""

    embedding: np.ndarray
    occluded: bool | None = None
    pattern: int | None = None
    visible_fraction: float | None = None
    source: str = ""


@dataclass
class Match:
    """An identity's best template for a probe: cosine ``score`` and whether it passes the threshold."""

    name: str
    score: float
    template_id: int
    template_occluded: bool | None
    same: bool | None = None
    threshold: float | None = None
    condition: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": round(self.score, 5), "template_id": self.template_id,
                "template_occluded": self.template_occluded, "same": self.same,
                "threshold": None if self.threshold is None else round(self.threshold, 5),
                "condition": self.condition}


class Gallery:
    """Enrolled identities in one SQLite file; ``enroll``, ``remove``, ``identify``. Safe across threads and
    processes. ``recognizer`` embeds images (a :class:`FaceRecognizer`, built lazily from the model the gallery
    was created with when not given); ``use_faiss``: ``"auto"`` (above 200k templates, if installed), True, False.
    """

    def __init__(self, path: str | os.PathLike, recognizer: Any = None, use_faiss: bool | str = "auto",
                 timeout: float = 60.0):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a folder, expected a gallery database file")
        self._recognizer = recognizer
        self.use_faiss = use_faiss
        self._lock = threading.RLock()
        self._cache: tuple | None = None
        self._seen_version: tuple[int, int] | None = None
        self._own_changes = 0
        self._faiss = None
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a usable gallery database ({exc})") from None

    # ------------------------------------------------------------------ schema and transactions
    def _init_schema(self) -> None:
        with self._write() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit early
                conn.execute(statement)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise DataError(f"{self.path}: gallery schema version {row[0]}, this fromface reads {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error) under the thread lock: one writer at a
        time across processes, and a crash before COMMIT leaves nothing behind."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._own_changes += 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ recognizer
    @property
    def recognizer(self):
        """The FaceRecognizer used to embed images (built on first use from the gallery's model)."""
        if self._recognizer is None:
            from fromface.inference.recognizer import FaceRecognizer

            meta = self.meta()
            self._recognizer = FaceRecognizer(meta.get("source") or meta.get("model"))
        return self._recognizer

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def _check_model(self, conn: sqlite3.Connection, dim: int, model: str | None, source: str | None) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "dim" in meta and int(meta["dim"]) != dim:
            raise ConfigError(f"{self.path}: gallery holds {meta['dim']}-d templates, got {dim}-d embeddings "
                              f"(model {model or '?'}); use a new gallery for another model")
        if model and meta.get("model") not in (None, model):
            raise ConfigError(f"{self.path}: gallery was enrolled with model {meta['model']!r}, not {model!r}")
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
        if model:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('model', ?)", (model,))
        if source:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('source', ?)", (source,))

    # ------------------------------------------------------------------ writing
    def enroll(self, name: str, images: Any) -> int:
        """Add the faces of ``images`` (one or several; the largest face of each) to identity ``name``.

        All or nothing: every image is embedded before anything is written, and the rows go in one transaction.
        Returns the number of templates added.
        """
        if isinstance(images, (str, os.PathLike, bytes, bytearray, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise DataError(f"enrolment of {name!r}: no images given")
        faces = [found[0] for found in self.recognizer.embed(list(images))]
        templates = [Template(f.embedding, f.occluded, f.pattern, f.visible_fraction, f.source) for f in faces]
        return self.enroll_templates(name, templates, model=self.recognizer.model_name,
                                     source=self.recognizer.model_source)

    def enroll_templates(self, name: str, templates: Sequence[Template], model: str | None = None,
                         source: str | None = None) -> int:
        """Store ready-made templates for ``name`` in one transaction (creating the identity if new). ``model``
        (name) and ``source`` (name or checkpoint path that rebuilds it) are recorded by the first enrolment."""
        return self.enroll_many({name: templates}, model, source)

    def enroll_many(self, people: Mapping[str, Sequence[Template]], model: str | None = None,
                    source: str | None = None) -> int:
        """Store templates of many identities in ONE transaction (bulk imports); returns the templates added."""
        prepared = [(self._clean_name(name), self._prepare(name, templates)) for name, templates in people.items()]
        dims = {emb.size for _, rows in prepared for emb, _ in rows}
        if len(dims) > 1:
            raise DataError(f"enrolment: templates of different sizes {sorted(dims)}")
        if not dims:
            raise DataError("enrolment: no identities given")
        with self._write() as conn:
            self._check_model(conn, dims.pop(), model, source)
            for name, rows in prepared:
                conn.execute("INSERT OR IGNORE INTO identities(name, created) VALUES (?, ?)", (name, time.time()))
                identity_id = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()[0]
                for emb, t in rows:
                    self._insert_template(conn, identity_id, emb, t)
        return sum(len(rows) for _, rows in prepared)

    @staticmethod
    def _clean_name(name: str) -> str:
        name = str(name).strip()
        if not name:
            raise DataError("an identity needs a non-empty name")
        return name

    @staticmethod
    def _prepare(name: str, templates: Sequence[Template]) -> list[tuple[np.ndarray, Template]]:
        """Unit-length float32 embeddings, refusing empty, non-finite or mixed-size ones."""
        rows = []
        for t in templates:
            emb = np.asarray(t.embedding, dtype=np.float32).ravel()
            if not np.isfinite(emb).all() or emb.size == 0:
                what = t.source or "a template"
                raise DataError(f"enrolment of {name!r}: embedding of {what} is empty or not finite")
            rows.append((emb / max(float(np.linalg.norm(emb)), 1e-12), t))
        if not rows:
            raise DataError(f"enrolment of {name!r}: no templates given")
        if len({emb.size for emb, _ in rows}) != 1:
            raise DataError(f"enrolment of {name!r}: templates of different sizes")
        return rows

    def _insert_template(self, conn: sqlite3.Connection, identity_id: int, emb: np.ndarray, t: Template) -> None:
        occluded = None if t.occluded is None else int(bool(t.occluded))
        conn.execute("INSERT INTO templates(identity_id, embedding, dim, occluded, pattern, visible_fraction, source, "
                     "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (identity_id, emb.astype("<f4").tobytes(), emb.size, occluded, t.pattern, t.visible_fraction,
                      t.source, time.time()))

    def remove(self, name: str) -> int:
        """Delete an identity and its templates; returns the number of templates removed (0 if unknown)."""
        with self._write() as conn:
            row = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                return 0
            count = conn.execute("SELECT COUNT(*) FROM templates WHERE identity_id = ?", (row[0],)).fetchone()[0]
            conn.execute("DELETE FROM templates WHERE identity_id = ?", (row[0],))
            conn.execute("DELETE FROM identities WHERE id = ?", (row[0],))
        return int(count)

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT name FROM identities ORDER BY name")]

    def counts(self) -> dict[str, int]:
        """Templates per identity name."""
        with self._lock:
            return dict(self._conn.execute("SELECT i.name, COUNT(t.id) FROM identities i LEFT JOIN templates t "
                                           "ON t.identity_id = i.id GROUP BY i.id ORDER BY i.name").fetchall())

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

    def _version(self) -> tuple[int, int]:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0]), self._own_changes

    def matrix(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
        """(embeddings (N, D), template ids, identity names, identity index per row, occluded per row),
        cached and reloaded only after a change by this or another process."""
        with self._lock:
            version = self._version()
            if self._cache is not None and version == self._seen_version:
                return self._cache
            rows = self._conn.execute("SELECT t.id, t.identity_id, t.embedding, t.dim, t.occluded, i.name FROM "
                                      "templates t JOIN identities i ON i.id = t.identity_id "
                                      "ORDER BY t.identity_id, t.id").fetchall()
            dim = rows[0][3] if rows else 0
            mat = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), dim).astype(np.float32)
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            names, owner = [], np.empty(len(rows), dtype=np.int64)
            last = None
            for k, r in enumerate(rows):
                if r[1] != last:
                    names.append(r[5])
                    last = r[1]
                owner[k] = len(names) - 1
            occluded = np.array([-1 if r[4] is None else r[4] for r in rows], dtype=np.int8)
            self._cache = (mat, ids, names, owner, occluded)
            self._seen_version = version
            self._faiss = None
            return self._cache

    def search(self, embedding: np.ndarray, top_k: int = 5) -> list[Match]:
        """Best template per identity for a unit embedding, ``top_k`` identities by descending cosine."""
        mat, ids, names, owner, occluded = self.matrix()
        if len(mat) == 0:
            return []
        query = np.asarray(embedding, dtype=np.float32).ravel()
        if query.size != mat.shape[1]:
            raise ConfigError(f"{self.path}: probe is {query.size}-d but the gallery holds {mat.shape[1]}-d templates")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = self._scores(mat, query)
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        best = np.maximum.reduceat(scores, starts)
        order = np.argsort(-best, kind="stable")[:max(int(top_k), 1)]
        out = []
        for ident in order:
            lo = starts[ident]
            hi = starts[ident + 1] if ident + 1 < len(starts) else len(scores)
            row = lo + int(np.argmax(scores[lo:hi]))
            occ = None if occluded[row] < 0 else bool(occluded[row])
            out.append(Match(names[owner[row]], float(scores[row]), int(ids[row]), occ))
        return out

    def _scores(self, mat: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Cosine of the query with every template: one matrix-vector product, or FAISS for huge galleries."""
        want = self.use_faiss is True or (self.use_faiss == "auto" and len(mat) > 200_000)
        if want:
            try:
                import faiss
            except ImportError:
                if self.use_faiss is True:
                    raise ConfigError("use_faiss=True needs the faiss package (pip install faiss-cpu)") from None
                return mat @ query
            if self._faiss is None:
                self._faiss = faiss.IndexFlatIP(mat.shape[1])
                self._faiss.add(mat)
            dist, idx = self._faiss.search(query[None], len(mat))
            scores = np.empty(len(mat), dtype=np.float32)
            scores[idx[0]] = dist[0]
            return scores
        return mat @ query

    def identify(self, image: Any, top_k: int = 5) -> list[Match]:
        """The ``top_k`` enrolled identities closest to the (largest) face in ``image``, each marked ``same`` by
        the recognizer's threshold for that probe/template occlusion condition."""
        from fromface.inference.recognizer import FaceEmbedding

        face = image if isinstance(image, FaceEmbedding) else self.recognizer.embed(image)[0]
        matches = self.search(face.embedding, top_k)
        for m in matches:
            known = face.occluded is not None or m.template_occluded is not None
            occluded = bool(face.occluded or m.template_occluded)
            m.threshold, m.condition, _ = self.recognizer.condition_threshold(occluded, known)
            m.same = m.score >= m.threshold
        return matches


__all__ = ["Gallery", "Match", "Template"]
