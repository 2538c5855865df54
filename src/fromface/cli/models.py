"""``fromface models``: the registered models, their preprocessing and pretrained tags."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and pretrained tags",
                       description="List every registered model with its input size, alignment "
                       "template, licence and pretrained tags; under each model, each tag's licence and the data "
                       "its weights were trained on (trained weights follow their training data's terms).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from fromface.models import get_spec, list_models

    rows = []
    for name in list_models():
        spec = get_spec(name)
        rows.append({
            "name": name,
            "input": "x".join(map(str, spec.preprocess.size)),
            "template": spec.preprocess.template,
            "licence": _weights_licence(spec),
            "pretrained": sorted(spec.pretrained) or [],
            "description": spec.description,
            "tags": {tag: _tag_terms(info) for tag, info in sorted(spec.pretrained.items())},
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<24} {'input':<8} {'template':<18} {'pretrained':<19} {'licence':<14} description")
    for r in rows:
        tags = ",".join(r["pretrained"]) or "-"
        print(f"{r['name']:<24} {r['input']:<8} {r['template']:<18} {tags:<19} {r['licence']:<14} "
              f"{r['description']}")
        for tag, terms in r["tags"].items():
            if terms["training_data"]:
                data = "; ".join(f"{d.get('name')} ({d.get('terms')})" for d in terms["training_data"])
                print(f"    {r['name']}:{tag}: licence {terms['licence']}; trained on {data}; trunk "
                      f"{terms['trunk'].get('model')} {terms['trunk'].get('licence')}")
    return 0


def _weights_licence(spec) -> str:
    """What ``create_model(name, pretrained=True)`` gives a user: the default tag's terms where it has its own
    (weights trained here follow their training data), else the model's (a port's weights, a trunk's)."""
    tags = spec.pretrained
    default = next((info for info in tags.values() if info.get("default")), next(iter(tags.values()), {}))
    if default.get("licence"):
        return "non-commercial" if "non-commercial" in default["licence"] else default["licence"]
    return spec.licence or "-"


def _tag_terms(info: dict) -> dict:
    """A pretrained tag's licence, training data and trunk licence (empty for a ported model's own weights)."""
    return {"licence": info.get("licence") or "", "training_data": list(info.get("training_data") or []),
            "trunk": dict(info.get("trunk") or {}), "default": bool(info.get("default"))}
