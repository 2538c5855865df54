"""A gallery of enrolled identities: enrol photos, remove people, identify a face among them.

The gallery embeds, checks names and images, applies the thresholds; where it keeps its templates is a store chosen
by one URL (:mod:`fromface.storage`): an SQLite file (a plain path, the default), PostgreSQL with pgvector, or
Milvus. Every store behaves the same (tests/test_stores.py runs one suite over all of them).

What a gallery is trusted with: names, embeddings and the *identity* of the model that made them. It never decides
which code or weights run: a gallery made with a registered model names that model (``name:tag``), which loads
only weights shipped in the package; a gallery made with a checkpoint or ONNX file records the file's sha256, and
that file is used only when the caller passes it explicitly. Searching with another model is refused.
Read-only commands open the gallery read-only and never write to it.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fromface.data.images import describe_source
from fromface.errors import ConfigError, DataError, FromfaceError, ImageError
from fromface.inference.decision import accepts
from fromface.inference.recognizer import FaceEmbedding, FaceRecognizer
from fromface.storage import Store, open_store
from fromface.storage.base import ENROL_MODES, Template, check_mode, describe_model, refuse_existing

#: Longest identity name accepted (characters).
MAX_NAME_LENGTH = 200

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


class Gallery:
    """Enrolled identities; ``enroll``, ``remove``, ``identify``. Safe across threads, and across processes where
    the store is (SQLite, PostgreSQL, a Milvus server; a Milvus Lite file is one process's).

    ``db`` is a path or URL (:mod:`fromface.storage`). ``recognizer`` embeds images (a :class:`FaceRecognizer`;
    built lazily from the registered model the gallery was enrolled with when not given; a gallery made with a
    model file needs that file passed explicitly). ``read_only=True`` never writes (identify, search).
    ``use_faiss`` and ``exact_up_to`` choose the SQLite store's search: ``use_faiss="auto"`` (the default) uses an
    approximate FAISS HNSW index above ``exact_up_to`` templates when FAISS is installed, True always, False never.
    """

    def __init__(self, db: str | os.PathLike, recognizer: Any = None, use_faiss: bool | str | None = None,
                 timeout: float = 60.0, read_only: bool = False, exact_up_to: int | None = None):
        options = {k: v for k, v in (("use_faiss", use_faiss), ("exact_up_to", exact_up_to)) if v is not None}
        self.store: Store = open_store(db, read_only=read_only, timeout=timeout, **options)
        self.location = self.store.location
        self.read_only = self.store.read_only
        self._recognizer = None
        if recognizer is not None:
            self.recognizer = recognizer

    @property
    def name(self) -> str:
        """A short name of the gallery (its file or database name), for a service to show."""
        return self.store.name

    def close(self) -> None:
        self.store.close()

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
        return self.store.meta()

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
            raise ConfigError(f"{self.location}: gallery was enrolled with {what} ({model_id}); "
                              "fromface does not load a model a gallery names: pass that model yourself "
                              "(--model PATH, or FaceRecognizer(PATH))")
        return model_id

    def check_model(self, model_id: str | None, model_name: str | None = None) -> None:
        """Refuse a recognizer other than the one the gallery was enrolled with: its scores would rank the wrong
        people (with a model of the same embedding size, silently)."""
        meta = self.meta()
        stored = meta.get("model_id")
        if stored is not None and model_id is not None and stored != model_id:
            raise ConfigError(f"{self.location}: gallery was enrolled with model {describe_model(meta)}, not "
                              f"{model_id}; scores across models mean nothing: use that model, or enrol into another "
                              "gallery")
        if stored is None and model_name and meta.get("model") not in (None, model_name):  # schema 1 galleries
            raise ConfigError(f"{self.location}: gallery was enrolled with model {meta['model']!r}, not "
                              f"{model_name!r}")

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
        check_mode(mode)
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
                out[name] = Enrolment(check_name(name), 0, skipped, self.store.template_count(check_name(name)) or 0)
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
        check_mode(mode)
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
        return Enrolment(name, added, skipped, self.store.template_count(name) or 0)

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
        return self.store.known_digests(list(digests))

    def refuse_existing(self, name: str, mode: str, new: int) -> None:
        """In ``mode="new"``, :class:`AlreadyEnrolledError` if ``name`` is already enrolled (callers check before
        embedding; the store checks again when it writes)."""
        check_mode(mode)
        refuse_existing(name, self.store.template_count(name) if mode == "new" else None, new, mode)

    def enroll_templates(self, name: str, templates: Sequence[Template], model: str | None = None,
                         source: str | None = None, mode: str = "new") -> int:
        """Store ready-made templates for ``name`` all or nothing (see :meth:`enroll_many`)."""
        return self.enroll_many({name: templates}, model, source, mode)

    def enroll_many(self, people: Mapping[str, Sequence[Template]], model: str | None = None,
                    source: str | None = None, mode: str = "new") -> int:
        """Store templates of many identities all or nothing (one transaction; bulk imports); returns the
        templates added.

        ``model`` is the recognizer's ``model_id`` and ``source`` a readable note of where it came from, both
        recorded by the first enrolment (later ones must match). ``mode="new"`` refuses names already enrolled,
        ``"add"`` extends them; templates whose ``digest`` is already in the gallery are left out."""
        check_mode(mode)
        prepared = [(check_name(name), _unit_rows(name, templates)) for name, templates in people.items()]
        dims = {emb.size for _, rows in prepared for emb, _ in rows}
        if len(dims) > 1:
            raise DataError(f"enrolment: templates of different sizes {sorted(dims)}")
        if not dims:
            raise DataError("enrolment: no identities given")
        return self.store.write(prepared, dims.pop(), model, source, mode)

    def bulk(self, templates: int):
        """``with gallery.bulk(n): ...`` around many enrolments adding about ``n`` templates in all (an import, a
        copy): a PostgreSQL gallery then builds its search index once at the end instead of growing it a
        template at a time, ten times faster; other stores do nothing different."""
        return self.store.bulk(templates)

    def remove(self, name: str) -> int:
        """Delete an identity and its templates; returns the number of templates removed (0 if unknown)."""
        return self.store.remove(name)

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return self.store.names()

    def counts(self) -> dict[str, int]:
        """Templates per identity name."""
        return self.store.counts()

    def __len__(self) -> int:
        return len(self.store)

    def search(self, embedding: np.ndarray, top_k: int = 5) -> list[Match]:
        """Best template per identity for an embedding, ``top_k`` (>= 1) identities by descending cosine; an
        identity with many templates never fills the list twice."""
        if int(top_k) < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        dim = self.store.dim()
        if dim is None:
            return []
        query = np.asarray(embedding, dtype=np.float32).ravel()
        if query.size != dim:
            raise ConfigError(f"{self.location}: probe is {query.size}-d but the gallery holds {dim}-d templates")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        hits = self.store.search(query, int(top_k))
        return [Match(name, float(score), int(tid), occluded)
                for tid, score, name, occluded in zip(hits.ids, hits.scores, hits.names, hits.occluded)]

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


def _unit_rows(name: str, templates: Sequence[Template]) -> list[tuple[np.ndarray, Template]]:
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


__all__ = ["ENROL_MODES", "Enrolment", "Gallery", "Match", "Template", "check_name", "image_digest"]
