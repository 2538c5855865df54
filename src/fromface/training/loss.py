"""The FROM training objective as one object that returns its named parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fromface.models.heads import MARGIN_HEADS
from fromface.models.outputs import FaceOutput
from fromface.occlusion.patterns import patterns
from fromface.training.config import LossConfig


class FromLoss(nn.Module):
    """``margin_weight`` x margin loss on the masked embedding + ``pattern_weight`` x pattern
    cross-entropy (+ ``consistency_weight`` x consistency, beyond the paper).

    ``forward`` returns a dict: ``margin`` (unless its weight is 0), ``pattern`` (when the model
    predicts patterns and labels are given), ``consistency`` (when a weight > 0 and target
    embeddings are given) and ``total``, so logs can show every part. The consistency term is
    ``1 - cos(embedding, target)``, averaged over the batch: with ``target`` a frozen trunk's
    embedding of the same face *unoccluded*, it pulls an occluded face's masked embedding back to
    where the clean face sits.

    ``mask_weight`` > 0 (also beyond the paper) supervises the soft mask itself: binary cross-entropy
    toward 0 where the face is covered and 1 elsewhere (all 1 for clean faces), so the mask has to
    switch the occluded features off rather than leave that to the layers above it. ``mask_truth``
    says what "covered" is: ``pattern``, the labelled pattern's rectangle (all the label knows), or
    ``occluder``, the fraction of each mask cell that the pasted occluder covers (the synthesiser knows
    it pixel by pixel; a hat or a moustache is not a rectangle).

    ``align_weight`` > 0 trains FROM's align head: L1 between its landmark shift and the shift that
    re-detection really caused (fractions of the crop size; zero for faces aligned as when clean).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: str = "cosface",
        scale: float = 30.0,
        margin_value: float = 0.35,
        pattern_weight: float = 1.0,
        consistency_weight: float = 0.0,
        margin_weight: float = 1.0,
        mask_weight: float = 0.0,
        mask_truth: str = "pattern",
        grid: int | None = None,
        align_weight: float = 0.0,
    ):
        super().__init__()
        if margin not in MARGIN_HEADS:
            raise ValueError(f"margin must be one of {sorted(MARGIN_HEADS)}, got {margin!r}")
        self.classifier = MARGIN_HEADS[margin](embedding_dim, num_classes, scale=scale, margin=margin_value)
        self.pattern_weight = pattern_weight
        self.consistency_weight = consistency_weight
        self.margin_weight = margin_weight
        if mask_truth not in ("pattern", "occluder"):
            raise ValueError(f"mask_truth must be 'pattern' or 'occluder', got {mask_truth!r}")
        if mask_weight > 0 and mask_truth == "pattern" and grid is None:
            raise ValueError("mask_weight with the pattern as truth needs the pattern grid of the model")
        self.mask_weight, self.mask_truth, self.grid, self.align_weight = mask_weight, mask_truth, grid, align_weight
        if margin_weight == 0:  # no identity classifier to train (and none left unused under DDP)
            self.classifier.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: LossConfig, *, embedding_dim: int, num_classes: int, grid: int | None = None) -> FromLoss:
        """The objective a config's ``loss`` section describes (``consistency_cache`` is the trainer's, not the loss's);
        ``grid`` is the model's pattern grid, which ``mask_weight`` needs."""
        return cls(embedding_dim, num_classes, margin=cfg.margin, scale=cfg.scale, margin_value=cfg.margin_value,
                   pattern_weight=cfg.pattern_weight, consistency_weight=cfg.consistency_weight,
                   margin_weight=cfg.margin_weight, mask_weight=cfg.mask_weight, mask_truth=cfg.mask_truth, grid=grid,
                   align_weight=cfg.align_weight)

    def forward(
        self,
        output: FaceOutput,
        labels: torch.Tensor,
        pattern_labels: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        landmark_shift: torch.Tensor | None = None,
        covered: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The named loss parts; ``covered`` (N, h, w) is the fraction of each pixel or cell the occluder covers
        (``mask_truth: occluder``), at any resolution: it is averaged down to the mask's."""
        losses: dict[str, torch.Tensor] = {}
        total = output.embedding.new_zeros(())
        if self.margin_weight > 0:
            losses["margin"] = F.cross_entropy(self.classifier(output.embedding, labels), labels)
            total = total + self.margin_weight * losses["margin"]
        if output.pattern_logits is not None and pattern_labels is not None and self.pattern_weight > 0:
            losses["pattern"] = F.cross_entropy(output.pattern_logits.float(), pattern_labels)
            total = total + self.pattern_weight * losses["pattern"]
        if target_embedding is not None and self.consistency_weight > 0:
            cos = F.cosine_similarity(output.embedding.float(), target_embedding.float().detach(), dim=1)
            losses["consistency"] = (1.0 - cos).mean()
            total = total + self.consistency_weight * losses["consistency"]
        truth = pattern_labels if self.mask_truth == "pattern" else covered
        if self.mask_weight > 0 and output.mask is not None and output.mask.dim() == 4 and truth is not None:
            losses["mask"] = self._mask_loss(output.mask, truth)
            total = total + self.mask_weight * losses["mask"]
        if self.align_weight > 0 and output.landmark_shift is not None and landmark_shift is not None:
            losses["align"] = F.l1_loss(output.landmark_shift.float(), landmark_shift.float())
            total = total + self.align_weight * losses["align"]
        losses["total"] = total
        return losses

    def _mask_loss(self, mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """BCE between the (channel-averaged) mask and "visible": outside the pattern's rectangle (``truth`` holds
        pattern labels) or 1 - the occluder's coverage of each cell (``truth`` holds coverage maps)."""
        mask = mask.float().mean(dim=1)
        if self.mask_truth == "pattern":
            covered = torch.from_numpy(patterns(mask.shape[1], mask.shape[2], self.grid)[truth.cpu().numpy()])
        else:
            covered = F.adaptive_avg_pool2d(truth.float()[:, None], mask.shape[1:])[:, 0]
        visible = 1.0 - covered.to(mask.device, torch.float32)
        return F.binary_cross_entropy(mask.clamp(1e-4, 1 - 1e-4), visible)
