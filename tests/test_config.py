"""Typed config: YAML + dotted overrides, clear errors for unknown keys and bad values, the paper's recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fromface.errors import ConfigError
from fromface.training.config import (
    TrainConfig,
    all_keys,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides_are_typed():
    cfg = config_from_dict({}, ["optim.lr=0.02", "schedule.milestones=[10, 25]", "model.kwargs.grid=3",
                                "data.batch_size=128", "amp=false", "optim.weight_decay=5e-4",
                                "optim.clip_grad_norm=null"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.milestones == [10.0, 25.0]
    assert cfg.model.kwargs == {"grid": 3}
    assert cfg.data.batch_size == 128 and cfg.amp is False
    assert cfg.optim.weight_decay == pytest.approx(5e-4) and cfg.optim.clip_grad_norm is None


def test_unknown_keys_suggest_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        config_from_dict({}, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'schedule\.milestones'"):
        config_from_dict({"schedule": {"milestone": [10]}})
    with pytest.raises(ConfigError, match=r"did you mean 'data\.batch_size' or 'eval\.batch_size'\?"):
        config_from_dict({}, ["batch_size=8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.groups\[0\]|prefx"):
        config_from_dict({"optim": {"groups": [{"prefx": "backbone."}]}})


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr' must be float"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="must be true or false"):
        config_from_dict({}, ["amp=maybe"])
    with pytest.raises(ConfigError, match="schedule.kind' must be one of step, cosine, constant; got 'linear'"):
        config_from_dict({}, ["schedule.kind=linear"])
    with pytest.raises(ConfigError, match="clean_prob' must be in"):
        config_from_dict({"occlusion": {"clean_prob": 1.5}})
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    cfg = config_from_dict({"optim": {"groups": [{"prefix": "backbone.", "lr_mult": 0.1}]}}, ["seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.optim.groups[0].lr_mult == 0.1


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        load_config(path)
    assert "optim.clip_grad_norm" in all_keys()


def test_paper_configs_carry_the_paper_recipe():
    base = load_config(CONFIGS / "paper" / "baseline_lresnet50e_ir.yaml")
    assert base.model.name == "lresnet50e_ir" and not base.occlusion.enabled
    assert (base.loss.margin, base.loss.scale, base.loss.margin_value) == ("cosface", 30.0, 0.35)
    frm = load_config(CONFIGS / "paper" / "from_lresnet50e_ir.yaml")
    assert frm.model.name == "from_lresnet50e_ir" and frm.model.kwargs["grid"] == 5
    assert frm.model.init and frm.loss.pattern_weight == 1.0
    assert (frm.optim.name, frm.optim.lr, frm.optim.momentum, frm.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert frm.data.batch_size == 512 and frm.schedule.epochs == 40
    assert frm.schedule.milestones == [10, 25] and frm.schedule.gamma == 0.1
    assert frm.occlusion.enabled and frm.occlusion.clean_prob == pytest.approx(1 / 3)
    assert not frm.optim.groups  # nothing frozen
    occ = load_config(CONFIGS / "paper" / "baseline_occaug_lresnet50e_ir.yaml")
    assert occ.model.name == "lresnet50e_ir" and occ.occlusion.enabled
    assert (occ.optim.lr, occ.schedule.epochs, occ.schedule.milestones) == (0.01, 40, [10, 25])


def test_base_configs_merge_section_by_section(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nmodel:\n  name: from_iresnet18\n"
                                          "  kwargs: {grid: 5, mask_stage: 2}\noptim: {lr: 0.1, name: sgd}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  kwargs: {mask_stage: 3}\noptim: {lr: 0.01}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.momentum=0.5"])
    assert cfg.name == "parent" and cfg.model.name == "from_iresnet18"
    assert cfg.model.kwargs == {"grid": 5, "mask_stage": 3} and cfg.optim.lr == 0.01 and cfg.optim.name == "sgd"
    assert cfg.optim.momentum == 0.5
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "orphan.yaml")
    ablation = load_config(CONFIGS / "experiments" / "ablations" / "no_mask.yaml")
    assert ablation.model.kwargs["use_mask"] is False and ablation.model.kwargs["mask_stage"] == 1
    assert ablation.data.feature_cache_variants == 4 and ablation.schedule.epochs == 2


def test_shipped_config_is_flat_and_is_what_trained_the_shipped_tag():
    import dataclasses
    import json

    import yaml

    from fromface.models.pretrained import HERE

    for meta in sorted(HERE.glob("*.json")):
        info = json.loads(meta.read_text())
        path = CONFIGS / f"{info['model']}.{info['tag']}.yaml"  # one file per shipped tag, named for it
        assert "base" not in yaml.safe_load(path.read_text()), f"{path} must be flat"
        config = dataclasses.asdict(load_config(path))
        # read through today's loader: keys added since the tag was trained take their defaults, which must keep
        # the old behaviour (e.g. loss.mask_truth: pattern)
        trained = dataclasses.asdict(config_from_dict(info["trained_with"]["config"]))
        assert {k for k in config if config[k] != trained[k]} <= {"name", "output_dir"}  # only where it ran may differ


def test_configs_load_within_two_levels_of_base():
    import yaml

    def depth(path: Path) -> int:
        base = yaml.safe_load(path.read_text()).get("base")
        return 0 if base is None else 1 + depth(path.parent / base)

    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) > 10
    for path in files:
        load_config(path)
        assert depth(path) <= 2, path
