"""What the evaluation runner embeds with: one interface over our models and the peers.

An :class:`Embedder` turns loaded RGB images into embeddings, each with the method that found the face
(``detected`` / ``retry`` / ``fallback``, or ``failed`` when its pipeline gives up). Its ``cache_key`` names
everything that changes the numbers (weights, preprocessing, face choice, flip), so cached embeddings are
never reused across settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EmbedResult:
    """One image's embedding (None when the pipeline found no face) and how its face was found."""

    embedding: np.ndarray | None
    method: str


@dataclass
class Embedder:
    """Base class: subclasses set the fields and implement :meth:`embed_batch`."""

    name: str
    source: str
    metric: str = "cosine"  # "cosine" or "euclidean" (scored as minus the distance)
    batch_size: int = 1
    info: dict = field(default_factory=dict)
    factory: tuple[str, dict] | None = None  # (spec, options) that rebuild it in a worker process

    @property
    def cache_key(self) -> str:
        return "|".join(f"{k}={self.info[k]}" for k in sorted(self.info)) + f"|metric={self.metric}"

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        raise NotImplementedError
