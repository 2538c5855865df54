"""Pair-list parsers: LFW, MFR2, TSV, auto-detection, malformed lines with line numbers, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATA
from fromface.data.pairs import Pair, detect_format, pair_images, read_pairs, write_pairs_tsv
from fromface.errors import DataError

SHARED = SHARED_DATA


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


LFW_TINY = "2\t1\nAnn\t1\t2\nBob\t1\tCid\t3\nDan\t2\t4\nEve\t1\tFay\t12\n"


def test_lfw_format_folds_and_paths(tmp_path):
    path = _write(tmp_path, "pairs.txt", LFW_TINY)
    pairs = read_pairs(path, root="/imgs")
    assert [p.fold for p in pairs] == [0, 0, 1, 1]
    assert [p.same for p in pairs] == [True, False, True, False]
    assert pairs[0].path1 == Path("/imgs/Ann/Ann_0001.jpg")
    assert pairs[1].path2 == Path("/imgs/Cid/Cid_0003.jpg")
    assert pairs[3].path2 == Path("/imgs/Fay/Fay_0012.jpg")
    assert detect_format(path) == "lfw"


def test_root_defaults_to_pair_file_folder(tmp_path):
    path = _write(tmp_path, "pairs.txt", LFW_TINY)
    assert read_pairs(path)[0].path1 == tmp_path / "Ann" / "Ann_0001.jpg"


def test_lfw_header_count_mismatch(tmp_path):
    path = _write(tmp_path, "pairs.txt", "2\t2\nAnn\t1\t2\n")
    with pytest.raises(DataError, match="header promises"):
        read_pairs(path)


def test_lfw_bad_field_count_names_line(tmp_path):
    path = _write(tmp_path, "pairs.txt", "1\t2\nAnn\t1\t2\nBob\t1\n\nBob\t1\tCid\t2\nEve\t1\tFay\t2\n")
    with pytest.raises(DataError, match=r"pairs.txt: line 3: expected 'Name i j'"):
        read_pairs(path, format="lfw")


def test_lfw_non_integer_index(tmp_path):
    path = _write(tmp_path, "pairs.txt", "1\t1\nAnn\t1\tx\nBob\t1\tCid\t2\n")
    with pytest.raises(DataError, match="line 2: image number 'x'"):
        read_pairs(path)


def test_lfw_missing_header_when_forced(tmp_path):
    path = _write(tmp_path, "pairs.txt", "Ann\t1\t2\n")
    with pytest.raises(DataError, match="line 1: expected the LFW header"):
        read_pairs(path, format="lfw")


def test_mfr2_space_separated_png(tmp_path):
    path = _write(tmp_path, "pairs.txt", "Ann 1 2\nBob 1 Cid 3\n")
    assert detect_format(path) == "mfr2"
    pairs = read_pairs(path, root=tmp_path)
    assert pairs[0] == Pair(tmp_path / "Ann/Ann_0001.png", tmp_path / "Ann/Ann_0002.png", True, -1)
    assert pairs[1] == Pair(tmp_path / "Bob/Bob_0001.png", tmp_path / "Cid/Cid_0003.png", False, -1)


def test_mfr2_malformed_line(tmp_path):
    path = _write(tmp_path, "pairs.txt", "Ann 1 2\n# comment\nBob\n")
    with pytest.raises(DataError, match="line 3"):
        read_pairs(path, format="mfr2")


def test_tsv_with_header_folds_and_labels(tmp_path):
    path = _write(tmp_path, "list.tsv", "path1\tpath2\tsame\tfold\na/1.jpg\tb/2.jpg\t1\t0\nc.jpg\td.jpg\tfalse\t1\n")
    assert detect_format(path) == "tsv"
    pairs = read_pairs(path)
    assert pairs == [Pair(tmp_path / "a/1.jpg", tmp_path / "b/2.jpg", True, 0),
                     Pair(tmp_path / "c.jpg", tmp_path / "d.jpg", False, 1)]


def test_tsv_bad_label_and_fields(tmp_path):
    bad_label = _write(tmp_path, "a.tsv", "x.jpg\ty.jpg\t1\nx.jpg\ty.jpg\tmaybe\n")
    with pytest.raises(DataError, match="a.tsv: line 2: third field"):
        read_pairs(bad_label)
    bad_fields = _write(tmp_path, "b.tsv", "x.jpg\ty.jpg\t1\nx.jpg\ty.jpg\n")
    with pytest.raises(DataError, match="b.tsv: line 2: expected"):
        read_pairs(bad_fields, format="tsv")
    bad_fold = _write(tmp_path, "c.tsv", "x.jpg\ty.jpg\t1\tone\n")
    with pytest.raises(DataError, match="line 1: fold"):
        read_pairs(bad_fold)


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="empty"):
        read_pairs(_write(tmp_path, "e.txt", "\n# only a comment\n"))
    with pytest.raises(DataError, match="unknown pair-list format"):
        read_pairs(_write(tmp_path, "f.txt", LFW_TINY), format="csv")
    with pytest.raises(DataError, match="cannot tell"):
        read_pairs(_write(tmp_path, "g.txt", "hello world\n"))


def test_tsv_round_trip_relative(tmp_path):
    images = tmp_path / "imgs"
    pairs = [Pair(images / "a/1.jpg", tmp_path / "other/2.jpg", True, 0), Pair(images / "b.jpg", images / "c.jpg",
                                                                              False, 1)]
    out = write_pairs_tsv(pairs, tmp_path / "out" / "pairs.tsv", relative_to=tmp_path / "out")
    text = out.read_text()
    assert text.splitlines()[0] == "../imgs/a/1.jpg\t../other/2.jpg\t1\t0"
    back = read_pairs(out)
    assert [(p.path1.resolve(), p.path2.resolve(), p.same, p.fold) for p in back] == \
        [(p.path1.resolve(), p.path2.resolve(), p.same, p.fold) for p in pairs]
    assert pair_images(pairs)[:2] == [images / "a/1.jpg", tmp_path / "other/2.jpg"]


def test_write_without_folds(tmp_path):
    out = write_pairs_tsv([Pair(Path("a.jpg"), Path("b.jpg"), False)], tmp_path / "p.tsv")
    assert out.read_text() == "a.jpg\tb.jpg\t0\n"


@pytest.mark.data("lfw/pairs.txt", "lfw/images")
def test_official_lfw_pairs():
    pairs = read_pairs(SHARED / "lfw" / "pairs.txt", root=SHARED / "lfw" / "images")
    assert len(pairs) == 6000
    assert sum(p.same for p in pairs) == 3000
    assert {p.fold for p in pairs} == set(range(10))
    assert all(sum(p.same for p in pairs if p.fold == f) == 300 for f in range(10))
    assert len(pair_images(pairs)) == 7701
    assert pairs[0].path1.exists()


def test_writer_refuses_or_protects_paths_the_reader_would_misread(tmp_path: Path) -> None:
    """Found by the round-trip property (test_properties.py): paths the reader took for a comment or an LFW name
    were written as they were; paths with a line break or white space at an end are refused."""
    tricky = [Pair(tmp_path / "#hash.jpg", tmp_path / "12", True, 0), Pair(tmp_path / "x", tmp_path / "7", False, 1),
              Pair(tmp_path / "\ufeffbom.png", tmp_path / "sp ace.png", True, 0)]
    written = write_pairs_tsv(tricky, tmp_path / "pairs.tsv", relative_to=tmp_path)
    assert written.read_text(encoding="utf-8").splitlines()[0] == "./#hash.jpg\t./12\t1\t0"
    assert read_pairs(written) == tricky
    for bad in ("a\u2028b.jpg", "a\rb.jpg", "trailing.jpg ", " leading.jpg"):
        with pytest.raises(DataError, match="cannot be written") as err:
            write_pairs_tsv([Pair(tmp_path / bad, tmp_path / "b.jpg", True)], tmp_path / "bad.tsv",
                            relative_to=tmp_path)
        assert "\n" not in str(err.value) and "\r" not in str(err.value)


@pytest.mark.parametrize("field", ["²", "١٢", "++1", "+-1", "1²"])
def test_non_ascii_or_doubly_signed_numbers_are_data_errors(tmp_path: Path, field: str) -> None:
    """Found by the malformed-line property (test_properties.py): str.isdigit() accepts '²', which int() then
    refused with a ValueError instead of a DataError naming the line; non-ASCII digits are now refused too."""
    for text, fmt in ((f"a.jpg\tb.jpg\t1\t{field}\n", "tsv"), (f"Ann\t1\t{field}\n", "mfr2"),
                      (f"1\t1\nAnn\t{field}\t2\nBob\t1\tCid\t2\n", "lfw")):
        path = _write(tmp_path, "p.txt", text)
        with pytest.raises(DataError, match=r"p.txt: line \d"):
            read_pairs(path, format=fmt)


def test_mixed_folds_are_written_and_read_back(tmp_path):
    """A list where only some pairs have a fold keeps them: the others get an empty fold field (fold -1)."""
    pairs = [Pair(tmp_path / "a.jpg", tmp_path / "b.jpg", True, 3), Pair(tmp_path / "c.jpg", tmp_path / "d.jpg", False)]
    out = write_pairs_tsv(pairs, tmp_path / "p.tsv", relative_to=tmp_path)
    assert out.read_text() == "a.jpg\tb.jpg\t1\t3\nc.jpg\td.jpg\t0\t\n"
    assert read_pairs(out) == pairs
