"""Improved-residual ResNets: the paper's LResNet50E-IR (112x96) and the 112x112 iResNets."""

from __future__ import annotations

import torch
from torch import nn

from fromface.models.backbones import Backbone, halve
from fromface.models.heads import EmbeddingHead
from fromface.models.outputs import FaceOutput
from fromface.models.registry import Preprocess, register_model

SPHEREFACE_112x96 = Preprocess(template="sphereface112x96", size=(112, 96))
ARCFACE_112 = Preprocess(template="arcface112", size=(112, 112))


class IRBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a (projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(Backbone):
    """Stem conv3x3/1 + four stride-2 stages; returns all four stage maps."""

    def __init__(self, layers: tuple[int, ...], channels: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        stages, in_ch = [], 64
        for depth, out_ch in zip(layers, channels):
            blocks = [IRBlock(in_ch, out_ch, 2)] + [IRBlock(out_ch, out_ch, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_until(x, len(self.stages) - 1)

    def forward_until(self, x: torch.Tensor, stage: int) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for block in self.stages[: stage + 1]:
            x = block(x)
            maps.append(x)
        return maps

    def forward_after(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        for block in self.stages[stage + 1:]:
            x = block(x)
        return x

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        shapes = []
        for ch in self.stage_channels:
            height, width = halve(height), halve(width)
            shapes.append((ch, height, width))
        return shapes


class Recognizer(nn.Module):
    """A backbone with the flattening embedding head: the plain (unmasked) baseline."""

    def __init__(self, backbone: Backbone, input_size: tuple[int, int], embedding_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        self.input_size = input_size
        self.embedding_dim = embedding_dim
        self.head = EmbeddingHead(backbone.stage_shapes(*input_size)[-1], embedding_dim)

    def forward(self, x: torch.Tensor) -> FaceOutput:
        emb = self.head(self.backbone(x)[-1])
        return FaceOutput(embedding=emb, features=emb)


_IR_LAYERS = {"lresnet50e_ir": (3, 4, 14, 3), "iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3)}


@register_model("lresnet50e_ir", SPHEREFACE_112x96, "LResNet50E-IR, the FROM paper's backbone (112x96)")
def lresnet50e_ir(embedding_dim: int = 512) -> Recognizer:
    return Recognizer(IResNet(_IR_LAYERS["lresnet50e_ir"]), (112, 96), embedding_dim)


@register_model("iresnet18", ARCFACE_112, "iResNet-18 (112x112)")
def iresnet18(embedding_dim: int = 512) -> Recognizer:
    return Recognizer(IResNet(_IR_LAYERS["iresnet18"]), (112, 112), embedding_dim)


@register_model("iresnet50", ARCFACE_112, "iResNet-50 (112x112)")
def iresnet50(embedding_dim: int = 512) -> Recognizer:
    return Recognizer(IResNet(_IR_LAYERS["iresnet50"]), (112, 112), embedding_dim)
