"""How often the default model calls a face occluded: clean LFW photos, the same photos in grayscale (as in MFR2 and
old scans), and occluded LFW. The condition picks the verification threshold, so a clean face called occluded is
compared at the looser occluded threshold.

    .venv/bin/fromface occlude-pairs --pairs ../shared/data/lfw/pairs.txt --root ../shared/data/lfw/images \\
        --occluders ../shared/data/occluders \\
        --out out/occ-lfw-600 --seed 100 --limit 600
    .venv/bin/python benchmarks/occlusion_condition.py --set out/occ-lfw-600

Reads the manifest of a set made by ``fromface occlude-pairs``: each occluded image and its clean source. Prints,
for several rules on the pattern predictor's output, the share of faces called occluded in each group.
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
    parser.add_argument("--set", type=Path, required=True, help="fromface occlude-pairs output")
    parser.add_argument("--source-root", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images",
                        help="folder the manifest's source paths are relative to")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    manifest = args.set / "manifest.csv"
    if not manifest.is_file():
        print(f"{manifest}: not found; make the set with `fromface occlude-pairs`", file=sys.stderr)
        return 2

    import torch
    from PIL import Image
    from tqdm import tqdm

    from fromface.inference.recognizer import FaceRecognizer

    torch.set_num_threads(2)
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    rec = FaceRecognizer(args.model, fallback=True)
    groups: dict[str, list] = {"clean": [], "grayscale": [], "occluded": []}
    for row in tqdm(rows, desc="faces", unit="pair", dynamic_ncols=True):
        clean = np.asarray(Image.open(args.source_root / row["source"]).convert("RGB"))
        gray = np.repeat(np.asarray(Image.fromarray(clean).convert("L"))[:, :, None], 3, axis=2)
        occluded = np.asarray(Image.open(args.set / row["output"]).convert("RGB"))
        for key, image in (("clean", clean), ("grayscale", gray), ("occluded", occluded)):
            groups[key].append(rec.embed(image)[0])
    rules = {
        "argmax pattern != 0 or visible < 0.9 (old rule)":
            lambda f: f.pattern != 0 or f.visible_fraction < 0.9,
        "P(occluded) >= 0.5": lambda f: f.occlusion_probability >= 0.5,
        "P(occluded) >= 0.5 and argmax pattern p >= 0.05":
            lambda f: f.occlusion_probability >= 0.5 and f.pattern != 0 and f.pattern_probability >= 0.05,
        "P(occluded) >= 0.5 and argmax pattern p >= 0.1":
            lambda f: f.occlusion_probability >= 0.5 and f.pattern != 0 and f.pattern_probability >= 0.1,
        "P(occluded) >= 0.7": lambda f: f.occlusion_probability >= 0.7,
        "P(occluded) >= 0.9": lambda f: f.occlusion_probability >= 0.9,
        "argmax pattern != 0 with p >= 0.03": lambda f: f.pattern != 0 and f.pattern_probability >= 0.03,
        "argmax pattern != 0 with p >= 0.05": lambda f: f.pattern != 0 and f.pattern_probability >= 0.05,
        "fromface's rule (FaceEmbedding.occluded)": lambda f: bool(f.occluded),
    }
    print(f"Faces called occluded by {rec.model_id}, {len(rows)} LFW photos of {args.set} (the first image of "
          "each pair is the clean source of its occluded copy)\n")
    print("| rule | clean | grayscale | occluded |\n|---|---|---|---|")
    for label, rule in rules.items():
        rates = [np.mean([rule(f) for f in faces]) for faces in groups.values()]
        print(f"| {label} | " + " | ".join(f"{r:.1%}" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
