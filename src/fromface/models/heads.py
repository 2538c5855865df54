"""Embedding head and the margin classifiers used to train it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """BN -> Dropout -> Linear(C*H*W -> D) -> BN: position-aware, as in the paper."""

    def __init__(self, feature_shape: tuple[int, int, int], embedding_dim: int = 512, dropout: float = 0.5):
        super().__init__()
        channels, height, width = feature_shape
        self.norm_in = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * height * width, embedding_dim)
        self.norm_out = nn.BatchNorm1d(embedding_dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.norm_in(feature_map)).flatten(1)
        return self.norm_out(self.fc(x))


class MarginHead(nn.Module):
    """Cosine classifier over L2-normalised embeddings and class centres."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embedding.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)

    def margin(self, cosine: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each sample's target class."""
        cos = self.cosine(embedding)
        target = cos.gather(1, labels[:, None])
        logits = cos.scatter(1, labels[:, None], self.margin(target))
        return logits * self.scale


class CosFace(MarginHead):
    """Large-margin cosine: s * (cos(theta) - m) on the target class (CosFace, s=30, m=0.35)."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35):
        super().__init__(embedding_dim, num_classes, scale)
        self.m = margin

    def margin(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.m


class ArcFace(MarginHead):
    """Additive angular margin: s * cos(theta + m), kept monotonic where theta + m > pi."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__(embedding_dim, num_classes, scale)
        self.m = margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def margin(self, cosine: torch.Tensor) -> torch.Tensor:
        # sqrt(1 - c^2) has an infinite gradient at |c| = 1: clamp away from it.
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
        shifted = cosine * self.cos_m - sine * self.sin_m
        # Beyond theta = pi - m, cos(theta + m) would rise again; fall back to a CosFace-like penalty.
        return torch.where(cosine > self.threshold, shifted, cosine - self.fallback)


MARGIN_HEADS = {"cosface": CosFace, "arcface": ArcFace}
