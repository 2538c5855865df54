"""``fromface identify IMAGE --db gallery.db``: the closest enrolled identities to the face in a photo."""

from __future__ import annotations

import argparse
import json

from fromface.cli._messages import DB_HELP
from fromface.cli.verify import add_recognizer_args, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("identify", help="who is this? search an enrolled gallery",
                       description="Find the enrolled identities closest to the face in IMAGE by cosine similarity, "
                       "the best template of each identity. " + DB_HELP)
    p.add_argument("image", help="photo to identify")
    p.add_argument("--db", required=True, help="the gallery (a path or URL, as for `fromface enroll`)")
    p.add_argument("--top", type=positive_int, default=5, help="number of identities to list (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_recognizer_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from fromface.cli.verify import recognizer_for_gallery
    from fromface.inference.gallery import Gallery

    with Gallery(args.db, read_only=True) as gallery:  # searching never writes to the file
        recognizer_for_gallery(args, gallery)
        face = gallery.recognizer.embed(args.image)[0]
        matches = gallery.identify(face, top_k=args.top)
        size, where = len(gallery), gallery.location
    if args.json:
        print(json.dumps({"image": args.image, "gallery_templates": size, "occluded": face.occluded,
                          "visible_fraction": face.visible_fraction, "occlusion_report": face.occlusion_report,
                          "matches": [m.to_dict() for m in matches]},
                         indent=2))
        return 0
    if not matches:
        print(f"{where} is empty: enrol people first")
        return 0
    best = matches[0]
    print(f"{args.image}: {'looks like ' + best.name if best.same else 'no enrolled identity matches'} "
          f"(best score {best.score:.4f}, threshold {best.threshold:.4f}, {best.condition})")
    if face.occlusion_report:
        print(f"  probe: {face.occlusion_report['summary']}")
    for rank, m in enumerate(matches, 1):
        print(f"  {rank}. {m.name:<30} {m.score:.4f} {'match' if m.same else ''}")
    return 0
