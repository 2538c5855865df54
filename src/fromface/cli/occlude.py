"""``fromface occlude-pairs``: a seeded, reproducible occluded copy of a pair list.

The second image of each pair (or both with ``--both``) is occluded in the ORIGINAL photo, before any
detection, so every system later runs its own pipeline on the same pixels. Image number ``i`` (in
first-seen order) is occluded with a generator seeded from ``(seed, i)``; images are written as PNG
so the pixels are exact. Output: ``images/`` (occluded photos, same relative layout as the source),
``pairs.tsv`` (generic TSV, relative to the output folder: occluded images for occluded slots,
the originals otherwise) and ``manifest.csv`` (one row per occluded image).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import time
from pathlib import Path

from fromface.data.images import load_image
from fromface.data.pairs import Pair, read_pairs, write_pairs_tsv
from fromface.errors import DataError, ImageError

MANIFEST_COLUMNS = ("index", "source", "output", "seed", "preset", "face", "face_box", "frame", "occluder", "category",
                    "kind", "placement", "template", "box", "factor", "scale", "angle", "target_coverage",
                    "covered_fraction", "pattern_label", "grid", "sha256")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("occlude-pairs", help="write a seeded occluded copy of a pair list",
                       description="Occlude the second image of every pair (or both) in the original photos, "
                       "write the images, a generic pairs.tsv and manifest.csv. Same seed, same bytes.")
    p.add_argument("--pairs", required=True, help="pair list: LFW pairs.txt, MFR2 pairs or generic TSV")
    p.add_argument("--root", default=None, help="image root for the pair list (default: its folder)")
    p.add_argument("--format", default="auto", choices=("auto", "lfw", "mfr2", "tsv"), help="pair-list format")
    p.add_argument("--occluders", required=True, help="occluder folder with occluders.csv")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--preset", default="face", help="occlusion preset: face (default), paper, paper2, face-train")
    p.add_argument("--categories", nargs="+", default=None, help="occluder categories to use (default: all)")
    p.add_argument("--coverage", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
                   help="covered fraction of the face box for face presets, e.g. 0.2 0.45")
    p.add_argument("--grid", type=int, default=5, help="pattern grid K for the manifest's pattern_label (default 5)")
    p.add_argument("--both", action="store_true", help="occlude both images of each pair")
    p.add_argument("--detector", choices=("yunet", "none"), default="yunet",
                   help="face boxes from YuNet (default), or 'none' to use the centre box for every photo")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs (for quick checks)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder, replacing our files")
    p.set_defaults(func=run)


def _prepare_out(out: Path, force: bool) -> None:

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: output folder is not empty; pass --force to replace its contents")
        for name in ("images", "pairs.tsv", "manifest.csv"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _relative_output(src: Path, root: Path, index: int) -> Path:
    """images/<path under root>.png, or images/<index>_<name>.png for files outside the root."""
    try:
        rel = src.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(f"{index:06d}_{src.name}")
    return Path("images") / rel.with_suffix(".png")


def _work_list(pairs, both: bool) -> list[Path]:
    """Images to occlude, in first-seen order (their position is their seed index)."""
    seen: dict[Path, None] = {}
    for p in pairs:
        if both:
            seen.setdefault(Path(p.path1), None)
        seen.setdefault(Path(p.path2), None)
    return list(seen)


def _row(index, src, root, rel, args, preset_name, how, box, result, digest) -> dict:
    rec = result.record
    try:
        source = src.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        source = str(src)
    return {
        "index": index, "source": source, "output": rel.as_posix(), "seed": args.seed, "preset": preset_name,
        "face": how, "face_box": " ".join(f"{v:.1f}" for v in box),
        "frame": " ".join(map(str, rec.get("frame", []))), "occluder": rec.get("occluder", ""),
        "category": rec.get("category", ""), "kind": rec.get("kind", ""), "placement": rec.get("placement", ""),
        "template": rec.get("template", ""), "box": " ".join(map(str, rec.get("box", []))),
        "factor": rec.get("factor", ""), "scale": rec.get("scale", ""), "angle": rec.get("angle", ""),
        "target_coverage": rec.get("target_coverage", ""), "covered_fraction": f"{result.covered_fraction:.6f}",
        "pattern_label": "" if result.pattern_label is None else result.pattern_label, "grid": args.grid or "",
        "sha256": digest,
    }


def run(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np
    from tqdm import tqdm

    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer

    cats = [c for item in args.categories for c in item.split(",")] if args.categories else None
    library = OccluderLibrary.from_folder(args.occluders, categories=cats)
    coverage = tuple(args.coverage) if args.coverage else None
    synth = Synthesizer(library, preset=args.preset, grid=args.grid or None, coverage=coverage, clean_prob=0.0)
    pairs = read_pairs(args.pairs, root=args.root, format=args.format)
    if args.limit:
        pairs = pairs[: args.limit]
    root = Path(args.root) if args.root else Path(args.pairs).parent
    work = _work_list(pairs, args.both)
    missing = [p for p in work if not p.is_file()]
    if missing:
        raise ImageError(missing[0], f"image named in {args.pairs} does not exist ({len(missing)} missing in all)")
    out = Path(args.out)
    _prepare_out(out, args.force)
    from fromface.faces.aligner import FaceAligner, placement_face

    aligner = None
    if args.detector == "yunet":
        aligner = FaceAligner("arcface112", select="central")
    mapping, rows, start = {}, [], time.perf_counter()
    for index, src in enumerate(tqdm(work, desc="occluding", unit="img", dynamic_ncols=True)):
        image = load_image(src)
        box, landmarks, how = placement_face(aligner, image)
        result = synth.occlude_seeded(image, args.seed, index, face_box=box, landmarks=landmarks)
        rel = _relative_output(src, root, index)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(result.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ImageError(src, "could not encode the occluded image as PNG")
        data = encoded.tobytes()
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        mapping[src] = out / rel
        rows.append(_row(index, src, root, rel, args, synth.preset.name, how, np.asarray(box), result,
                         hashlib.sha256(data).hexdigest()))
    new_pairs = [Pair(mapping.get(Path(p.path1), p.path1) if args.both else p.path1, mapping[Path(p.path2)],
                      p.same, p.fold) for p in pairs]
    write_pairs_tsv(new_pairs, out / "pairs.tsv", relative_to=out)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    took = time.perf_counter() - start
    faces = sum(r["face"] != "centre-box" for r in rows)
    rate = len(rows) / max(took, 1e-9)
    print(f"occluded {len(rows)} images for {len(pairs)} pairs in {took:.1f} s ({rate:.1f} img/s); "
          f"face found in {faces}, centre box in {len(rows) - faces}; wrote {out / 'pairs.tsv'} and "
          f"{out / 'manifest.csv'}", flush=True)
    return 0
