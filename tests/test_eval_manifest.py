"""The per-category and per-covered-fraction tables of ``fromface eval --manifest``: exact groups on a hand-made set.

Every expected count below is written by hand from the table ``CASES`` (which bin each covered fraction belongs to,
by the rule "lo <= f < hi, and the last bin also takes f == its top edge"), not computed with the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromface.cli.main import main
from fromface.data.pairs import Pair, write_pairs_tsv
from fromface.evaluation.embedding import Embedder, EmbedResult
from fromface.evaluation.report import write_markdown
from fromface.evaluation.verification import DEFAULT_BINS, evaluate_pairs, occlusion_groups, read_manifest

# (category, covered_fraction as written in the manifest, same person); None: the image is not in the manifest
CASES = [
    ("cup", "0.0", True),           # bottom edge of the first bin: 0.00-0.10
    ("cup", "0.05", False),         # 0.00-0.10
    ("cup", "0.1", True),           # on the 0.1 edge: belongs to 0.10-0.20, not 0.00-0.10
    ("scarf", "0.199999", False),   # just under an edge: 0.10-0.20
    ("scarf", "0.2", True),         # 0.20-0.30
    ("scarf", "0.300000", False),   # the 0.3 edge as occlude-pairs writes it (%.6f): 0.30-0.40
    ("hand", "0.35", True),         # 0.30-0.40
    ("hand", "0.4", False),         # 0.40-0.50
    ("hand", "0.5", True),          # 0.50-1.00
    ("hand", "0.75", False),        # 0.50-1.00
    ("mouth_mask", "1.0", True),    # the top edge: the inclusive last bin, 0.50-1.00
    ("mouth_mask", "1", False),     # the same, written as an integer
    ("mouth_mask", "", True),       # no covered fraction: its category counts, no bin does
    (None, None, False),            # not occluded: category "clean", no bin
    (None, None, True),             # not occluded
]
EXPECTED_CATEGORIES = {"clean": 2, "cup": 3, "hand": 4, "mouth_mask": 3, "scarf": 3}
EXPECTED_BINS = {"0.00-0.10": 2, "0.10-0.20": 2, "0.20-0.30": 1, "0.30-0.40": 2, "0.40-0.50": 1, "0.50-1.00": 4}
# --bins 0,0.25,0.5,1 on the same set: 0.25 is not a value here, 0.5 and 1.0 are edges
EXPECTED_COARSE = {"0.00-0.25": 5, "0.25-0.50": 3, "0.50-1.00": 4}


class ColourEmbedder(Embedder):
    """Test double: the embedding is the mean colour (the same person has the same colour)."""

    def __init__(self):
        super().__init__(name="colour", source="test", info={"kind": "test"})

    def embed_batch(self, images):
        return [EmbedResult(im.reshape(-1, 3).mean(0).astype(np.float32), "detected") for im in images]


def _colour(k: int) -> tuple[int, int, int]:
    return (40 + 13 * k % 200, 200 - 11 * k % 180, 30 + 29 * k % 190)


@pytest.fixture()
def hand_set(tmp_path: Path) -> dict:
    """One pair per case: first image original, second image occluded (listed in the manifest when it has a row)."""
    pairs, rows = [], ["output,category,covered_fraction"]
    for k, (category, covered, same) in enumerate(CASES):
        first = tmp_path / "orig" / f"p{k:02d}.png"
        second = tmp_path / "occ" / f"p{k:02d}.png"
        first.parent.mkdir(exist_ok=True)
        second.parent.mkdir(exist_ok=True)
        other = _colour(k) if same else _colour(k + 50)
        Image.fromarray(np.full((8, 8, 3), _colour(k), np.uint8)).save(first)
        Image.fromarray(np.full((8, 8, 3), other, np.uint8)).save(second)
        pairs.append(Pair(first, second, same, k % 2))
        if category is not None:
            rows.append(f"occ/{second.name},{category},{covered}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"pairs": pairs, "manifest": manifest, "tmp": tmp_path}


def _counts(groups: dict[str, np.ndarray]) -> dict[str, int]:
    return {name: int(mask.sum()) for name, mask in groups.items()}


def test_groups_on_bin_edges_and_the_inclusive_top(hand_set: dict) -> None:
    occlusion = read_manifest(hand_set["manifest"])
    by_cat, by_bin = occlusion_groups(hand_set["pairs"], occlusion)
    assert _counts(by_cat) == EXPECTED_CATEGORIES
    assert _counts(by_bin) == EXPECTED_BINS
    assert list(by_bin) == sorted(EXPECTED_BINS)  # in bin order
    # which pairs, not only how many: case index -> bin, by hand
    members = {name: np.flatnonzero(mask).tolist() for name, mask in by_bin.items()}
    assert members == {"0.00-0.10": [0, 1], "0.10-0.20": [2, 3], "0.20-0.30": [4], "0.30-0.40": [5, 6],
                       "0.40-0.50": [7], "0.50-1.00": [8, 9, 10, 11]}
    assert np.flatnonzero(by_cat["clean"]).tolist() == [13, 14]


def test_custom_bins_and_empty_bins_left_out(hand_set: dict) -> None:
    occlusion = read_manifest(hand_set["manifest"])
    _, by_bin = occlusion_groups(hand_set["pairs"], occlusion, bins=(0.0, 0.25, 0.5, 1.0))
    assert _counts(by_bin) == EXPECTED_COARSE
    # a bin no pair falls in is not reported; the top of the last bin still counts
    _, by_bin = occlusion_groups(hand_set["pairs"], occlusion, bins=(0.6, 0.9, 1.0))
    assert _counts(by_bin) == {"0.60-0.90": 1, "0.90-1.00": 2}


def test_only_the_first_image_occluded_gives_its_category(hand_set: dict) -> None:
    pairs = [Pair(p.path2, p.path1, p.same, p.fold) for p in hand_set["pairs"]]  # occluded image first
    by_cat, by_bin = occlusion_groups(pairs, read_manifest(hand_set["manifest"]))
    assert _counts(by_cat) == EXPECTED_CATEGORIES and _counts(by_bin) == EXPECTED_BINS


def test_evaluate_pairs_reports_every_group_with_its_pairs(hand_set: dict) -> None:
    occlusion = read_manifest(hand_set["manifest"])
    res = evaluate_pairs(hand_set["pairs"], [ColourEmbedder()], None, occlusion, DEFAULT_BINS, progress=False)[0]
    assert res["metrics"]["n_pairs"] == len(CASES) and res["metrics"]["accuracy_mean"] == 1.0
    assert {c: m["n_pairs"] for c, m in res["per_category"].items()} == EXPECTED_CATEGORIES
    assert {b: m["n_pairs"] for b, m in res["per_covered_fraction"].items()} == EXPECTED_BINS
    # n_positive by hand from CASES: 0.50-1.00 holds cases 8 (same), 9, 10 (same), 11
    top = res["per_covered_fraction"]["0.50-1.00"]
    assert (top["n_positive"], top["n_negative"]) == (2, 2)
    assert all(m["accuracy_at_overall_thresholds"] == 1.0 for m in res["per_category"].values())


def test_cli_eval_manifest_tables(hand_set: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import fromface.evaluation.embedders as embedders

    monkeypatch.setattr(embedders, "load_embedder", lambda name, **kw: ColourEmbedder())
    tmp = hand_set["tmp"]
    tsv = write_pairs_tsv(hand_set["pairs"], tmp / "pairs.tsv", relative_to=tmp)
    out = tmp / "out"
    assert main(["eval", "--pairs", str(tsv), "--model", "colour", "--out", str(out), "--quiet", "--no-cache",
                 "--manifest", str(hand_set["manifest"]), "--bins", "0,0.25,0.5,1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"]["bins"] == [0.0, 0.25, 0.5, 1.0]
    model = report["models"][0]
    assert {c: m["n_pairs"] for c, m in model["per_category"].items()} == EXPECTED_CATEGORIES
    assert {b: m["n_pairs"] for b, m in model["per_covered_fraction"].items()} == EXPECTED_COARSE
    md = (out / "report.md").read_text()
    for title, expected in (("occluder category", EXPECTED_CATEGORIES), ("covered fraction", EXPECTED_COARSE)):
        section = md.split(f"### Per {title}")[1].split("###")[0]
        table = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "pairs" not in line]
        assert {g.strip(): int(n) for g, n in table} == expected, title


def test_markdown_group_rows_follow_the_results(tmp_path: Path) -> None:
    """report.md prints each group's own pair count, in the order the evaluation gave them."""
    groups = {"0.00-0.10": 7, "0.50-1.00": 3}
    metrics = {"n_pairs": 10, "accuracy_mean": 0.9, "accuracy_std": 0.1, "auc": 0.95}
    result = {"name": "m", "metrics": metrics, "failed_pairs": 0, "failed_positive_pairs": 0,
              "face_methods": {"detected": 20},
              "per_covered_fraction": {g: {"n_pairs": n, "accuracy_mean": 0.5, "accuracy_std": 0.0,
                                           "accuracy_at_overall_thresholds": 0.25, "auc": 0.75}
                                       for g, n in groups.items()}}
    report = {"pairs": {"file": "p.tsv", "n_pairs": 10, "n_positive": 5, "n_negative": 5, "n_images": 20},
              "command": "fromface eval", "select": "central",
              "environment": {"date_utc": "d", "cpu_count": 2, "python": "3", "versions": {}}}
    md = write_markdown(report, [result], tmp_path / "r.md").read_text()
    section = md.split("### Per covered fraction")[1]
    rows = [line for line in section.splitlines() if line.startswith("| 0.")]
    assert rows == ["| 0.00-0.10 | 7 | 50.00 ± 0.00 | 25.00 | 75.00 |",
                    "| 0.50-1.00 | 3 | 50.00 ± 0.00 | 25.00 | 75.00 |"]
    assert "### Per occluder category" not in md  # no per_category in the results: no table
