import pytest
import torch

from fromface.errors import ConfigError
from fromface.models import FROM, create_model, get_spec, list_models
from fromface.occlusion import num_patterns
from fromface.training.loss import FromLoss

REQUIRED = ["lresnet50e_ir", "iresnet18", "iresnet50", "mobilefacenet"]


def test_required_models_registered():
    names = list_models()
    for name in REQUIRED:
        assert name in names
        assert f"from_{name}" in names


@pytest.mark.parametrize("name", list_models())
def test_output_shapes_at_bound_input_size(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    height, width = model.preprocess.size
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert out.embedding.ndim == 2 and out.embedding.shape[0] == 2
    assert torch.isfinite(out.embedding).all()
    if isinstance(model, FROM):
        last = model.backbone(torch.randn(1, 3, height, width))[-1]
        assert out.mask.shape == (2, *last.shape[1:])
        assert out.pattern_logits.shape == (2, num_patterns(model.grid))
        assert out.features.shape == out.embedding.shape
        assert ((out.mask >= 0) & (out.mask <= 1)).all()


def test_paper_model_shapes():
    model = create_model("from_lresnet50e_ir", grid=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 96))
    assert tuple(out.embedding.shape) == (2, 512)
    assert tuple(out.mask.shape) == (2, 512, 7, 6)
    assert tuple(out.pattern_logits.shape) == (2, 226)
    assert model.preprocess.template == "sphereface112x96"
    assert model.preprocess.size == (112, 96)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mask_shape": "2d"},
        {"mask_target": "embedding"},
        {"mask_source": "last"},
    ],
)
def test_every_parameter_gets_a_gradient(options):
    """No dead branches: DDP must work without find_unused_parameters."""
    torch.manual_seed(0)
    model = create_model("from_iresnet18", grid=4, **options).train()
    loss_fn = FromLoss(model.embedding_dim, num_classes=5)
    out = model(torch.randn(4, 3, 112, 112))
    losses = loss_fn(out, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 7, 100]))
    assert set(losses) == {"margin", "pattern", "total"}
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert model.mask_decoder.body[0].weight.grad.abs().sum() > 0
    assert model.pattern_head.fc.weight.grad.abs().sum() > 0
    assert (model.pyramid is None) == (options.get("mask_source") == "last")


def test_mask_shapes_of_ablation_variants():
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        two_d = create_model("from_lresnet50e_ir", grid=3, mask_shape="2d").eval()(x)
        on_emb = create_model("from_lresnet50e_ir", grid=3, mask_target="embedding").eval()(x)
    assert two_d.mask.shape == (2, 512, 7, 6)
    assert torch.equal(two_d.mask[:, 0], two_d.mask[:, 511])  # one value per position
    assert on_emb.mask.shape == (2, 512)
    assert two_d.pattern_logits.shape == on_emb.pattern_logits.shape == (2, 37)


@pytest.mark.parametrize("target", ["features", "embedding"])
def test_all_ones_mask_gives_unmasked_embedding(target):
    torch.manual_seed(0)
    model = create_model("from_mobilefacenet", grid=3, mask_target=target).eval()
    last_conv = model.mask_decoder.body[-1]
    with torch.no_grad():
        last_conv.weight.zero_()
        last_conv.bias.fill_(40.0)  # sigmoid(40) == 1.0 in float32
        out = model(torch.randn(3, 3, 112, 112))
    assert torch.all(out.mask == 1.0)
    torch.testing.assert_close(out.embedding, out.features)


def test_mask_changes_embedding():
    torch.manual_seed(0)
    model = create_model("from_mobilefacenet", grid=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert not torch.allclose(out.embedding, out.features)


def test_baseline_checkpoint_loads_into_from_variant():
    base = create_model("iresnet18")
    wrapped = create_model("from_iresnet18")
    result = wrapped.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.split(".")[0] in {"pyramid", "mask_decoder", "pattern_head"} for k in result.missing_keys)


def test_unknown_model_and_options_are_clear_errors():
    with pytest.raises(ConfigError, match="did you mean"):
        create_model("from_lresnet50")
    with pytest.raises(ConfigError, match="mask_shape"):
        create_model("from_iresnet18", mask_shape="4d")
    with pytest.raises(ConfigError):
        create_model("iresnet18", grid=5)


def test_preprocess_bound_to_every_model():
    for name in list_models():
        spec = get_spec(name)
        assert spec.preprocess.template
        assert len(spec.preprocess.size) == 2


def test_mobilefacenet_is_about_one_million_parameters():
    model = create_model("mobilefacenet")
    count = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < count < 1.5e6


def test_mask_init_starts_near_the_trunk():
    torch.manual_seed(0)
    model = create_model("from_iresnet18", grid=3, pyramid_channels=64, mask_init=0.98).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert torch.allclose(out.mask, torch.full_like(out.mask, 0.98), atol=0.01)
    assert model.pyramid.smooth3.out_channels == 64
    # the last decoder weights are small but not so small that the decoder starts on a plateau
    assert model.mask_decoder.body[-1].weight.std().item() == pytest.approx(1e-2, rel=0.2)
    pinned = create_model("from_iresnet18", grid=3, pyramid_channels=64, mask_init=0.98, mask_init_std=1e-3)
    assert pinned.mask_decoder.body[-1].weight.std().item() == pytest.approx(1e-3, rel=0.2)
    with pytest.raises(ConfigError, match="mask_init"):
        create_model("from_iresnet18", mask_init=1.0)


def test_intermediate_mask_stage_runs_upper_stages_on_the_masked_map():
    torch.manual_seed(0)
    model = create_model("from_iresnet18", grid=3, mask_stage=2, pyramid_channels=32, mask_init=0.5).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model(x)
        assert out.mask.shape == (2, 256, 14, 14)
        c4 = model.backbone.forward_until(x, 2)[-1]
        expected = model.head(model.backbone.forward_after(c4 * out.mask, 2))
        plain = model.head(model.backbone(x)[-1])
    torch.testing.assert_close(out.embedding, expected)
    torch.testing.assert_close(out.features, plain)
    with pytest.raises(ConfigError, match="fewer than three"):
        create_model("from_iresnet18", mask_stage=1)
    early = create_model("from_iresnet18", mask_stage=1, mask_source="last", mask_shape="2d").eval()
    with torch.no_grad():
        out = early(x)
        c2 = early.backbone.forward_until(x, 1)[-1]
        expected = early.head(early.backbone.forward_after(c2 * out.mask, 1))
    assert out.mask.shape == (2, 128, 28, 28)
    torch.testing.assert_close(out.embedding, expected)

