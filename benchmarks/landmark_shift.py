"""How far the detector's landmarks move when a face is occluded, per occluder category.

    .venv/bin/python benchmarks/landmark_shift.py [--set out/occ-lfw] [--per-category 60]

Reads an occluded set made by ``fromface occlude-pairs`` (its manifest names each occluded image's clean
source) and runs the product's aligner (YuNet, retry, centre fallback, central face) on both images. The
shift is the mean distance between the five landmarks found on the occluded image and on its clean source,
over the clean source's eye distance (normalised mean error, NME). Training pastes occluders on aligned
crops, so without ``occlusion.realign`` a model never sees this shift.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=REPO / "out" / "occ-lfw", help="fromface occlude-pairs output")
    parser.add_argument("--source-root", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images",
                        help="folder the manifest's source paths are relative to")
    parser.add_argument("--per-category", type=int, default=60, help="occluded images per category (first N)")
    args = parser.parse_args(argv)
    manifest = args.set / "manifest.csv"
    if not manifest.is_file():
        print(f"{manifest}: not found; make the set with `fromface occlude-pairs`", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from fromface.data.images import load_image
    from fromface.faces.aligner import FaceAligner

    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in csv.DictReader(manifest.open(encoding="utf-8")):
        if len(by_category[row["category"]]) < args.per_category:
            by_category[row["category"]].append(row)
    aligner = FaceAligner("arcface112", select="central", fallback=True)
    todo = [row for rows in by_category.values() for row in rows]
    shifts: dict[str, list[float]] = defaultdict(list)
    for row in tqdm(todo, desc="landmarks", unit="pair", dynamic_ncols=True):
        clean = aligner.align_array(load_image(args.source_root / row["source"]))[0].landmarks
        moved = aligner.align_array(load_image(args.set / row["output"]))[0].landmarks
        eye_distance = float(np.linalg.norm(clean[0] - clean[1]))
        shifts[row["category"]].append(float(np.linalg.norm(moved - clean, axis=1).mean()) / eye_distance)
    print(f"Landmark shift on {args.set} ({args.per_category} occluded images per category), NME of the five "
          "points found on the occluded image against those on its clean source\n")
    print("| category | images | mean NME | median NME | NME > 0.1 | NME > 0.2 |\n|---|---|---|---|---|---|")
    for category, values in sorted(shifts.items()) + [("all", sum(shifts.values(), []))]:
        v = np.asarray(values)
        print(f"| {category} | {len(v)} | {v.mean():.3f} | {np.median(v):.3f} | {(v > 0.1).mean():.0%} | "
              f"{(v > 0.2).mean():.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
