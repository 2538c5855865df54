"""Score any model on a training config's held-out validation pairs, as the trainer does at each epoch.

    python tools/validate_model.py configs/from_sface_net.celeba299-realign.yaml sface_net_face [CHECKPOINT.pt ...]

Gives the trunk-alone row of an ablation on exactly the pairs (and occluders) the trained runs were
selected on. Model arguments are registered names (``name`` or ``name:tag``) or trainer checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fromface.models import create_model
from fromface.training.checkpoint import load_model
from fromface.training.config import load_config
from fromface.training.data import make_pairs, split_by_identity
from fromface.training.pack import open_faces
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
        model = load_model(spec) if Path(spec).suffix == ".pt" else create_model(spec)
        p = model.preprocess
        source = open_faces(cfg.data.train, cfg.data.format, p.size, p.template, cfg.data.aligned,
                            cfg.data.align_fallback, cfg.data.cache_dir or str(Path(cfg.output_dir) / "cache"),
                            cfg.data.min_images, False)
        split = split_by_identity(source.labels, cfg.data.val_identities, cfg.seed)
        pairs = make_pairs(split.val_rows, split.val_labels, cfg.data.val_pairs, cfg.seed)
        occluder = build_occluder(cfg, p, getattr(source, "context", 1.0))
        m = validate(model, source, pairs, p, torch.device("cpu"), cfg.eval.batch_size, occluder, cfg.seed)
        print(f"| {spec} | {m['val_acc']:.4f} | {m['val_occ_acc']:.4f} | {m['val_mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
