"""``fromface remove NAME --db gallery.db``: delete identities and their templates from a gallery."""

from __future__ import annotations

import argparse
import sys

from fromface.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remove", help="delete enrolled identities from a gallery",
                       description="Delete each NAME and all its templates from the gallery, in one transaction per "
                       "name. Exit status 1 when a name was not enrolled.")
    p.add_argument("names", nargs="+", metavar="NAME", help="identity to delete (as `fromface enroll` stored it)")
    p.add_argument("--db", required=True, help="the gallery (a path or URL, as for `fromface enroll`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from fromface.inference.gallery import Gallery
    from fromface.storage import local_path

    path = local_path(args.db)
    if path is not None and not path.is_file():
        raise DataError(f"{args.db}: gallery not found")
    missing = 0
    with Gallery(args.db) as gallery:
        for name in args.names:
            if name.strip() not in gallery.names():
                missing += 1
                print(f"{name}: not enrolled in {gallery.location}", file=sys.stderr)
                continue
            removed = gallery.remove(name.strip())
            print(f"removed {name}: {removed} template{'s' * (removed != 1)}")
        total, count = len(gallery), len(gallery.names())
        where = gallery.location
    print(f"{where}: {count} identities, {total} templates")
    return 1 if missing else 0
