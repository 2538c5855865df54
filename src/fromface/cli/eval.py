"""``fromface eval`` (verification on a pair list) and ``fromface eval-id`` (gallery/probe identification)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fromface.cli._output import check_output_folder
from fromface.data.pairs import pair_images, read_pairs
from fromface.errors import ConfigError

#: What each command writes into --out (an earlier run's files are replaced only with --force).
EVAL_OUTPUTS = ("report.json", "report.md", "scores.tsv", "roc.png")
EVAL_ID_OUTPUTS = ("report.json", "report.md")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="verification accuracy of one or more models on a pair list",
                       description="Score pairs with every --model on the same images: 10-fold accuracy "
                       "(threshold from the other folds), ROC AUC, EER, TAR@FAR; report.json, report.md, scores.tsv, "
                       "roc.png.")
    p.add_argument("--pairs", required=True, type=Path, help="LFW pairs.txt, MFR2 pairs list or TSV")
    p.add_argument("--root", type=Path, default=None, help="image folder (default: the pair file's folder)")
    p.add_argument("--format", default="auto", choices=["auto", "lfw", "mfr2", "tsv"], help="pair-list format")
    _common(p)
    p.add_argument("--manifest", type=Path, default=None,
                   help="manifest.csv from `fromface occlude-pairs`: adds per-category and per-covered-fraction "
                   "metrics, and per model the occlusion-estimate section (FROM models' estimate against the truth)")
    p.add_argument("--occluders", type=Path, default=None,
                   help="with --manifest: the occluder folder the set was made with; the occlusion-estimate section "
                   "then scores against each occluder's exact pixels (rebuilt and checked against the stored images) "
                   "instead of the manifest's boxes")
    p.add_argument("--source-root", type=Path, default=None,
                   help="with --occluders: folder of the original photos the manifest's 'source' paths are relative "
                   "to (default: found from the pair list's clean images)")
    p.add_argument("--bins", default="0,0.1,0.2,0.3,0.4,0.5,1", help="covered-fraction bin edges (comma-separated)")
    p.add_argument("--folds", type=int, default=10, help="folds for lists without their own (default 10)")
    p.add_argument("--first-folds", type=int, default=None, metavar="K",
                   help="score only the pairs of the first K folds (a quicker, smaller check; said in the report)")
    p.set_defaults(func=run_eval)

    q = sub.add_parser("eval-id", help="rank-1/rank-5 identification with a gallery/probe split",
                       description="Identification: split a folder tree (one sub-folder per identity) into gallery "
                       "and probes, or take --gallery and --probe trees; optional distractor images.")
    q.add_argument("--root", type=Path, default=None, help="identity folder tree to split into gallery and probes")
    q.add_argument("--gallery", type=Path, default=None, help="gallery identity tree (with --probe)")
    q.add_argument("--probe", type=Path, default=None, help="probe identity tree (with --gallery)")
    q.add_argument("--gallery-per-id", type=int, default=1, help="gallery images per identity when splitting --root")
    q.add_argument("--distractors", type=Path, default=None, help="folder of distractor images added to the gallery")
    q.add_argument("--seed", type=int, default=0, help="seed of the gallery/probe split")
    q.add_argument("--ranks", default="1,5", help="ranks to report (comma-separated)")
    _common(q)
    q.set_defaults(func=run_eval_id)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, dest="models", metavar="NAME_OR_PATH",
                   help="registered model, trainer checkpoint (.pt), exported .onnx, or peer (sface, "
                   "face_recognition); repeatable")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="replace the reports of an earlier run in --out (its embedding cache is always reused)")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache folder (default: OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--flip", action="store_true", help="fuse the embeddings of the image and its mirror")
    p.add_argument("--select", default="central", choices=["central", "largest"],
                   help="which face when several are found (central: for photos centred on the subject)")
    p.add_argument("--no-fallback", action="store_true",
                   help="our models: no centre-crop fallback when no face is found (the pair then fails)")
    p.add_argument("--no-refine", action="store_true",
                   help="FROM models with an align head: crop faces where the detector put them, without the "
                   "head's correction (for ablations)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass for our models")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                   help="our models: 'auto' (default) runs a registered model's pretrained weights with onnxruntime "
                   "and checkpoints with PyTorch; 'onnx' or 'torch' choose (the cache keeps them apart)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/onnxruntime/OpenCV threads (default: library default)")
    p.add_argument("--workers", type=int, default=1, help="embed in this many processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _setup(args: argparse.Namespace) -> list:
    from fromface.evaluation.embedders import load_embedder

    if args.threads:
        import cv2
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # onnxruntime sessions made from now on take it
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    options = {"select": args.select, "fallback": not args.no_fallback, "flip": args.flip,
               "batch_size": args.batch_size, "refine": not args.no_refine, "backend": args.backend}
    return [load_embedder(m, **options) for m in args.models]


def _bins(text: str) -> tuple[float, ...]:

    try:
        edges = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--bins {text!r}: expected comma-separated numbers") from None
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"--bins {text!r}: need at least two increasing edges")
    return edges


def run_eval(args: argparse.Namespace) -> int:
    from fromface.evaluation.report import (
        command_line,
        environment,
        estimate_lines,
        plot_roc,
        summary_lines,
        write_json,
        write_markdown,
        write_scores,
    )
    from fromface.evaluation.verification import evaluate_pairs, read_manifest

    check_output_folder(args.out, EVAL_OUTPUTS, force=args.force)
    pairs = _first_folds(read_pairs(args.pairs, root=args.root, format=args.format), args)
    bins = _bins(args.bins)
    occlusion = read_manifest(args.manifest, args.root) if args.manifest else None
    if (args.occluders or args.source_root) and not args.manifest:
        raise ConfigError("--occluders and --source-root need --manifest")
    embedders = _setup(args)
    cache = None if args.no_cache else (args.cache or args.out / "cache")
    results = evaluate_pairs(pairs, embedders, cache, occlusion, bins, args.folds, progress=not args.quiet,
                             workers=args.workers, occluders=args.occluders, source_root=args.source_root)
    n_pos = sum(p.same for p in pairs)
    notes = [f"Face choice '{args.select}' for every model and peer"
             + (" (the labelled face is the one nearest the image centre)." if args.select == "central" else "."),
             "Thresholds are chosen on the other folds; std is the population std over folds.",
             "A pair whose image yields no face scores below every real score (counted 'different').",
             "face_recognition is scored as it scores (minus the Euclidean distance); the others by cosine."]
    for r in results:
        for far in (r["metrics"].get("tar_at_far") or {}).values():
            if far.get("note"):
                notes.append(f"{r['name']}: {far['note']}")
    report = {
        "command": command_line(args), "cwd": str(Path.cwd()), "environment": environment(), "select": args.select,
        "flip": args.flip, "fallback": not args.no_fallback, "refine": not args.no_refine,
        "pairs": {"file": str(args.pairs), "root": str(args.root) if args.root else None, "format": args.format,
                  "n_pairs": len(pairs), "n_positive": n_pos, "n_negative": len(pairs) - n_pos,
                  "n_images": len(pair_images(pairs)), "manifest": str(args.manifest) if args.manifest else None,
                  "occluders": str(args.occluders) if args.occluders else None,
                  "bins": list(bins), "first_folds": args.first_folds},
        "models": results, "notes": sorted(set(notes), key=notes.index),
    }
    write_json(report, args.out / "report.json")
    write_markdown(report, results, args.out / "report.md")
    write_scores(pairs, results, args.out / "scores.tsv")
    roc = plot_roc(results, args.out / "roc.png", title=f"ROC: {args.pairs}")
    for line in summary_lines(results) + estimate_lines(results):
        print(line)
    print(f"wrote {args.out / 'report.json'}, report.md, scores.tsv" + (", roc.png" if roc else ""))
    return 0


def _first_folds(pairs: list, args: argparse.Namespace) -> list:
    """Keep the pairs of folds 0..K-1 (the list's folds, else contiguous ones) when --first-folds K is given."""
    if args.first_folds is None:
        return pairs
    from fromface.evaluation.metrics import assign_folds

    folds = assign_folds([p.same for p in pairs], args.folds, [p.fold for p in pairs])
    if not 2 <= args.first_folds <= int(folds.max()) + 1:
        raise ConfigError(f"--first-folds must be between 2 and {int(folds.max()) + 1}")
    return [type(p)(p.path1, p.path2, p.same, int(f)) for p, f in zip(pairs, folds) if f < args.first_folds]


def run_eval_id(args: argparse.Namespace) -> int:
    from fromface.evaluation.identification import run_identification_cli

    check_output_folder(args.out, EVAL_ID_OUTPUTS, force=args.force)
    return run_identification_cli(args, _setup(args))
