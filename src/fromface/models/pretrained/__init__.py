"""Weights trained by this project, shipped inside the package.

Each tag is two files here: ``<model>.<tag>.safetensors`` (only the parts that were trained: FROM's
pieces on a pretrained trunk, never the trunk, which loads from its own package) and
``<model>.<tag>.json`` (checksum, architecture options, calibrated thresholds, how it was made).
Importing :mod:`fromface.models` registers every tag found here.
"""

from __future__ import annotations

import json
from pathlib import Path

from fromface.models.registry import register_pretrained

HERE = Path(__file__).resolve().parent


def register_shipped_tags() -> None:
    """Register the tag described by every JSON file in this folder."""
    for meta in sorted(HERE.glob("*.json")):
        info = json.loads(meta.read_text())
        info["file"] = str(HERE / info["file"])
        register_pretrained(info.pop("model"), info.pop("tag"), **info)
