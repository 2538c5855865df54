"""``fromface cluster DIR --out clusters.csv [--link-to OUTDIR]``: group a photo collection by person, no enrolment.

The work is :mod:`fromface.inference.clustering`; this module checks the outputs before the long part starts, shows
progress, writes the CSV and the link folders, and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fromface.cli._output import check_output_file, check_output_folder
from fromface.cli.verify import add_recognizer_args, positive_int
from fromface.errors import DataError

SELECT_CHOICES = ("all", "largest", "central", "single")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster", help="group the faces of a photo folder by person (no enrolment)",
        description="Find every face in the images under DIR (recursively), embed them and group them by person with "
        "the model's calibrated thresholds: a pair is compared at the occluded threshold when either face is "
        "occluded, so masked and clean photos of one person end up together. Writes one CSV row per face; "
        "faces that match nobody get cluster -1. Images with no face are skipped and listed; every face of a "
        "photo with several faces is clustered.")
    p.add_argument("folder", metavar="DIR", help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="CSV to write: file, face (index in the image), faces_in_image, cluster, cluster_size, "
                   "occluded, box x1 y1 x2 y2, detection_score")
    p.add_argument("--link-to", metavar="OUTDIR", default=None,
                   help="also make OUTDIR/person-0000, person-0001, ... (largest first) and OUTDIR/alone, with a "
                   "symlink to each photo; OUTDIR must be empty or new (see --force) and outside DIR")
    p.add_argument("--force", action="store_true",
                   help="overwrite the CSV, and replace the person-*/alone link folders of an earlier run in OUTDIR "
                   "(other files there are kept; a real file in those folders is never removed)")
    p.add_argument("--linkage", choices=("average", "single"), default="average",
                   help="'average' (default): merge two groups while their pairs pass the threshold on average; "
                   "'single': every pair that passes joins its two groups (chains more)")
    p.add_argument("--batch", type=positive_int, default=16, help="images per batch (default 16)")
    add_recognizer_args(p, select="all")
    for action in p._actions:  # clustering groups every face by default, so 'all' is a choice here
        if "--select" in action.option_strings:
            action.choices = SELECT_CHOICES
            action.help = ("which faces of a photo to cluster: 'all' (default), the 'largest', the 'central', or "
                           "'single' (skip photos with several faces)")
    p.set_defaults(func=run)


def _check_link_folder(out: Path, root: Path, force: bool) -> None:
    """Refuse before any work: OUTDIR inside DIR (its links would be clustered next time) or not empty."""
    try:
        out.resolve().relative_to(root.resolve())
    except ValueError:
        pass
    else:
        raise DataError(f"{out}: is inside {root}; put the link folders outside the photo folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: output folder is not empty; pass --force to replace the links of an earlier run")
    check_output_folder(out)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fromface.cli.verify import recognizer_from_args
    from fromface.inference import clustering

    root = Path(args.folder)
    files, passed = clustering.list_images(root)
    check_output_file(args.out, force=args.force)
    link_to = Path(args.link_to) if args.link_to else None
    if link_to is not None:
        _check_link_folder(link_to, root, args.force)
    recognizer = recognizer_from_args(args)
    with tqdm(total=len(files), desc="embedding", unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        collection = clustering.cluster_folder(recognizer, root, batch=args.batch, linkage=args.linkage,
                                               progress=bar.update, files=files, passed=passed)
    clustering.write_csv(collection, args.out)
    if link_to is not None:
        if args.force:
            clustering.clear_links(link_to)
        clustering.link_clusters(collection, link_to)
    _summary(collection, args, recognizer.model_name)
    return 0


def _summary(collection, args: argparse.Namespace, model: str) -> None:
    from fromface.inference.clustering import ALONE

    faces, clusters = collection.faces, collection.clusters
    alone = sum(f.cluster == ALONE for f in faces)
    seconds = collection.embed_seconds + collection.cluster_seconds
    largest = f", largest {len(clusters[0])} faces" if clusters else ""
    print(f"{args.out}: {len(faces)} faces from {collection.embedded_images} images in "
          f"{len(clusters)} clusters{largest}; {alone} faces matched nobody (cluster -1); model {model}")
    print(f"  {seconds:.1f} s ({len(faces) / max(seconds, 1e-9):.1f} faces/s; clustering "
          f"{collection.cluster_seconds:.2f} s)")
    multi = collection.multi_face_images
    if multi:
        print(f"  {len(multi)} images had several faces; every face was clustered:")
        for file, count in multi:
            print(f"    {file}: {count} faces")
    if args.link_to:
        print(f"  links in {args.link_to}/ (one folder per cluster, 'alone' for the rest)")
    if collection.skipped:
        print(f"  {len(collection.skipped)} files skipped:")
        for file, why in collection.skipped:
            print(f"    {file}: {why}")
