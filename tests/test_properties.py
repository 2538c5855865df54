"""Property-based tests (Hypothesis): pair lists, image decoding of arbitrary bytes, the pattern labeller.

Every property runs derandomized (the same examples on every machine and every run) with a modest example count and
a per-example deadline, so the file takes a few seconds and a hang shows as a failure, not a stuck CI job.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from fromface.data.images import load_image
from fromface.data.pairs import Pair, read_pairs, write_pairs_tsv
from fromface.errors import DataError, ImageError
from fromface.occlusion.patterns import PatternVocabulary, label_patterns, patterns
from fromface.occlusion.synth import box_label
from test_patterns import brute_force_label, definition_boxes

PROPERTY = settings(max_examples=200, deadline=5000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(PROPERTY, max_examples=100)

#: Characters that trip parsers: separators, line breaks str.splitlines() knows, digits int() does not read, a BOM.
TRICKY = list("\t \r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\xa0\u3000\ufeff#+-./\\,;:\"'0123456789²³¹١٢٣")
TEXT = st.text(st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8"), st.sampled_from(list("AnnBob_"))),
               max_size=24)
#: Text that nearly reads as a number: int() and str.isdigit() disagree on some of these ('²', '++1').
NUMBERISH = st.text(st.sampled_from(list("0123456789+-²³¹١٢٣ ")), min_size=1, max_size=6)


# --- Pair lists ------------------------------------------------------------------------------------------------

@contextmanager
def _scratch() -> Iterator[Path]:
    """A fresh folder for one example, removed afterwards (a pytest tmp_path would be shared by all examples)."""
    with tempfile.TemporaryDirectory(prefix="fromface-prop-") as folder:
        yield Path(folder)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _normal(pairs: list[Pair]) -> list[tuple[str, str, bool, int]]:
    return [(os.path.normpath(p.path1), os.path.normpath(p.path2), p.same, p.fold) for p in pairs]


SAME_WORDS = ["1", "0", "true", "False", "SAME", "diff", "yes", "no", "match", "mismatch", "genuine", "impostor"]
#: What a field of an accepted line can hold: no tab, no line break, no white space at either end.
BREAKS = "\t\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
FIELD = st.text(st.one_of(st.sampled_from([c for c in TRICKY if c not in BREAKS]),
                          st.characters(codec="utf-8", exclude_characters=BREAKS)),
                min_size=1, max_size=16).map(str.strip).filter(bool)
FOLD = st.one_of(st.none(), st.just(""), st.integers(0, 10**6).map(str), st.integers(0, 99).map(lambda i: f"+{i}"))


@st.composite
def tsv_lines(draw) -> str:
    fields = [draw(FIELD), draw(FIELD), draw(st.sampled_from(SAME_WORDS))]
    fold = draw(FOLD)
    if fold is not None:
        fields.append(fold)
    pad = draw(st.sampled_from(["", " ", "  "]))
    return "\t".join(pad + f + pad for f in fields)


@st.composite
def name_index_lines(draw) -> str:
    name = st.text(st.one_of(st.sampled_from(list("AnnBob_-.'/#+0123456789")),
                             st.characters(codec="utf-8", exclude_characters=BREAKS)),
                   min_size=1, max_size=12).map(lambda t: "".join(t.split())).filter(bool)  # no white space: MFR2
    index = st.one_of(st.integers(0, 12000).map(str), st.integers(0, 99).map(lambda i: f"+{i:03d}"))
    fields = [draw(name), draw(index), draw(index)] if draw(st.booleans()) else \
        [draw(name), draw(index), draw(name), draw(index)]
    return "\t".join(fields)


def _round_trip(pairs: list[Pair], folder: Path) -> None:
    # absolute paths, written as they are: read back exactly
    written = write_pairs_tsv(pairs, folder / "abs" / "pairs.tsv")
    assert read_pairs(written) == pairs
    # relative to the list (what occlude-pairs writes): the same files (relpath folds "a/../b" to "b")
    written = write_pairs_tsv(pairs, folder / "rel" / "pairs.tsv", relative_to=folder)
    assert _normal(read_pairs(written, root=folder)) == _normal(pairs)


def _read_back(pairs: list[Pair], folder: Path) -> None:
    """Write the pairs and read them back: unchanged, or refused in one line when the format cannot carry a path."""
    try:
        _round_trip(pairs, folder)
    except DataError as exc:
        event("refused by the writer")
        assert "cannot be written to a TSV pair list" in str(exc) and "\n" not in str(exc)
    else:
        event("round trip")


@FEW
@given(lines=st.lists(tsv_lines(), min_size=1, max_size=4))
def test_accepted_tsv_lines_round_trip(lines: list[str]) -> None:
    with _scratch() as folder:
        source = _write(folder, "in.tsv", "\n".join(lines) + "\n")
        try:
            pairs = read_pairs(source, root=folder, format="tsv")
        except DataError:
            assume(False)  # not a list the parser accepts (a comment first, a line break inside a field, ...)
        assert len(pairs) <= len(lines)
        _read_back(pairs, folder)


@FEW
@given(lines=st.lists(name_index_lines(), min_size=1, max_size=4), fmt=st.sampled_from(["lfw", "mfr2"]))
def test_accepted_name_index_lines_round_trip(lines: list[str], fmt: str) -> None:
    if fmt == "mfr2":
        text = "\n".join(line.replace("\t", " ") for line in lines) + "\n"
    else:  # one fold: the lines as the positives' and again as the negatives' half
        text = f"1\t{len(lines)}\n" + "\n".join(lines + lines) + "\n"
    with _scratch() as folder:
        source = _write(folder, "pairs.txt", text)
        try:
            pairs = read_pairs(source, root=folder, format=fmt)
        except DataError:
            assume(False)
        assert all(p.path1.name.endswith(".jpg" if fmt == "lfw" else ".png") for p in pairs)
        _read_back(pairs, folder)


GOOD_TSV = "a/1.jpg\tb/2.jpg\t1\t0"
GOOD_LFW = ("Ann\t1\t2", "Bob\t1\tCid\t3")
#: format -> (lines before, line number of the line under test, lines after, fields of a good line to mutate)
SURROUNDINGS = {
    "auto": ([GOOD_TSV], 2, [GOOD_TSV], GOOD_TSV.split("\t")),
    "tsv": ([GOOD_TSV], 2, [GOOD_TSV], GOOD_TSV.split("\t")),
    "lfw": (["1\t1", GOOD_LFW[0]], 3, [GOOD_LFW[1]], GOOD_LFW[1].split("\t")),  # the header promises 2 pairs
    "mfr2": (["Ann 1 2"], 2, ["Bob 1 Cid 3"], ["Bob", "1", "Cid", "3"]),
}


@st.composite
def near_miss_lines(draw, fmt: str) -> str:
    """Arbitrary text, or a good line of the format with one field replaced, dropped or added."""
    fields = list(SURROUNDINGS[fmt][3])
    how = draw(st.sampled_from(["text", "replace", "drop", "add"]))
    if how == "text":
        return draw(TEXT)
    at = draw(st.integers(0, len(fields) - 1))
    if how == "replace":
        fields[at] = draw(st.one_of(TEXT, NUMBERISH))
    elif how == "drop":
        del fields[at]
    else:
        fields.insert(at, draw(st.one_of(TEXT, NUMBERISH)))
    return (" " if fmt == "mfr2" else "\t").join(fields)


@PROPERTY
@given(fmt=st.sampled_from(sorted(SURROUNDINGS)), data=st.data())
def test_a_malformed_line_is_a_one_line_data_error_naming_file_and_line(fmt: str, data) -> None:
    """Good lines around the line under test: the list reads, or the DataError names the file and that line."""
    before, number, after, _ = SURROUNDINGS[fmt]
    line = data.draw(near_miss_lines(fmt), label="line")
    assume(len(f"x{line}x".splitlines()) == 1)  # one line; line breaks inside are the next property's business
    with _scratch() as folder:
        source = _write(folder, "pairs.txt", "\n".join([*before, line, *after]) + "\n")
        try:
            pairs = read_pairs(source, root=folder, format=fmt)
        except DataError as exc:
            pairs, message = None, str(exc)
    if pairs is None:
        problem = message.split(": ", 2)[-1].split("'")[0]
        event(f"DataError: {problem[:30]}")
        assert "\n" not in message and "\r" not in message
        assert message.startswith(f"{source}: ")
        assert f"{source}: line {number}: " in message or (fmt == "lfw" and "header promises" in message), message
    else:
        event("read")
        good = 2 if fmt != "lfw" else 1
        assert len(pairs) in (good, good + 1)  # the line was blank or a comment, or a pair


@PROPERTY
@given(data=st.one_of(st.binary(max_size=200), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.lists(st.one_of(TEXT, st.sampled_from([GOOD_TSV, *GOOD_LFW, "2\t1", "1 1"])),
                               max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))),
       fmt=st.sampled_from(["auto", "tsv", "lfw", "mfr2"]))
def test_any_file_reads_or_fails_with_a_one_line_data_error(data: bytes, fmt: str) -> None:
    with _scratch() as folder:
        source = folder / "list.txt"
        source.write_bytes(data)
        try:
            pairs = read_pairs(source, root=folder, format=fmt)
        except DataError as exc:
            event("DataError")
            assert "\n" not in str(exc) and "\r" not in str(exc) and str(exc).startswith(f"{source}: ")
        else:
            event("read")
            assert pairs and all(isinstance(p, Pair) for p in pairs)


# --- Image decoding of arbitrary bytes ---------------------------------------------------------------------------

def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seed_images() -> dict[str, bytes]:
    """Small valid files of many formats and modes, for the mutation property to start from."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    seeds = {
        "png": _encode(np.asarray(rgb), "PNG"),
        "png_rgba": _encode(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "PNG"),
        "png_gray16": _encode(rng.integers(0, 65535, (6, 5), dtype=np.uint16), "PNG"),
        "jpeg": _encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "JPEG", quality=80),
        "jpeg_progressive": _encode(np.asarray(rgb), "JPEG", progressive=True),
        "jpeg_gray": _encode(rng.integers(0, 256, (8, 8), dtype=np.uint8), "JPEG"),
    }
    variants = [("P", "GIF"), ("P", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF"), ("LAB", "TIFF"), ("F", "TIFF"),
                ("I;16", "TIFF"), ("CMYK", "TIFF"), ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"),
                ("RGB", "PPM"), ("RGB", "TGA"), ("RGB", "PCX"), ("RGB", "SGI"), ("RGB", "ICO"), ("RGBA", "QOI"),
                ("RGB", "DDS"), ("L", "SPIDER"), ("RGB", "JPEG2000")]
    for mode, fmt in variants:
        buf = io.BytesIO()
        try:
            rgb.convert(mode).save(buf, format=fmt)
        except (OSError, ValueError, KeyError):  # a format or mode this Pillow build cannot write
            continue
        seeds[f"{fmt.lower()}_{mode.lower()}"] = buf.getvalue()
    return seeds


SEEDS = _seed_images()


class DecoderHang(BaseException):
    """Not an Exception, so that load_image's own ``except Exception`` cannot turn a hang into an ImageError."""


@contextmanager
def _no_hang(seconds: float = 30.0) -> Iterator[None]:
    """Fail, rather than hang the suite, if decoding one input takes absurdly long (POSIX; a no-op elsewhere)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise DecoderHang(f"load_image did not return within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _png_declaring(width: int, height: int, depth: int = 8, colour: int = 2, payload: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def _check_loaded(data: bytes) -> None:
    try:
        with _no_hang():
            arr = load_image(data)
    except ImageError as exc:
        message = str(exc)
        event(f"ImageError: {exc.problem.split(' (')[0][:40]}")
        assert message.startswith(f"<{len(data)} bytes>: ") and "\n" not in message, message
    else:
        event("decoded")
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 and arr.shape[0] * arr.shape[1] > 0


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


#: Leading bytes of formats Pillow recognises, so that random bytes reach the format plug-ins, not only open().
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF87a", b"GIF89a", b"BM",
         b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"P5 4 4 255\n", b"P4\n",
         b"\x00\x00\x01\x00", b"8BPS", b"DDS ", b"qoif", b"\x0a\x05\x01\x08", b"\x01\xda", b"icns",
         b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\x00\x00\x00\x18ftypheic", b"SIMPLE  =                    T"]


PIL_NOISE = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on corrupt TIFF/EXIF tags


@PIL_NOISE
@PROPERTY
@given(data=st.one_of(st.binary(max_size=300), st.tuples(st.sampled_from(MAGIC), st.binary(max_size=300)).map(
    lambda t: t[0] + t[1])))
def test_arbitrary_bytes_load_or_fail_with_an_image_error(data: bytes) -> None:
    _check_loaded(data)


@PIL_NOISE
@PROPERTY
@given(data=mutated_images())
def test_mutated_and_truncated_images_load_or_fail_with_an_image_error(data: bytes) -> None:
    _check_loaded(data)


@FEW
@given(width=st.sampled_from([1, 2, 255, 8000, 8001, 65535, 2**31 - 1]),
       height=st.sampled_from([1, 3, 7999, 8000, 2**20, 2**31 - 1]),
       depth_colour=st.sampled_from([(8, 2), (8, 6), (16, 0), (1, 0), (8, 3), (16, 2), (8, 4)]),
       payload=st.binary(max_size=64))
def test_huge_declared_dimensions_are_refused_quickly(width, height, depth_colour, payload) -> None:
    """A header that promises billions of pixels must be refused from the header, without allocating them."""
    data = _png_declaring(width, height, *depth_colour, payload=payload)
    _check_loaded(data)
    if width * height > 64_000_000:  # MAX_PIXELS: refused from the header, before any pixel is decoded
        with pytest.raises(ImageError, match="over the limit of 64,000,000 pixels|decompression bomb"):
            load_image(data)


# --- The pattern labeller ----------------------------------------------------------------------------------------

@cache
def _vocabulary(height: int, width: int, grid: int) -> PatternVocabulary:
    return PatternVocabulary(height, width, grid)


@cache
def _boxes(height: int, width: int, grid: int) -> tuple:
    return tuple(definition_boxes(height, width, grid))


@st.composite
def masks(draw) -> tuple[np.ndarray, int]:
    grid = draw(st.integers(1, 6))
    height, width = draw(st.integers(grid, 24)), draw(st.integers(grid, 24))
    mask = np.zeros((height, width), bool)
    kind = draw(st.sampled_from(["boxes", "noise", "empty", "full"]))
    if kind == "boxes":
        for _ in range(draw(st.integers(1, 3))):
            top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
            mask[top:draw(st.integers(top + 1, height)), left:draw(st.integers(left + 1, width))] = True
    elif kind == "noise":
        seed = draw(st.integers(0, 2**32 - 1))
        mask = np.random.default_rng(seed).random((height, width)) < draw(st.floats(0.01, 0.9))
    elif kind == "full":
        mask[:] = True
    return mask, grid


@PROPERTY
@given(case=masks())
def test_labeller_is_argmax_iou_by_brute_force(case: tuple[np.ndarray, int]) -> None:
    mask, grid = case
    height, width = mask.shape
    expected = brute_force_label(mask, _boxes(height, width, grid))
    vocab = _vocabulary(height, width, grid)
    assert int(vocab.label(mask)) == expected
    assert int(label_patterns(mask, patterns(height, width, grid))) == expected
    assert box_label(vocab, mask) == expected


@settings(PROPERTY, max_examples=100)
@given(grid=st.integers(1, 6), size=st.sampled_from([(112, 96), (112, 112), (30, 17)]), data=st.data())
def test_a_grid_box_is_its_own_pattern_and_boxes_label_by_iou(grid: int, size: tuple[int, int], data) -> None:
    """Every vocabulary box labels as itself; any box drawn at random labels as the brute-force argmax."""
    height, width = size
    boxes = _boxes(height, width, grid)
    vocab = _vocabulary(height, width, grid)
    index = data.draw(st.integers(1, len(boxes) - 1))
    top, left, bottom, right = boxes[index]
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    assert box_label(vocab, mask) == int(vocab.label(mask)) == index
    top, left = data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))
    mask = np.zeros((height, width), bool)
    mask[top:data.draw(st.integers(top + 1, height)), left:data.draw(st.integers(left + 1, width))] = True
    assert box_label(vocab, mask) == int(vocab.label(mask)) == brute_force_label(mask, boxes)
