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
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fromface.errors import ConfigError
from fromface.storage.base import ENROL_MODES, Hits, Store, Template

SCHEMES = ("sqlite", "postgresql", "postgres", "milvus", "milvus+https", "milvus-lite")
_SECRET_PARAMS = {"password", "token", "sslpassword"}


def redact(url: str) -> str:
    """``url`` as it may be shown: without the password of ``user:password@`` or of a ``password=`` parameter."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scheme_of(location: str | os.PathLike) -> str:
    """The backend a gallery location names: ``sqlite`` (a plain path too), ``postgresql``, ``milvus`` or
    ``milvus-lite``."""
    text = os.fspath(location)
    if "://" not in text:
        return "sqlite"
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"{redact(text)}: unknown kind of gallery {scheme + '://'!r}; use a file path, "
                          "sqlite:///PATH, postgresql://..., milvus://HOST:PORT[/COLLECTION] or milvus-lite:///PATH")
    return {"postgres": "postgresql", "milvus+https": "milvus"}.get(scheme, scheme)


def local_path(location: str | os.PathLike) -> Path | None:
    """The file a gallery location names (SQLite or Milvus Lite), or None for a server."""
    text = os.fspath(location)
    scheme = scheme_of(text)
    if scheme == "sqlite":
        return Path(text.split("://", 1)[1] if "://" in text else text)
    if scheme == "milvus-lite":
        return Path(text.split("://", 1)[1].split("?", 1)[0])
    return None


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
