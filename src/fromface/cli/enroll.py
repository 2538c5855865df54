"""``fromface enroll``: add people to a gallery, from a folder of identity sub-folders or from images with --name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fromface.cli.verify import add_recognizer_args

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def images_in(folder: Path) -> list[Path]:
    """Image files directly inside a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def plan(inputs: list[str], name: str | None) -> dict[str, list[Path]]:
    """{identity: images}: with ``name``, every given image (or image inside a given folder) is that person;
    without, each input folder holds one sub-folder per identity."""
    from fromface.errors import DataError

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
    if name is not None:
        files = [f for p in paths for f in (images_in(p) if p.is_dir() else [p])]
        if not files:
            raise DataError(f"no images found in {', '.join(inputs)}")
        return {name: files}
    people: dict[str, list[Path]] = {}
    for p in paths:
        if not p.is_dir():
            raise DataError(f"{p}: a single image needs --name NAME (or give a folder of identity sub-folders)")
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subs:
            raise DataError(f"{p}: no identity sub-folders; to enrol the images in it as one person, add --name NAME")
        for d in subs:
            files = images_in(d)
            if files:
                people.setdefault(d.name, []).extend(files)
    if not people:
        raise DataError(f"no images found in the identity folders of {', '.join(inputs)}")
    return people


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="add people to a gallery database",
                       description="Enrol faces into a gallery. Give a folder of identity sub-folders "
                       "(DIR/<name>/<images>), or images / a folder of images with --name NAME. Each identity is "
                       "written all-or-nothing; a photo without a face skips that identity with a message.")
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_IMAGES")
    p.add_argument("--db", required=True, help="gallery database file (created if missing)")
    p.add_argument("--name", default=None, help="enrol all given images as this one person")
    add_recognizer_args(p, select="single")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fromface.cli.verify import recognizer_from_args
    from fromface.errors import FromfaceError
    from fromface.inference.gallery import Gallery

    people = plan(args.inputs, args.name)
    failed = 0
    with Gallery(args.db) as gallery:
        if args.model is None:
            meta = gallery.meta()
            args.model = meta.get("source") or meta.get("model")  # the model the gallery was enrolled with
        gallery._recognizer = recognizer_from_args(args)
        for person, files in people.items():
            try:
                added = gallery.enroll(person, [str(f) for f in files])
            except FromfaceError as exc:
                failed += 1
                print(f"skipped {person}: {exc}", file=sys.stderr)
                continue
            print(f"enrolled {person}: {added} template{'s' * (added != 1)}")
        total, count = len(gallery), len(gallery.names())
    print(f"{args.db}: {count} identities, {total} templates ({failed} identit{'ies' if failed != 1 else 'y'} skipped)")
    return 1 if failed else 0
