"""Optimiser with named parameter groups, and the warm-up + step/cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from fromface.errors import ConfigError
from fromface.training.config import OptimConfig, ScheduleConfig


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Split parameters by name prefix (first matching rule wins): frozen ones get ``requires_grad=False``.

    Biases and normalisation weights (1-D tensors) get no weight decay, the usual practice for BN nets.
    """
    rules = list(cfg.groups)
    for rule in rules:
        if not any(name.startswith(rule.prefix) for name, _ in named):
            known = sorted({name.split(".")[0] + "." for name, _ in named})
            raise ConfigError(f"optim.groups prefix {rule.prefix!r} matches no parameter (top-level parts: {known})")
    buckets: dict[tuple, dict] = {}
    for name, param in named:
        rule = next((r for r in rules if name.startswith(r.prefix)), None)
        if rule is not None and rule.freeze:
            param.requires_grad_(False)
            continue
        if not param.requires_grad:
            continue
        mult = rule.lr_mult if rule is not None else 1.0
        decay = rule.weight_decay if rule is not None and rule.weight_decay is not None else cfg.weight_decay
        if param.ndim <= 1:
            decay = 0.0
        key = (rule.prefix if rule else "", mult, decay)
        group = buckets.setdefault(key, {"params": [], "names": [], "lr_mult": mult, "weight_decay": decay,
                                         "lr": cfg.lr * mult})
        group["params"].append(param)
        group["names"].append(name)
    if not buckets:
        raise ConfigError("every parameter is frozen: nothing to train")
    return list(buckets.values())


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(clean, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ConfigError(f"optim.name must be sgd or adamw, got {cfg.name!r}")


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.kind == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule.kind must be step, cosine or constant, got {cfg.kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, steps_per_epoch, total_steps, cfg)  # validates the kind before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, total_steps, cfg))
