"""FROM's pieces around any backbone: feature pyramid, mask decoder and occlusion-pattern predictor.

The wrapper takes a plain recognizer (``backbone`` returning stage maps + ``head`` turning the last
map into an embedding) and multiplies a soft mask, predicted from the image's own features, into
that last map before the head. Keeping the recognizer's parameter names (``backbone.*``,
``head.*``) lets a clean baseline checkpoint load straight into its FROM variant.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fromface.errors import ConfigError
from fromface.faces.aligner import Refiner
from fromface.models.outputs import FaceOutput
from fromface.models.registry import Preprocess, get_spec, register_model
from fromface.occlusion.patterns import num_patterns

MaskShape = Literal["3d", "2d"]
MaskTarget = Literal["features", "embedding"]
MaskSource = Literal["pyramid", "last"]


class TopDownPyramid(nn.Module):
    """The used path of a RetinaNet-style pyramid: P5 -> P4 -> P3, returning P3."""

    def __init__(self, c3: int, c4: int, c5: int, channels: int = 256):
        super().__init__()
        self.lateral5 = nn.Conv2d(c5, channels, 1)
        self.lateral4 = nn.Conv2d(c4, channels, 1)
        self.lateral3 = nn.Conv2d(c3, channels, 1)
        self.smooth3 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        p5 = self.lateral5(c5)
        p4 = self.lateral4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return self.smooth3(p3)


class MaskDecoder(nn.Module):
    """conv3x3 -> PReLU -> BN -> conv3x3 -> sigmoid, resized to the masked map when needed."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 3, stride, 1),
            nn.PReLU(hidden),
            nn.BatchNorm2d(hidden),
            nn.Conv2d(hidden, out_ch, 3, stride, 1),
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.body(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.adaptive_avg_pool2d(logits, size)
        return torch.sigmoid(logits)


class PatternPredictor(nn.Module):
    """flatten(mask) -> BN -> Dropout -> Linear (no bias) -> BN: logits over occlusion patterns."""

    def __init__(self, mask_numel: int, patterns: int, dropout: float = 0.5):
        super().__init__()
        self.norm_in = nn.BatchNorm1d(mask_numel)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(mask_numel, patterns, bias=False)
        self.norm_out = nn.BatchNorm1d(patterns)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc(self.dropout(self.norm_in(mask.flatten(1)))))


class LowRankDelta(nn.Module):
    """A trainable rank-r correction added to a frozen linear layer's output (as its forward hook).

    SFace's head is one position-aware linear layer (50,176 -> 128, 6.4M weights): fine-tuning it
    through ``up @ down`` lets the head re-weigh the visible positions while the shipped file stays
    small. ``up`` starts at zero, so the network starts as it was.
    """

    def __init__(self, layer: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(layer.in_features, rank, bias=False)
        self.up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        layer.register_forward_hook(self)

    def forward(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.up(self.down(inputs[0]))


class AlignHead(nn.Module):
    """Where the face's five alignment points really lie in a crop, as a shift from the template's points.

    A detector's landmarks move when part of the face is covered, so an occluded face is cropped off its
    usual alignment (docs/training.md). This head reads the frozen stage map and predicts the shift, in
    fractions of the crop's width and height; the aligner then warps the photo again from the corrected
    points (:class:`~fromface.faces.aligner.FaceAligner` ``refine``). It starts at zero: trust the detector.
    """

    def __init__(self, in_ch: int, hidden: int = 64, pooled: int = 7):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden), nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden), nn.PReLU(hidden),
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(hidden * pooled * pooled, 10))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, stage_map: torch.Tensor) -> torch.Tensor:
        # shifts are a few hundredths of the crop: the 0.1 keeps Adam's first steps on the wide last layer small
        return 0.1 * self.body(stage_map).view(-1, 5, 2)


class FROM(nn.Module):
    """Face Recognition with Occlusion Masks around a plain recognizer.

    Args:
        recognizer: module with ``backbone`` (a :class:`Backbone`), ``head``, ``input_size`` and
            ``embedding_dim``.
        grid: K of the K x K occlusion-pattern grid (K=5 gives 226 patterns, the paper's setting).
        mask_shape: ``3d`` (one value per channel and position) or ``2d`` (shared over channels).
        mask_target: ``features`` (mask a feature map) or ``embedding`` (mask the embedding).
        mask_source: ``pyramid`` (decode from P3) or ``last`` (decode from the masked map only).
        mask_stage: which stage map is masked (default -1: the last, as in the paper). An earlier
            stage needs a backbone with ``forward_after``; the stages above it then run on the
            masked map.
        pyramid_channels: width of the pyramid and decoder (256 in the paper; less is cheaper on CPU).
        mask_init: if set, the decoder starts by predicting this mask value everywhere (e.g. 0.98), so
            FROM on a pretrained trunk starts out as the trunk itself.
        mask_init_std: with ``mask_init``, the std of the decoder's last weights. 1e-3 (used for the
            shipped models) left the decoder on a plateau, a nearly constant mask, through short
            schedules even under direct supervision. 1e-2 still starts within about 0.01 of
            ``mask_init`` and lets it learn.
        use_mask: False builds the ablation "no mask": the same split network with nothing multiplied in
            (no decoder, no pattern predictor), to tell the mask's effect from fine-tuning's.
        head_rank: > 0 adds a :class:`LowRankDelta` of this rank to the head's last linear layer
            (``head_adapter``), for fine-tuning a large head cheaply.
        align_head: adds an :class:`AlignHead` on the masked stage's map (before the mask), trained with
            ``loss.align_weight`` on re-detected occluded faces; the aligner uses it to re-crop the face.
    """

    def __init__(
        self,
        recognizer: nn.Module,
        grid: int = 5,
        mask_shape: MaskShape = "3d",
        mask_target: MaskTarget = "features",
        mask_source: MaskSource = "pyramid",
        pyramid_channels: int = 256,
        dropout: float = 0.5,
        mask_init: float | None = None,
        mask_stage: int = -1,
        use_mask: bool = True,
        head_rank: int = 0,
        mask_init_std: float = 1e-2,
        align_head: bool = False,
    ):
        super().__init__()
        _check_options(mask_shape, mask_target, mask_source)
        self.backbone = recognizer.backbone
        self.head = recognizer.head
        self.input_size = tuple(recognizer.input_size)
        self.embedding_dim = recognizer.embedding_dim
        self.grid, self.mask_shape, self.mask_target, self.mask_source = grid, mask_shape, mask_target, mask_source

        shapes = self.backbone.stage_shapes(*self.input_size)
        self.mask_stage = mask_stage % len(shapes)
        if self.mask_stage < 2 and mask_source == "pyramid":
            raise ConfigError(f"mask_stage {mask_stage} leaves fewer than three stage maps for the pyramid; "
                              "use mask_source='last'")
        if self.mask_stage != len(shapes) - 1 and not hasattr(self.backbone, "forward_after"):
            raise ConfigError(f"{type(self.backbone).__name__} cannot mask an intermediate stage")
        c3, c4 = shapes[max(self.mask_stage - 2, 0)][0], shapes[max(self.mask_stage - 1, 0)][0]
        c5, h5, w5 = shapes[self.mask_stage]
        self.mask_size = (h5, w5)
        mask_channels = {"2d": 1, "3d": c5}[mask_shape] if mask_target == "features" else self.embedding_dim

        if mask_source == "pyramid":
            self.pyramid = TopDownPyramid(c3, c4, c5, pyramid_channels)
            self.mask_decoder = MaskDecoder(pyramid_channels, mask_channels, stride=2, hidden=pyramid_channels)
        else:
            self.pyramid = None
            self.mask_decoder = MaskDecoder(c5, mask_channels, stride=1, hidden=pyramid_channels)
        mask_numel = mask_channels * (h5 * w5 if mask_target == "features" else 1)
        self.pattern_head = PatternPredictor(mask_numel, num_patterns(grid), dropout)
        self.use_mask = use_mask
        self.head_adapter = None
        if head_rank > 0:
            linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ConfigError(f"head_rank={head_rank}: the head of this recognizer has no linear layer")
            self.head_adapter = LowRankDelta(linears[-1], head_rank)
        self.align_head = AlignHead(c5) if align_head else None
        #: In eval mode, also return the unmasked embedding (``features``: baselines, analysis, a FROM teacher).
        #: It runs the network above the mask a second time; the product's loaders turn it off.
        self.unmasked_features = True
        if not use_mask:
            self.pyramid = self.mask_decoder = self.pattern_head = None
        elif mask_init is not None:
            self._init_mask(mask_init, mask_init_std)

    def _init_mask(self, value: float, std: float) -> None:
        if not 0.0 < value < 1.0:
            raise ConfigError(f"mask_init must lie strictly between 0 and 1, got {value}")
        last_conv = self.mask_decoder.body[-1]
        nn.init.normal_(last_conv.weight, std=std)
        nn.init.constant_(last_conv.bias, float(torch.logit(torch.tensor(value))))

    def predict_mask(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The soft mask, before broadcasting: (B, C|1, H, W) for maps, (B, D) for the embedding."""
        source = self.pyramid(*maps[-3:]) if self.pyramid is not None else maps[-1]
        mask = self.mask_decoder(source, self.mask_size)
        return mask.mean(dim=(2, 3)) if self.mask_target == "embedding" else mask

    def _embed(self, stage_map: torch.Tensor) -> torch.Tensor:
        """Run the rest of the network (upper stages, then the head) from the masked stage's map."""
        if self.mask_stage != len(self.backbone.stage_channels) - 1:
            stage_map = self.backbone.forward_after(stage_map, self.mask_stage)
        return self.head(stage_map)

    def forward(self, x: torch.Tensor) -> FaceOutput:
        return self.forward_maps(self.backbone.forward_until(x, self.mask_stage))

    def predict_landmark_shift(self, x: torch.Tensor) -> torch.Tensor:
        """The align head's shift for input crops, running only the trunk below the mask (no embedding)."""
        if self.align_head is None:
            raise ConfigError("this FROM model has no align head (model kwarg align_head)")
        return self.align_head(self.backbone.forward_until(x, self.mask_stage)[-1])

    def forward_maps(self, maps: list[torch.Tensor]) -> FaceOutput:
        """Everything from the stage maps up to the masked one (training on stored trunk outputs starts here)."""
        output = self._forward_maps(maps)
        if self.align_head is None:
            return output
        return output._replace(landmark_shift=self.align_head(maps[-1]))

    def _forward_maps(self, maps: list[torch.Tensor]) -> FaceOutput:
        masked_map = maps[-1]
        if not self.use_mask:
            embedding = self._embed(masked_map)
            return FaceOutput(embedding=embedding, features=None if self.training else embedding)
        mask = self.predict_mask(maps)
        pattern_logits = self.pattern_head(mask)
        # The unmasked embedding is for baselines and analysis; training does not need it.
        features = None if self.training or not self.unmasked_features else self._embed(masked_map)
        if self.mask_target == "features":
            embedding = self._embed(masked_map * mask)
            mask = mask.expand_as(masked_map)
        else:
            base = features if features is not None else self._embed(masked_map)
            embedding = base * mask
        return FaceOutput(embedding=embedding, features=features, mask=mask, pattern_logits=pattern_logits)


def _check_options(mask_shape: str, mask_target: str, mask_source: str) -> None:
    for name, value, allowed in (
        ("mask_shape", mask_shape, ("3d", "2d")),
        ("mask_target", mask_target, ("features", "embedding")),
        ("mask_source", mask_source, ("pyramid", "last")),
    ):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if mask_target == "embedding" and mask_shape == "2d":
        raise ConfigError("a 2-D mask applies to feature maps only; use mask_shape='3d' with the embedding")


#: FROM's own options (the keyword arguments of :class:`FROM` after the recognizer).
FROM_OPTIONS = frozenset(inspect.signature(FROM).parameters) - {"recognizer"}


def register_from_variant(backbone: str, description: str = "") -> Callable[..., FROM]:
    """Register ``from_<backbone>``: FROM around the registered recognizer, same preprocessing."""
    spec = get_spec(backbone)

    def build(**kwargs) -> FROM:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in FROM_OPTIONS}  # the rest is the backbone's
        return FROM(spec.builder(**kwargs), **options)

    text = description or f"FROM (mask decoder + pattern predictor) on {backbone}"
    return register_model(f"from_{backbone}", spec.preprocess, text, spec.licence)(build)


def model_refiner(model: nn.Module, preprocess: Preprocess) -> Refiner | None:
    """A FROM model's align head as a :class:`~fromface.faces.aligner.FaceAligner` ``refine`` step: crops in,
    each face's five points' shift out, in one batch; None for models without one."""
    if getattr(model, "align_head", None) is None:
        return None

    def refine(crops: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(preprocess.to_input(crops))
        with torch.inference_mode():
            shift = model.predict_landmark_shift(x.to(next(model.parameters()).device))
        return shift.float().cpu().numpy().astype(np.float64)

    return refine
