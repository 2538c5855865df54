"""Training: the FROM loss, the trainer and its data plumbing.

Public entry points (imported lazily, so ``fromface.training.checkpoint`` stays cheap to import):
``train(config, resume=None)``, ``Trainer``, ``TrainConfig``, ``load_config(path, overrides)``,
``config_from_dict(dict, overrides)``, ``pack_folder(...)``, ``PackedFaces``, ``load_model(checkpoint)``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "fromface.training.trainer",
    "Trainer": "fromface.training.trainer",
    "TrainConfig": "fromface.training.config",
    "load_config": "fromface.training.config",
    "config_from_dict": "fromface.training.config",
    "pack_folder": "fromface.training.pack",
    "PackedFaces": "fromface.training.pack",
    "load_model": "fromface.training.checkpoint",
    "FromLoss": "fromface.training.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fromface.training' has no attribute {name!r}")
