"""Where a gallery lives, chosen by one URL: an SQLite file, PostgreSQL with pgvector, or Milvus.

- a plain path or ``sqlite:///path/g.db`` (everything after ``sqlite://`` is the path): one file, the default;
- ``postgresql://user@host:port/db`` (or ``postgres://``): tables ``fromface_*`` with a pgvector HNSW index;
  the password comes from the URL or the usual libpq variables (``PGPASSWORD``, ``PGPASSFILE``, ``PGHOST``...);
- ``milvus://host:port[/collection]``: a Milvus server or cluster (``milvus+https://`` for TLS; a token from
  ``user:password@`` in the URL or ``MILVUS_TOKEN``);
- ``milvus-lite:///path/g.db[?collection=NAME]``: a local Milvus Lite file (one process at a time).

Server clients are optional extras: ``pip install 'fromface[postgres]'`` or ``'fromface[milvus]'``.
"""

from __future__ import annotations

import os

from fromface.errors import ConfigError
from fromface.storage.base import ENROL_MODES, Hits, Store, Template
from fromface.storage.urls import SCHEMES, local_path, redact, scheme_of


def open_store(location: str | os.PathLike, read_only: bool = False, timeout: float = 60.0, **options) -> Store:
    """The store a gallery location names (see the module docstring). ``options`` go to the SQLite store
    (``use_faiss``, ``exact_up_to``); other stores refuse them."""
    scheme = scheme_of(location)
    if scheme == "sqlite":
        from fromface.storage.sqlite import SqliteStore

        return SqliteStore(local_path(location), read_only=read_only, timeout=timeout, **options)
    if options:
        raise ConfigError(f"{redact(os.fspath(location))}: {', '.join(sorted(options))} apply to SQLite galleries only")
    if scheme == "postgresql":
        from fromface.storage.postgres import PostgresStore

        return PostgresStore(os.fspath(location), read_only=read_only, timeout=timeout)
    from fromface.storage.milvus import MilvusStore

    return MilvusStore(os.fspath(location), read_only=read_only, timeout=timeout)


__all__ = ["ENROL_MODES", "Hits", "SCHEMES", "Store", "Template", "local_path", "open_store", "redact", "scheme_of"]
