"""ONNX export: onnxruntime gives PyTorch's embedding, mask and pattern logits (<= 1e-4) with a dynamic batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class NoDetector:
    score_threshold = 0.6

    def detect(self, image_rgb, score_threshold=None):
        return []


def crops(seed: int, n: int, occlude: bool = False) -> np.ndarray:
    """Smooth random 112x112 crops; ``occlude`` pastes a grey block over the lower half (a mask-like occluder)."""
    rng = np.random.default_rng(seed)
    out = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).resize((112, 112)))
                    for _ in range(n)])
    if occlude:
        out[:, 60:, 10:102] = 128
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from fromface.cli.main import main
    from fromface.models import create_model

    torch.manual_seed(0)
    net = create_model("from_mobilefacenet", embedding_dim=128).eval()
    for m in net.modules():  # non-trivial batch-norm statistics, so a wrong export would show
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = folder / "tiny.pt"
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128},
                "state_dict": net.state_dict()}, ckpt)
    out = folder / "tiny.onnx"
    assert main(["export", "onnx", str(out), "--model", str(ckpt)]) == 0  # also checks ort vs torch itself
    return net, ckpt, out


@pytest.mark.parametrize("occlude", [False, True], ids=["clean", "occluded"])
def test_onnxruntime_matches_torch(exported, occlude):
    import torch

    from fromface.inference.onnx_backend import OnnxFaceModel

    net, _, path = exported
    model = OnnxFaceModel(path)
    assert model.output_names == ["embedding", "mask", "pattern_logits"]
    assert model.model_name == "from_mobilefacenet" and model.grid == 5 and model.preprocess == net.preprocess
    for n in (1, 3):  # dynamic batch
        x = net.preprocess.to_input(crops(n, n, occlude))
        with torch.no_grad():
            want = net(torch.from_numpy(x))
        emb, mask, logits = model(x)
        assert emb.shape == (n, 128) and mask.shape == tuple(want.mask.shape) and logits.shape == (n, 226)
        assert np.abs(emb - want.embedding.numpy()).max() <= 1e-4
        assert np.abs(mask - want.mask.numpy()).max() <= 1e-4
        assert np.abs(logits - want.pattern_logits.numpy()).max() <= 1e-4


def test_recognizer_onnx_backend_matches_torch(exported):
    from fromface.inference.recognizer import FaceRecognizer

    _, ckpt, path = exported
    images = list(crops(7, 2)) + list(crops(8, 1, occlude=True))
    torch_faces = FaceRecognizer(ckpt, fallback=True, detector=NoDetector()).embed(images)
    onnx_rec = FaceRecognizer(path, fallback=True, detector=NoDetector())
    assert onnx_rec.backend == "onnx" and onnx_rec.torch_model is None
    onnx_faces = onnx_rec.embed(images)
    for [t], [o] in zip(torch_faces, onnx_faces):
        assert np.abs(t.embedding - o.embedding).max() <= 1e-4
        assert np.abs(t.heatmap - o.heatmap).max() <= 1e-4
        assert t.pattern == o.pattern and t.visible_fraction == o.visible_fraction
    v = onnx_rec.verify(images[0], images[0])
    assert v.same and v.score == pytest.approx(1.0, abs=1e-5)


def test_bad_onnx_files(tmp_path):
    from fromface.errors import ConfigError
    from fromface.inference.onnx_backend import OnnxFaceModel

    with pytest.raises(ConfigError, match="not found"):
        OnnxFaceModel(tmp_path / "nothing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="junk.onnx"):
        OnnxFaceModel(junk)


def test_metadata_keeps_thresholds_only_when_given():
    import json

    from fromface.inference.onnx_backend import model_metadata
    from fromface.models import create_model

    net = create_model("mobilefacenet")
    plain = model_metadata(net)
    assert plain["fromface.model_name"] == "mobilefacenet" and json.loads(plain["fromface.thresholds"]) == {}
    assert json.loads(plain["fromface.preprocess"])["size"] == [112, 112] and plain["fromface.grid"] == ""
    tagged = model_metadata(net, "v1", {"clean": {"far1e-3": 0.4}})
    assert tagged["fromface.tag"] == "v1" and json.loads(tagged["fromface.thresholds"])["clean"]["far1e-3"] == 0.4
