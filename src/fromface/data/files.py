"""File plumbing shared by every layer: content digests, writes that never leave half a file behind, and data
files shipped inside installed packages (weights are never downloaded)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fromface.errors import ConfigError


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (model files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is renamed over ``path``.

    Readers (and concurrent writers) never see a half-written file, and on every failure path the temporary
    file is removed. The result gets the usual permissions (0666 less the umask), not ``mkstemp``'s 0600, because
    caches and exported models are shared. ``OSError`` from creating the file propagates for the caller to word.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def package_file(package: str, relative: str, install_hint: str = "") -> Path:
    """Path of a data file shipped inside an installed package (never downloaded).

    The package is located without importing it: ``face_recognition_models`` imports the removed
    ``pkg_resources`` at import time, but its files are all we need.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        hint = f" (install it: {install_hint})" if install_hint else ""
        raise ConfigError(f"package {package!r} is not installed{hint}")
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(f"{Path(roots[0]) / relative}: weight file missing from the installed package {package!r}")
