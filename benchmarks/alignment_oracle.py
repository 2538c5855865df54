"""What the landmark shift costs: occluded LFW with each occluded image cropped from its own detection, and from
the landmarks found on its clean source photo (an oracle no real photo offers).

    .venv/bin/python benchmarks/alignment_oracle.py --model sface_net_face --model from_sface_net [--set out/occ-lfw]

Both columns use the same occluded pixels and the same model; only where the crop is taken differs. The gap is
what a perfect, occlusion-proof landmark detector would be worth, and the ceiling for FROM's align head
(``--no-refine`` turns the head off, so the "detected" column shows the detector alone). Prints 10-fold accuracy
(the set's folds) and TAR at FAR 1e-3 per model.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, dest="models", help="registered model or .pt")
    parser.add_argument("--set", type=Path, default=REPO / "out" / "occ-lfw", help="fromface occlude-pairs output")
    parser.add_argument("--source-root", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images",
                        help="folder the manifest's source paths are relative to")
    parser.add_argument("--no-refine", action="store_true", help="ignore FROM align heads")
    parser.add_argument("--pairs", type=int, default=0, help="about N pairs, evenly spread over the folds (0: all)")
    args = parser.parse_args(argv)
    for name in ("pairs.tsv", "manifest.csv"):
        if not (args.set / name).is_file():
            print(f"{args.set / name}: not found; make the set with `fromface occlude-pairs`", file=sys.stderr)
            return 2

    from tqdm import tqdm

    from fromface import FaceRecognizer
    from fromface.data.images import load_image
    from fromface.evaluation.metrics import tar_at_far, verification_metrics
    from fromface.faces.alignment import warp_face

    sources = {r["output"]: r["source"] for r in csv.DictReader((args.set / "manifest.csv").open(encoding="utf-8"))}
    rows = [line.rstrip("\n").split("\t") for line in (args.set / "pairs.tsv").open(encoding="utf-8")]
    rows = rows[:: max(1, len(rows) // args.pairs)] if args.pairs else rows
    same = np.array([int(r[2]) for r in rows], dtype=bool)
    folds = np.array([int(r[3]) for r in rows])
    recognizers = {m: FaceRecognizer(m, select="central", fallback=True, refine=not args.no_refine)
                   for m in args.models}
    aligner = next(iter(recognizers.values())).aligner
    plain = type(aligner)(aligner.template, select="central", fallback=True)  # the detector alone, for the oracle
    scores = {m: {"detected": [], "oracle": []} for m in args.models}
    for first, second, _, _ in tqdm(rows, desc="pairs", unit="pair", dynamic_ncols=True):
        photo = load_image(args.set / second)
        clean_points = plain.align_array(load_image(args.source_root / sources[second]))[0].landmarks
        oracle_crop = warp_face(photo, clean_points, aligner.template)
        for m, rec in recognizers.items():
            a, b = rec.embed_one(args.set / first), rec.embed_one(photo)
            oracle = rec._embed_crops([oracle_crop])[0]
            scores[m]["detected"].append(float(a.embedding @ b.embedding))
            scores[m]["oracle"].append(float(a.embedding @ oracle.embedding))
    print(f"Occluded LFW ({args.set}, {len(rows)} pairs): occluded image cropped from its own detection vs from "
          f"its clean photo's landmarks{' (align heads off)' if args.no_refine else ''}\n")
    print("| model | crop of the occluded image | 10-fold accuracy % | TAR % @ FAR 1e-3 |\n|---|---|---|---|")
    for m in args.models:
        for where, values in scores[m].items():
            s = np.asarray(values)
            acc = verification_metrics(s, same, folds=folds)["accuracy_mean"]
            tar = tar_at_far(s, same, 1e-3)["tar"]
            print(f"| {m} | {where} | {100 * acc:.2f} | {'n/a' if tar is None else f'{100 * tar:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
