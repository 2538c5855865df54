"""Training throughput of a config on this machine: images/s through the real trainer (data + step).

A synthetic pack of random faces at the model's input size stands in for the dataset (so only decoding
is skipped; flip, occlusion and pattern labelling run as in training), then the trainer's own loader
and ``train_step`` are timed. Prints one JSON line per config and a markdown row.

    python benchmarks/train_speed.py configs/paper/from_lresnet50e_ir.yaml --batch 8 --steps 4
    python benchmarks/train_speed.py configs/tiny_cpu.yaml --batch 8 --steps 4 -- optim.groups='[...]'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fromface.models import create_model, get_spec
from fromface.training.config import load_config
from fromface.training.loss import FromLoss
from fromface.training.pack import pack_folder
from fromface.training.trainer import Trainer

OCCLUDERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "occluders"


def synthetic_pack(folder: Path, size: tuple[int, int], identities: int, per_id: int) -> Path:
    """An identity folder of smooth random faces, packed at ``size`` (no alignment needed)."""
    rng = np.random.default_rng(0)
    src = folder / "faces"
    for i in range(identities):
        base = cv2.resize(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8), (size[1], size[0]))
        (src / f"id{i:04d}").mkdir(parents=True)
        for j in range(per_id):
            img = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(src / f"id{i:04d}" / f"{j}.png"), img)
    return pack_folder(src, folder / "pack", size, progress=False)


def train_flops(config: str, overrides: list[str], batch: int = 2) -> dict:
    """FLOPs of one forward and of one training step (forward + loss + backward) per image, counted by torch."""
    cfg = load_config(config, overrides)
    model = create_model(cfg.model.name, **cfg.model.kwargs).train()
    # the margin and pattern terms only (what a training step of the paper's recipe computes), 1000 identities
    loss = FromLoss(model.embedding_dim, 1000, margin=cfg.loss.margin, scale=cfg.loss.scale,
                    margin_value=cfg.loss.margin_value, pattern_weight=cfg.loss.pattern_weight)
    h, w = model.preprocess.size
    x = torch.randn(batch, 3, h, w)
    labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as fwd:
        model.eval()(x)
    model.train()
    with FlopCounterMode(display=False) as step:
        loss(model(x), labels, labels)["total"].backward()
    return {"model": cfg.model.name, "input": [h, w],
            "forward_gflops_per_image": round(fwd.get_total_flops() / batch / 1e9, 2),
            "train_step_gflops_per_image": round(step.get_total_flops() / batch / 1e9, 2)}


def measure(config: str, overrides: list[str], batch: int, steps: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    base = load_config(config, overrides)
    size = get_spec(base.model.name).preprocess.size
    identities = max(8, (batch * (steps + warmup + 1)) // 4 + 1)
    with tempfile.TemporaryDirectory() as tmp:
        pack = synthetic_pack(Path(tmp), size, identities, 4)
        occ = base.occlusion.occluders
        occ = str(OCCLUDERS) if occ and not Path(occ).is_dir() and OCCLUDERS.is_dir() else occ
        occ = occ if occ and Path(occ).is_dir() else None
        cfg = load_config(config, overrides + [
            f"data.train={pack}", "data.format=packed", f"data.batch_size={batch}", "data.val_identities=0",
            "data.num_workers=0", "model.init=null", f"output_dir={tmp}/run", "eval.select=val_acc",
            f"occlusion.occluders={occ if occ else 'null'}", f"threads={threads}", "log.tensorboard=false"])
        trainer = Trainer(cfg, progress=False)
        trainer.set_train_mode()
        loader = iter(trainer.loader(0, 0))
        data_times, step_times = [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch_data = next(loader)
            t1 = time.perf_counter()
            trainer.train_step(batch_data)
            t2 = time.perf_counter()
            if i >= warmup:
                data_times.append(t1 - t0)
                step_times.append(t2 - t1)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
    data, step = statistics.median(data_times), statistics.median(step_times)
    return {
        "config": config, "overrides": overrides, "model": cfg.model.name, "input": list(size), "batch": batch,
        "threads": threads, "steps_timed": steps, "occluders": occ or "random boxes" if cfg.occlusion.enabled
        else "off", "params_total_M": round(total / 1e6, 2), "params_trained_M": round(trainable / 1e6, 2),
        "median_data_s": round(data, 4), "median_step_s": round(step, 4),
        "images_per_s": round(batch / (data + step), 2), "images_per_s_compute_only": round(batch / step, 2),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "device": str(trainer.device), "cores": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="only count FLOPs per image (forward, training step)")
    args = parser.parse_args()
    if args.flops:
        print(json.dumps(train_flops(args.config, args.overrides)))
        return
    r = measure(args.config, args.overrides, args.batch, args.steps, args.warmup, args.threads)
    print(json.dumps(r))
    print(f"| {r['config']} {' '.join(r['overrides'])} | {r['model']} {r['input'][0]}x{r['input'][1]} | {r['batch']} "
          f"| {r['params_trained_M']}/{r['params_total_M']} M | {r['images_per_s']} | "
          f"{r['images_per_s_compute_only']} |")


if __name__ == "__main__":
    main()
