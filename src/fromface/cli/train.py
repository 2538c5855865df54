"""``fromface train`` (one process, or each process under torchrun) and ``fromface pack`` (aligned-crop packs)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model from a YAML config",
        description="Train from a YAML config with dotted key=value overrides (e.g. optim.lr=0.01 "
        "schedule.max_steps=100). Runs on the CPU or one GPU as is, and data-parallel under "
        "`torchrun --nproc_per_node N -m fromface.cli.main train CONFIG` (gloo on CPU, NCCL on CUDA).")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--resume", metavar="PATH", help="checkpoint to continue from exactly, or 'auto' for the latest "
                   "step_*.pt in <output_dir>/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train, extra_overrides="overrides")

    q = sub.add_parser(
        "pack", help="pack an identity folder into aligned crops for fast training",
        description="Decode every image of root/<identity>/<image> once, align it with the model's template "
        "(or only resize it with --aligned) and write images.npy + index.json to OUT.")
    q.add_argument("source", help="identity folder: SOURCE/<identity>/<image>")
    q.add_argument("out", help="output folder for the pack")
    q.add_argument("--model", default="from_lresnet50e_ir", help="model whose input size and alignment template "
                   "the crops follow (default: %(default)s)")
    q.add_argument("--aligned", action="store_true", help="images are already aligned crops: only resize them")
    q.add_argument("--fallback", action="store_true", help="centre-crop images where no face is detected "
                   "instead of skipping them")
    q.add_argument("--min-images", type=int, default=1, help="drop identities with fewer images")
    q.add_argument("--workers", type=int, default=1, help="processes decoding/aligning in parallel (default 1)")
    q.add_argument("--context", type=float, default=1.0, metavar="FACTOR",
                   help="store each aligned crop inside a FACTOR times wider canvas of the photo (2 is enough), so "
                   "training can occlude the wider view and re-detect the face as the product does "
                   "(occlusion.realign); default 1: bare crops")
    q.set_defaults(func=run_pack)


def run_train(args: argparse.Namespace) -> int:

    import yaml

    from fromface.training.config import config_to_dict, load_config
    from fromface.training.trainer import train

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    try:
        summary = train(config, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        if stop.args:  # the trainer stopped cleanly after saving a checkpoint
            print(f"fromface train: {stop.args[0]}", file=sys.stderr)
            return 130
        raise
    if not summary["is_main"]:  # under torchrun only rank 0 reports
        return 0
    best = summary["best_metric"]
    print(f"done: step {summary['step']}, best {config.eval.select} "
          f"{'n/a' if best is None else f'{best:.4f}'}, last checkpoint {summary['last_checkpoint']}")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from fromface.models import get_spec
    from fromface.training.pack import PackedFaces, pack_folder

    pre = get_spec(args.model).preprocess
    out = pack_folder(args.source, args.out, pre.size, pre.template, aligned=args.aligned, fallback=args.fallback,
                      min_images=args.min_images, workers=args.workers, context=args.context)
    pack = PackedFaces(out)
    canvas = f" in {pack.images.shape[1]}x{pack.images.shape[2]} canvases" if pack.context > 1 else ""
    print(f"packed {len(pack)} faces of {len(pack.identities)} identities at {pre.size[0]}x{pre.size[1]}{canvas} "
          f"({pre.template}) into {out}; skipped {len(pack.skipped)}")
    return 0
