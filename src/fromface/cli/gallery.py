"""``fromface gallery info DB`` and ``fromface gallery copy SRC DST``: look at a gallery, move it to another store."""

from __future__ import annotations

import argparse
import sys

from fromface.cli._messages import DB_HELP
from fromface.cli.verify import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gallery", help="inspect a gallery or copy it to another store (SQLite, PostgreSQL, Milvus)",
                       description="Work on a gallery as a whole. " + DB_HELP)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="identities, templates and the model of a gallery",
                              description="Print what a gallery holds, without changing it.")
    info.add_argument("db", help="the gallery (a path or URL)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)
    copy = actions.add_parser(
        "copy", help="copy a gallery into another store (migration)",
        description="Copy every identity of SRC into DST with its templates as they are: embeddings, occlusion "
        "state, sources, image digests and the model that made them (nothing is embedded again). DST must be "
        "empty; each batch of identities is written all or nothing, so after an interruption the same command "
        "with --resume finishes the copy. SRC is opened read-only. Example: fromface gallery copy gallery.db "
        "postgresql://fromface@db.example.org/faces")
    copy.add_argument("source", metavar="SRC", help="the gallery to copy (a path or URL)")
    copy.add_argument("target", metavar="DST", help="where to copy it (a path or URL; created if missing)")
    copy.add_argument("--batch", type=positive_int, default=1000, help="identities per write (default 1000)")
    copy.add_argument("--resume", action="store_true",
                      help="DST holds an interrupted copy of SRC: add what is missing")
    copy.add_argument("--no-progress", action="store_true", help="no progress bar")
    copy.set_defaults(func=run_copy)


def run_info(args: argparse.Namespace) -> int:
    import json

    from fromface.storage import open_store

    with open_store(args.db, read_only=True) as store:
        meta, counts = store.meta(), store.counts()
        out = {"gallery": store.location, "identities": len(counts), "templates": sum(counts.values()),
               "dim": int(meta["dim"]) if "dim" in meta else None, "model": meta.get("model_id") or meta.get("model"),
               "model_source": meta.get("source")}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['gallery']}: {out['identities']:,} identities, {out['templates']:,} templates"
              + (f", {out['dim']}-d, model {out['model']}" if out["dim"] else " (empty)"))
    return 0


def run_copy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fromface.storage import open_store
    from fromface.storage.migrate import copy_store

    with open_store(args.source, read_only=True) as source, open_store(args.target) as target:
        total = len(source.counts())
        with tqdm(total=total, desc="copy", unit="identity", file=sys.stderr, disable=args.no_progress) as bar:
            done = copy_store(source, target, batch=args.batch, resume=args.resume, progress=bar.update)
        print(f"{target.location}: copied {done.identities:,} identities ({done.templates:,} templates) from "
              f"{source.location}" + (f"; {done.already:,} were there already" if done.already else ""))
    return 0
