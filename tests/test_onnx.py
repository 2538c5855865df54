"""ONNX export: onnxruntime gives PyTorch's embedding, mask, pattern logits and align-head shift (<= 1e-4) with a
dynamic batch, for small untrained models on synthetic crops and for the shipped default model on real LFW faces,
clean and masked; the default backend is onnxruntime, and an export runs where torch cannot be imported."""

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


def test_align_head_is_exported_as_its_own_graph(tmp_path):
    import torch

    from fromface.errors import ConfigError
    from fromface.inference.onnx_backend import OnnxFaceModel, align_path, export_onnx
    from fromface.models import create_model

    torch.manual_seed(1)
    net = create_model("from_mobilefacenet", embedding_dim=128, align_head=True).eval()
    with torch.no_grad():  # a head that moves points (a new one starts at zero)
        for param in net.align_head.body[-1].parameters():
            param.normal_(std=0.5)
    path = export_onnx(net, tmp_path / "tiny.onnx")
    side = align_path(path)
    assert side.name == "tiny.align.onnx" and side.is_file()
    model = OnnxFaceModel(path)
    x = net.preprocess.to_input(crops(3, 3))
    with torch.no_grad():
        want = net.predict_landmark_shift(torch.from_numpy(x)).numpy()
    got = model.landmark_shift(x)
    assert got.shape == (3, 5, 2) and np.abs(want).max() > 1e-3 and np.abs(got - want).max() <= 1e-5
    assert [o.name for o in model.align_session.get_outputs()] == ["landmark_shift"]
    assert side.stat().st_size < path.stat().st_size / 2  # the first look runs a small part of the network
    assert OnnxFaceModel(path, align=False).align_session is None
    side.write_bytes(side.read_bytes()[:-1] + b"\0")  # another align graph than the one exported with it
    with pytest.raises(ConfigError, match="tiny.align.onnx.*not the align head exported with tiny.onnx"):
        OnnxFaceModel(path)
    side.unlink()
    with pytest.raises(ConfigError, match="tiny.onnx: its align head tiny.align.onnx is missing.*refine=False"):
        OnnxFaceModel(path)
    without = OnnxFaceModel(path, align=False)  # runs without it when asked
    assert without(x)[0].shape == (3, 128)
    with pytest.raises(ConfigError, match="no align head loaded"):
        without.landmark_shift(x)


def test_cli_export_writes_both_graphs_and_keeps_existing_files(tmp_path, capsys):
    import torch

    from fromface.cli.main import main
    from fromface.models import create_model

    torch.manual_seed(2)
    net = create_model("from_mobilefacenet", embedding_dim=128, align_head=True).eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128, "align_head": True},
                "state_dict": net.state_dict()}, ckpt)
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(out), "--model", str(ckpt)]) == 0  # compares both graphs with torch
    assert "m.align.onnx: its align head" in capsys.readouterr().out and (tmp_path / "m.align.onnx").is_file()
    out.unlink()
    before = (tmp_path / "m.align.onnx").read_bytes()
    assert main(["export", "onnx", str(out), "--model", str(ckpt)]) == 2  # the align graph is there already
    assert "m.align.onnx: already exists; use --force" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "m.align.onnx").read_bytes() == before
    assert main(["export", "onnx", str(out), "--model", str(ckpt), "--force"]) == 0


def test_auto_backend_choice(exported, monkeypatch):
    import fromface.inference.face_model as face_model

    _, ckpt, _ = exported
    assert face_model.load_face_model(ckpt).backend == "torch"  # a checkpoint under training stays in PyTorch
    assert face_model.load_face_model(ckpt, backend="onnx").backend == "onnx"
    monkeypatch.setattr(face_model, "onnx_available", lambda: False)  # no onnxruntime/onnxscript installed
    default = face_model.load_face_model()
    assert default.backend == "torch" and default.model_id == "from_sface_net:celeba1140-photometric"
    with pytest.raises(face_model.ConfigError, match="backend must be one of auto, onnx, torch"):
        face_model.load_face_model(ckpt, backend="tensorrt")


def test_sessions_sleep_unless_told_to_spin(monkeypatch):
    from fromface.inference.onnx_backend import session_options

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    options = session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 3 and session_options(threads=1).intra_op_num_threads == 1
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(Exception, match="does not have configuration"):  # onnxruntime's default: spinning
        session_options().get_session_config_entry("session.intra_op.allow_spinning")


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


# ---------------------------------------------------------------------------------------- the shipped default model
# Tolerances, onnxruntime vs PyTorch (float32, CPU): embedding cosine >= 0.9999 and max abs difference <= 1e-4 (raw,
# un-normalised embeddings reach ~4; measured ~1e-5), mask <= 1e-3 (the trained mask is a steep sigmoid that goes
# from 1 to 0 at an occluder's edge, so the backends' float differences show most there: measured ~4e-4 on a masked
# face, against 1 for the full range), pattern logits <= 1e-3 (logits reach ~5; measured ~1e-5).
# The align head's shift (fractions of the crop; masked faces move by up to ~0.05): <= 1e-5.
EMB_COSINE, EMB_ABS, MASK_ABS, LOGIT_ABS, SHIFT_ABS = 0.9999, 1e-4, 1e-3, 1e-3, 1e-5
DEFAULT_PEOPLE = ("Angelina_Jolie", "Ben_Affleck", "Arnold_Schwarzenegger")


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The default model in PyTorch (with its align head), and what `fromface export onnx` writes for it."""
    from fromface.inference.onnx_backend import export_onnx
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(backend="torch")
    path = export_onnx(rec.torch_model, tmp_path_factory.mktemp("onnx-default") / "default.onnx", rec.tag,
                       rec.thresholds)
    return rec, path


@pytest.fixture(scope="module")
def lfw_photos(default_export):
    """Three LFW photos, the same with a mouth mask pasted on the face, and the aligned crops of all six."""
    from conftest import LFW_IMAGES, SHARED_DATA
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer, rng_for

    rec, _ = default_export
    clean = [np.asarray(Image.open(sorted((LFW_IMAGES / p).iterdir())[0]).convert("RGB")) for p in DEFAULT_PEOPLE]
    faces = [found[0] for found in rec.embed(clean)]
    masks = Synthesizer(OccluderLibrary.from_folder(SHARED_DATA / "occluders", categories=["mouth_mask"]), "face",
                        coverage=(0.4, 0.45))
    occluded = [masks.occlude(img, rng_for(0, k), face_box=f.box, landmarks=f.landmarks).image
                for k, (img, f) in enumerate(zip(clean, faces))]
    crops = [f.crop for f in faces] + [found[0].crop for found in rec.embed(occluded)]
    return clean + occluded, np.stack(crops)


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_default_model_onnx_matches_torch_on_lfw(default_export, lfw_photos):
    import torch

    from fromface.inference.onnx_backend import OnnxFaceModel
    from fromface.models import get_spec

    rec, path = default_export
    net = rec.torch_model
    spec = get_spec("from_sface_net").pretrained["celeba1140-photometric"]
    assert rec.model_id == "from_sface_net:celeba1140-photometric" and net.align_head is not None
    assert spec["kwargs"]["mask_stage"] == 1 and spec["kwargs"]["head_rank"] == 16  # the parts the export must carry
    model = OnnxFaceModel(path)
    assert model.output_names == ["embedding", "mask", "pattern_logits"]
    assert (model.model_name, model.grid, model.tag) == ("from_sface_net", 5, "celeba1140-photometric")
    assert model.thresholds == spec["thresholds"] and model.preprocess == net.preprocess
    _, crops = lfw_photos
    x = net.preprocess.to_input(list(crops))
    with torch.no_grad():
        want = net(torch.from_numpy(x))
    emb, mask, logits = model(x)
    assert mask.shape == tuple(want.mask.shape) == (len(crops), want.mask.shape[1], 28, 28)
    assert emb.shape == tuple(want.embedding.shape) and logits.shape == (len(crops), 226)
    w_emb = want.embedding.numpy()
    cosine = (emb * w_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(w_emb, axis=1)
    assert cosine.min() >= EMB_COSINE and np.abs(emb - w_emb).max() <= EMB_ABS
    assert np.abs(mask - want.mask.numpy()).max() <= MASK_ABS
    assert np.abs(logits - want.pattern_logits.numpy()).max() <= LOGIT_ABS
    # The occluded half is seen as occluded by both: the pattern logits pick a pattern other than "clean" (0).
    assert (logits[:3].argmax(1) == 0).all() and (logits[3:].argmax(1) != 0).all()
    np.testing.assert_array_equal(logits.argmax(1), want.pattern_logits.numpy().argmax(1))
    shift = want.landmark_shift.numpy()
    assert np.abs(shift[3:]).max() > 0.01  # the head moves the masked faces' points, so the check below bites
    assert np.abs(model.landmark_shift(x) - shift).max() <= SHIFT_ABS


def assert_same_faces(want: list, got: list) -> None:
    """Two backends' FaceEmbeddings of the same photos agree: box, embedding, heat map, pattern, condition."""
    for t, o in zip(want, got, strict=True):
        np.testing.assert_array_equal(t.box, o.box)  # same detector
        assert np.abs(t.landmarks - o.landmarks).max() <= 0.01  # the align head's re-crop, from either backend
        assert float(t.embedding @ o.embedding) >= EMB_COSINE and np.abs(t.embedding - o.embedding).max() <= EMB_ABS
        assert t.heatmap.shape == o.heatmap.shape == (28, 28) and np.abs(t.heatmap - o.heatmap).max() <= MASK_ABS
        assert (t.pattern, t.occluded) == (o.pattern, o.occluded)


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_default_model_onnx_recognizer_matches_torch(default_export, lfw_photos):
    from fromface.inference.recognizer import FaceRecognizer

    rec, path = default_export
    photos, _ = lfw_photos
    onnx_rec = FaceRecognizer(path)
    assert onnx_rec.backend == "onnx" and onnx_rec.thresholds == rec.thresholds and onnx_rec.tag == rec.tag
    assert onnx_rec.aligner.refine is not None  # the export's align head re-crops, as the torch model's does
    torch_faces = [found[0] for found in rec.embed(photos)]
    onnx_faces = [found[0] for found in onnx_rec.embed(photos)]
    assert_same_faces(torch_faces, onnx_faces)
    unrefined = [found[0] for found in FaceRecognizer(path, refine=False).embed(photos[3:])]
    assert max(np.abs(o.landmarks - u.landmarks).max() for o, u in zip(onnx_faces[3:], unrefined)) > 0.5
    assert [f.occluded for f in onnx_faces] == [False] * 3 + [True] * 3
    for i, j in ((0, 3), (0, 1)):  # the same verdicts, thresholds and conditions (clean+masked, two people)
        vt, vo = rec.verify(torch_faces[i], torch_faces[j]), onnx_rec.verify(onnx_faces[i], onnx_faces[j])
        assert (vt.same, vt.threshold, vt.condition) == (vo.same, vo.threshold, vo.condition)
        assert vo.score == pytest.approx(vt.score, abs=1e-5)


@pytest.mark.slow
@pytest.mark.data("lfw/images", "occluders")
def test_default_recognizer_runs_onnxruntime_with_torch_results(default_export, lfw_photos):
    from fromface.inference.recognizer import FaceRecognizer

    rec, _ = default_export
    photos, _ = lfw_photos
    default = FaceRecognizer()
    assert default.backend == "onnx" and default.model_id == rec.model_id and default.thresholds == rec.thresholds
    assert default.aligner.refine is not None
    assert_same_faces([f[0] for f in rec.embed(photos)], [f[0] for f in default.embed(photos)])
    # one call over many photos batches their faces together and gives what one photo at a time gives
    one_by_one = [default.embed(p)[0] for p in photos]
    assert_same_faces(one_by_one, [f[0] for f in FaceRecognizer(batch_size=4).embed(photos)])


RUNNER = """
import sys
for blocked in ("torch", "onnx", "onnxscript", "safetensors", "yaml", "tqdm", "sklearn", "scipy"):
    sys.modules[blocked] = None  # importing these now fails: the export runs on NumPy, OpenCV, Pillow, onnxruntime
import numpy as np
from fromface import FaceRecognizer
rec = FaceRecognizer(sys.argv[1])
faces = rec.embed(sys.argv[2:])
np.save(sys.stdout.buffer, np.stack([f[0].embedding for f in faces]))
"""


@pytest.mark.slow
@pytest.mark.data("lfw/images")
def test_exported_files_run_without_torch(default_export, tmp_path):
    import io
    import subprocess
    import sys

    from conftest import LFW_IMAGES

    rec, path = default_export
    photos = [str(sorted((LFW_IMAGES / p).iterdir())[0]) for p in DEFAULT_PEOPLE]
    run = subprocess.run([sys.executable, "-c", RUNNER, str(path), *photos], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    got = np.load(io.BytesIO(run.stdout))
    want = np.stack([f[0].embedding for f in rec.embed(photos)])
    assert ((got * want).sum(1) >= EMB_COSINE).all()
