"""What every gallery store does, and the rules they share so that backends cannot drift.

A store keeps identities (unique names), their templates (unit embeddings, each with the occlusion state the model
saw and the sha256 of the image it came from) and a little metadata (the model that made the templates, their
size). :class:`fromface.Gallery` does the embedding, the checks on names and images and the thresholds; a store
only stores and searches. Its contract:

- ``write`` is all or nothing: every identity of one call is stored, or none, even when the process is killed
  half-way. Inside it, with no other writer in between, it refuses another model or size, refuses in
  ``mode="new"`` a name already enrolled, and leaves out images (digests) already in the gallery.
- ``nearest`` returns the templates closest to a unit query by cosine, best first (exact or approximate);
  :meth:`Store.search` widens it until ``top_k`` different identities are found, so an identity with many
  templates never fills a top-k twice.
- Nothing read from a store decides which code runs; messages name the store by :attr:`Store.location`, its URL
  without the password.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fromface.errors import AlreadyEnrolledError, ConfigError, DataError

#: Enrolment modes: "new" refuses a name already enrolled, "add" adds templates to it.
ENROL_MODES = ("new", "add")


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
class Hits:
    """Templates found for a query, best first: their ids, cosine scores, identity names and occlusion state
    (True, False, or None when the template was enrolled without an estimate)."""

    ids: np.ndarray
    scores: np.ndarray
    names: list[str]
    occluded: list[bool | None]

    def __len__(self) -> int:
        return len(self.ids)


#: One identity's templates to write: (name, [(unit float32 embedding, template), ...]).
Person = tuple[str, list[tuple[np.ndarray, Template]]]


class Store(ABC):
    """Storage and search of one gallery (see the module docstring for the contract)."""

    #: The gallery's URL or path as shown in messages (never a password).
    location: str
    #: A short name for the gallery (a file name, a database or collection name), for a service to show.
    name: str
    read_only: bool = False

    @abstractmethod
    def meta(self) -> dict[str, str]:
        """Metadata: ``dim``, ``model_id``, ``model``, ``source`` once something is enrolled."""

    @abstractmethod
    def write(self, people: Sequence[Person], dim: int, model: str | None, source: str | None, mode: str) -> int:
        """Store ``people`` all or nothing (see the module docstring); returns the templates added."""

    @abstractmethod
    def remove(self, name: str) -> int:
        """Delete an identity and its templates; the number of templates removed (0 if unknown)."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Templates per identity, by name."""

    @abstractmethod
    def template_count(self, name: str) -> int | None:
        """Templates of identity ``name``, or None when it is not enrolled."""

    @abstractmethod
    def __len__(self) -> int:
        """Templates stored."""

    @abstractmethod
    def known_digests(self, digests: Sequence[str]) -> dict[str, str]:
        """{digest: identity name} for those of ``digests`` already enrolled."""

    @abstractmethod
    def nearest(self, query: np.ndarray, count: int) -> Hits:
        """About the ``count`` templates closest to the unit ``query`` (float32, the gallery's size), best first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and files."""

    @contextlib.contextmanager
    def bulk(self, templates: int) -> Iterator[None]:
        """Around a bulk load of about ``templates`` templates in many writes: a store whose index is slow to grow
        a template at a time (pgvector's HNSW) builds it once at the end instead. Others do nothing."""
        yield

    def people(self, batch: int = 1000) -> Iterator[list[Person]]:
        """Every identity with its templates (unit embeddings and what was stored with them), ``batch``
        identities at a time: what a copy to another store reads."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its templates")

    def names(self) -> list[str]:
        """Enrolled identity names, sorted."""
        return sorted(self.counts())

    def dim(self) -> int | None:
        """Size of the stored templates, or None before the first enrolment."""
        value = self.meta().get("dim")
        return int(value) if value is not None else None

    def search(self, query: np.ndarray, top_k: int) -> Hits:
        """The best template of each of the ``top_k`` identities closest to ``query``, best first (without
        counting the templates: on a server a count can cost more than the search)."""
        return best_per_identity(lambda count: self.nearest(query, count), None, top_k)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def best_per_identity(nearest: Callable[[int], Hits], total: int | None, top_k: int) -> Hits:
    """The best template of each of the ``top_k`` best identities among ``total`` templates (None: not counted;
    the gallery is exhausted when ``nearest`` returns fewer than asked), from ``nearest(count)`` (the ``count``
    nearest templates, best first): four times ``top_k`` are fetched at first, four times more until ``top_k``
    different identities are among them, so an identity with many templates never fills a top-k twice."""
    if total == 0:
        return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), [], [])
    wide = 4 * top_k if total is None else min(total, 4 * top_k)
    while True:
        hits = nearest(wide)
        best: dict[str, int] = {}
        for k, name in enumerate(hits.names):
            best.setdefault(name, k)
        if len(best) >= top_k or (wide >= total if total is not None else len(hits) < wide):
            keep = sorted(best.values())[:top_k]
            return Hits(hits.ids[keep], hits.scores[keep], [hits.names[k] for k in keep],
                        [hits.occluded[k] for k in keep])
        wide = 4 * wide if total is None else min(total, 4 * wide)


def check_mode(mode: str) -> None:
    if mode not in ENROL_MODES:
        raise ConfigError(f"enrolment mode must be one of {', '.join(ENROL_MODES)}; got {mode!r}")


def describe_model(meta: dict[str, str]) -> str:
    """The model a gallery was enrolled with, for messages: its id, and the file it came from when there was one."""
    model_id = meta.get("model_id") or meta.get("model") or "?"
    source = meta.get("source")
    return f"{model_id} ({source})" if source and source != model_id else model_id


def model_meta(location: str, meta: dict[str, str], dim: int, model: str | None,
               source: str | None) -> dict[str, str]:
    """The metadata an enrolment of ``dim``-d templates by ``model`` adds to ``meta`` (keys not yet set), after
    refusing another size or model: scores across models mean nothing, and same-size ones would rank silently
    wrong."""
    if "dim" in meta and int(meta["dim"]) != dim:
        raise ConfigError(f"{location}: gallery holds {meta['dim']}-d templates, got {dim}-d embeddings "
                          f"(model {model or '?'}); use a new gallery for another model")
    if model and meta.get("model_id", model) != model:
        raise ConfigError(f"{location}: gallery was enrolled with model {describe_model(meta)}, not {model}; "
                          "use that model, or enrol into another gallery")
    wanted = {"dim": str(dim)}
    if model:
        wanted.update(model_id=model, model=model)
    if source:
        wanted["source"] = source
    return {k: v for k, v in wanted.items() if k not in meta}


def refuse_existing(name: str, templates: int | None, new: int, mode: str) -> None:
    """:class:`AlreadyEnrolledError` in ``mode="new"`` when ``name`` already has ``templates`` (not None)."""
    if mode == "new" and templates is not None:
        raise AlreadyEnrolledError(f"{name!r} is already enrolled ({templates} templates); to add these {new} "
                                   "image(s) to that identity use mode='add', or choose another name for a "
                                   "different person")


def read_only_error(location: str) -> DataError:
    return DataError(f"{location}: opened read-only; nothing can be enrolled or removed")


__all__ = ["ENROL_MODES", "Hits", "Person", "Store", "Template", "best_per_identity", "check_mode", "describe_model",
           "model_meta", "read_only_error", "refuse_existing"]
