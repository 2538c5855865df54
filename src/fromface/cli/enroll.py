"""``fromface enroll``: add people to a gallery, from a folder of identity sub-folders or from images with --name."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from fromface.cli._messages import cli_wording
from fromface.cli.verify import add_recognizer_args
from fromface.data.images import scan_images
from fromface.errors import DataError, FromfaceError


def plan(inputs: list[str], name: str | None) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """({identity: images}, skipped files with the reason): with ``name``, every given image (or image inside a
    given folder) is that person; without, each input folder holds one sub-folder per identity."""

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
    skipped: list[tuple[Path, str]] = []
    if name is not None:
        files = []
        for p in paths:
            found, passed = scan_images(p) if p.is_dir() else ([p], [])
            files += found
            skipped += passed
        if not files:
            raise DataError(f"no images found in {', '.join(inputs)}")
        return {name: files}, skipped
    people: dict[str, list[Path]] = {}
    for p in paths:
        if not p.is_dir():
            raise DataError(f"{p}: a single image needs --name NAME (or give a folder of identity sub-folders)")
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subs:
            raise DataError(f"{p}: no identity sub-folders; to enrol the images in it as one person, add --name NAME")
        for d in subs:
            files, passed = scan_images(d)
            skipped += passed
            if files:
                people.setdefault(d.name, []).extend(files)
    if not people:
        raise DataError(f"no images found in the identity folders of {', '.join(inputs)}")
    return people, skipped


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="add people to a gallery database",
                       description="Enrol faces into a gallery. Give a folder of identity sub-folders "
                       "(DIR/<name>/<images>), or images / a folder of images with --name NAME. Each identity is "
                       "written all-or-nothing; a photo without a face skips that identity with a message. A name "
                       "already in the gallery is refused unless --add is given, and an image already enrolled "
                       "(same bytes) is skipped, so re-running an interrupted enrolment adds nothing twice. "
                       "Exit status 1 when an identity was skipped.")
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_IMAGES")
    p.add_argument("--db", required=True, help="gallery database file (created if missing)")
    p.add_argument("--name", default=None, help="enrol all given images as this one person")
    p.add_argument("--add", action="store_true",
                   help="add the images to identities that are already enrolled (without it, such names are refused)")
    add_recognizer_args(p, select="single")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fromface.cli.verify import recognizer_for_gallery
    from fromface.inference.gallery import Gallery

    people, passed = plan(args.inputs, args.name)
    for path, why in passed:
        print(f"skipped {path}: {why}", file=sys.stderr)
    failed = 0
    mode = "add" if args.add else "new"
    with Gallery(args.db) as gallery:
        recognizer_for_gallery(args, gallery)
        for group in _groups(people, gallery.recognizer.batch_size):  # people whose photos share a batch
            results = gallery.enroll_each({person: [str(f) for f in files] for person, files in group.items()}, mode)
            for person, result in results.items():
                if isinstance(result, FromfaceError):
                    failed += 1
                    print(f"skipped {person}: {cli_wording(str(result))}", file=sys.stderr)
                    continue
                again = f", {len(result.skipped)} already enrolled" if result.skipped else ""
                print(f"enrolled {person}: {result.added} template{'s' * (result.added != 1)} added{again} "
                      f"({result.templates} in all)")
                for line in result.skipped:
                    print(f"  skipped {line}", file=sys.stderr)
        total, count = len(gallery), len(gallery.names())
    print(f"{args.db}: {count} identities, {total} templates ({failed} identit{'ies' if failed != 1 else 'y'} skipped)")
    return 1 if failed else 0


def _groups(people: dict[str, list], images: int) -> Iterator[dict[str, list]]:
    """Consecutive people, in order, with about ``images`` photos per group (one person is never split)."""
    group: dict[str, list] = {}
    for person, files in people.items():
        group[person] = files
        if sum(len(f) for f in group.values()) >= images:
            yield group
            group = {}
    if group:
        yield group
