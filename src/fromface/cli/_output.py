"""Checks on output paths, made before any long work starts, so a command never fails at its end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fromface.errors import DataError


def check_output_file(path: str | os.PathLike, force: bool = False) -> Path:
    """``path`` can be written: not a folder, its folder exists and takes a file, and it does not exist already
    unless ``force`` (the CLI's ``--force``): nothing a user owns is overwritten without asking."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the name of a file to write")
    if path.exists() and not force:
        raise DataError(f"{path}: already exists; use --force to overwrite it")
    _check_writable_folder(path.parent, path)
    return path


def check_output_folder(path: str | os.PathLike, outputs: tuple[str, ...] = (), force: bool = False) -> Path:
    """``path`` is (or can be made) a folder that takes files; it is created. A folder already holding one of the
    ``outputs`` a command writes is refused unless ``force``, so an earlier run's results are not lost."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: is a file, expected an output folder (give a new or existing folder)")
    earlier = [name for name in outputs if (path / name).exists()]
    if earlier and not force:
        raise DataError(f"{path}: holds {earlier[0]} from an earlier run; use --force to replace it, or give a new "
                        "--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot create the output folder ({exc.strerror or exc})") from None
    _check_writable_folder(path, path)
    return path


def _check_writable_folder(folder: Path, target: Path) -> None:
    """Try a real file: permission bits say nothing for root, or on read-only file systems."""
    folder = folder if str(folder) else Path(".")
    if not folder.is_dir():
        raise DataError(f"{target}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fromface-write-check-"):
            pass
    except OSError as exc:
        raise DataError(f"{target}: cannot write into {folder} ({exc.strerror or exc})") from None
