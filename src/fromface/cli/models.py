"""``fromface models``: the registered models, their preprocessing and pretrained tags."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and pretrained tags",
                       description="List every registered model with its input size, alignment "
                       "template, licence and pretrained tags.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from fromface.models import get_spec, list_models

    rows = []
    for name in list_models():
        spec = get_spec(name)
        rows.append({
            "name": name,
            "input": "x".join(map(str, spec.preprocess.size)),
            "template": spec.preprocess.template,
            "licence": spec.licence or "-",
            "pretrained": sorted(spec.pretrained) or [],
            "description": spec.description,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<24} {'input':<8} {'template':<18} {'pretrained':<14} {'licence':<12} description")
    for r in rows:
        tags = ",".join(r["pretrained"]) or "-"
        print(f"{r['name']:<24} {r['input']:<8} {r['template']:<18} {tags:<14} {r['licence']:<12} "
              f"{r['description']}")
    return 0
