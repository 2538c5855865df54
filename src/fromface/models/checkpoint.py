"""Reading model checkpoints as data: the product (FaceRecognizer, ``fromface eval``) and the trainer share this.

A checkpoint is a dict saved with ``torch.save`` holding at least ``model_name``, ``model_kwargs`` and
``state_dict``; the trainer adds its resume state (``fromface.training.checkpoint``). Everything in it is a tensor or
a plain Python value (dict, list, tuple, str, number, None), so it is read with ``torch.load(weights_only=True)``:
a checkpoint is data, and a crafted file cannot run code when it is opened.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fromface.errors import ConfigError
from fromface.models.registry import create_model


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict on CPU as data only (``weights_only=True``: tensors and plain Python values; a pickle
    that names any other object is refused, never run). A clear error for a missing, foreign or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        why = next((line for line in lines if "Unsupported" in line or "Unpickler error" in line), lines[0] if lines
                   else type(exc).__name__)
        why = why.split(" was not an allowed global")[0]  # not torch's advice on how to load it anyway
        raise ConfigError(f"{path}: refused: the file holds more than tensors and plain values, and fromface "
                          f"never runs code from a checkpoint ({why[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_name" not in ckpt:
        raise ConfigError(f"{path}: not a fromface checkpoint (no model_name/state_dict)")
    return ckpt


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
    ckpt = read_checkpoint(path)
    model = create_model(ckpt["model_name"], **(ckpt.get("model_kwargs") or {}))
    load_weights(model, ckpt["state_dict"], path, strict=True)
    return model.to(map_location).eval()
