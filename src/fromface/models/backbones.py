"""What the FROM wrapper needs from a backbone: stage outputs and their shapes."""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """A trunk that returns its stage outputs, shallow to deep (the last one is masked by FROM).

    Subclasses set ``stage_channels`` and implement ``forward`` (returning a list of maps, at least
    three) and ``stage_shapes`` (their (C, H, W) for an input size), so wrappers can size their
    layers without a dry run. Those that also implement ``forward_after`` (run the stages above
    ``stage`` on a given map of that stage) can be masked at an intermediate stage by FROM.
    """

    stage_channels: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:  # pragma: no cover
        raise NotImplementedError

    def forward_until(self, x: torch.Tensor, stage: int) -> list[torch.Tensor]:
        """Stage maps 0..``stage``; subclasses that can stop early override this."""
        return self(x)[: stage + 1]


def halve(n: int) -> int:
    """Output length of a 3x3 (or 1x1) stride-2 convolution with padding 1 (or 0)."""
    return (n + 1) // 2
