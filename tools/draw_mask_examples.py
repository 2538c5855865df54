"""Draw docs/img/mask_examples.png: what a FROM model predicts for clean and occluded faces.

    python tools/draw_mask_examples.py [--model from_sface_net:celeba1140-photometric] \\
        [--out docs/img/mask_examples.png]

Top row: the aligned crop the model sees. The example photo is occluded by fromface's synthesiser (one
occluder category each, seed fixed) and then detected and aligned as the product does, with the model's
align head when it has one. Bottom row: the predicted soft mask over its feature
map, drawn as a heat map (no tint: mask >= 0.95; full red: mask <= 0.7, the feature suppressed), and the
predicted occlusion pattern (green box;
pattern 0 = "no occlusion" draws none), with the mask's smallest value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from fromface.data.images import load_image
from fromface.faces.aligner import FaceAligner
from fromface.models import create_model
from fromface.models.from_net import model_refiner
from fromface.occlusion.patterns import pattern_boxes
from fromface.training.data import SynthesizerOccluder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TILE = 160
COLUMNS = [("clean", None), ("mask", "mouth_mask"), ("sunglasses", "sunglasses"), ("cup", "cup"),
           ("phone", "phone"), ("hand", "hand")]


def _tile(img: np.ndarray, text: str) -> np.ndarray:
    tile = cv2.resize(img, (TILE, TILE), interpolation=cv2.INTER_LINEAR)
    cv2.rectangle(tile, (0, TILE - 18), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(tile, text, (3, TILE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _overlay(crop: np.ndarray, mask: np.ndarray, pattern: int, grid: int) -> np.ndarray:
    h, w = crop.shape[:2]
    suppressed = 1.0 - cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    heat = np.zeros_like(crop)
    heat[..., 0] = 255
    # one fixed scale for every tile: no tint at mask >= 0.95, full tint at mask <= 0.7
    alpha = np.clip((suppressed - 0.05) / 0.25, 0, 1)[..., None] * 0.7
    view = (crop * (1 - alpha) + heat * alpha).astype(np.uint8)
    if pattern > 0:
        top, left, bottom, right = pattern_boxes(h, w, grid)[pattern]
        cv2.rectangle(view, (int(left), int(top)), (int(right) - 1, int(bottom) - 1), (80, 255, 80), 2)
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="from_sface_net:celeba1140-photometric")
    parser.add_argument("--photo", type=Path, default=EXAMPLES / "person_a_1.jpg")
    parser.add_argument("--occluders", type=Path, default=SHARED / "occluders")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/img/mask_examples.png"))
    args = parser.parse_args()
    model = create_model(args.model).eval()
    p = model.preprocess
    photo = load_image(args.photo)
    face = FaceAligner(p.template).align_array(photo)[0]
    aligner = FaceAligner(p.template, refine=model_refiner(model, p))
    top, bottom = [], []
    for name, category in COLUMNS:
        occluded = photo
        if category is not None:
            synth = SynthesizerOccluder(str(args.occluders), size=p.size, categories=[category], preset="face",
                                        template=p.template).synth
            occluded = synth.occlude(photo, np.random.default_rng([args.seed, len(top)]), face_box=face.box,
                                     landmarks=face.landmarks).image
        image = aligner.align_array(occluded)[0].crop
        with torch.no_grad():
            out = model(torch.from_numpy(p.to_input(image)))
        mask = out.mask[0].mean(0).numpy()
        pattern = int(out.pattern_logits[0].argmax())
        top.append(_tile(image, name))
        bottom.append(_tile(_overlay(image, mask, pattern, model.grid), f"pattern {pattern}, min {mask.min():.2f}"))
    grid = np.vstack([np.hstack(top), np.hstack(bottom)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]}) with {args.model}")


if __name__ == "__main__":
    main()
