"""Training checkpoints: atomic writes, the last N kept, RNG capture, and resume checks.

Format (a dict saved with ``torch.save``): ``model_name``, ``model_kwargs``, ``state_dict`` (the
model's weights, enough for inference and evaluation), ``config`` (the resolved training config),
``step``, ``epoch``, ``batch_in_epoch``, ``optimizer``, ``scheduler``, ``scaler``, ``loss_state`` (the
margin classifier), ``rng`` and ``best_metric``.

Everything in it is a tensor or a plain Python value, so it is read as data (``fromface.models.checkpoint``, which
also holds ``read_checkpoint``, ``load_weights`` and ``load_model``, re-exported here for the trainer).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fromface.data.files import atomic_write
from fromface.errors import ConfigError
from fromface.models.checkpoint import load_model, load_weights, read_checkpoint

FORMAT_VERSION = 2  # 2: numpy RNG state stored as a tensor and plain values (weights_only loads)
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, as tensors and plain values only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return path


def step_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """``step_*.pt`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints; returns what was removed."""
    files = step_checkpoints(folder)
    doomed = files[:-keep_last] if keep_last > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def check_architecture(ckpt: dict, model_name: str, model_kwargs: dict, path: str | os.PathLike) -> None:
    """Refuse to resume a run from a checkpoint of another model or other model settings."""
    if ckpt["model_name"] != model_name or dict(ckpt.get("model_kwargs") or {}) != dict(model_kwargs):
        raise ConfigError(f"{path}: checkpoint holds {ckpt['model_name']!r} {ckpt.get('model_kwargs') or {}}, "
                          f"but the config builds {model_name!r} {dict(model_kwargs)}; resume needs the same model")



__all__ = ["atomic_save", "check_architecture", "load_model", "load_weights", "prune", "read_checkpoint",
           "rng_state", "set_rng_state", "step_checkpoints"]
