"""Export a fromface model to ONNX and run it with onnxruntime.

An export is one file, or two for a FROM model with an align head:

- ``NAME.onnx``: input ``input`` (N x 3 x H x W, dynamic N); outputs ``embedding`` and, for FROM models, ``mask`` and
  ``pattern_logits``. What is needed to use the file alone (model name, preprocessing, pattern grid, pretrained
  thresholds) is stored in its metadata, so ``FaceRecognizer("NAME.onnx")`` needs no torch model.
- ``NAME.align.onnx``: the align head's graph, the trunk up to the masked stage and the head, input ``input`` and
  output ``landmark_shift`` (N x 5 x 2). It is a graph of its own because the first look at a face needs only this
  small part of the network, and onnxruntime runs a whole graph whatever outputs are asked for. The main file names
  it and records its SHA-256, so a mismatched pair is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fromface.data.files import atomic_write, file_sha256
from fromface.errors import ConfigError
from fromface.faces.preprocess import Preprocess

# torch, onnx and fromface.models are imported inside the export functions only: running an exported file needs
# onnxruntime, NumPy and OpenCV, nothing else.
OUTPUTS = ("embedding", "mask", "pattern_logits")
ALIGN_OUTPUT = "landmark_shift"
OPSET = 18


def align_path(path: str | os.PathLike) -> Path:
    """Where the align head's graph of the export ``path`` lives: ``NAME.onnx`` -> ``NAME.align.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.align{path.suffix or '.onnx'}")


def _wrapper(model):
    """(full graph, align graph or None) as modules the exporter takes, on a copy of ``model`` whose PReLUs are
    written as ``relu(x) + slope * min(x, 0)``: the same function, which onnxruntime runs in its blocked conv layout,
    where its PReLU kernel makes it convert every map back and forth (measured: the align graph 2.2x, the full
    graph 1.5x faster on a CPU)."""
    import copy

    import torch

    class _FastPReLU(torch.nn.Module):
        def __init__(self, prelu: torch.nn.PReLU):
            super().__init__()
            self.slope = torch.nn.Parameter(prelu.weight.detach().clone(), requires_grad=False)

        def forward(self, x):
            slope = self.slope.view(1, -1, *([1] * (x.dim() - 2))) if self.slope.numel() > 1 else self.slope
            return torch.relu(x) + slope * torch.clamp(x, max=0.0)

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.PReLU):
                setattr(module, name, _FastPReLU(child))
            else:
                swap(child)

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

    class _AlignExport(torch.nn.Module):
        """Only what the first look needs: the trunk up to the masked stage and the align head."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.predict_landmark_shift(x)

    net = copy.deepcopy(model).eval()
    if hasattr(net, "unmasked_features"):
        net.unmasked_features = False  # not an output of the export
    swap(net)
    return _Export(net).eval(), (_AlignExport(net).eval() if getattr(net, "align_head", None) else None)


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
                opset: int = OPSET, weights_sha256: str | None = None) -> Path:
    """Export ``model`` (eval mode) with a dynamic batch axis; returns the written path (written atomically).

    A model with an align head also gets its :func:`align_path` graph, written first, so the main file never names
    an align graph that is not there. ``weights_sha256`` records which weights file the export was made from (the
    shipped exports say which safetensors they came from, so a stale one is never used)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnxscript: pip install 'fromface[onnx]'") from None
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the name of the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    full, align = _wrapper(model)
    metadata = model_metadata(model, tag, thresholds)
    if weights_sha256:
        metadata["fromface.weights_sha256"] = weights_sha256
    if align is not None:
        side = align_path(path)
        _save(_export_graph(align, model, [ALIGN_OUTPUT], opset), side,
              {**metadata, "fromface.role": "align head of " + path.name})
        metadata.update({"fromface.align_file": side.name, "fromface.align_sha256": file_sha256(side)})
    _save(_export_graph(full, model, None, opset), path, metadata)
    return path


def _export_graph(module, model, output_names: list[str] | None, opset: int):
    import torch

    h, w = model.preprocess.size
    example = torch.randn(2, 3, h, w)
    if output_names is None:
        with torch.no_grad():
            output_names = list(OUTPUTS[:len(module(example))])
    batch = torch.export.Dim("batch", min=1, max=4096)
    exporter_log = logging.getLogger("torch.onnx")  # notes such as "torchvision is not installed" are not ours
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), input_names=["input"], output_names=output_names,
                                        dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True,
                                        external_data=False, verbose=False)
        finally:
            exporter_log.setLevel(level)
    return program.model_proto


def _save(proto, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        with atomic_write(path) as tmp:
            onnx.save(proto, str(tmp))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the ONNX file ({exc.strerror or exc})") from None


def cached_export(model, tag: str | None = None, thresholds: dict | None = None) -> Path:
    """Export once per (model name, weights, thresholds) into ``$FROMFACE_CACHE/onnx`` and reuse the files.

    Each export is a folder made under a temporary name and renamed into place, so processes exporting the same
    model at once never mix one's model file with another's align graph."""
    import shutil
    import tempfile

    from fromface.models.weights import cache_dir, state_digest

    name = getattr(model, "model_name", type(model).__name__)
    key = [tag, thresholds or {}, "align graph", "fast prelu"]  # exports made by older code are not reused
    extra = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:6]
    folder = cache_dir() / "onnx" / f"{name}-{state_digest(model)}-{extra}"
    path = folder / "model.onnx"
    if path.is_file():
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        export_onnx(model, work / "model.onnx", tag, thresholds)
        try:
            work.rename(folder)
        except OSError:  # another process got there first: use its export
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def session_options(threads: int | None = None):
    """onnxruntime options as the library runs them: ``threads`` intra-op threads (default: ``OMP_NUM_THREADS``
    when set, as for torch, else onnxruntime's one per physical core), and idle threads that sleep rather than spin
    unless ``OMP_WAIT_POLICY=ACTIVE``. Spinning threads of the two graphs' sessions, OpenCV's detector and any other
    busy process stall each other: on a 2-core CPU the default path ran at about half its speed with spinning on
    (``benchmarks/e2e_speed.py --omp-wait default``, docs/api.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                          else None)
    if threads:
        options.intra_op_num_threads = int(threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("the ONNX backend needs onnxruntime: pip install onnxruntime") from None
    if not path.is_file():
        raise ConfigError(f"{path}: ONNX file not found")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ConfigError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None


class OnnxFaceModel:
    """An exported fromface model under onnxruntime; ``model(batch)`` -> (embedding, mask, pattern_logits) and,
    when the export has an align head (and ``align`` is true), ``model.landmark_shift(batch)``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, align: bool = True):
        self.path = Path(path)
        self.session = _session(self.path, threads)
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
        self.weights_sha256 = meta.get("fromface.weights_sha256") or None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.align_session = self._align_session(meta, threads) if align else None

    def _align_session(self, meta: dict[str, Any], threads: int | None):
        name = meta.get("fromface.align_file")
        if not name:
            return None
        side = self.path.parent / Path(name).name  # a name beside the model file, never a path elsewhere
        if not side.is_file():
            raise ConfigError(f"{self.path}: its align head {side.name} is missing (`fromface export onnx` writes "
                              "it beside the model); copy it there, or pass refine=False to run without it")
        if file_sha256(side) != meta.get("fromface.align_sha256"):
            raise ConfigError(f"{side}: is not the align head exported with {self.path.name} (checksum differs); "
                              "export both again")
        return _session(side, threads)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        outs = dict(zip(self.output_names, self.session.run(None, {self.input_name: _contiguous(batch)})))
        return outs["embedding"], outs.get("mask"), outs.get("pattern_logits")

    def landmark_shift(self, batch: np.ndarray) -> np.ndarray:
        """The align head's (N, 5, 2) shift for network input ``batch``; only the align graph runs."""
        if self.align_session is None:
            raise ConfigError(f"{self.path}: no align head loaded (the export has none, or it was loaded without)")
        return self.align_session.run(None, {self.input_name: _contiguous(batch)})[0]


def _contiguous(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch, dtype=np.float32)
