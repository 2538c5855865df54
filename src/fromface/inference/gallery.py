"""A persistent gallery of enrolled identities on SQLite, searched by cosine similarity in memory.

Why SQLite: one file, safe for several processes (WAL journal, ``BEGIN IMMEDIATE`` writes), and atomic commits, so a
crash in the middle of an enrolment never leaves half an identity behind. Templates are float32 blobs with their
occlusion state; the search matrix is loaded once and kept up to date (``PRAGMA data_version`` sees other
processes' commits; new templates are appended, a removal reloads it). Search is exact up to ``EXACT_UP_TO``
templates and goes through an approximate FAISS HNSW index above it, when FAISS is installed.

What a gallery file is trusted with: names, embeddings and the *identity* of the model that made them. It never
decides which code or weights run: a gallery made with a registered model names that model (``name:tag``), which
loads only weights shipped in the package; a gallery made with a checkpoint or ONNX file records the file's sha256,
and that file is used only when the caller passes it explicitly. Searching with another model is refused.
Read-only commands open the file read-only (``mode=ro``) and never write to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fromface.data.images import describe_source
from fromface.errors import AlreadyEnrolledError, ConfigError, DataError, FromfaceError, ImageError
from fromface.inference.decision import accepts
from fromface.inference.recognizer import FaceEmbedding, FaceRecognizer

SCHEMA_VERSION = 2  # 2: templates.digest (sha256 of the enrolled image), so the same image is never enrolled twice
READABLE_VERSIONS = (1, 2)
#: Exact search up to this many templates; above it an approximate index when FAISS is installed
#: (benchmarks/gallery_scale.py measures both; docs/gallery.md).
EXACT_UP_TO = 1_000_000
#: Longest identity name accepted (characters).
MAX_NAME_LENGTH = 200
ENROL_MODES = ("new", "add")
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


@dataclass
class Template:
    """One stored embedding with the occlusion state the model saw when it was enrolled."""

    embedding: np.ndarray
    occluded: bool | None = None
    pattern: int | None = None
    visible_fraction: float | None = None
    source: str = ""
    digest: str | None = None  # sha256 of the image it came from: the same image is not enrolled twice


@dataclass
class Enrolment:
    """What one enrolment did: templates ``added`` to identity ``name``, images ``skipped`` (``"source: reason"``)
    and the identity's ``templates`` afterwards."""

    name: str
    added: int
    skipped: list[str]
    templates: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "added": self.added, "skipped": list(self.skipped), "templates": self.templates}


def image_digest(image: Any) -> str:
    """sha256 of an image as given: a file's bytes, encoded bytes, or an array's/PIL image's pixels and shape."""
    if isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise ImageError(str(image), "no such file" if not Path(image).exists() else
                             f"cannot read file ({exc.strerror or exc})") from None
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, np.ndarray):
        data = repr((image.shape, str(image.dtype))).encode() + np.ascontiguousarray(image).tobytes()
    elif isinstance(image, Image.Image):
        data = repr((image.size, image.mode)).encode() + image.tobytes()
    else:
        raise ImageError(f"<{type(image).__name__}>", "expected a path, bytes, a PIL image or a numpy array")
    return hashlib.sha256(data).hexdigest()


def check_name(name: Any) -> str:
    """An identity name as stored: stripped, 1-200 characters, no control characters (NUL, newline, tab...)."""
    text = str(name).strip()
    if not text:
        raise DataError("an identity needs a non-empty name")
    if len(text) > MAX_NAME_LENGTH:
        raise DataError(f"identity name of {len(text):,} characters is over the limit of {MAX_NAME_LENGTH}")
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise DataError(f"identity name {text[:40]!r} contains the control character {bad!r}")
    return text


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


class Gallery:
    """Enrolled identities in one SQLite file; ``enroll``, ``remove``, ``identify``. Safe across threads and
    processes. ``recognizer`` embeds images (a :class:`FaceRecognizer`; built lazily from the registered model the
    gallery was enrolled with when not given; a gallery made with a model file needs that file passed explicitly).
    ``read_only=True`` opens the file without ever writing to it (identify, search; also in a read-only folder).
    ``use_faiss``: ``"auto"`` (an approximate FAISS HNSW index above ``exact_up_to`` templates, if FAISS is
    installed; exact search below), True (always the index), False (always exact).
    """

    def __init__(self, path: str | os.PathLike, recognizer: Any = None, use_faiss: bool | str = "auto",
                 timeout: float = 60.0, read_only: bool = False, exact_up_to: int = EXACT_UP_TO):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a folder, expected a gallery database file")
        self.read_only = bool(read_only)
        if self.read_only and not self.path.is_file():
            raise DataError(f"{self.path}: gallery not found (create it with `fromface enroll ... --db {self.path}`)")
        self.use_faiss = use_faiss
        self._lock = threading.RLock()
        self._cache: tuple | None = None
        self._seen_version: tuple[int, int] | None = None
        self._own_changes = 0
        self._ann: HnswIndex | None = None
        self._removals_seen: tuple | None = None
        self.exact_up_to = int(exact_up_to)
        self._recognizer = None
        try:
            self._conn = self._connect(timeout)
            if self.read_only:
                self._check_schema()
            else:
                self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a usable gallery database ({exc})") from None
        if recognizer is not None:
            self.recognizer = recognizer

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
            raise DataError(f"{self.path}: opened read-only; nothing can be enrolled or removed")
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

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ recognizer
    @property
    def recognizer(self):
        """The FaceRecognizer used to embed images (built on first use from the gallery's registered model)."""
        if self._recognizer is None:
            self._recognizer = FaceRecognizer(self.model_spec())
        return self._recognizer

    @recognizer.setter
    def recognizer(self, recognizer: Any) -> None:
        self.check_model(getattr(recognizer, "model_id", None), getattr(recognizer, "model_name", None))
        self._recognizer = recognizer

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def model_spec(self) -> str | None:
        """The registered model (``name:tag``) this gallery was enrolled with, to build its recognizer; None for an
        empty gallery. A gallery made with a checkpoint or ONNX file is refused: fromface never loads a model
        because a database names it, the caller passes the file."""
        meta = self.meta()
        model_id = meta.get("model_id")
        if model_id is None and "model" in meta:  # schema 1 galleries: the name, and the path of a model file
            source = meta.get("source") or ""
            model_id = meta["model"] if Path(source).suffix.lower() not in _MODEL_FILE_SUFFIXES else "file:"
        if model_id is None:
            return None
        if model_id.startswith(("sha256:", "file:", "module:")):
            what = "a model built in Python" if model_id.startswith("module:") else \
                f"the model file {meta.get('source') or '?'}"
            raise ConfigError(f"{self.path}: gallery was enrolled with {what} ({model_id}); "
                              "fromface does not load a model a gallery names: pass that model yourself "
                              "(--model PATH, or FaceRecognizer(PATH))")
        return model_id

    def check_model(self, model_id: str | None, model_name: str | None = None) -> None:
        """Refuse a recognizer other than the one the gallery was enrolled with: its scores would rank the wrong
        people (with a model of the same embedding size, silently)."""
        meta = self.meta()
        stored = meta.get("model_id")
        if stored is not None and model_id is not None and stored != model_id:
            raise ConfigError(f"{self.path}: gallery was enrolled with model {_describe(meta)}, not {model_id}; "
                              "scores across models mean nothing: use that model, or enrol into another gallery")
        if stored is None and model_name and meta.get("model") not in (None, model_name):  # schema 1 galleries
            raise ConfigError(f"{self.path}: gallery was enrolled with model {meta['model']!r}, not {model_name!r}")

    def _check_model(self, conn: sqlite3.Connection, dim: int, model: str | None, source: str | None) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "dim" in meta and int(meta["dim"]) != dim:
            raise ConfigError(f"{self.path}: gallery holds {meta['dim']}-d templates, got {dim}-d embeddings "
                              f"(model {model or '?'}); use a new gallery for another model")
        if model and meta.get("model_id", model) != model:
            raise ConfigError(f"{self.path}: gallery was enrolled with model {_describe(meta)}, not {model}; "
                              "use that model, or enrol into another gallery")
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
        if model:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('model_id', ?)", (model,))
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('model', ?)", (model,))
        if source:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('source', ?)", (source,))

    # ------------------------------------------------------------------ writing
    def enroll(self, name: str, images: Any, mode: str = "new") -> Enrolment:
        """Add the faces of ``images`` (one or several; the selected face of each) to identity ``name``.

        ``mode="new"`` (default) refuses a name that is already enrolled (a second person under that name would
        silently merge with the first); ``mode="add"`` adds templates to it. An image already in the gallery (same
        bytes) is skipped and reported, so re-running an enrolment adds nothing twice. All or nothing: every image
        is embedded before anything is written, and the rows go in one transaction.
        """
        result = self.enroll_each({name: images}, mode)[name]
        if isinstance(result, FromfaceError):
            raise result
        return result

    def enroll_each(self, people: Mapping[str, Any], mode: str = "new") -> dict[str, Enrolment | FromfaceError]:
        """:meth:`enroll` for several people at once, ``{name: images}``: their photos share the recognizer's
        batches (a folder of people with a photo or two each embeds as fast as one big list). Each person is still
        all or nothing, in a transaction of their own; a person who fails (a photo without a face, a name already
        enrolled) gets the error in their place, and the others are enrolled."""
        _check_mode(mode)
        out: dict[str, Enrolment | FromfaceError] = {}
        plans: dict[str, tuple[list, list[str | None], list[int], list[str]]] = {}
        for name, images in people.items():
            try:
                plans[name] = self._plan(name, images, mode)
            except FromfaceError as exc:
                out[name] = exc
        todo = [(name, k) for name, (_, _, ks, _) in plans.items() for k in ks]
        found = self.recognizer.embed_each([plans[name][0][k] for name, k in todo]) if todo else []
        faces: dict[str, list] = {name: [] for name in plans}
        for (name, _), result in zip(todo, found):
            if isinstance(result, FromfaceError):
                out.setdefault(name, result)
            else:
                faces[name].append(result[0])
        for name, (_, digests, ks, skipped) in plans.items():
            if name in out:
                continue
            if not ks:
                out[name] = Enrolment(check_name(name), 0, skipped, self.counts().get(check_name(name), 0))
                continue
            try:
                out[name] = self._store_faces(check_name(name), faces[name], [digests[k] for k in ks], skipped, mode)
            except FromfaceError as exc:
                out[name] = exc
        return {name: out[name] for name in people}

    def _plan(self, name: str, images: Any, mode: str) -> tuple[list, list[str | None], list[int], list[str]]:
        """(images, their digests, indices of those to embed, "label: reason" for the others), checked before any
        embedding work: a bad name, no images, or a name already enrolled in ``mode="new"`` is refused here."""
        name = check_name(name)
        if isinstance(images, (str, os.PathLike, bytes, bytearray, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        images = list(images)
        if not images:
            raise DataError(f"enrolment of {name!r}: no images given")
        digests = [image_digest(img) for img in images]
        todo, skipped = self._new_images([describe_source(img) for img in images], digests)
        if todo:
            self.refuse_existing(name, mode, len(todo))  # before the embedding work, and again when writing
        return images, digests, todo, skipped

    def enroll_faces(self, name: str, faces: Sequence[Any], digests: Sequence[str | None] | None = None,
                     mode: str = "new") -> Enrolment:
        """Like :meth:`enroll` for faces this gallery's recognizer has already embedded (``FaceEmbedding``), with
        the ``digests`` (:func:`image_digest`) of the images they came from."""
        _check_mode(mode)
        name = check_name(name)
        digests = list(digests) if digests is not None else [None] * len(faces)
        if not faces or len(digests) != len(faces):
            raise DataError(f"enrolment of {name!r}: no faces given, or not one digest per face")
        todo, skipped = self._new_images([f.source or "a face" for f in faces], digests)
        return self._store_faces(name, [faces[k] for k in todo], [digests[k] for k in todo], skipped, mode)

    def _store_faces(self, name: str, faces: Sequence[Any], digests: Sequence[str | None], skipped: list[str],
                     mode: str) -> Enrolment:
        added = 0
        if faces:
            templates = [Template(f.embedding, f.occluded, f.pattern, f.visible_fraction, f.source, digest)
                         for f, digest in zip(faces, digests)]
            added = self.enroll_templates(name, templates, model=self.recognizer.model_id,
                                          source=self.recognizer.model_source, mode=mode)
        return Enrolment(name, added, skipped, self.counts().get(name, 0))

    def _new_images(self, labels: Sequence[str], digests: Sequence[str | None]) -> tuple[list[int], list[str]]:
        """(indices of images not yet in the gallery nor earlier in the list, "label: reason" for the others)."""
        known = self.known_digests([d for d in digests if d])
        todo, skipped, seen = [], [], {}
        for k, (label, digest) in enumerate(zip(labels, digests)):
            if digest and digest in known:
                skipped.append(f"{label}: already enrolled as {known[digest]!r}")
            elif digest and digest in seen:
                skipped.append(f"{label}: same image as {seen[digest]}")
            else:
                if digest:
                    seen[digest] = label
                todo.append(k)
        return todo, skipped

    def known_digests(self, digests: Sequence[str]) -> dict[str, str]:
        """{digest: identity name} for those of ``digests`` (:func:`image_digest`) already enrolled."""
        with self._lock:
            out = {}
            for start in range(0, len(digests), 500):
                chunk = list(digests[start:start + 500])
                marks = ",".join("?" * len(chunk))
                out.update(self._conn.execute(f"SELECT t.digest, i.name FROM templates t JOIN identities i ON "
                                              f"i.id = t.identity_id WHERE t.digest IN ({marks})", chunk).fetchall())
            return out

    def refuse_existing(self, name: str, mode: str, new: int, conn: sqlite3.Connection | None = None) -> None:
        """In ``mode="new"``, :class:`AlreadyEnrolledError` if ``name`` is already enrolled (callers check before
        embedding; the write checks again inside its transaction)."""
        _check_mode(mode)
        if mode == "add":
            return
        with self._lock:
            row = (conn or self._conn).execute("SELECT (SELECT COUNT(*) FROM templates t WHERE t.identity_id = i.id) "
                                               "FROM identities i WHERE i.name = ?", (name,)).fetchone()
        if row is not None:
            raise AlreadyEnrolledError(f"{name!r} is already enrolled ({row[0]} templates); to add these {new} "
                                       "image(s) to that identity use mode='add', or choose another name for a "
                                       "different person")

    def enroll_templates(self, name: str, templates: Sequence[Template], model: str | None = None,
                         source: str | None = None, mode: str = "new") -> int:
        """Store ready-made templates for ``name`` in one transaction (see :meth:`enroll_many`)."""
        return self.enroll_many({name: templates}, model, source, mode)

    def enroll_many(self, people: Mapping[str, Sequence[Template]], model: str | None = None,
                    source: str | None = None, mode: str = "new") -> int:
        """Store templates of many identities in ONE transaction (bulk imports); returns the templates added.

        ``model`` is the recognizer's ``model_id`` and ``source`` a readable note of where it came from, both
        recorded by the first enrolment (later ones must match). ``mode="new"`` refuses names already enrolled,
        ``"add"`` extends them; templates whose ``digest`` is already in the gallery are left out."""
        _check_mode(mode)
        prepared = [(check_name(name), self._prepare(name, templates)) for name, templates in people.items()]
        dims = {emb.size for _, rows in prepared for emb, _ in rows}
        if len(dims) > 1:
            raise DataError(f"enrolment: templates of different sizes {sorted(dims)}")
        if not dims:
            raise DataError("enrolment: no identities given")
        added = 0
        with self._write() as conn:
            self._check_model(conn, dims.pop(), model, source)
            for name, rows in prepared:
                self.refuse_existing(name, mode, len(rows), conn)
                new = [(emb, t) for emb, t in rows if not (t.digest and conn.execute(
                    "SELECT 1 FROM templates WHERE digest = ?", (t.digest,)).fetchone())]
                if not new:
                    continue  # every image is enrolled already: no identity without templates
                conn.execute("INSERT OR IGNORE INTO identities(name, created) VALUES (?, ?)", (name, time.time()))
                identity_id = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()[0]
                for emb, t in new:
                    self._insert_template(conn, identity_id, emb, t)
                    added += 1
        return added

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
                     "created, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (identity_id, emb.astype("<f4").tobytes(), emb.size, occluded, t.pattern, t.visible_fraction,
                      t.source, time.time(), t.digest))

    def remove(self, name: str) -> int:
        """Delete an identity and its templates; returns the number of templates removed (0 if unknown)."""
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

    def search(self, embedding: np.ndarray, top_k: int = 5) -> list[Match]:
        """Best template per identity for a unit embedding, ``top_k`` (>= 1) identities by descending cosine.

        The templates scored are the closest few by exact cosine (one matrix-vector product) or, in a gallery
        above ``exact_up_to`` templates, by the approximate index; the search widens until ``top_k`` different
        identities are among them, so an identity with many templates never fills the list twice."""
        if int(top_k) < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        with self._lock:  # the rows and the index over them, as of one moment
            mat, ids, names, owner, occluded = self.matrix()
            ann = self._ann_index(mat)
        if len(mat) == 0:
            return []
        query = np.asarray(embedding, dtype=np.float32).ravel()
        if query.size != mat.shape[1]:
            raise ConfigError(f"{self.path}: probe is {query.size}-d but the gallery holds {mat.shape[1]}-d templates")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        rows, scores = self._best_rows(mat, owner, query, int(top_k), ann)
        return [Match(names[owner[r]], float(sc), int(ids[r]), None if occluded[r] < 0 else bool(occluded[r]))
                for r, sc in zip(rows, scores)]

    def _best_rows(self, mat: np.ndarray, owner: np.ndarray, query: np.ndarray, top_k: int,
                   ann: HnswIndex | None) -> tuple[list, list]:
        """(row, score) of the best template of each of the ``top_k`` best identities."""
        want = min(top_k, int(owner.max()) + 1)  # identity indices are 0 .. identities - 1
        exact = None if ann is not None else mat @ query
        wide = min(len(mat), 4 * top_k)
        while True:
            if ann is not None:
                with self._lock:  # FAISS may not search while matrix() adds rows to it in another thread
                    rows, scores = ann.search(query, wide)
                known = rows < len(mat)  # rows enrolled after this search's snapshot are left out
                rows, scores = rows[known], scores[known]
            else:
                rows = np.argpartition(-exact, wide - 1)[:wide] if wide < len(mat) else np.arange(len(mat))
                scores = exact[rows]
            order = np.argsort(-scores, kind="stable")
            rows, scores = rows[order], scores[order]
            _, first = np.unique(owner[rows], return_index=True)  # each identity's best row among these
            if len(first) >= want or wide >= len(mat):
                best = np.sort(first)[:want]
                return list(rows[best]), list(scores[best])
            wide = min(len(mat), 4 * wide)

    def _ann_index(self, mat: np.ndarray) -> HnswIndex | None:
        """The approximate index over ``mat`` (the current rows; call with the lock held) for a gallery above
        ``exact_up_to`` templates (FAISS HNSW), or None: exact search."""
        wanted = self.use_faiss is True or (self.use_faiss == "auto" and len(mat) > self.exact_up_to)
        if not wanted:
            return None
        with self._lock:
            return self._ann if self._ann is not None else self._new_ann(mat)

    def _new_ann(self, mat: np.ndarray) -> HnswIndex | None:
        if self._ann is None:
            try:
                import faiss  # optional (pip install 'fromface[index]'): exact NumPy search without it
            except ImportError:
                if self.use_faiss is True:
                    raise ConfigError("use_faiss=True needs the faiss package (pip install faiss-cpu)") from None
                return None
            self._ann = HnswIndex(faiss, mat)
        return self._ann

    def identify(self, image: Any, top_k: int = 5) -> list[Match]:
        """The ``top_k`` enrolled identities closest to the (largest) face in ``image``, each marked ``same`` by
        the recognizer's threshold for that probe/template occlusion condition."""
        recognizer = self.recognizer  # checked against the gallery's model when it was set or built
        face = image if isinstance(image, FaceEmbedding) else recognizer.embed(image)[0]
        matches = self.search(face.embedding, top_k)
        for m in matches:
            known = face.occluded is not None or m.template_occluded is not None
            occluded = bool(face.occluded or m.template_occluded)
            m.threshold, m.condition, _ = recognizer.condition_threshold(occluded, known)
            m.same = accepts(m.score, m.threshold)
        return matches


_MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".onnx")


def _check_mode(mode: str) -> None:
    if mode not in ENROL_MODES:
        raise ConfigError(f"enrolment mode must be one of {', '.join(ENROL_MODES)}; got {mode!r}")


def _describe(meta: dict[str, str]) -> str:
    """The model a gallery was enrolled with, for messages: its id, and the file it came from when there was one."""
    model_id = meta.get("model_id") or meta.get("model") or "?"
    source = meta.get("source")
    return f"{model_id} ({source})" if source and source != model_id else model_id


__all__ = ["Enrolment", "Gallery", "Match", "Template", "check_name", "image_digest"]
