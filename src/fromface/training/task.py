"""The training task (model + loss + optional frozen teacher) and the trainer's small helpers."""

from __future__ import annotations

import platform
import random
import sys
import time

import numpy as np
import torch
from torch import nn

from fromface import __version__
from fromface.errors import ConfigError
from fromface.models.outputs import FaceOutput
from fromface.training.config import TrainConfig
from fromface.training.data import RandomBoxOccluder, RealigningOccluder, SynthesizerOccluder, TrainBatch
from fromface.training.loss import FromLoss
from fromface.training.runtime import Runtime


class TrainingTask(nn.Module):
    """Model + loss (+ an optional frozen teacher): ``forward`` returns the dict of named losses.

    With a teacher, a batch's ``clean`` holds the unoccluded version of each image and the teacher's unmasked
    embedding of it (``features``, or ``embedding`` for plain models) is the consistency target. With
    ``cache_size`` the targets are kept per ``keys`` (row and flip): a frozen teacher sees the same
    clean image every time, so each one is computed once.
    """

    def __init__(self, model: nn.Module, loss: FromLoss, *, teacher: nn.Module | None = None, cache_size: int = 0):
        super().__init__()
        self.model, self.loss, self.teacher = model, loss, teacher
        self.cache_size = cache_size
        self.cache: torch.Tensor | None = None
        self.cached: torch.Tensor | None = None

    def targets(self, clean: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """The frozen teacher's embeddings of the clean images (from the cache where possible)."""
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = self.teacher.eval()(x)
            return (out.features if out.features is not None else out.embedding).float()

        if not self.cache_size or keys is None:
            return run(clean)
        keys = keys.to(clean.device)
        if self.cache is None:
            dim = self.model.embedding_dim
            self.cache = torch.zeros(self.cache_size, dim, device=clean.device)
            self.cached = torch.zeros(self.cache_size, dtype=torch.bool, device=clean.device)
        miss = ~self.cached[keys]
        if miss.any():
            self.cache[keys[miss]] = run(clean[miss])
            self.cached[keys[miss]] = True
        return self.cache[keys]

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The named losses of a batch of images or of stored maps (which bring their own consistency targets)."""
        targets = batch.targets
        if targets is None and self.teacher is not None and batch.clean is not None:
            targets = self.targets(batch.clean, batch.keys)
        return self.loss(model_output(self.model, batch), batch.labels, pattern_labels=batch.patterns,
                         target_embedding=targets, landmark_shift=batch.shifts, covered=batch.covered)


def model_output(model: nn.Module, batch: TrainBatch) -> FaceOutput:
    """The model's output for a batch: from the stored trunk maps when it holds them, else from its images."""
    return model(batch.images) if batch.maps is None else model.forward_maps(batch.maps)


def run_info(rt: Runtime, resume: str | None) -> dict:
    """What produced a run besides its config: the command, versions, processes and device."""
    return {"command": list(sys.argv), "resume": resume, "fromface": __version__, "torch": str(torch.__version__),
            "python": platform.python_version(), "world_size": rt.world_size, "backend": rt.backend,
            "device": str(rt.device), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loss(cfg: TrainConfig, model: nn.Module, num_classes: int) -> FromLoss:
    """The configured objective, refusing loss terms the model or data cannot feed (never a silent no-op)."""
    loss = cfg.loss
    if loss.mask_weight > 0 and (getattr(model, "mask_decoder", None) is None or model.mask_target != "features"):
        raise ConfigError(f"loss.mask_weight needs a FROM model that masks a feature map; {cfg.model.name} "
                          "with these options has none")
    if loss.align_weight > 0:
        if getattr(model, "align_head", None) is None:
            raise ConfigError("loss.align_weight needs a FROM model with an align head (model.kwargs.align_head)")
        if not (cfg.occlusion.enabled and cfg.occlusion.realign and cfg.data.feature_cache_variants > 0):
            raise ConfigError("loss.align_weight learns from re-detected faces on stored trunk outputs: set "
                              "occlusion.realign and data.feature_cache_variants")
    return FromLoss.from_config(loss, embedding_dim=model.embedding_dim, num_classes=num_classes,
                                grid=getattr(model, "grid", None))


def build_occluder(cfg: TrainConfig, preprocess, context: float = 1.0, *, varied: bool = True):
    """The training occluder; ``context`` is the source pack's canvas factor (``occlusion.realign`` needs > 1).

    ``varied=False`` leaves out ``occlusion.vary``: validation judges on the occluders as they are.
    """
    if not cfg.occlusion.enabled:
        return None
    if cfg.occlusion.occluders:
        occluder = SynthesizerOccluder(cfg.occlusion.occluders, size=preprocess.size,
                                       categories=cfg.occlusion.categories, preset=cfg.occlusion.preset,
                                       template=preprocess.template, vary=cfg.occlusion.vary if varied else 0.0)
        if not cfg.occlusion.realign:
            return occluder
        if context <= 1.0:
            raise ConfigError(f"occlusion.realign needs a pack with room around each face (`fromface pack ... "
                              f"--context 2`); {cfg.data.train} stores bare crops")
        return RealigningOccluder(occluder, preprocess.template, context)
    if cfg.occlusion.realign:
        raise ConfigError("occlusion.realign needs occluder images (occlusion.occluders)")
    return RandomBoxOccluder()
