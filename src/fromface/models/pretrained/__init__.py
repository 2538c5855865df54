"""Weights trained by this project, shipped inside the package.

Each tag is two files here: ``<model>.<tag>.safetensors`` (only the parts that were trained: FROM's
pieces on a pretrained trunk, never the trunk, which loads from its own package) and
``<model>.<tag>.json`` (checksum, architecture options, calibrated thresholds, how it was made).
Importing :mod:`fromface.models` registers every tag found here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from fromface.errors import ConfigError

HERE = Path(__file__).resolve().parent


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_shipped_tags() -> None:
    """Register the tag described by every JSON file in this folder."""
    from fromface.models.registry import register_pretrained

    for meta in sorted(HERE.glob("*.json")):
        info = json.loads(meta.read_text())
        info["file"] = str(HERE / info["file"])
        register_pretrained(info.pop("model"), info.pop("tag"), **info)


def load_tag_state(model: nn.Module, name: str, tag: str, info: dict[str, Any]) -> None:
    """Load a tag's trained parts after checking the file's checksum; the rest must be the trunk's."""
    from safetensors.torch import load_file

    path = Path(info["file"])
    if not path.is_file():
        raise ConfigError(f"{name}:{tag}: weights file {path} is missing; reinstall fromface")
    if info.get("sha256") and sha256_of(path) != info["sha256"]:
        raise ConfigError(f"{name}:{tag}: {path} fails its sha256 check (corrupt or replaced); reinstall fromface")
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    trunk = tuple(info.get("trunk_prefixes", ("backbone.", "head.")))
    untrained = [k for k in result.missing_keys if not k.startswith(trunk)]
    if result.unexpected_keys or untrained:
        raise ConfigError(f"{name}:{tag}: {path} does not fit the model "
                          f"(unexpected {result.unexpected_keys[:3]}, missing {untrained[:3]})")
