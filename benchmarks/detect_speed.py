"""Detect + align throughput on 250x250 photos (LFW), the way ``fromface align`` runs: N worker threads sharing
one FaceAligner, OpenCV single-threaded inside each worker.

    .venv/bin/python benchmarks/detect_speed.py [--images ../shared/data/lfw/images] [--n 400] [--threads 2]

Prints images/s for detect+align on decoded arrays and for decode+detect+align from files, median of --repeats,
as wall-clock rates and as images per CPU-second (less sensitive to other users of a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "images"


def _rate(fn, items: list, threads: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return len(items) / (time.perf_counter() - start), len(items) / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of 250x250 photos")
    parser.add_argument("--n", type=int, default=400, help="number of photos")
    parser.add_argument("--threads", type=int, default=2, help="worker threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--template", default="arcface112")
    args = parser.parse_args(argv)

    import cv2
    import numpy as np

    from fromface.data.images import load_image
    from fromface.faces import FaceAligner

    paths = sorted(args.images.rglob("*.jpg"))[: args.n] if args.images.is_dir() else []
    if not paths:
        print(f"no .jpg photos under {args.images}; pass --images", file=sys.stderr)
        return 2
    cv2.setNumThreads(1 if args.threads > 1 else 2)
    aligner = FaceAligner(args.template, select="central", fallback=True)
    arrays = [load_image(p) for p in paths]
    sizes = {a.shape[:2] for a in arrays}
    aligner.align_array(arrays[0])  # warm up: creates the OpenCV network
    load = os.getloadavg()[0]
    detect_align, end_to_end = [], []
    for _ in range(args.repeats):
        detect_align.append(_rate(aligner.align_array, arrays, args.threads))
        end_to_end.append(_rate(aligner.align, paths, args.threads))
    methods = [aligner.align_array(a)[0].method for a in arrays]
    print(f"{len(paths)} photos of size(s) {sorted(sizes)}, {args.threads} threads, template {args.template}, "
          f"opencv {cv2.__version__}, numpy {np.__version__}")
    print(f"load average before: {load:.2f} (machine has {os.cpu_count()} cores)")
    for label, runs in (("detect+align", detect_align), ("decode+detect+align", end_to_end)):
        wall = statistics.median(r[0] for r in runs)
        per_cpu = statistics.median(r[1] for r in runs)
        print(f"{label:20s} {wall:7.1f} img/s wall (runs: " + ", ".join(f"{r[0]:.1f}" for r in runs)
              + f"); {per_cpu:.1f} img per CPU-second, i.e. {per_cpu * args.threads:.1f} img/s if "
              f"{args.threads} cores were free")
    print("methods: " + ", ".join(f"{m} {methods.count(m)}" for m in ("detected", "retry", "fallback")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
