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
from pathlib import Path

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

    model = create_model(name).eval()
    pre = model.preprocess

    def run():
        with torch.inference_mode():
            return model(torch.from_numpy(pre.to_input(crops))).embedding

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


def lfw_photos(root: Path, count: int) -> list[Path]:
    """One photo from each of ``count`` identities spread over LFW (the parity tests use the same rule)."""
    people = sorted(p for p in root.iterdir() if p.is_dir())
    photos = [next(iter(sorted(p.glob("*.jpg"))), None) for p in people[:: max(1, len(people) // count)]]
    return [p for p in photos if p is not None][:count]


def parity_crops(root: Path, count: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(RGB crops, the original's embeddings) per pair: OpenCV's YuNet + alignCrop for SFace, dlib's
    5-point predictor + get_face_chip(150, 0.25) for dlib (fixed central box: LFW faces are centred)."""
    import cv2
    import dlib

    from fromface.data.images import load_image
    from fromface.models.dlib_resnet import dlib_dat_path
    from fromface.models.sface import sface_onnx_path

    det = cv2.FaceDetectorYN.create(str(sface_onnx_path().with_name("face_detection_yunet_2023mar_int8bq.onnx")),
                                    "", (320, 320), 0.6, 0.3)
    rec = cv2.FaceRecognizerSF.create(str(sface_onnx_path()), "")
    predictor = dlib.shape_predictor(str(dlib_dat_path().with_name("shape_predictor_5_face_landmarks.dat")))
    dlib_rec = dlib.face_recognition_model_v1(str(dlib_dat_path()))
    out: dict[str, tuple[list, list]] = {"sface": ([], []), "dlib": ([], [])}
    for path in lfw_photos(root, count):
        rgb = load_image(path)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        det.setInputSize((bgr.shape[1], bgr.shape[0]))
        faces = det.detect(bgr)[1]
        if faces is not None:
            crop = rec.alignCrop(bgr, faces[0])
            out["sface"][0].append(crop[..., ::-1])
            out["sface"][1].append(rec.feature(crop).ravel().copy())
        h, w = rgb.shape[:2]
        shape = predictor(rgb, dlib.rectangle(int(w * 0.3), int(h * 0.3), int(w * 0.7), int(h * 0.7)))
        chip = dlib.get_face_chip(rgb, shape, size=150, padding=0.25)
        out["dlib"][0].append(chip)
        out["dlib"][1].append(np.array(dlib_rec.compute_face_descriptor(chip)))
    return {k: (np.stack(c), np.stack(e)) for k, (c, e) in out.items()}


def report_parity(root: Path, count: int) -> None:
    ports = {"sface": "sface_net_face", "dlib": "dlib_resnet_face"}
    for key, (crops, ref) in parity_crops(root, count).items():
        ours = np.concatenate([torch_runner(ports[key], crops[i: i + 16])().numpy() for i in range(0, len(crops), 16)])
        cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"parity {key:<6} n={len(cos)}  cosine min {cos.min():.7f} mean {cos.mean():.7f}  "
              f"max |diff| {np.abs(ours - ref).max():.2e} (embedding norm ~{np.linalg.norm(ref, axis=1).mean():.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="images/s of each port vs its original")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--only", choices=["sface", "dlib"], help="benchmark one pair only")
    parser.add_argument("--parity", type=int, default=0, metavar="N",
                        help="instead of timing, compare embeddings with the originals on N LFW photos")
    parser.add_argument("--lfw", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
                        / "images", help="LFW images folder for --parity")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # dlib's BLAS, if it has one
        os.environ.setdefault(var, str(args.threads))

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.parity:
        report_parity(args.lfw, args.parity)
        return 0
    rng = np.random.default_rng(0)
    pairs = {
        "sface": (112, "sface_net_face", sface_runner, "cv2.FaceRecognizerSF"),
        "dlib": (150, "dlib_resnet_face", dlib_runner, "dlib compute_face_descriptor"),
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"threads={args.threads} torch={torch.__version__} opencv={cv2.__version__} cpus={os.cpu_count()} "
          f"load average (1/5/15 min)={load}")
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
