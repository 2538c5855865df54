"""Embedding speed of the PyTorch ports vs their originals on the same crops (images/s, embed only).

    .venv/bin/python benchmarks/port_speed.py --threads 2 --seconds 5

SFace: our ``sface_net_face`` vs ``cv2.FaceRecognizerSF.feature`` (OpenCV's API embeds one crop per
call, so its "batch 32" is 32 calls). dlib: our ``dlib_resnet_face`` vs
``dlib.face_recognition_model_v1.compute_face_descriptor`` on a list of chips (dlib batches it).
Crops are seeded random pixels of the right size: the cost of these networks does not depend on the
content. Timings are wall-clock medians over repeated runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np


def images_per_second(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Median throughput of ``fn`` (which embeds ``batch`` images) over runs filling ``seconds``."""
    fn()  # warm-up: first-call allocations, lazy initialisation
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def torch_runner(name: str, crops: np.ndarray) -> Callable[[], object]:
    import torch

    from fromface.models import create_model
    from fromface.models.weights import crops_to_tensor

    model = create_model(name).eval()
    pre = model.preprocess

    def run():
        with torch.inference_mode():
            return model(crops_to_tensor(crops, pre.mean, pre.std, pre.channel_order)).embedding

    return run


def sface_runner(crops_rgb: np.ndarray) -> Callable[[], object]:
    import cv2

    from fromface.models.sface import sface_onnx_path

    rec = cv2.FaceRecognizerSF.create(str(sface_onnx_path()), "")
    crops_bgr = [np.ascontiguousarray(c[..., ::-1]) for c in crops_rgb]
    return lambda: [rec.feature(c) for c in crops_bgr]


def dlib_runner(chips: np.ndarray) -> Callable[[], object]:
    import dlib

    from fromface.models.dlib_resnet import dlib_dat_path

    rec = dlib.face_recognition_model_v1(str(dlib_dat_path()))
    batch = [np.ascontiguousarray(c) for c in chips]
    if len(batch) == 1:
        return lambda: rec.compute_face_descriptor(batch[0])
    return lambda: rec.compute_face_descriptor(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="images/s of each port vs its original")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--only", choices=["sface", "dlib"], help="benchmark one pair only")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # dlib's BLAS, if it has one
        os.environ.setdefault(var, str(args.threads))

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    pairs = {
        "sface": (112, "sface_net_face", sface_runner, "cv2.FaceRecognizerSF"),
        "dlib": (150, "dlib_resnet_face", dlib_runner, "dlib compute_face_descriptor"),
    }
    print(f"threads={args.threads} torch={torch.__version__} opencv={cv2.__version__}")
    print(f"{'pair':<6} {'batch':>5} {'port img/s':>11} {'original img/s':>15} {'port/original':>14}  original")
    for key, (size, port, original, label) in pairs.items():
        if args.only and key != args.only:
            continue
        for batch in args.batches:
            crops = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
            ours = images_per_second(torch_runner(port, crops), batch, args.seconds)
            theirs = images_per_second(original(crops), batch, args.seconds)
            print(f"{key:<6} {batch:>5} {ours:>11.1f} {theirs:>15.1f} {ours / theirs:>14.2f}  {label}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
