"""Can masking SFace's last (7x7) map, with its head frozen, undo an occlusion? Test with the TRUE mask.

    python tools/oracle_mask_check.py [--pack out/celeba-arcface112] [--occluders ../shared/data/occluders]

Occludes 120 packed CelebA crops (preset "face"), then compares each clean embedding with the
occluded one: unmasked, and with the true occlusion mask pooled to 7x7 and thresholded (cells kept
when more than `thr` of them is visible), the dropped cells set to zero or to the head's per-channel
mean. If neither beats "unmasked", no learned mask on that map can help while the head stays frozen.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from fromface.faces.alignment import get_template
from fromface.models import create_model
from fromface.occlusion import OccluderLibrary, Synthesizer, rng_for
from fromface.training.data import to_tensor
from fromface.training.pack import PackedFaces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default="out/celeba-arcface112")
    parser.add_argument("--occluders", default="../shared/data/occluders")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = create_model("sface_net_face").eval()
    p = model.preprocess
    faces = PackedFaces(args.pack)
    synth = Synthesizer(OccluderLibrary.from_folder(args.occluders), preset="face")
    landmarks = get_template("arcface112").points
    clean, occluded, masks = [], [], []
    for i in np.arange(0, len(faces), 40)[:120]:
        image = faces.image(int(i))
        result = synth.occlude(image, rng_for(5, int(i)), landmarks=landmarks)
        clean.append(to_tensor(image, p.mean, p.std))
        occluded.append(to_tensor(result.image, p.mean, p.std))
        masks.append(torch.from_numpy(result.mask.astype(np.float32)))
    clean, occluded = torch.stack(clean), torch.stack(occluded)
    visible = 1 - F.adaptive_avg_pool2d(torch.stack(masks)[:, None], 7)
    with torch.no_grad():
        reference = F.normalize(model.head(model.backbone(clean)[-1]))
        last = model.backbone(occluded)[-1]
        mean = model.head.norm_in.running_mean.view(1, -1, 1, 1)

        def cos(feature_map: torch.Tensor) -> float:
            return float((reference * F.normalize(model.head(feature_map))).sum(1).mean())

        print("| cells kept when visible > | unmasked | true mask, zero fill | true mask, mean fill |")
        print("|---|---|---|---|")
        for thr in (0.5, 0.8, 0.95):
            keep = (visible > thr).float()
            print(f"| {thr} | {cos(last):.3f} | {cos(last * keep):.3f} | {cos(last * keep + mean * (1 - keep)):.3f} |")
        other = float((reference * reference.roll(1, 0)).sum(1).mean())
        print(f"\nmean cosine of clean embeddings of different images: {other:.3f}")


if __name__ == "__main__":
    main()
