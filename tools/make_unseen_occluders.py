"""Write an occluder folder of shapes no model here was trained on, for a robustness check.

    python tools/make_unseen_occluders.py out/unseen-occluders [--per-category 8] [--seed 7]
    fromface occlude-pairs --pairs ../shared/data/lfw/pairs.txt --root ../shared/data/lfw/images \
        --occluders out/unseen-occluders --out out/occ-lfw-unseen --seed 100

The training occluders (../shared/data/occluders) are photos of real objects; a model tuned on them can
learn their look rather than "something covers the face". These are procedural RGBA shapes (irregular
blobs, bars, ellipses and clusters of small blobs) filled with smooth random colour fields and fine
noise, so their textures, outlines and colours appear nowhere in training. Unknown categories are
placed anywhere on the face by the ``face`` preset, at the same 20-45% coverage as occluded LFW.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

SIZE = 256
CATEGORIES = ("unseen_blob", "unseen_bar", "unseen_ellipse", "unseen_cluster")


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field (a few control points upsampled) plus fine grain."""
    cells = int(rng.integers(2, 6))
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    mix = rng.uniform(0.2, 0.8)
    field = cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) * mix + base * (1 - mix)
    grain = rng.normal(0, rng.uniform(2, 18), size=(SIZE, SIZE, 1)).astype(np.float32)
    return np.clip(field + grain, 0, 255).astype(np.uint8)


def _star_polygon(rng: np.random.Generator, centre: tuple[float, float], radius: float) -> np.ndarray:
    """An irregular closed outline: sorted angles, radii varying around ``radius``."""
    n = int(rng.integers(6, 14))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    return pts.round().astype(np.int32)


def _shape(category: str, rng: np.random.Generator) -> np.ndarray:
    """The occluder's alpha (uint8), edges softened by a small blur."""
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    c = SIZE / 2
    if category == "unseen_blob":
        cv2.fillPoly(alpha, [_star_polygon(rng, (c, c), SIZE * 0.48)], 255)
    elif category == "unseen_bar":
        half_h = SIZE * rng.uniform(0.10, 0.22)
        box = cv2.boxPoints(((c, c), (SIZE * 0.98, 2 * half_h), float(rng.uniform(-15, 15))))
        cv2.fillPoly(alpha, [box.round().astype(np.int32)], 255)
    elif category == "unseen_ellipse":
        axes = (int(SIZE * 0.48), int(SIZE * rng.uniform(0.2, 0.48)))
        cv2.ellipse(alpha, (int(c), int(c)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    elif category == "unseen_cluster":
        for _ in range(int(rng.integers(3, 7))):
            centre = tuple(rng.uniform(SIZE * 0.2, SIZE * 0.8, 2))
            cv2.fillPoly(alpha, [_star_polygon(rng, centre, SIZE * rng.uniform(0.12, 0.25))], 255)
    else:
        raise ValueError(f"unknown category {category!r}")
    return cv2.GaussianBlur(alpha, (5, 5), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write (PNG files and occluders.csv)")
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for category in CATEGORIES:
        for i in range(args.per_category):
            rgba = np.dstack([_texture(rng), _shape(category, rng)])
            name = f"{category}_{i:02d}.png"
            cv2.imwrite(str(args.out / name), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
            rows.append({"file": name, "category": category, "kind": "rgba",
                         "source": f"tools/make_unseen_occluders.py --seed {args.seed}", "licence": "CC0"})
    with open(args.out / "occluders.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "category", "kind", "source", "licence"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} occluders in {len(CATEGORIES)} categories to {args.out}")


if __name__ == "__main__":
    main()
