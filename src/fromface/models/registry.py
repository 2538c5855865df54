"""One registry and one factory for every model, each bound to its preprocessing.

A model's alignment template, input size and pixel normalisation travel with it (as in open_clip's
``create_model_and_transforms``) so a crop made for one network is never fed to another.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fromface.errors import ConfigError
from fromface.faces.preprocess import Preprocess
from fromface.models.weights import load_tag_state


@dataclass
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    preprocess: Preprocess
    description: str = ""
    licence: str = ""
    pretrained: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    preprocess: Preprocess,
    description: str = "",
    licence: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder`` under ``name`` with its preprocessing."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or (builder.__doc__ or "").strip().splitlines()[0:1]
        text = doc if isinstance(doc, str) else (doc[0] if doc else "")
        _REGISTRY[name] = ModelSpec(name, builder, preprocess, text, licence)
        return builder

    return wrap


def register_pretrained(model: str, tag: str, **info: Any) -> None:
    """Attach a pretrained tag (weights file, checksum, thresholds...) to a registered model."""
    get_spec(model).pretrained[tag] = info


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise ConfigError(f"unknown model {name!r}{hint}") from None


def create_model(name: str, pretrained: str | bool | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; its ``preprocess`` attribute says how to feed it.

    ``pretrained`` names a pretrained tag (``True``: the tag marked default); ``"name:tag"`` is the
    same as ``pretrained="tag"``. A tag fixes the architecture options it was trained with, so
    ``kwargs`` may not contradict them.
    """
    if ":" in name:
        name, tag_in_name = name.split(":", 1)
        if pretrained not in (None, False, tag_in_name):
            raise ConfigError(f"model {name!r}: tag {tag_in_name!r} in the name and pretrained={pretrained!r} differ")
        pretrained = tag_in_name
    spec = get_spec(name)
    tag = pick_tag(spec, pretrained)
    info = spec.pretrained.get(tag, {}) if tag else {}
    fixed = dict(info.get("kwargs") or {})
    clash = {k for k in kwargs if k in fixed and kwargs[k] != fixed[k]}
    if clash:
        raise ConfigError(f"{name}:{tag} was trained with {({k: fixed[k] for k in clash})}; cannot change it")
    try:
        model = spec.builder(**{**fixed, **kwargs})
    except TypeError as exc:
        raise ConfigError(f"cannot build {name!r} with {sorted(kwargs)}: {exc}") from None
    if tag and info.get("file"):
        load_tag_state(model, name, tag, info)
    model.preprocess = spec.preprocess
    model.model_name = name
    model.pretrained_tag = tag
    return model


def pick_tag(spec: ModelSpec, pretrained: str | bool | None) -> str | None:
    """The tag ``pretrained`` names: None for none; ``True`` for the one marked ``default`` (else the first)."""
    if not pretrained:
        return None
    if pretrained is True:
        defaults = [t for t, info in spec.pretrained.items() if info.get("default")]
        if len(defaults) > 1:  # which one FaceRecognizer() loads must not depend on the order files are read
            raise ConfigError(f"model {spec.name!r} has several pretrained tags marked default: {', '.join(defaults)}")
        tag = defaults[0] if defaults else next(iter(spec.pretrained), None)
        if tag is None:
            raise ConfigError(f"model {spec.name!r} has no pretrained weights")
        return tag
    if pretrained not in spec.pretrained:
        known = ", ".join(sorted(spec.pretrained)) or "none"
        raise ConfigError(f"model {spec.name!r} has no pretrained tag {pretrained!r}; known: {known}")
    return pretrained
