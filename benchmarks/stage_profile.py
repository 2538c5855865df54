"""Where the time of one verification goes: the default path stage by stage, in milliseconds per image.

Each stage is timed by wrapping the function that does it, exclusive of the other wrapped stages it calls:
decode (``load_image``), detect (``FaceAligner.detect``, YuNet and its retries), warp (``warp_face``: the first
crop and, with the align head, the re-crop), head (the align head's shift, ``aligner.refine``), embed (crops to
network input, the network, normalisation and the occlusion estimate: ``FaceRecognizer._embed_crops``), and the
rest of ``verify`` (the comparison, thresholds, bookkeeping). Pairs come from LFW's pairs.txt.

    .venv/bin/python benchmarks/stage_profile.py --pairs 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_speed import DATA, lfw_pairs  # noqa: E402

STAGES = ("decode", "detect", "warp", "head", "embed", "compare")


class StageClock:
    """Exclusive time per stage: a wrapped call's time minus that of the wrapped calls it makes."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # time spent in nested wrapped calls, one entry per open call

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                nested = self._stack.pop()
                self.total[stage] += spent - nested
                if self._stack:
                    self._stack[-1] += spent
        return timed


def instrument(rec, clock: StageClock) -> None:
    """Wrap the stage functions of one recognizer (its module globals, its aligner and its methods)."""
    import fromface.faces.aligner as aligner_module
    import fromface.inference.recognizer as recognizer_module

    recognizer_module.load_image = clock.wrap("decode", recognizer_module.load_image)
    aligner_module.warp_face = clock.wrap("warp", aligner_module.warp_face)
    rec.aligner.detect = clock.wrap("detect", rec.aligner.detect)
    if rec.aligner.refine is not None:
        rec.aligner.refine = clock.wrap("head", rec.aligner.refine)
    rec._embed_crops = clock.wrap("embed", rec._embed_crops)
    rec.verify = clock.wrap("compare", rec.verify)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=None, help="FaceRecognizer backend (default: the library's default)")
    parser.add_argument("--model", default=None, help="fromface model (default: the default model)")
    args = parser.parse_args(argv)
    if not (DATA / "pairs.txt").is_file():
        print(f"needs LFW in {DATA}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from fromface.inference.recognizer import FaceRecognizer

    options = {} if args.backend is None else {"backend": args.backend}
    rec = FaceRecognizer(args.model, select="central", fallback=True, **options)
    pairs = lfw_pairs(args.pairs)
    rec.verify(*pairs[0])  # warm-up: lazy loading and first-call allocation are not a stage
    clock = StageClock()
    instrument(rec, clock)
    start = time.perf_counter()
    for a, b in pairs:
        rec.verify(a, b)
    wall = time.perf_counter() - start
    images = 2 * len(pairs)
    print(f"\n{rec.model_name} ({rec.backend}), {len(pairs)} LFW pairs ({images} images), {args.threads} threads; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| stage | ms per image | share |")
    print("|---|---|---|")
    for stage in STAGES:
        ms = 1000 * clock.total[stage] / images
        print(f"| {stage} | {ms:.1f} | {100 * clock.total[stage] / wall:.0f}% |")
    print(f"| **total** | **{1000 * wall / images:.1f}** ({images / wall:.1f} images/s) | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
