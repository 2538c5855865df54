"""Parameters, GFLOPs and CPU throughput of every registered model, with and without FROM.

    python benchmarks/model_speed.py [--models lresnet50e_ir mobilefacenet] [--threads 2] [--seconds 3]

Prints a Markdown table. "FROM / plain" rows give FROM's overhead as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fromface.models import FROM, create_model, list_models
from fromface.occlusion import num_patterns
from fromface.training.loss import FromLoss


def gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Forward GFLOPs per image (multiply-add = 2 FLOPs), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, *size))
    return counter.get_total_flops() / 1e9


def rate(step, batch: int, seconds: float, min_iters: int = 2) -> float:
    """Median images/s over repeated calls of ``step`` after one warm-up call."""
    for _ in range(3):  # first calls pick kernels and allocate
        step()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def measure(name: str, seconds: float) -> dict:
    torch.manual_seed(0)
    model = create_model(name)
    size = model.preprocess.size
    row = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    model.eval()
    row["gflops"] = gflops(model, size)
    with torch.no_grad():
        for batch in (1, 32):
            x = torch.randn(batch, 3, *size)
            row[f"fwd_b{batch}"] = rate(lambda x=x: model(x), batch, seconds)
    model.train()
    loss_fn = FromLoss(model.embedding_dim, num_classes=1000)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, *size), torch.randint(0, 1000, (32,))
    patterns = torch.randint(0, num_patterns(model.grid), (32,)) if isinstance(model, FROM) else None

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y, patterns)["total"].backward()
        opt.step()

    row["train_b32"] = rate(train_step, 32, seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="plain model names (their from_ variants are added)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [n for n in list_models() if f"from_{n}" in list_models()]
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} intra-op threads\n")
    cols = ["params_m", "gflops", "fwd_b1", "fwd_b32", "train_b32"]
    print("| model | params (M) | GFLOPs | fwd img/s b1 | fwd img/s b32 | train img/s b32 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        plain, wrapped = measure(name, args.seconds), measure(f"from_{name}", args.seconds)
        for row in (plain, wrapped):
            print(f"| {row['model']} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |", flush=True)
        ratio = {c: wrapped[c] / plain[c] for c in cols}
        print(f"| FROM / plain ({name}) | " + " | ".join(f"x{ratio[c]:.2f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
