"""Draw docs/img/occluded_examples.png: LFW photos under the ``face`` and ``paper2`` presets.

    python tools/draw_occluded_examples.py [--lfw ../shared/data/lfw] [--occluders ../shared/data/occluders]
                                           [--seed 100] [--out docs/img/occluded_examples.png]

Rows: the original photo with its YuNet box; ``face`` preset; its occlusion mask with the K=5 pattern
chosen for it among 226 (green rectangle, in face-box coordinates); ``paper2`` preset. Columns are the second
images of the first pairs, one per category, with the seeds ``occlude-pairs`` gives them, so the
``face`` row shows exactly the pixels of ``out/occ-lfw`` (seed 100).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fromface.cli.occlude import _work_list
from fromface.data.images import load_image
from fromface.data.pairs import read_pairs
from fromface.faces.aligner import FaceAligner, fallback_landmarks
from fromface.occlusion.occluders import OccluderLibrary
from fromface.occlusion.synth import Synthesizer, rng_for

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TILE = 128


def _tile(img: np.ndarray, text: str) -> np.ndarray:
    tile = cv2.resize(img, (TILE, TILE), interpolation=cv2.INTER_AREA)
    cv2.rectangle(tile, (0, TILE - 16), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(tile, text, (3, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.34, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _mask_view(res, synth: Synthesizer, frame) -> np.ndarray:
    view = (res.image // 3).copy()
    view[res.mask] = (255, 80, 80)
    x0, y0, x1, y1 = frame
    cv2.rectangle(view, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    h, w = synth.label_size
    top, left, bottom, right = synth.vocabulary(h, w, 5).boxes[res.pattern_label]
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    cv2.rectangle(view, (int(x0 + left * sx), int(y0 + top * sy)), (int(x0 + right * sx) - 1,
                  int(y0 + bottom * sy) - 1), (80, 255, 80), 2)
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", type=Path, default=SHARED / "lfw")
    parser.add_argument("--occluders", type=Path, default=SHARED / "occluders")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("docs/img/occluded_examples.png"))
    args = parser.parse_args()
    library = OccluderLibrary.from_folder(args.occluders)
    face = Synthesizer(library, preset="face", grid=5)
    paper = Synthesizer(library, preset="paper2", grid=5)
    aligner = FaceAligner("arcface112", select="central")
    pairs = read_pairs(args.lfw / "pairs.txt", root=args.lfw / "images")
    seen, columns = set(), []
    for index, path in enumerate(_work_list(pairs, both=False)[:400]):  # same seeds as occlude-pairs
        img = load_image(path)
        faces, _ = aligner.detect(img)
        chosen = aligner.choose(faces, *img.shape[:2])
        box, lms = (chosen[0].box, chosen[0].landmarks) if chosen else fallback_landmarks(*img.shape[:2])
        res = face.occlude(img, rng_for(args.seed, index), face_box=box, landmarks=lms)
        if res.record["category"] in seen:
            continue
        seen.add(res.record["category"])
        orig = img.copy()
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(orig, (x0, y0), (x1, y1), (80, 255, 80), 2)
        frame = res.record["frame"]
        alt = paper.occlude(img, rng_for(args.seed, index), face_box=box, landmarks=lms)
        columns.append([_tile(orig, path.stem[:22]),
                        _tile(res.image, f"{res.record['category']} {res.covered_fraction:.0%}"),
                        _tile(_mask_view(res, face, frame), f"mask, pattern {res.pattern_label}"),
                        _tile(alt.image, f"paper2: {alt.covered_fraction:.0%}")])
        if len(columns) == len(library.categories):
            break
    grid = np.vstack([np.hstack([c[r] for c in columns]) for r in range(4)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 256-colour palette: a third of the bytes of a full-colour PNG, and plenty for a documentation figure
    Image.fromarray(grid).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]}, {len(columns)} categories)")


if __name__ == "__main__":
    main()
