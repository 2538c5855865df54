"""What the evaluation runner embeds with: one interface over our models and the peers.

An :class:`Embedder` turns loaded RGB images into embeddings, each with the method that found the face
(``detected`` / ``retry`` / ``fallback``, or ``failed`` when its pipeline gives up). Its ``cache_key`` names
everything that changes the numbers (weights, preprocessing, face choice, flip), so cached embeddings are
never reused across settings. A FROM model also returns its :class:`OcclusionEstimate` per face, so the eval can
score what users are shown about occlusion against a manifest's truth in the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from fromface.occlusion.heatmap import shown_visible_fraction


@dataclass
class OcclusionEstimate:
    """What a FROM model said about one face's occlusion, and where the crop it judged came from.

    ``landmarks`` (5, 2) are the points in the photo the crop was warped from (after the align head's re-crop),
    ``template`` and ``size`` (height, width of the network input) the rest of that warp: together they map any
    region of the photo into the crop. The other fields are those of
    :class:`~fromface.inference.recognizer.FaceEmbedding` (``pattern_box`` is (top, left, bottom, right) in input
    pixels, bottom/right exclusive; ``heatmap`` the mask averaged over channels, None when the model has no mask),
    except ``visible_fraction``, which is the pattern box's alone: the figure users are shown is
    :attr:`shown_visible_fraction`, derived from it and the heat map, so a cached row never holds a stale one.
    """

    landmarks: np.ndarray
    template: str
    size: tuple[int, int]
    pattern: int | None = None
    pattern_probability: float | None = None
    occlusion_probability: float | None = None
    pattern_box: tuple[int, int, int, int] | None = None
    visible_fraction: float | None = None
    heatmap: np.ndarray | None = None

    @property
    def shown_visible_fraction(self) -> float | None:
        """The visible fraction :class:`~fromface.inference.recognizer.FaceEmbedding` reports for this face."""
        return shown_visible_fraction(self.heatmap, self.visible_fraction, (int(self.size[0]), int(self.size[1])))

    def to_row(self) -> tuple[str, bytes | None]:
        """(JSON of everything but the heat map, the heat map as float16 bytes): one cache row, a few KB."""
        data = {"landmarks": np.asarray(self.landmarks, np.float64).round(4).tolist(), "template": self.template,
                "size": list(self.size), "pattern": self.pattern, "pattern_probability": self.pattern_probability,
                "occlusion_probability": self.occlusion_probability,
                "pattern_box": None if self.pattern_box is None else [int(v) for v in self.pattern_box],
                "visible_fraction": self.visible_fraction,
                "heatmap_shape": None if self.heatmap is None else list(self.heatmap.shape)}
        heat = None if self.heatmap is None else np.asarray(self.heatmap, np.float16).tobytes()
        return json.dumps(data), heat

    @classmethod
    def from_row(cls, text: str, heat: bytes | None) -> OcclusionEstimate:
        d = json.loads(text)
        heatmap = None
        if heat is not None and d.get("heatmap_shape"):
            heatmap = np.frombuffer(heat, dtype=np.float16).astype(np.float32).reshape(d["heatmap_shape"])
        box = d.get("pattern_box")
        return cls(np.asarray(d["landmarks"], np.float64), d["template"], tuple(d["size"]), d.get("pattern"),
                   d.get("pattern_probability"), d.get("occlusion_probability"),
                   None if box is None else tuple(box), d.get("visible_fraction"), heatmap)


@dataclass
class EmbedResult:
    """One image's embedding (None when the pipeline found no face), how its face was found and, for models with
    an occlusion head, what the model estimated about the face's occlusion."""

    embedding: np.ndarray | None
    method: str
    estimate: OcclusionEstimate | None = None


@dataclass
class Embedder:
    """Base class: subclasses set the fields and implement :meth:`embed_batch`.

    ``gives_estimate``: whether :meth:`embed_batch` attaches an :class:`OcclusionEstimate` to every face it finds
    (FROM models); the runner then knows that a cached row without one was written before estimates were kept.
    """

    name: str
    source: str
    metric: str = "cosine"  # "cosine" or "euclidean" (scored as minus the distance)
    batch_size: int = 1
    info: dict = field(default_factory=dict)
    factory: tuple[str, dict] | None = None  # (spec, options) that rebuild it in a worker process
    gives_estimate: bool = False

    @property
    def cache_key(self) -> str:
        return "|".join(f"{k}={self.info[k]}" for k in sorted(self.info)) + f"|metric={self.metric}"

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        raise NotImplementedError
