"""Score any model on a training config's held-out validation pairs, as the trainer does at each epoch.

    python tools/validate_model.py configs/from_sface_net.celeba299-realign.yaml sface_net_face [CHECKPOINT.pt ...]

Gives the trunk-alone row of an ablation on exactly the pairs (and occluders) the trained runs were
selected on. Model arguments are registered names (``name`` or ``name:tag``) or trainer checkpoints.
"""

from __future__ import annotations

import argparse

import torch

from fromface.inference.face_model import load_face_model
from fromface.training.config import load_config
from fromface.training.data import make_pairs, split_by_identity
from fromface.training.pack import open_training_faces
from fromface.training.task import build_occluder
from fromface.training.validate import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    print("| model | val_acc | val_occ_acc | val_mean |\n|---|---|---|---|")
    for spec in args.models:
        model = load_face_model(spec).torch_model  # a name, name:tag or checkpoint, as FaceRecognizer loads it
        p = model.preprocess
        source = open_training_faces(cfg, p, progress=False)
        split = split_by_identity(source.labels, cfg.data.val_identities, cfg.seed)
        pairs = make_pairs(split.val_rows, split.val_labels, cfg.data.val_pairs, cfg.seed)
        occluder = build_occluder(cfg, p, getattr(source, "context", 1.0), varied=False)
        m = validate(model, source, pairs, preprocess=p, device=torch.device("cpu"), batch_size=cfg.eval.batch_size,
                     occluder=occluder, seed=cfg.seed)
        print(f"| {spec} | {m['val_acc']:.4f} | {m['val_occ_acc']:.4f} | {m['val_mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
