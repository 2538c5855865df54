"""Speed of ``fromface watch``: frames/s at 640x480 for ``--every 1`` and ``--every 3`` (and any other N given).

The video is built from LFW photos: two faces on screen in every frame, one of them wearing a mouth mask from
fromface's synthesiser, both moving; both people are enrolled from other photos. Each setting runs the real command
in a fresh process, writing the annotated video and the tracks CSV, and the number is the one its summary prints
(frames read / seconds of the loop: decode, detect, align, embed, track, identify, draw, encode; the model load is
not counted). Settings take turns ``--repeat`` times and the median is shown, since the machine may be shared.

    .venv/bin/python benchmarks/watch_speed.py --frames 60 --every 1 3 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LFW = DATA / "lfw" / "images"
SIZE, FPS = (640, 480), 10
MASKED, CLEAN = "David_Beckham", "Jean_Chretien"


def photo(name: str, number: int) -> Path:
    return LFW / name / f"{name}_{number:04d}.jpg"


def build(folder: Path, frames: int) -> tuple[Path, Path]:
    """The benchmark video (mp4v .mp4) and a gallery of both people; returns their paths."""
    from fromface import FaceRecognizer, Gallery
    from fromface.data.images import load_image
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer, rng_for

    rec = FaceRecognizer()
    image = load_image(photo(MASKED, 1))
    face = rec.embed(image)[0]
    masks = Synthesizer(OccluderLibrary.from_folder(DATA / "occluders", categories=["mouth_mask"]), "face",
                        coverage=(0.4, 0.45))
    masked = masks.occlude(image, rng_for(0, 1), face_box=face.box, landmarks=face.landmarks).image
    clean = load_image(photo(CLEAN, 2))
    background = np.repeat(np.linspace(90, 170, SIZE[1], dtype=np.uint8)[:, None, None], SIZE[0], 1).repeat(3, 2)
    video = folder / "scene.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    for k in range(frames):
        frame = background.copy()
        swing = int(20 * np.sin(k / 8.0))  # both walk to and fro, 20 px either way
        frame[100 + swing:350 + swing, 50 + swing:300 + swing] = masked
        frame[130:380, 370 - swing:620 - swing] = clean
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    gallery = folder / "gallery.db"
    with Gallery(gallery, recognizer=rec) as g:
        g.enroll(MASKED, [photo(MASKED, 9), photo(MASKED, 11)])
        g.enroll(CLEAN, [photo(CLEAN, 6), photo(CLEAN, 8)])
    return video, gallery


def run_watch(video: Path, gallery: Path, folder: Path, every: int, backend: str) -> tuple[float, list[str]]:
    """frames/s from the command's summary, and the identity of each track it found (a check the run was real)."""
    cmd = [sys.executable, "-m", "fromface.cli.main", "watch", str(video), "--db", str(gallery), "--every", str(every),
           "--backend", backend, "--out", str(folder / "annotated.mp4"), "--csv", str(folder / "tracks.csv"),
           "--force", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"watch failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    first = done.stdout.splitlines()[0]
    found = re.search(r"([\d.]+) frames/s", first)
    if found is None:
        raise SystemExit(f"no frames/s in the summary: {first}")
    return float(found.group(1)), re.findall(r"^  track \d+: (\S+)", done.stdout, re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="length of the video in frames (default 60)")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 3], help="values of --every (default 1 3)")
    parser.add_argument("--backend", nargs="+", default=["auto"], help="values of --backend (default auto)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, taking turns (default 1)")
    args = parser.parse_args()
    if not LFW.is_dir():
        raise SystemExit(f"needs LFW photos under {LFW}")
    with tempfile.TemporaryDirectory(prefix="watch-speed-") as tmp:
        folder = Path(tmp)
        video, gallery = build(folder, args.frames)
        settings = [(b, n) for b in args.backend for n in args.every]
        speeds: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
        tracks: dict[tuple[str, int], list[str]] = {}
        for _ in range(args.repeat):
            for backend, every in settings:
                fps, tracks[(backend, every)] = run_watch(video, gallery, folder, every, backend)
                speeds[(backend, every)].append(fps)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"fromface watch, {SIZE[0]}x{SIZE[1]}, {args.frames} frames, 2 faces a frame (one masked), annotated video "
          f"and CSV written; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average after: {load}")
    print()
    print("| backend | --every | frames/s (median) | runs | tracks found |")
    print("|---|---|---|---|---|")
    for backend, every in settings:
        runs = speeds[(backend, every)]
        print(f"| {backend} | {every} | {statistics.median(runs):.1f} | {', '.join(f'{v:.1f}' for v in runs)} | "
              f"{', '.join(tracks[(backend, every)])} |")


if __name__ == "__main__":
    main()
