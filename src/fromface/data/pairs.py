"""Verification pair lists: LFW ``pairs.txt``, MFR2's space-separated list and a generic TSV.

Every evaluation, ours and the peers', reads its pairs through :func:`read_pairs`, so a list is
interpreted once and the same way everywhere. Malformed lines raise :class:`DataError` naming the
file and the line number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fromface.errors import DataError

FORMATS = ("auto", "lfw", "mfr2", "tsv")
#: Image file extension of each name-and-index format.
_NAME_INDEX_EXT = {"lfw": ".jpg", "mfr2": ".png"}
_TRUE = {"1", "true", "same", "yes", "y", "t", "match", "genuine"}
_FALSE = {"0", "false", "diff", "different", "no", "n", "f", "mismatch", "impostor"}


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same person; ``fold`` is -1 when the list has none."""

    path1: Path
    path2: Path
    same: bool
    fold: int = -1


def _is_int(text: str) -> bool:
    """A non-negative integer in ASCII digits, with at most one leading '+': exactly what ``int()`` then reads."""
    digits = text.strip()
    digits = digits[1:] if digits.startswith("+") else digits
    return digits.isascii() and digits.isdigit()


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every non-blank, non-comment line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: pair list not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read pair list ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: pair list is not UTF-8 text") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, line.rstrip("\r\n")))
    if not out:
        raise DataError(f"{path}: pair list is empty")
    return out


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from the first content line: a numeric header means LFW, tabs with paths mean TSV."""
    path = Path(path)
    _, first = _content_lines(path)[0]
    fields = first.split()
    if 1 <= len(fields) <= 2 and all(_is_int(f) for f in fields):
        return "lfw"
    if "\t" in first:
        tabbed = [f.strip() for f in first.split("\t")]
        if len(tabbed) in (3, 4) and _is_int(tabbed[1]) and not _looks_like_path(tabbed[0]):
            return "lfw"
        return "tsv"
    if len(fields) in (3, 4) and _is_int(fields[1]):
        return "mfr2"
    raise DataError(f"{path}: line 1: cannot tell the pair-list format from {first!r}; pass format= "
                    "'lfw', 'mfr2' or 'tsv'")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _name_image(root: Path, name: str, index: str, ext: str, where: str) -> Path:
    if not _is_int(index):
        raise DataError(f"{where}: image number {index!r} is not an integer")
    number = int(index)
    if number < 0:
        raise DataError(f"{where}: image number {index!r} is negative")
    return root / name / f"{name}_{number:04d}{ext}"


def _read_name_index(path: Path, root: Path, fmt: str, ext: str | None) -> list[Pair]:
    """LFW / MFR2: ``Name i j`` (same) or ``Name1 i Name2 j`` (different), optional numeric header."""
    ext = ext if ext is not None else _NAME_INDEX_EXT[fmt]
    lines = _content_lines(path)
    folds, per_class = 0, 0
    header = lines[0][1].split()
    if 1 <= len(header) <= 2 and all(_is_int(f) for f in header):
        values = [int(f) for f in header]
        folds, per_class = (1, values[0]) if len(values) == 1 else (values[0], values[1])
        if folds < 1 or per_class < 1:
            raise DataError(f"{path}: line {lines[0][0]}: header {lines[0][1].strip()!r} must be two positive integers")
        lines = lines[1:]
    elif fmt == "lfw":
        raise DataError(f"{path}: line {lines[0][0]}: expected the LFW header 'folds pairs_per_class', "
                        f"got {lines[0][1].strip()!r}")
    pairs = []
    for k, (number, line) in enumerate(lines):
        where = f"{path}: line {number}"
        fields = line.split("\t") if fmt == "lfw" and "\t" in line else line.split()
        fields = [f.strip() for f in fields if f.strip()]
        fold = k // (2 * per_class) if folds else -1
        if len(fields) == 3:
            name, i, j = fields
            pairs.append(Pair(_name_image(root, name, i, ext, where), _name_image(root, name, j, ext, where),
                              True, fold))
        elif len(fields) == 4:
            name1, i, name2, j = fields
            pairs.append(Pair(_name_image(root, name1, i, ext, where), _name_image(root, name2, j, ext, where),
                              False, fold))
        else:
            raise DataError(f"{where}: expected 'Name i j' or 'Name1 i Name2 j', got {len(fields)} fields: "
                            f"{line.strip()!r}")
    if folds and len(lines) != folds * 2 * per_class:
        raise DataError(f"{path}: header promises {folds} folds x {2 * per_class} pairs = "
                        f"{folds * 2 * per_class} lines, found {len(lines)}")
    return pairs


def _parse_same(text: str, where: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DataError(f"{where}: third field must be 1/0 (same/different), got {text!r}")


def _read_tsv(path: Path, root: Path) -> list[Pair]:
    """``path1<TAB>path2<TAB>same[<TAB>fold]``; an optional header row naming the columns is skipped."""
    lines = _content_lines(path)
    first = [f.strip().lower() for f in lines[0][1].split("\t")]
    if len(first) >= 3 and first[2] in {"same", "label", "is_same", "issame", "match"}:
        lines = lines[1:]
    pairs = []
    for number, line in lines:
        where = f"{path}: line {number}"
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) not in (3, 4) or not fields[0] or not fields[1]:
            raise DataError(f"{where}: expected 'path1<TAB>path2<TAB>same[<TAB>fold]', got {len(fields)} "
                            f"tab-separated fields: {line.strip()!r}")
        same = _parse_same(fields[2], where)
        fold = -1
        if len(fields) == 4 and fields[3] != "":
            if not _is_int(fields[3]):
                raise DataError(f"{where}: fold {fields[3]!r} is not a non-negative integer")
            fold = int(fields[3])
        pairs.append(Pair(root / fields[0], root / fields[1], same, fold))
    return pairs


def read_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None, format: str = "auto",
               ext: str | None = None) -> list[Pair]:
    """Read a pair list into :class:`Pair` objects with image paths resolved against ``root``.

    ``root`` defaults to the pair file's folder. ``format`` is ``"lfw"`` (header + tab lines, images
    ``Name/Name_000i.jpg``), ``"mfr2"`` (space-separated, ``.png``), ``"tsv"`` or ``"auto"``. ``ext``
    overrides the image extension of the name-and-index formats.
    """
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown pair-list format {format!r}; choose one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a pair-list file")
    base = Path(root) if root is not None else path.parent
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "tsv":
        pairs = _read_tsv(path, base)
    else:
        pairs = _read_name_index(path, base, fmt, ext)
    if not pairs:
        raise DataError(f"{path}: no pairs found")
    return pairs


def write_pairs_tsv(pairs: list[Pair], path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
    """Write pairs as ``path1<TAB>path2<TAB>same<TAB>fold`` (the fold column when some pair has one; empty for a
    pair without, as the reader takes it).

    Paths are written relative to ``relative_to`` when given (``..`` allowed), with forward slashes,
    so the file reads back with ``read_pairs(path, root=relative_to)``. A relative path that the reader would take
    for something else (a ``#`` comment, a byte-order mark, an LFW name) is written as ``./path``; a path with a
    tab, a line break or white space at either end cannot be read back and is refused with a :class:`DataError`.
    """
    path = Path(path)
    with_folds = any(p.fold >= 0 for p in pairs)

    def fmt(p: Path) -> str:
        text = os.path.relpath(p, relative_to) if relative_to is not None else str(p)
        if "\t" in text or len(f"x{text}x".splitlines()) > 1:
            raise DataError(f"{str(p)!r}: a path with a tab or line break cannot be written to a TSV pair list")
        if text != text.strip():
            raise DataError(f"{p}: a path that begins or ends with white space cannot be written to a TSV pair "
                            "list (its fields are read stripped)")
        text = text.replace(os.sep, "/")
        if not os.path.isabs(text) and (text.startswith(("#", "\ufeff")) or not _looks_like_path(text)):
            text = "./" + text  # the same path to the reader, which can no longer mistake it
        return text

    rows = []
    for p in pairs:
        row = [fmt(Path(p.path1)), fmt(Path(p.path2)), "1" if p.same else "0"]
        if with_folds:
            row.append(str(p.fold) if p.fold >= 0 else "")
        rows.append("\t".join(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def pair_images(pairs: list[Pair]) -> list[Path]:
    """Every distinct image in the pairs, in first-seen order (the embedding work list)."""
    seen: dict[Path, None] = {}
    for p in pairs:
        seen.setdefault(Path(p.path1), None)
        seen.setdefault(Path(p.path2), None)
    return list(seen)
