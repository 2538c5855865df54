"""Reading gallery locations: which store a URL names, the file it points to, and the URL as it may be shown."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fromface.errors import ConfigError

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
    if not netloc:  # scheme:///path: urlunsplit would drop the empty authority
        return f"{parts.scheme}://{parts.path}" + (f"?{query}" if query else "")
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


__all__ = ["SCHEMES", "local_path", "redact", "scheme_of"]
