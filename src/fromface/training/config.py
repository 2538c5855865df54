"""Typed training configuration: dataclasses filled from YAML plus dotted ``key=value`` overrides.

Every knob of an experiment lives in one YAML file; the resolved config is written next to each
checkpoint so a result can always be traced to what made it. A key that does not exist is an
error that names the nearest real key, because a silently ignored typo ruins a week of GPU time.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fromface.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "from_mobilefacenet"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_model
    init: str | None = None  # checkpoint whose weights initialise the model (e.g. the clean baseline)
    init_strict: bool = False  # False lets a baseline load into its FROM variant (new parts stay random)


@dataclass
class DataConfig:
    train: str = ""  # identity-folder root or packed folder (see ``fromface pack``)
    format: str = "auto"  # auto | folder | packed
    aligned: bool = True  # folder images are already aligned crops; False aligns (cached) with the model's template
    align_fallback: bool = False  # when aligning: centre-crop images without a detected face instead of dropping them
    cache_dir: str | None = None  # where aligned packs of unaligned folders are cached (default: <output_dir>/cache)
    min_images: int = 1  # identities with fewer images are dropped
    val_identities: float = 0.05  # held-out identities: fraction (< 1) or count (>= 1)
    val_pairs: int = 600  # validation pairs (half positive) built from the held-out identities
    batch_size: int = 64  # global batch, split over processes
    accumulate: int = 1  # split each process's batch into this many chunks (less memory; BN sees the chunks)
    num_workers: int = 0
    flip: bool = True
    # photometric augmentation of every training image (after occlusion, so the occluder changes with the photo):
    # a grey-scale copy with this probability, and brightness, contrast and saturation each scaled by a factor
    # drawn from [1 - colour_jitter, 1 + colour_jitter]; the consistency teacher still sees the untouched face
    grayscale_prob: float = 0.0
    colour_jitter: float = 0.0
    # > 0: draw this many augmented versions of each training image once, store the frozen trunk's maps below
    # FROM's mask for them and train only the layers above (training/feature_cache.py; single process)
    feature_cache_variants: int = 0


@dataclass
class OcclusionConfig:
    enabled: bool = False
    clean_prob: float = 1.0 / 3.0  # probability that a training image stays clean
    occluders: str | None = None  # occluder folder for fromface.occlusion; None: random boxes
    categories: list[str] | None = None
    preset: str = "from"  # synthesiser preset (fromface.occlusion)
    val: bool = True  # also report validation accuracy with the second image of each pair occluded
    realign: bool = False  # occlude a context pack's wider canvas, then detect and align again (as at test time)
    # probability that a training occluder gets a new colour and outline (fromface.occlusion.variation);
    # validation always sees the occluders as they are
    vary: float = 0.0


@dataclass
class LossConfig:
    margin: str = "cosface"
    scale: float = 30.0
    margin_value: float = 0.35
    pattern_weight: float = 1.0
    margin_weight: float = 1.0  # 0 trains without the identity classifier (e.g. consistency only)
    consistency_weight: float = 0.0  # pull occluded masked embeddings toward a frozen trunk's clean ones
    mask_weight: float = 0.0  # supervise the mask: 0 where the face is covered, 1 where it is visible
    mask_truth: str = "pattern"  # what "covered" is: the labelled pattern's rectangle, or the occluder's own pixels
    align_weight: float = 0.0  # train FROM's align head on re-detected faces (occlusion.realign, stored outputs)
    consistency_cache: bool = False  # compute each clean target once (faster; last-bit float drift on resume)


@dataclass
class ParamGroupConfig:
    prefix: str = ""  # parameter-name prefix, e.g. "backbone."
    lr_mult: float = 1.0
    weight_decay: float | None = None
    freeze: bool = False
    frozen_stats: bool = False  # train the weights but keep batch-norm statistics and dropout as they are


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    groups: list[ParamGroupConfig] = field(default_factory=list)
    clip_grad_norm: float | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs when smaller)
    kind: str = "step"  # step | cosine | constant
    milestones: list[float] = field(default_factory=list)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1  # lr factor at step 0 of the warm-up
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    every_epochs: int = 1
    keep_last: int = 3


@dataclass
class PairSetConfig:
    name: str = "lfw"  # metrics are logged as <name>_acc and <name>_auc
    pairs: str = ""  # any pair list fromface.data.pairs reads: LFW pairs.txt, `fromface occlude-pairs` output, MFR2
    root: str | None = None
    limit: int | None = None  # only N evenly spaced pairs (quick looks)


@dataclass
class EvalConfig:
    every_steps: int | None = None
    every_epochs: int = 1
    select: str = "val_acc"  # metric for best.pt: val_acc | val_occ_acc | val_mean
    batch_size: int = 64
    # Pair lists evaluated with the 10-fold protocol and logged, never used for selection (e.g. LFW and
    # occluded LFW made by `fromface occlude-pairs`, where the occluders are pasted before detection).
    pair_sets: list[PairSetConfig] = field(default_factory=list)


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True  # used when the tensorboard package is installed
    progress: bool = True


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, CUDA only
    channels_last: bool = False  # NHWC memory format (often faster with AMP on GPUs, 1.1-1.3x on some CPUs)
    deterministic: bool = False
    threads: int | None = None  # torch CPU threads per process
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows (nested sections included)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key + ".")
    return keys


def _unknown(key: str) -> ConfigError:
    """The error for a key the schema lacks, naming the nearest real key(s)."""
    keys = all_keys()
    tail = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == tail]  # right name, wrong section
    if not close:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a typo in the last part anywhere, e.g. "lrr" -> "optim.lr"
        tails: dict[str, list[str]] = {}
        for k in keys:
            tails.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        near = difflib.get_close_matches(tail, tails, n=1, cutoff=0.6)
        close = tails[near[0]] if near else []
    hint = "; did you mean " + " or ".join(f"'{k}'" for k in close[:3]) + "?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp`` (the small set of types configs use)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown(prefix + str(name))
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


#: Allowed values of the string-valued choices, checked before anything heavy is built.
CHOICES = {
    "data.format": ("auto", "folder", "packed"),
    "optim.name": ("sgd", "adamw"),
    "schedule.kind": ("step", "cosine", "constant"),
    "loss.margin": ("cosface", "arcface"),
    "loss.mask_truth": ("pattern", "occluder"),
    "eval.select": ("val_acc", "val_occ_acc", "val_mean"),
}


def validate(config: TrainConfig) -> TrainConfig:
    """Check choices and ranges that types alone cannot express."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    checks = [
        ("data.batch_size", config.data.batch_size >= 1, "must be >= 1"),
        ("data.accumulate", config.data.accumulate >= 1, "must be >= 1"),
        ("schedule.epochs", config.schedule.epochs >= 1, "must be >= 1"),
        ("occlusion.clean_prob", 0.0 <= config.occlusion.clean_prob <= 1.0, "must be in [0, 1]"),
        ("occlusion.vary", 0.0 <= config.occlusion.vary <= 1.0, "must be in [0, 1]"),
        ("data.val_identities", config.data.val_identities >= 0, "must be >= 0"),
        ("data.grayscale_prob", 0.0 <= config.data.grayscale_prob <= 1.0, "must be in [0, 1]"),
        ("data.colour_jitter", 0.0 <= config.data.colour_jitter < 1.0, "must be in [0, 1)"),
        ("checkpoint.keep_last", config.checkpoint.keep_last >= 1, "must be >= 1"),
        ("log.every_steps", config.log.every_steps >= 1, "must be >= 1"),
    ]
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {problem}")
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc})") from None
    return key.strip(), value


def _inside_mapping(key: str) -> bool:
    """True for keys below a free-form mapping field such as ``model.kwargs.grid``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in all_keys():
            return head in {"model.kwargs"}
    return False


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from a plain dict plus dotted overrides."""
    data = dataclasses.asdict(_build(TrainConfig, data or {})) if data else {}
    for text in overrides:
        key, value = parse_override(text)
        if key not in all_keys() and not _inside_mapping(key):
            raise _unknown(key)
        _set_dotted(data, key, value)
    return validate(_build(TrainConfig, data))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (clear errors for a missing or malformed file) and apply overrides.

    ``base: other.yaml`` (relative to the file) starts from another config: sections merge key by key,
    so an ablation states only what it changes.
    """
    data = _read_yaml(Path(path), ())
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = data or {}
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be the path of another config file")
    return _merge(_read_yaml(path.parent / base, (*seen, path.resolve())), data)


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def cache_folder(config: TrainConfig) -> Path:
    """Where a run caches aligned packs and stored trunk outputs: ``data.cache_dir``, else ``<output_dir>/cache``."""
    return Path(config.data.cache_dir or Path(config.output_dir) / "cache")


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what actually ran, overrides applied)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
