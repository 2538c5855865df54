"""``fromface embed DIR -o embeddings.npz``: embeddings and occlusion estimates for every image under a folder.

Large collections: ``--shard K/N`` takes one shard of the images (a job of a job array), and finished batches are
kept in a hidden folder beside the output, so the same command run again after a kill goes on where it stopped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fromface.cli._messages import cli_wording
from fromface.cli._output import check_output_file
from fromface.cli.verify import add_recognizer_args, positive_int
from fromface.data.images import scan_images
from fromface.errors import DataError

SHARD_HELP = ("embed only shard K of N (K = 1..N) of the images, for a job array or several machines: an image is "
              "in shard K when the first 8 bytes of the sha256 of its path relative to DIR ('/' separated), read as "
              "a big-endian number, modulo N, are K-1. A hash, not a "
              "position in the sorted list, so an image stays in its shard when others are added to or removed from "
              "DIR, and jobs that list DIR at different times still agree. "
              "The N shards are disjoint and together hold every image")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="embed every image under a folder into an .npz file",
        description="Embed the (selected) face of every image under DIR (recursively). Writes embeddings, relative "
        "paths, boxes, alignment methods, predicted patterns, visible fractions, whether each face is occluded "
        "('occluded': 1, 0, or -1 without an estimate), the sha256 of each image ('digests'), the model "
        "('model', 'model_id', 'model_source') and DIR ('root'), so `fromface enroll --from` can fill a gallery "
        "from the file without embedding again; images without a usable face are listed under 'skipped' with the "
        "reason. Finished batches are saved as they go in a hidden folder beside the output (.OUT.npz.partial/); "
        "after a kill, run the same command again and it goes on where it stopped. The output is written at the "
        "end, all at once, and the folder removed. A partial folder left by a run with other arguments (another "
        "DIR, image list, model, shard or --batch) is refused, not mixed in.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("-o", "--output", required=True, help="output .npz file")
    p.add_argument("--force", action="store_true",
                   help="overwrite the output file if it exists, and discard a partial folder left by a run with "
                   "other arguments (a partial folder of the same run is still resumed)")
    p.add_argument("--batch", type=positive_int, default=256,
                   help="images per batch; each finished batch is saved, so a kill loses at most one (default 256)")
    p.add_argument("--shard", metavar="K/N", default=None, help=SHARD_HELP)
    add_recognizer_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from fromface.cli.verify import recognizer_from_args
    from fromface.inference.bulk import EmbedJob, embed_collection, parse_shard, relative_key, write_embeddings

    shard = parse_shard(args.shard)
    root = Path(args.folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    output = Path(args.output)
    if not output.is_dir() and output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")  # what numpy would write
    check_output_file(output, force=args.force)
    files, passed = scan_images(root, recursive=True)
    if shard is not None:
        files = shard.select(files, lambda f: relative_key(f, root))
        passed = shard.select(passed, lambda item: relative_key(item[0], root))
    if not files:
        where = f"{root}" + (f" (shard {shard})" if shard else "")
        raise DataError(f"{where}: no images found" + (f" ({len(passed)} other files)" if passed else ""))
    recognizer = recognizer_from_args(args)
    job = EmbedJob(root, files, output, batch=args.batch, shard=shard,
                   settings={"select": args.select, "fallback": bool(args.fallback)})
    with tqdm(total=len(files), desc=f"embed {shard or ''}".strip(), unit="img", file=sys.stderr,
              dynamic_ncols=True, mininterval=2.0) as bar:
        arrays, resumed = embed_collection(recognizer, job, force=args.force, progress=bar.update,
                                           wording=cli_wording)
    skipped = [f"{path.relative_to(root)}: {why}" for path, why in passed] + [str(s) for s in arrays["skipped"]]
    if not len(arrays["paths"]):
        raise DataError(f"{root}: no face found in any of {len(files)} images")
    arrays["skipped"] = np.array(skipped, dtype=str)
    write_embeddings(job, arrays)
    again = f" ({resumed} of {len(files)} images done by an earlier run)" if resumed else ""
    print(f"{output}: {len(arrays['paths'])} embeddings ({arrays['embeddings'].shape[1]}-d, {recognizer.model_name})"
          f"{again}; {len(skipped)} images skipped")
    for line in skipped:
        print(f"  skipped {line}", file=sys.stderr)
    return 0
