"""Resolve what a user names as a model (``"default"``, ``name``, ``name:tag``, a checkpoint, an ``.onnx`` file or a
built module) into one loaded network with its preprocessing, calibrated thresholds and identity.

:class:`~fromface.inference.recognizer.FaceRecognizer` and ``fromface eval`` both load through
:func:`load_face_model`, so a name means the same weights and thresholds everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fromface.data.files import file_sha256
from fromface.errors import ConfigError
from fromface.faces.aligner import Refiner
from fromface.faces.preprocess import Preprocess
from fromface.inference.onnx_backend import OnnxFaceModel, cached_export

# torch and fromface.models (which imports torch) are imported inside the functions that build or run a torch model:
# an exported .onnx file loads and runs with NumPy, OpenCV and onnxruntime alone, and torch takes seconds to import.

BACKENDS = ("auto", "onnx", "torch")

# Idle OpenMP threads sleep instead of spinning (a default; set OMP_WAIT_POLICY yourself to choose). It only takes
# effect if torch has not started its thread pool yet. On a small or shared CPU, spinning threads of torch,
# onnxruntime and OpenCV stall each other (docs/api.md, "Speed").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: What ``"default"`` falls back to when no shipped tag is marked default: OpenCV's SFace ported to PyTorch (no
#: occlusion head, no calibrated thresholds). The package ships a default tag, so this is for stripped installs.
PLAIN_TRUNK_MODEL = "sface_net_face"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")

#: Calibrated thresholds: ``{condition: {far: cosine}}``, condition "clean" or "occluded", far e.g. "far1e-3".
Thresholds = dict[str, dict[str, float]]


def default_model_name() -> str:
    """The registered model with a pretrained tag marked ``default`` (how a shipped model becomes the default),
    else :data:`PLAIN_TRUNK_MODEL` with a warning."""
    from fromface.models import get_spec, list_models

    for name in list_models():
        if any(info.get("default") for info in get_spec(name).pretrained.values()):
            return name
    warnings.warn(f"no shipped model is marked default; using {PLAIN_TRUNK_MODEL}, which has no occlusion head "
                  "and no calibrated thresholds", UserWarning, stacklevel=3)
    return PLAIN_TRUNK_MODEL


def default_model_spec() -> str:
    """What ``"default"`` names wherever a model is taken: the default model with its default tag (``name:tag``)."""
    from fromface.models import get_spec
    from fromface.models.registry import pick_tag

    name = default_model_name()
    tag = pick_tag(get_spec(name), True) if get_spec(name).pretrained else None
    return f"{name}:{tag}" if tag else name


def checked_thresholds(raw: Any, where: str) -> Thresholds:
    """A tag's or file's ``thresholds`` in the one schema, ``{condition: {far: float}}``; anything else is refused."""
    if not raw:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{where}: thresholds must be {{condition: {{far: value}}}}, got {raw!r}")
    try:
        return {str(cond): {str(far): float(t) for far, t in fars.items()} for cond, fars in raw.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: thresholds must be numbers, got {raw!r}") from None


@dataclass
class FaceModel:
    """A loaded network, torch or ONNX, and everything said about it.

    ``model_id`` is what a gallery records to refuse another model later: ``name:tag`` for a registered model with a
    tag, ``sha256:...`` of a checkpoint or ONNX file, ``module:name:digest`` of the weights otherwise. ``source`` is a
    note of where it came from (a path or a name), never used to load anything.
    """

    name: str
    preprocess: Preprocess
    grid: int | None
    tag: str | None
    thresholds: Thresholds
    model_id: str
    source: str
    file: Path | None = None
    torch_model: Any = None  # the torch nn.Module, when the torch backend runs it or it was exported from it
    onnx: OnnxFaceModel | None = None

    @property
    def backend(self) -> str:
        return "onnx" if self.onnx is not None else "torch"

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Network input (N, 3, H, W) -> (embedding, mask, pattern_logits) as NumPy; mask/logits None if absent."""
        if self.onnx is not None:
            return self.onnx(batch)
        import torch

        device = next(self.torch_model.parameters()).device
        with torch.inference_mode():
            out = self.torch_model(torch.from_numpy(batch).to(device))
        emb, mask, logits = (getattr(out, k, None) for k in ("embedding", "mask", "pattern_logits"))
        if emb is None:  # a bare network returning the embedding tensor
            emb = out
        return tuple(None if t is None else t.float().cpu().numpy() for t in (emb, mask, logits))

    def refiner(self) -> Refiner | None:
        """The align head as a :class:`~fromface.faces.aligner.FaceAligner` ``refine`` step, in whichever backend
        runs the model; None when the model has none (or it was loaded without it)."""
        if self.onnx is not None:
            if self.onnx.align_session is None:
                return None
            onnx, preprocess = self.onnx, self.preprocess
            return lambda crops: onnx.landmark_shift(preprocess.to_input(crops)).astype(np.float64)
        from fromface.models.from_net import model_refiner

        return model_refiner(self.torch_model, self.preprocess)


def onnx_available() -> bool:
    """Whether the ONNX backend can run and export here (onnxruntime, and onnxscript for torch's exporter)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def load_face_model(model: Any = None, tag: str | None = None, backend: str = "auto", device: str = "cpu",
                    refine: bool = True) -> FaceModel:
    """Load ``model``: None or ``"default"``, a registered ``name`` / ``name:tag``, a training checkpoint
    (``.pt``), an ``.onnx`` file from ``fromface export`` (always the ONNX backend) or a built ``nn.Module``.

    ``backend``: ``"onnx"`` runs a torch model through onnxruntime (exported once, cached under
    ``$FROMFACE_CACHE``); ``"torch"`` runs it in PyTorch; ``"auto"`` (default) takes onnxruntime for a registered
    model's pretrained weights on the CPU when onnxruntime is installed (about twice PyTorch's speed on a CPU, the
    same embeddings to cosine 0.9999), and PyTorch otherwise: for checkpoints and modules, which change while one
    trains, an export per set of weights would cost more than it saves. ``refine=False`` leaves an ONNX export's
    align head unloaded.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx":
        return _onnx_file(Path(model), refine)
    from torch import nn

    from fromface.models.checkpoint import load_model

    if model is None or model == "default":
        model = default_model_spec()
    registered_weights = False  # a registered name with a pretrained tag: fixed weights, worth one export
    if isinstance(model, nn.Module):
        if not hasattr(model, "preprocess"):
            raise ConfigError("a model passed as a module needs a .preprocess (build it with create_model)")
        loaded = _torch(model, model.model_name if hasattr(model, "model_name") else type(model).__name__)
    elif isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() in CHECKPOINT_SUFFIXES:
        path = Path(model)
        loaded = _torch(load_model(path), None, file=path)
    elif isinstance(model, str):
        loaded = _registered(model, tag)
        registered_weights = loaded.tag is not None
    else:
        raise ConfigError(f"model must be a registered name, a checkpoint or ONNX path or an nn.Module; got {model!r}")
    loaded.torch_model = loaded.torch_model.to(device).eval()
    if model is not loaded.torch_model and hasattr(loaded.torch_model, "unmasked_features"):
        loaded.torch_model.unmasked_features = False  # a network we built: skip the unmasked pass nobody reads
    auto_onnx = registered_weights and str(device) == "cpu" and onnx_available()
    if backend == "onnx" or (backend == "auto" and auto_onnx):
        loaded.onnx = OnnxFaceModel(cached_export(loaded.torch_model, loaded.tag, loaded.thresholds), align=refine)
    return loaded


def _onnx_file(path: Path, refine: bool = True) -> FaceModel:
    net = OnnxFaceModel(path, align=refine)
    return FaceModel(net.model_name, net.preprocess, net.grid, net.tag, checked_thresholds(net.thresholds, str(path)),
                     f"sha256:{file_sha256(path)}", str(path.resolve()), file=path, onnx=net)


def _registered(spec: str, tag: str | None) -> FaceModel:
    from fromface.models import create_model, get_spec
    from fromface.models.registry import pick_tag
    from fromface.models.weights import state_digest

    name, _, tag_in_name = spec.partition(":")
    model_spec = get_spec(name)  # unknown names list close matches
    if tag and tag_in_name and tag != tag_in_name:
        raise ConfigError(f"model {spec!r}: tag {tag_in_name!r} in the name and tag={tag!r} differ")
    chosen = pick_tag(model_spec, tag or tag_in_name or bool(model_spec.pretrained))
    net = create_model(name, pretrained=chosen)  # the factory loads (and checksums) a tag's shipped weights
    info = model_spec.pretrained.get(chosen, {}) if chosen else {}
    model_id = f"{name}:{chosen}" if chosen else f"module:{name}:{state_digest(net)}"  # untrained: random weights
    return FaceModel(name, net.preprocess, getattr(net, "grid", None), chosen,
                     checked_thresholds(info.get("thresholds"), f"{name}:{chosen}"), model_id, name, torch_model=net)


def _torch(net: Any, name: str | None, file: Path | None = None) -> FaceModel:
    """A checkpoint or a built module: a tag's thresholds were calibrated for other weights, so there are none,
    unless the module was built from a tag (``create_model(..., pretrained=tag)``) and still says so."""
    from fromface.models import get_spec
    from fromface.models.weights import state_digest

    name = name or getattr(net, "model_name", type(net).__name__)
    tag = getattr(net, "pretrained_tag", None) if file is None else None
    thresholds: Thresholds = {}
    if tag:
        info = get_spec(name).pretrained.get(tag) or {}
        thresholds = checked_thresholds(info.get("thresholds"), f"{name}:{tag}")
    if file is not None:
        model_id, source = f"sha256:{file_sha256(file)}", str(file.resolve())
    else:
        model_id = f"{name}:{tag}" if tag else f"module:{name}:{state_digest(net)}"
        source = name
    return FaceModel(name, net.preprocess, getattr(net, "grid", None), tag, thresholds, model_id, source, file=file,
                     torch_model=net)
