"""``fromface enroll``: add people to a gallery, from a folder of identity sub-folders, from images with --name, or
from the output of ``fromface embed`` (``--from``, no embedding); ``--shard K/N`` takes one shard of the identities."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from fromface.cli._messages import DB_HELP, cli_wording
from fromface.cli.verify import add_recognizer_args
from fromface.data.images import scan_images
from fromface.errors import ConfigError, DataError, FromfaceError


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
                       "(DIR/<name>/<images>), or images / a folder of images with --name NAME, or the output of "
                       "`fromface embed` with --from (no embedding then). Each identity is written all-or-nothing; "
                       "a photo without a face skips that identity with a message. A name already in the gallery is "
                       "refused unless --add is given, and an image already enrolled (same bytes) is skipped, so "
                       "running an interrupted enrolment again (after a kill, too) finishes it and adds nothing "
                       "twice. Exit status 1 when an identity was skipped. " + DB_HELP)
    p.add_argument("inputs", nargs="*", metavar="DIR_OR_IMAGES")
    p.add_argument("--db", required=True, help="the gallery: a file (created if missing) or a URL, see below")
    p.add_argument("--name", default=None, help="enrol all given images (or all embeddings of --from) as this one "
                   "person")
    p.add_argument("--add", action="store_true",
                   help="add the images to identities that are already enrolled (without it, such names are refused)")
    p.add_argument("--from", dest="from_files", nargs="+", metavar="EMBEDDINGS.npz", default=None,
                   help="enrol from the output of `fromface embed` (one or more files, e.g. one per shard) without "
                   "embedding again: each image's identity is the first component of its path (its identity "
                   "sub-folder), or --name; the embeddings' model must be the gallery's; identities are written "
                   "1,000 per transaction. Files from an older fromface embed (without model_id) are "
                   "refused: embed them again")
    p.add_argument("--shard", metavar="K/N", default=None,
                   help="enrol only shard K of N (K = 1..N) of the identities, for a job array or several machines: "
                   "an identity is in shard K when the first 8 bytes of the sha256 of its name (UTF-8), read as a "
                   "big-endian number, modulo N, are K-1 (so it stays in its shard when others are added, and all "
                   "its photos stay in one job). With --from too; not with --name")
    add_recognizer_args(p, select="single")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fromface.inference.bulk import parse_shard

    shard = parse_shard(args.shard)
    if args.from_files is not None:
        if args.inputs:
            raise ConfigError("give DIR_OR_IMAGES or --from EMBEDDINGS.npz, not both")
        if args.model is not None:
            raise ConfigError("--model is not used with --from: the embeddings' model is recorded in the file")
        return _run_from(args, shard)
    if not args.inputs:
        raise ConfigError("nothing to enrol: give a folder of identity sub-folders, images with --name NAME, or "
                          "--from EMBEDDINGS.npz")
    if shard is not None and args.name is not None:
        raise ConfigError("--shard splits identities, and --name makes all images one identity: drop one of them")
    people, passed = plan(args.inputs, args.name)
    if shard is not None:
        people = {person: files for person, files in people.items() if shard.holds(person)}
        passed = [(path, why) for path, why in passed if shard.holds(path.parent.name)]
        if not people:
            raise DataError(f"no identities of {', '.join(args.inputs)} are in shard {shard}")
    for path, why in passed:
        print(f"skipped {path}: {why}", file=sys.stderr)
    return _enroll_images(args, people)


def _enroll_images(args: argparse.Namespace, people: dict[str, list[Path]]) -> int:
    from fromface.cli.verify import recognizer_for_gallery
    from fromface.inference.gallery import Gallery

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
        total, count, where = len(gallery), len(gallery.names()), gallery.location
    print(f"{where}: {count} identities, {total} templates ({failed} identit{'ies' if failed != 1 else 'y'} skipped)")
    return 1 if failed else 0


def _run_from(args: argparse.Namespace, shard) -> int:
    """``--from``: templates straight from ``fromface embed`` outputs, a thousand identities per transaction."""
    from tqdm import tqdm

    from fromface.inference.bulk import check_gallery_model, enroll_in_batches, group_templates, read_embeddings
    from fromface.inference.gallery import Gallery

    files = [read_embeddings(path) for path in args.from_files]
    people, skipped = group_templates(files, args.name, shard)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not people:
        where = f" in shard {shard}" if shard else ""
        raise DataError(f"{', '.join(args.from_files)}: no identities to enrol{where}")
    with Gallery(args.db) as gallery:
        check_gallery_model(gallery, files[0])
        with tqdm(total=len(people), desc="enroll", unit="identity", file=sys.stderr, dynamic_ncols=True,
                  mininterval=2.0) as bar:
            done = enroll_in_batches(gallery, people, files[0].model_id, files[0].model_source,
                                     "add" if args.add else "new", progress=bar.update)
        total, count, where = len(gallery), len(gallery.names()), gallery.location
    for person, why in done.refused.items():
        print(f"skipped {person}: {cli_wording(why)}", file=sys.stderr)
    print(f"enrolled {done.identities} identities from {len(files)} file{'s' * (len(files) != 1)}: {done.added} "
          f"templates added, {done.already} already enrolled ({done.unchanged} identities unchanged)")
    refused = len(done.refused)
    print(f"{where}: {count} identities, {total} templates ({refused} identit{'ies' if refused != 1 else 'y'} "
          "skipped)")
    return 1 if refused else 0


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
