"""``fromface align SRC DST``: detect and align every image in a folder tree, keeping its structure.

Writes one crop per image (or per face with ``--select all``), a CSV of per-image results and a summary of how
many faces were detected, retried, fell back or failed. A crop is named after its image (``person.jpg`` ->
``person.png``); images of one folder that share a name but not an extension keep it (``person_jpg.png``,
``person_png.png``), so no crop overwrites another. Re-running skips images already done with the same settings,
so an interrupted run resumes where it stopped. Exit status 0 when every image was aligned, 1 when any failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fromface.cli._messages import cli_wording
from fromface.data.images import IMAGE_EXTENSIONS, load_image
from fromface.errors import ConfigError, DataError, FromfaceError

CSV_NAME = "align_results.csv"
SETTINGS_NAME = "align_settings.json"
FIELDS = ["source", "status", "method", "score", "x1", "y1", "x2", "y2"] + [
    f"{p}{i}" for i in range(5) for p in ("lx", "ly")] + ["n_faces", "outputs", "error"]
STATUSES = ("detected", "retry", "fallback", "failed")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("align", help="detect and align all faces in a folder tree",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="folder of images (searched recursively)")
    p.add_argument("dst", type=Path, help="output folder; mirrors SRC's structure")
    p.add_argument("--template", default="arcface112", help="alignment template (default: arcface112)")
    p.add_argument("--select", default="largest", choices=["largest", "central", "all"],
                   help="which face when there are several (default: largest; use central for centred photos)")
    p.add_argument("--fallback", action="store_true",
                   help="centre-crop photos where no face is found (only for photos centred on one face)")
    p.add_argument("--workers", type=int, default=2, help="parallel workers (default: 2)")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="crop file format (default: png)")
    p.add_argument("--overwrite", action="store_true", help="redo every image, even those already done")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def find_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under root (relative paths, sorted), skipping anything inside ``exclude``."""
    exclude = exclude.resolve() if exclude is not None else None
    out = []
    for path in root.rglob("*"):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue
        out.append(path.relative_to(root))
    return sorted(out)


def output_bases(images: list[Path]) -> dict[Path, Path]:
    """Each image's crop name without extension: its own name, or name_ext when another image of the folder has
    the same name (person.jpg, person.png), with a counter as the last resort: no two images share an output."""
    plain = Counter(rel.with_suffix("") for rel in images)
    bases = {rel: rel.with_suffix("") if plain[rel.with_suffix("")] == 1 else
             rel.with_name(f"{rel.stem}_{rel.suffix[1:]}") for rel in images}
    taken: set[Path] = set()
    for rel in images:
        base, k = bases[rel], 2
        while base in taken:
            base, k = bases[rel].with_name(f"{bases[rel].name}_{k}"), k + 1
        bases[rel] = base
        taken.add(base)
    return bases


def _output_names(base: Path, n: int, select: str, fmt: str) -> list[Path]:
    if select != "all":
        return [base.with_name(f"{base.name}.{fmt}")]
    return [base.with_name(f"{base.name}_face{i}.{fmt}") for i in range(n)]


def _row(rel: Path, status: str, error: str = "") -> dict:
    row = dict.fromkeys(FIELDS, "")
    row.update(source=rel.as_posix(), status=status, n_faces=0, error=error)
    return row


def process_one(aligner, src: Path, dst: Path, rel: Path, fmt: str, base: Path | None = None) -> dict:
    """Align one image and save its crop(s); never raises for bad input, records the failure instead."""
    from PIL import Image

    try:
        image = load_image(src / rel)
        faces = aligner.align_array(image, str(src / rel))
    except FromfaceError as exc:

        return _row(rel, "failed", cli_wording(str(exc)))
    names = _output_names(base if base is not None else rel.with_suffix(""), len(faces), aligner.select, fmt)
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if fmt == "jpg" else {"compress_level": 1}
    for face, name in zip(faces, names):
        Image.fromarray(face.crop).save(dst / name, **options)
    first = faces[0]
    row = _row(rel, first.method)
    row.update(method=first.method, score=f"{first.score:.4f}", n_faces=len(faces),
               outputs=";".join(n.as_posix() for n in names))
    row.update({k: f"{v:.2f}" for k, v in zip(("x1", "y1", "x2", "y2"), first.box)})
    for i, (x, y) in enumerate(first.landmarks):
        row[f"lx{i}"], row[f"ly{i}"] = f"{x:.2f}", f"{y:.2f}"
    return row


def read_results(path: Path) -> dict[str, dict]:
    """Rows of an earlier run's CSV keyed by source path (empty when there is none)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["source"]: row for row in csv.DictReader(fh) if row.get("source")}


def _is_done(row: dict | None, dst: Path) -> bool:
    if row is None or row.get("status") not in ("detected", "retry", "fallback"):
        return False
    return all((dst / name).is_file() for name in row.get("outputs", "").split(";") if name)


def _check_settings(dst: Path, settings: dict, overwrite: bool) -> None:

    path = dst / SETTINGS_NAME
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        if old != settings:
            raise ConfigError(f"{dst} was aligned with other settings {old}; use another DST or --overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def summarize(rows: list[dict]) -> dict[str, int]:
    """Counts per status, in the fixed order detected / retry / fallback / failed."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def write_results(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["source"]))
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from fromface.faces.aligner import FaceAligner

    src, dst = args.src, args.dst
    if not src.is_dir():
        raise DataError(f"{src}: not a folder of images")
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    aligner = FaceAligner(args.template, select=args.select, fallback=args.fallback)
    settings = {"template": aligner.template, "select": args.select, "fallback": args.fallback, "format": args.format}
    _check_settings(dst, settings, args.overwrite)
    images = find_images(src, exclude=dst)
    if not images:
        raise DataError(f"{src}: no image files found")
    csv_path = dst / CSV_NAME
    old = {} if args.overwrite else read_results(csv_path)
    done = {rel.as_posix(): old[rel.as_posix()] for rel in images if _is_done(old.get(rel.as_posix()), dst)}
    todo = [rel for rel in images if rel.as_posix() not in done]
    bases = output_bases(images)
    cv2.setNumThreads(1 if args.workers > 1 else 2)
    start = time.perf_counter()
    rows = list(done.values())
    pool = ThreadPoolExecutor(max_workers=args.workers)
    try:
        results = pool.map(lambda rel: process_one(aligner, src, dst, rel, args.format, bases[rel]), todo)
        for row in tqdm(results, total=len(todo), desc="align", unit="img", disable=args.no_progress):
            rows.append(row)
            if len(rows) % 1000 == 0:
                write_results(csv_path, rows)
    finally:  # also on Ctrl-C: drop queued work, keep what is done so a re-run resumes
        pool.shutdown(wait=True, cancel_futures=True)
        write_results(csv_path, rows)
    elapsed = time.perf_counter() - start
    counts = summarize(rows)
    rate = len(todo) / elapsed if elapsed > 0 else 0.0
    print(f"{len(rows)} images: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
          + f" ({len(done)} already done, {len(todo)} processed in {elapsed:.1f} s, {rate:.1f} img/s)")
    print(f"results: {csv_path}")
    for row in rows:
        if row["status"] == "failed" and row["source"] not in done:
            print(f"failed: {row['error']}")
    return 1 if counts["failed"] else 0
