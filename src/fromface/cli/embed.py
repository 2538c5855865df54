"""``fromface embed DIR -o embeddings.npz``: embeddings and occlusion estimates for every image under a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fromface.cli._messages import cli_wording
from fromface.cli._output import check_output_file
from fromface.cli.verify import add_recognizer_args
from fromface.data.images import scan_images
from fromface.errors import DataError, FromfaceError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed every image under a folder into an .npz file",
                       description="Embed the (selected) face of every image under DIR (recursively). Writes "
                       "embeddings, relative paths, boxes, alignment methods, predicted patterns and visible "
                       "fractions; images without a usable face are listed under 'skipped' with the reason.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("-o", "--output", required=True, help="output .npz file")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    add_recognizer_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    import numpy as np

    from fromface.cli.verify import recognizer_from_args

    root = Path(args.folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    output = Path(args.output)
    if not output.is_dir() and output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")  # what numpy would write
    check_output_file(output, force=args.force)
    files, passed = scan_images(root, recursive=True)
    if not files:
        raise DataError(f"{root}: no images found" + (f" ({len(passed)} other files)" if passed else ""))
    recognizer = recognizer_from_args(args)
    kept, faces = [], []
    skipped = [f"{path.relative_to(root)}: {why}" for path, why in passed]
    for start in range(0, len(files), max(args.batch, 1)):
        chunk = files[start:start + max(args.batch, 1)]
        pairs = []
        for f, found in zip(chunk, recognizer.embed_each([str(f) for f in chunk])):
            if isinstance(found, FromfaceError):  # this file is reported; the rest of the batch is kept
                skipped.append(f"{f.relative_to(root)}: {cli_wording(str(found))}")
            else:
                pairs.append((f, found[0]))
        for f, face in pairs:
            kept.append(str(f.relative_to(root)))
            faces.append(face)
    if not faces:
        raise DataError(f"{root}: no face found in any of {len(files)} images")
    missing = -1
    np.savez_compressed(
        output, embeddings=np.stack([f.embedding for f in faces]), paths=np.array(kept),
        boxes=np.stack([f.box for f in faces]).astype(np.float32), methods=np.array([f.method for f in faces]),
        pattern=np.array([missing if f.pattern is None else f.pattern for f in faces]),
        visible_fraction=np.array([np.nan if f.visible_fraction is None else f.visible_fraction for f in faces]),
        skipped=np.array(skipped, dtype=str), model=np.array(recognizer.model_name))
    print(f"{output}: {len(faces)} embeddings ({faces[0].embedding.size}-d, {recognizer.model_name}); "
          f"{len(skipped)} images skipped")
    for line in skipped:
        print(f"  skipped {line}", file=sys.stderr)
    return 0
