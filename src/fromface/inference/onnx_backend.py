"""Export a fromface model to ONNX and run it with onnxruntime.

The exported graph has one input (``input``: N x 3 x H x W, dynamic N) and the outputs ``embedding`` and, for FROM
models, ``mask`` and ``pattern_logits``. What is needed to use the file alone (model name, preprocessing, pattern grid,
pretrained thresholds) is stored in the ONNX metadata, so ``FaceRecognizer("model.onnx")`` needs no torch model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fromface.data.files import atomic_write
from fromface.errors import ConfigError
from fromface.faces.preprocess import Preprocess

# torch, onnx and fromface.models are imported inside the export functions only: running an exported file needs
# onnxruntime, NumPy and OpenCV, nothing else. onnxruntime is the optional `onnx` extra, imported where it is used.
OUTPUTS = ("embedding", "mask", "pattern_logits")
OPSET = 18


def _wrapper(model):
    import torch

    class _Export(torch.nn.Module):
        """Turns FaceOutput into a plain tuple (the exporter wants tensors, not None)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            if out.mask is None or out.pattern_logits is None:
                return (out.embedding,)
            return out.embedding, out.mask, out.pattern_logits

    return _Export(model).eval()


def model_metadata(model, tag: str | None = None, thresholds: dict | None = None) -> dict[str, str]:
    """String metadata written into the ONNX file: enough to preprocess inputs and read the outputs.
    ``thresholds`` are stored only when given: they belong to particular weights (a pretrained tag)."""
    name = getattr(model, "model_name", type(model).__name__)
    pre = model.preprocess
    return {
        "fromface.model_name": name,
        "fromface.preprocess": json.dumps({"template": pre.template, "size": list(pre.size), "mean": list(pre.mean),
                                           "std": list(pre.std), "channel_order": pre.channel_order}),
        "fromface.grid": str(getattr(model, "grid", "") or ""),
        "fromface.tag": tag or "",
        "fromface.thresholds": json.dumps(thresholds or {}),
    }


def export_onnx(model, path: str | os.PathLike, tag: str | None = None, thresholds: dict | None = None,
                opset: int = OPSET) -> Path:
    """Export ``model`` (eval mode) with a dynamic batch axis; returns the written path (written atomically)."""
    import onnx
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnxscript: pip install 'fromface[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    h, w = model.preprocess.size
    wrapped = _wrapper(model)
    example = torch.randn(2, 3, h, w)
    with torch.no_grad():
        n_out = len(wrapped(example))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, (example,), input_names=["input"], output_names=list(OUTPUTS[:n_out]),
                                    dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True,
                                    external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in model_metadata(model, tag, thresholds).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the name of the .onnx file to write")
    try:
        with atomic_write(path) as tmp:
            onnx.save(proto, str(tmp))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the ONNX file ({exc.strerror or exc})") from None
    return path


def cached_export(model, tag: str | None = None, thresholds: dict | None = None) -> Path:
    """Export once per (model name, weights, thresholds) into ``$FROMFACE_CACHE/onnx`` and reuse the file."""
    from fromface.models.weights import cache_dir, state_digest

    name = getattr(model, "model_name", type(model).__name__)
    extra = hashlib.sha256(json.dumps([tag, thresholds or {}], sort_keys=True).encode()).hexdigest()[:6]
    path = cache_dir() / "onnx" / f"{name}-{state_digest(model)}-{extra}.onnx"
    if not path.is_file():
        export_onnx(model, path, tag, thresholds)
    return path


class OnnxFaceModel:
    """An exported fromface model under onnxruntime; ``model(batch)`` -> (embedding, mask, pattern_logits)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the ONNX backend needs onnxruntime: pip install 'fromface[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            # Same knob as torch's OpenMP pool: idle threads sleep instead of spinning (shared, busy CPUs).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        meta: dict[str, Any] = self.session.get_modelmeta().custom_metadata_map
        if "fromface.preprocess" not in meta:
            raise ConfigError(f"{self.path}: not exported by fromface (no preprocessing metadata); "
                              "use `fromface export onnx`")
        pre = json.loads(meta["fromface.preprocess"])
        self.preprocess = Preprocess(pre["template"], tuple(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]),
                                     pre["channel_order"])
        self.model_name = meta.get("fromface.model_name", self.path.stem)
        self.grid = int(meta["fromface.grid"]) if meta.get("fromface.grid") else None
        self.tag = meta.get("fromface.tag") or None
        self.thresholds = json.loads(meta.get("fromface.thresholds") or "{}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        outs = dict(zip(self.output_names, self.session.run(None, {self.input_name: batch.astype(np.float32)})))
        return outs["embedding"], outs.get("mask"), outs.get("pattern_logits")
