"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, CC0) in PyTorch.

:class:`DlibReader` reads dlib's serialization format in plain Python/NumPy, following dlib's
``serialize.h`` (variable-length integers, floats as mantissa/exponent pairs, tensors as raw
little-endian float32) and ``dnn/core.h``: a network is written outermost layer first, each
``add_layer`` writing its version, then its sub-network, then its own layer, so the file is read
inward to the input layer and back out. Tag and skip layers carry no id in the file, so the
layer sequence is checked against dlib's published network definition (:data:`FACE_NET_LEVELS`)
before the weights are used.

Semantics reproduced from dlib: ``con_`` pads ``k // 2`` at stride 1 and nothing at stride 2;
``max_pool``/``avg_pool`` likewise; ``add_prev_`` adds tensors of different sizes as if the smaller
were zero-padded at the end of each axis (channels, rows, columns); ``affine_`` is a per-channel
``gamma * x + beta``; the input layer computes ``(pixel - channel_mean) / 256`` on RGB pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fromface.errors import ConfigError
from fromface.faces.alignment import TEMPLATES, AlignmentTemplate, register_template
from fromface.models.backbones import Backbone
from fromface.models.outputs import FaceOutput
from fromface.models.registry import Preprocess, register_model, register_pretrained
from fromface.models.weights import load_converted, package_file

DLIB_FILE = "models/dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"  # the file parity was checked on
DLIB_MEANS = (122.782, 117.001, 104.298)  # input_rgb_image's per-channel means (RGB), pixels / 256
DLIB_PREPROCESS = Preprocess(template="dlib150", size=(150, 150), mean=tuple(m / 255 for m in DLIB_MEANS),
                             std=(256 / 255,) * 3, channel_order="RGB")
# Where YuNet's five landmarks (right eye, left eye, nose, mouth corners; image left to right) land in
# dlib's 150x150 chips (get_face_chip, padding 0.25): mean over 996 LFW photos, derived by
# tools/derive_dlib150_template.py --limit 1000 (per-point std 4-7.6 px; see docs/ports.md).
DLIB150_POINTS = np.array([[46.4607, 45.1758], [102.5902, 45.2132], [74.2660, 77.2056], [50.5202, 101.6924],
                           [98.5800, 102.4415]])
if "dlib150" not in TEMPLATES:
    register_template(AlignmentTemplate("dlib150", (150, 150), DLIB150_POINTS))
# (channels, residual blocks, first block down-samples): dlib's alevel4 ... alevel0, input to output.
FACE_NET_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
STEM_CHANNELS, EMBEDDING_DIM, INPUT_SIZE = 32, 128, 150


# ----------------------------------------------------------------------------- format reader


class DlibReader:
    """Reads dlib's serialized primitives from a byte buffer; errors name the file and offset."""

    def __init__(self, data: bytes, source: object = "<bytes>"):
        self.data, self.pos, self.source = memoryview(data), 0, source

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {problem} at byte {self.pos} (not a dlib network file, or truncated)")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"needs {n} more bytes, file ends")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def int(self, signed: bool = True) -> int:
        """dlib's integer: a control byte (size in the low bits, 0x80 = negative) then little-endian bytes."""
        ctrl = self.take(1)[0]
        size = ctrl & (0x0F if signed else 0x8F)
        if size == 0 or size > 8:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if signed and ctrl & 0x80 else value

    def float(self) -> float:
        """dlib's float: int64 mantissa and int16 exponent, value = mantissa * 2**exponent."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail("old ASCII float encoding is not supported")
        mantissa, exponent = self.int(), self.int()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return special[exponent] if exponent in special else math.ldexp(float(mantissa), exponent)

    def string(self) -> str:
        n = self.int(signed=False)
        if n > 1 << 20:
            raise self.fail(f"implausible string length {n}")
        return bytes(self.take(n)).decode("latin-1")

    def bool(self) -> bool:
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {ch!r}")
        return ch == b"1"

    def tensor(self) -> np.ndarray:
        """resizable_tensor: version 2, (n, k, nr, nc), then n*k*nr*nc little-endian float32."""
        if (version := self.int()) != 2:
            raise self.fail(f"tensor version {version}, expected 2")
        shape = tuple(self.int() for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"negative tensor shape {shape}")
        count = math.prod(shape)
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        if (version := self.int()) != 1:
            raise self.fail(f"alias_tensor version {version}, expected 1")
        return tuple(self.int() for _ in range(4))

    def peek_input_layer(self) -> bool:
        """Whether the next item is the input layer's name (a string starting with "input")."""
        start = self.pos
        try:
            n = self.int(signed=False)
            return 5 <= n <= 64 and bytes(self.take(5)) == b"input"
        except ConfigError:
            return False
        finally:
            self.pos = start


@dataclass
class Layer:
    """One computational layer read from the file; ``kind`` is dlib's name without version suffix."""

    kind: str
    params: dict = field(default_factory=dict)


def _read_details(r: DlibReader) -> Layer:
    """One layer's own data (``con_``, ``fc_``, ``relu_``, ``affine_``, ``bn_``, pools, ``add_prev_``)."""
    version = r.string()
    if version in ("con_4", "con_5"):
        params = r.tensor().ravel()
        p = {"filters": r.int(), "nr": r.int(), "nc": r.int()}
        p.update(stride=(r.int(), r.int()), padding=(r.int(), r.int()))
        fshape, bshape = r.alias(), r.alias()
        _ = [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
        use_bias = r.bool() if version == "con_5" else True
        nf = int(np.prod(fshape))
        p["weight"] = params[:nf].reshape(fshape)
        p["bias"] = params[nf: nf + int(np.prod(bshape))].copy() if use_bias else None
        return Layer("con", p)
    if version in ("fc_2", "fc_3"):
        outputs, inputs = r.int(signed=False), r.int(signed=False)
        params = r.tensor().ravel()
        wshape, bshape = r.alias(), r.alias()
        bias_mode = r.int()
        _ = [r.float() for _ in range(4)]
        use_bias = r.bool() if version == "fc_3" else True
        nw = int(np.prod(wshape))
        weight = params[:nw].reshape(inputs, outputs).T  # dlib computes x @ W with W (inputs, outputs)
        bias = params[nw: nw + int(np.prod(bshape))] if bias_mode == 0 and use_bias else None
        return Layer("fc", {"weight": weight, "bias": bias, "outputs": outputs, "inputs": inputs})
    if version in ("affine_", "affine_2"):
        params = r.tensor().ravel()
        gshape, _bshape = r.alias(), r.alias()
        _mode = r.int()
        if version == "affine_2" and r.bool():
            raise r.fail("disabled affine layers are not supported")
        n = int(np.prod(gshape))
        return Layer("affine", {"gamma": params[:n].copy(), "beta": params[n: 2 * n].copy()})
    if version in ("bn_con2", "bn_fc2"):
        params = r.tensor().ravel()
        gshape, _bshape = r.alias(), r.alias()
        _means, _invstds, run_mean, run_var = (r.tensor().ravel() for _ in range(4))
        _ = r.int(signed=False), r.int(signed=False), [r.float() for _ in range(4)]
        eps = r.float()
        n = int(np.prod(gshape))
        gamma = params[:n] / np.sqrt(run_var + eps)  # dlib's affine_(bn_) conversion
        return Layer("affine", {"gamma": gamma.astype(np.float32), "beta": (params[n: 2 * n] - gamma * run_mean)})
    if version in ("max_pool_2", "avg_pool_2"):
        p = {"nr": r.int(), "nc": r.int(), "stride": (r.int(), r.int()), "padding": (r.int(), r.int())}
        return Layer(version[:-2], p)
    if version in ("relu_", "add_prev_"):
        return Layer(version.rstrip("_"))
    raise r.fail(f"unsupported layer {version!r}")


def _skip_add_layer_tail(r: DlibReader, version: int, on_input: bool) -> None:
    """add_layer's bookkeeping after its layer: flags, cached tensors (ignored)."""
    for _ in range(3):
        r.bool()
    r.tensor(), r.tensor()  # x_grad, cached_output
    if on_input or version >= 2:
        r.tensor()  # grad_final / params_grad
    if on_input and version >= 3:
        r.int(signed=False)  # sample_expansion_factor


@dataclass
class DlibNetwork:
    """What the file holds: loss name, input layer, and the layers from input to output ("tag" = tag/skip)."""

    loss: str
    input_kind: str
    input_means: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[Layer]


def read_dlib_network(data: bytes, source: object = "<bytes>") -> DlibNetwork:
    """Parse a dlib ``loss_*<...<input_*>>`` network file into its layer list (no topology assumed)."""
    r = DlibReader(data, source)
    try:
        return _read_network(r)
    except (ValueError, IndexError, OverflowError, MemoryError) as exc:  # inconsistent sizes inside a layer
        raise r.fail(f"inconsistent layer data ({exc})") from None


def _read_network(r: DlibReader) -> DlibNetwork:
    if r.int() != 1:
        raise r.fail("expected an add_loss_layer (version 1)")
    loss = r.string()
    if not loss.startswith("loss_"):
        raise r.fail(f"expected a loss layer, found {loss[:40]!r}")
    if loss == "loss_metric_2":
        r.float(), r.float()
    versions = []
    while not r.peek_input_layer():
        versions.append(r.int())
        if len(versions) > 10000:
            raise r.fail("network nesting too deep")
    if not versions or versions[-1] not in (2, 3):
        raise r.fail("the input layer must sit under an add_layer")
    input_kind = r.string()
    if not input_kind.startswith("input_rgb_image"):
        raise r.fail(f"unsupported input layer {input_kind!r}")
    means = (r.float(), r.float(), r.float())
    size = (r.int(signed=False), r.int(signed=False)) if input_kind == "input_rgb_image_sized" else (0, 0)
    layers = [_read_details(r)]
    _skip_add_layer_tail(r, versions.pop(), on_input=True)
    for version in reversed(versions):
        if version == 1:
            layers.append(Layer("tag"))
        elif version == 2:
            layers.append(_read_details(r))
            _skip_add_layer_tail(r, version, on_input=False)
        else:
            raise r.fail(f"unexpected layer wrapper version {version}")
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes")
    return DlibNetwork(loss, input_kind, means, size, layers)


# ----------------------------------------------------------------------------- PyTorch module


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev_``: sum over the larger shape, the smaller tensor zero-padded at the ends."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return grow(a) + grow(b)


def _out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


class Affine(nn.Module):
    """dlib's ``affine_``: per-channel ``gamma * x + beta`` (a batch norm frozen at test time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class DlibBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(block(x) + shortcut), the shortcut 2x2-average-pooled when down."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.affine2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_prev(y, shortcut))


class DlibResNetBackbone(Backbone):
    """Stem (7x7/2 conv, affine, relu, 3x3/2 max-pool) and five residual levels; returns each level's map.

    At 150x150 the maps are 32x35x35, 64x17x17, 128x8x8, 256x4x4 and 256x2x2: dlib's shortcut pool
    and its stride-2 convolution disagree on odd sizes, and ``add_prev`` keeps the larger one.
    """

    stage_channels = tuple(c for c, _, _ in FACE_NET_LEVELS)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0), Affine(STEM_CHANNELS), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 0))
        levels, cin = [], STEM_CHANNELS
        for cout, blocks, down in FACE_NET_LEVELS:
            levels.append(nn.Sequential(*[DlibBlock(cin if i == 0 else cout, cout, down and i == 0)
                                          for i in range(blocks)]))
            cin = cout
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_until(x, len(self.levels) - 1)

    def forward_until(self, x: torch.Tensor, stage: int) -> list[torch.Tensor]:
        x, maps = self.stem(x), []
        for level in self.levels[: stage + 1]:
            x = level(x)
            maps.append(x)
        return maps

    def forward_after(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the levels above ``stage`` on its map: FROM can mask the 8x8 or 4x4 map instead of the 2x2 one."""
        for level in self.levels[stage + 1:]:
            x = level(x)
        return x

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        h, w = (_out(_out(n, 7, 2, 0), 3, 2, 0) for n in (height, width))
        shapes = []
        for cout, _blocks, down in FACE_NET_LEVELS:
            if down:
                h, w = (max(_out(n, 3, 2, 0), _out(n, 2, 2, 0)) for n in (h, w))
            shapes.append((cout, h, w))
        return shapes


class DlibHead(nn.Module):
    """Global average pool over the last map, then the 128-d projection (no bias)."""

    def __init__(self, channels: int, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.fc = nn.Linear(channels, embedding_dim, bias=False)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(feature_map.mean(dim=(2, 3)))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet as a plain recognizer (150x150 chips, 128-d embedding)."""

    def __init__(self, from_package: bool = True, use_cache: bool = True):
        super().__init__()
        self.input_size = (INPUT_SIZE, INPUT_SIZE)
        self.embedding_dim = EMBEDDING_DIM
        self.backbone = DlibResNetBackbone()
        self.head = DlibHead(self.backbone.stage_shapes(*self.input_size)[-1][0])
        if from_package:
            self.load_state_dict(load_dlib_state(use_cache=use_cache))
            self.eval()

    def forward(self, x: torch.Tensor) -> FaceOutput:
        emb = self.head(self.backbone(x)[-1])
        return FaceOutput(embedding=emb, features=emb)


# ----------------------------------------------------------------------------- file -> state dict


class _Cursor:
    """Walks the file's layers in order, checking each against dlib's face network definition."""

    def __init__(self, layers: list[Layer], source: object):
        self.layers, self.i, self.source = layers, 0, source

    def next(self, kind: str, **expect) -> Layer:
        if self.i >= len(self.layers):
            raise ConfigError(f"{self.source}: network ends after {self.i} layers, expected a {kind}")
        layer = self.layers[self.i]
        got = {k: layer.params.get(k) for k in expect}
        if layer.kind != kind or got != expect:
            raise ConfigError(f"{self.source}: layer {self.i} is {layer.kind} {got}, expected {kind} {expect}: "
                              "not dlib's face-recognition ResNet")
        self.i += 1
        return layer


def _conv(cur: _Cursor, state: dict, prefix: str, filters: int, k: int, stride: int, pad: int) -> None:
    layer = cur.next("con", filters=filters, nr=k, nc=k, stride=(stride, stride), padding=(pad, pad))
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = layer.params["weight"], layer.params["bias"]


def _affine(cur: _Cursor, state: dict, prefix: str) -> None:
    layer = cur.next("affine")
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = layer.params["gamma"], layer.params["beta"]


def dlib_state_from_network(net: DlibNetwork, source: object = "<network>") -> dict[str, torch.Tensor]:
    """Map a parsed dlib face network onto :class:`DlibResNet`'s parameter names, checking every layer."""
    if net.input_kind != "input_rgb_image_sized" or net.input_size != (INPUT_SIZE, INPUT_SIZE):
        raise ConfigError(f"{source}: input {net.input_kind} {net.input_size}, expected 150x150 RGB")
    if not np.allclose(net.input_means, DLIB_MEANS, atol=1e-4):
        raise ConfigError(f"{source}: input means {net.input_means} differ from {DLIB_MEANS}")
    cur, state = _Cursor(net.layers, source), {}
    _conv(cur, state, "backbone.stem.0", STEM_CHANNELS, 7, 2, 0)
    _affine(cur, state, "backbone.stem.1")
    cur.next("relu")
    cur.next("max_pool", nr=3, nc=3, stride=(2, 2), padding=(0, 0))
    for li, (cout, blocks, down) in enumerate(FACE_NET_LEVELS):
        for bi in range(blocks):
            d, p = down and bi == 0, f"backbone.levels.{li}.{bi}"
            cur.next("tag")
            _conv(cur, state, f"{p}.conv1", cout, 3, 2 if d else 1, 0 if d else 1)
            _affine(cur, state, f"{p}.affine1")
            cur.next("relu")
            _conv(cur, state, f"{p}.conv2", cout, 3, 1, 1)
            _affine(cur, state, f"{p}.affine2")
            if d:  # tag2, skip1 (back to the block input), 2x2 average pool
                cur.next("tag"), cur.next("tag")
                cur.next("avg_pool", nr=2, nc=2, stride=(2, 2), padding=(0, 0))
            cur.next("add_prev"), cur.next("relu")
    cur.next("avg_pool", nr=0, nc=0)  # avg_pool_everything
    fc = cur.next("fc", outputs=EMBEDDING_DIM, inputs=FACE_NET_LEVELS[-1][0])
    if fc.params["bias"] is not None:
        raise ConfigError(f"{source}: the embedding layer has a bias; dlib's face network has none")
    state["head.fc.weight"] = fc.params["weight"]
    if cur.i != len(net.layers):
        raise ConfigError(f"{source}: {len(net.layers) - cur.i} layers after the embedding")
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}


def convert_dlib_dat(path: Path) -> dict[str, torch.Tensor]:
    """Read a dlib face-recognition network file into :class:`DlibResNet`'s state dict."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read dlib network file ({exc.strerror})") from None
    return dlib_state_from_network(read_dlib_network(data, path), path)


def dlib_dat_path() -> Path:
    """The network file inside the installed ``face_recognition_models`` package."""
    return package_file("face_recognition_models", DLIB_FILE, "pip install face_recognition_models")


def load_dlib_state(path: Path | None = None, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """dlib ResNet weights as a state dict (converted once, then read from the safetensors cache)."""
    source = Path(path) if path else dlib_dat_path()
    return load_converted("dlib_resnet", source, convert_dlib_dat, use_cache, None if path else DLIB_SHA256)


_DESC = "dlib face-recognition ResNet (150x150, 128-d), ported from face_recognition_models"


@register_model("dlib_resnet", DLIB_PREPROCESS, _DESC + "; backbone for FROM", licence="CC0-1.0")
def dlib_resnet(from_package: bool = True, use_cache: bool = True) -> DlibResNet:
    return DlibResNet(from_package, use_cache)


@register_model("dlib_resnet_face", DLIB_PREPROCESS, _DESC, licence="CC0-1.0")
def dlib_resnet_face(from_package: bool = True, use_cache: bool = True) -> DlibResNet:
    return DlibResNet(from_package, use_cache)


for _name in ("dlib_resnet", "dlib_resnet_face"):  # no "file": the weights come from face_recognition_models
    register_pretrained(_name, "dlib_v1", source=f"face_recognition_models/{DLIB_FILE}", source_sha256=DLIB_SHA256,
                        licence="CC0-1.0", parity="cosine >= 0.9999 vs dlib compute_face_descriptor (docs/ports.md)")
