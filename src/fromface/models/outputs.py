"""The typed result every recognition model returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FaceOutput(NamedTuple):
    """What a forward pass produces.

    ``embedding`` is the (masked, for FROM) embedding used for matching. ``features`` is the same
    network's embedding without the mask (None for plain models, where it equals ``embedding``, and
    while training, where it is not needed). ``mask`` is FROM's soft mask over the last feature map
    and ``pattern_logits`` its occlusion-pattern prediction; both are None for plain models.
    ``landmark_shift`` (FROM with ``align_head``) says where the five alignment points of this face
    lie in the crop, relative to the template's points; see :class:`~fromface.models.from_net.AlignHead`.
    """

    embedding: torch.Tensor
    features: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    pattern_logits: torch.Tensor | None = None
    landmark_shift: torch.Tensor | None = None  # (N, 5, 2): FROM's re-alignment head, fractions of the crop size
