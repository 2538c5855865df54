"""Synthesised training samples per second on ONE core, beside one core's training step.

    python benchmarks/occlusion_speed.py [--images ../shared/data/celeba299] [--occluders ../shared/data/occluders]
                                         [--model from_mobilefacenet] [--seconds 3]

One sample = decode an aligned-crop JPEG from memory, occlude it (preset), label its K=5 pattern and
normalise it to a tensor -- what the trainer's data loader does per item. The crops are CelebA photos
resized to the model's input size and JPEG-encoded once in memory, so disk speed is not measured.
The training step (forward + FROM loss + backward + SGD, batch 32) of the model runs on the same
single thread, so "ratio" says how many data-loading cores one training core needs. Times are CPU
time of this process (``time.process_time``), not wall time: on a shared machine wall time mostly
measures the neighbours.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy/torch load their thread pools

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fromface.faces.alignment import get_template  # noqa: E402
from fromface.models import create_model  # noqa: E402
from fromface.occlusion.occluders import OccluderLibrary  # noqa: E402
from fromface.occlusion.patterns import num_patterns  # noqa: E402
from fromface.occlusion.synth import Synthesizer, rng_for  # noqa: E402
from fromface.training.loss import FromLoss  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def encoded_crops(folder: Path, size: tuple[int, int], count: int) -> list[bytes]:
    """JPEG bytes of ``count`` CelebA images cut to the model's input size (centre region)."""
    files = sorted(folder.glob("*/*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no images under {folder}")
    out = []
    for f in files:
        img = cv2.imread(str(f))
        h, w = img.shape[:2]
        img = img[h // 4: 3 * h // 4, w // 4: 3 * w // 4]  # the face is the middle half of these crops
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return out


def synth_rate(synth: Synthesizer, blobs: list[bytes], landmarks, preprocess, seconds: float) -> float:
    """Median samples/s over blocks of 50 samples."""
    def block(start: int) -> None:
        for i in range(start, start + 50):
            bgr = cv2.imdecode(np.frombuffer(blobs[i % len(blobs)], np.uint8), cv2.IMREAD_COLOR)
            res = synth.occlude(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rng_for(0, i), landmarks=landmarks, grid=5)
            preprocess.to_input(res.image)

    block(0)
    times, start, i = [], time.process_time(), 50
    while len(times) < 3 or time.process_time() - start < seconds:
        t0 = time.process_time()
        block(i)
        times.append(time.process_time() - t0)
        i += 50
    return 50 / statistics.median(times)


def train_rate(name: str, seconds: float) -> float:
    torch.manual_seed(0)
    model = create_model(name).train()
    loss_fn = FromLoss(model.embedding_dim, num_classes=1000)
    opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, *model.preprocess.size), torch.randint(0, 1000, (32,))
    patterns = torch.randint(0, num_patterns(5), (32,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y, patterns)["total"].backward()
        opt.step()

    step()
    times, start = [], time.process_time()
    while len(times) < 2 or time.process_time() - start < seconds:
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return 32 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED / "celeba299")
    parser.add_argument("--occluders", type=Path, default=SHARED / "occluders")
    parser.add_argument("--model", default="from_mobilefacenet", help="model whose training step is the yardstick")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    preprocess = create_model(args.model).preprocess
    blobs = encoded_crops(args.images, preprocess.size, 200)
    landmarks = get_template(preprocess.template).points_at(preprocess.size)
    library = OccluderLibrary.from_folder(args.occluders)
    print(f"1 thread, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"cv2 {cv2.__version__}; input {preprocess.size[0]}x{preprocess.size[1]} ({args.model})\n")
    print("| what | samples per CPU-second (1 thread) |")
    print("|---|---|")
    rates = {}
    for preset in ("paper", "face-train", "face"):
        rates[preset] = synth_rate(Synthesizer(library, preset=preset), blobs, landmarks, preprocess, args.seconds)
        print(f"| decode + occlude ({preset}) + label K=5 + tensor | {rates[preset]:.0f} |", flush=True)
    train = train_rate(args.model, args.seconds)
    print(f"| training step {args.model}, batch 32 | {train:.1f} |")
    worst = min(rates.values())
    print(f"\nslowest synthesis / training step = x{worst / train:.0f} (one data core feeds that many training cores)")


if __name__ == "__main__":
    main()
