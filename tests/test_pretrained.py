import pytest
import torch
from safetensors.torch import save_file

from fromface.errors import ConfigError
from fromface.models import create_model, get_spec, register_pretrained
from fromface.models.pretrained import sha256_of

KWARGS = {"grid": 3, "mask_shape": "2d", "pyramid_channels": 16}


@pytest.fixture
def shipped_tag(tmp_path):
    torch.manual_seed(0)
    trained = create_model("from_iresnet18", **KWARGS)
    parts = {k: v for k, v in trained.state_dict().items() if not k.startswith(("backbone.", "head."))}
    path = tmp_path / "w.safetensors"
    save_file(parts, str(path))
    register_pretrained("from_iresnet18", "unit-test", file=str(path), sha256=sha256_of(path), kwargs=KWARGS,
                        thresholds={"clean": {"far1e-3": 0.4}})
    yield trained, path
    get_spec("from_iresnet18").pretrained.pop("unit-test")


def test_tag_loads_trained_parts_and_its_architecture(shipped_tag):
    trained, _ = shipped_tag
    model = create_model("from_iresnet18:unit-test")
    assert model.pretrained_tag == "unit-test"
    assert model.mask_shape == "2d" and model.grid == 3
    torch.testing.assert_close(model.mask_decoder.state_dict(), trained.mask_decoder.state_dict())
    same = create_model("from_iresnet18", pretrained="unit-test")
    torch.testing.assert_close(same.pattern_head.fc.weight, trained.pattern_head.fc.weight)


def test_corrupt_file_fails_its_checksum(shipped_tag):
    _, path = shipped_tag
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256"):
        create_model("from_iresnet18:unit-test")
    path.unlink()
    with pytest.raises(ConfigError, match="missing"):
        create_model("from_iresnet18:unit-test")


def test_tag_architecture_cannot_be_contradicted(shipped_tag):
    with pytest.raises(ConfigError, match="trained with"):
        create_model("from_iresnet18:unit-test", grid=5)
    with pytest.raises(ConfigError, match="no pretrained tag"):
        create_model("from_iresnet18:nope")
