"""MobileFaceNet (Chen et al. 2018): ~1M parameters, 112x112, a CPU-friendly backbone."""

from __future__ import annotations

import torch
from torch import nn

from fromface.models.backbones import Backbone, halve
from fromface.models.iresnet import ARCFACE_112
from fromface.models.outputs import FaceOutput
from fromface.models.registry import register_model


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1); residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, expanded: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_ch, expanded),
            conv_bn(expanded, expanded, 3, stride, groups=expanded),
            conv_bn(expanded, out_ch, act=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _stage(in_ch: int, out_ch: int, down_expanded: int, expanded: int, repeats: int) -> nn.Sequential:
    """A stride-2 bottleneck followed by ``repeats`` residual ones."""
    blocks = [Bottleneck(in_ch, out_ch, down_expanded, 2)]
    blocks += [Bottleneck(out_ch, out_ch, expanded, 1) for _ in range(repeats)]
    return nn.Sequential(*blocks)


class MobileFaceNetBackbone(Backbone):
    """Returns the 28x28, 14x14 and 7x7 maps (64, 128 and 512 channels at 112x112)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 3, 2), conv_bn(64, 64, 3, 1, groups=64))
        self.stage3 = _stage(64, 64, 128, 128, 4)
        self.stage4 = _stage(64, 128, 256, 256, 6)
        self.stage5 = nn.Sequential(_stage(128, 128, 512, 256, 2), conv_bn(128, 512))
        self.stage_channels = (64, 128, 512)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage3(self.stem(x))
        c4 = self.stage4(c3)
        return [c3, c4, self.stage5(c4)]

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        shapes = []
        height, width = halve(height), halve(width)
        for ch in self.stage_channels:
            height, width = halve(height), halve(width)
            shapes.append((ch, height, width))
        return shapes


class GlobalDepthwiseHead(nn.Module):
    """MobileFaceNet's GDC: a depthwise conv over the whole map, then a linear projection."""

    def __init__(self, feature_shape: tuple[int, int, int], embedding_dim: int = 512):
        super().__init__()
        channels, height, width = feature_shape
        self.gdc = nn.Sequential(
            nn.Conv2d(channels, channels, (height, width), groups=channels, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.fc = nn.Linear(channels, embedding_dim, bias=False)
        self.norm_out = nn.BatchNorm1d(embedding_dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc(self.gdc(feature_map).flatten(1)))


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_dim: int = 512, input_size: tuple[int, int] = (112, 112)):
        super().__init__()
        self.backbone = MobileFaceNetBackbone()
        self.input_size = input_size
        self.embedding_dim = embedding_dim
        self.head = GlobalDepthwiseHead(self.backbone.stage_shapes(*input_size)[-1], embedding_dim)

    def forward(self, x: torch.Tensor) -> FaceOutput:
        emb = self.head(self.backbone(x)[-1])
        return FaceOutput(embedding=emb, features=emb)


@register_model("mobilefacenet", ARCFACE_112, "MobileFaceNet (~1M parameters, 112x112)")
def mobilefacenet(embedding_dim: int = 512) -> MobileFaceNet:
    return MobileFaceNet(embedding_dim)
