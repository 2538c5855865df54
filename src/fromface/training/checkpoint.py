"""Checkpoints: atomic writes, the last N kept, RNG capture, and loading with clear architecture errors.

Format (a dict saved with ``torch.save``): ``model_name``, ``model_kwargs``, ``state_dict`` (the
model's weights, enough for inference and evaluation), ``config`` (the resolved training config),
``step``, ``epoch``, ``batch_in_epoch``, ``optimizer``, ``scheduler``, ``scaler``, ``loss_state`` (the
margin classifier), ``rng`` and ``best_metric``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fromface.errors import ConfigError

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
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


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict on CPU; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_name" not in ckpt:
        raise ConfigError(f"{path}: not a fromface checkpoint (no model_name/state_dict)")
    return ckpt


def check_architecture(ckpt: dict, model_name: str, model_kwargs: dict, path: str | os.PathLike) -> None:
    """Refuse to resume a run from a checkpoint of another model or other model settings."""
    if ckpt["model_name"] != model_name or dict(ckpt.get("model_kwargs") or {}) != dict(model_kwargs):
        raise ConfigError(f"{path}: checkpoint holds {ckpt['model_name']!r} {ckpt.get('model_kwargs') or {}}, "
                          f"but the config builds {model_name!r} {dict(model_kwargs)}; resume needs the same model")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                 strict: bool = True) -> dict[str, list[str]]:
    """Copy weights into ``model``; with ``strict=False`` only keys present in both must agree in shape.

    A baseline's ``backbone.*``/``head.*`` weights load into its FROM variant this way (the mask
    decoder and pattern predictor stay freshly initialised). Shape mismatches, or no shared key at
    all, mean the checkpoint is from another architecture: a :class:`ConfigError` says so.
    """
    own = model.state_dict()
    shared = [k for k in state_dict if k in own]
    bad = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shared
           if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    name = getattr(model, "model_name", type(model).__name__)
    if bad or not shared:
        detail = f"{len(bad)} tensors differ in shape, e.g. {bad[0]}" if bad else "no parameter names in common"
        raise ConfigError(f"{path}: checkpoint weights do not fit model {name!r} ({detail}); "
                          "it was trained for another architecture")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise ConfigError(f"{path}: checkpoint does not match model {name!r}: {len(missing)} missing keys "
                          f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    model.load_state_dict({k: state_dict[k] for k in shared}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a training checkpoint describes (``create_model(model_name, **model_kwargs)``)."""
    from fromface.models import create_model

    ckpt = read_checkpoint(path)
    model = create_model(ckpt["model_name"], **(ckpt.get("model_kwargs") or {}))
    load_weights(model, ckpt["state_dict"], path, strict=True)
    return model.to(map_location).eval()
