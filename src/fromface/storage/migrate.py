"""Copying a gallery from one store to another (SQLite to PostgreSQL or Milvus, and back): the migration path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fromface.errors import DataError
from fromface.storage.base import Store


@dataclass
class Copied:
    """What :func:`copy_store` did: identities and templates written, identities already there (``resume``)."""

    identities: int = 0
    templates: int = 0
    already: int = 0


def copy_store(source: Store, target: Store, batch: int = 1000, resume: bool = False,
               progress: Callable[[int], None] | None = None) -> Copied:
    """Copy every identity of ``source`` into ``target``, ``batch`` identities per all-or-nothing write, with the
    model identity, embeddings, occlusion state, sources and digests as they are.

    ``target`` must be empty, or, with ``resume``, hold an earlier copy of ``source`` that was interrupted: an
    identity already there with the same number of templates is left alone, one with another number is refused
    (the target has changed since), so a copy run again after a kill finishes the job and writes nothing twice."""
    meta = source.meta()
    if "dim" not in meta:
        raise DataError(f"{source.location}: the gallery is empty; nothing to copy")
    there = target.counts()
    if there and not resume:
        raise DataError(f"{target.location}: already holds {len(there):,} identities; copy into an empty gallery, "
                        "or pass resume=True (--resume) to finish an interrupted copy of the same gallery")
    done = Copied()
    with target.bulk(len(source)):
        for people in source.people(batch):
            todo = []
            for name, rows in people:
                if name not in there:
                    todo.append((name, rows))
                elif there[name] == len(rows):
                    done.already += 1
                else:
                    raise DataError(f"{target.location}: {name!r} has {there[name]} templates there but "
                                    f"{len(rows)} in {source.location}; the target is not a copy of the source")
            if todo:
                done.templates += target.write(todo, int(meta["dim"]), meta.get("model_id"), meta.get("source"),
                                               "new")
                done.identities += len(todo)
            if progress is not None:
                progress(len(people))
    return done


__all__ = ["Copied", "copy_store"]
