"""Resolve ``--model`` into an :class:`~fromface.evaluation.embedding.Embedder`: a peer by name, or one of our
models (registered name, ``name:tag``, trainer checkpoint or exported ONNX file) loaded exactly as
:class:`~fromface.FaceRecognizer` loads it, behind our aligner.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fromface.data.files import file_sha256
from fromface.errors import ConfigError, NoFaceError
from fromface.evaluation.embedding import Embedder, EmbedResult, OcclusionEstimate
from fromface.evaluation.peers import make_peer
from fromface.faces.aligner import FaceAligner
from fromface.inference.face_model import FaceModel, load_face_model
from fromface.models.weights import state_digest
from fromface.occlusion.patterns import num_patterns, pattern_boxes, predicted_pattern

PEER_NAMES = ("sface", "face_recognition")


def _file_identity(path: Path) -> str:
    """A model file in a cache key: its path, size and content (a file replaced in place is noticed)."""
    return f"{path.resolve()}:{path.stat().st_size}:{file_sha256(path)[:16]}"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ModelEmbedder(Embedder):
    """A fromface network (torch or ONNX): our aligner (YuNet, retry, optional centre fallback, the align head's
    re-crop when the model has one) and the model's own preprocessing."""

    def __init__(self, model: FaceModel, name: str, weights_id: str, select: str = "central",
                 fallback: bool = True, flip: bool = False, batch_size: int = 16, refine: bool = True):
        super().__init__(name=name, source=model.source, batch_size=batch_size)
        self.model, self.preprocess, self.flip = model, model.preprocess, flip
        refiner = model.refiner() if refine else None
        self.aligner = FaceAligner(model.preprocess.template, select=select, fallback=fallback, refine=refiner)
        det = self.aligner.detector
        kind = "fromface-onnx" if model.onnx is not None else "fromface"
        self.info = {"kind": kind, "model": model.name, "weights": weights_id, "preprocess": repr(model.preprocess),
                     "select": select, "fallback": fallback, "flip": flip,
                     "detector": f"{type(det).__name__}({getattr(det, 'score_threshold', '?')})"}
        if refiner is not None:  # only then, so the cache keys of models without an align head stay as they were
            self.info["refine"] = True
        # A model with a pattern head (its grid is known) reports an occlusion estimate; the cache key is unchanged,
        # so embeddings cached before estimates were kept stay valid (the runner adds the estimates when asked).
        self._grid = model.grid or 0
        self.gives_estimate = bool(model.grid)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.forward(batch)[0], dtype=np.float32)

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        found, methods = [], []
        for image in images:
            try:
                face = self.aligner.locate(image)[0]
            except NoFaceError:
                methods.append("failed")
                continue
            found.append((image, face))
            methods.append(face.method)
        self.aligner.recrop(found)  # the align head sees the whole batch at once
        crops = [face.crop for _, face in found]
        vectors: list[np.ndarray] = []
        estimates: list[OcclusionEstimate | None] = []
        if crops:
            x = self.preprocess.to_input(crops)
            raw, mask, logits = self.model.forward(x)
            emb = _unit(np.asarray(raw, dtype=np.float32))
            if self.flip:  # flip fusion: sum of the unit embeddings of the crop and its mirror
                emb = _unit(emb + _unit(self.forward(np.ascontiguousarray(x[..., ::-1]))))
            vectors = list(emb.astype(np.float32))
            estimates = [self._estimate(face.landmarks, mask, logits, k) if self.gives_estimate else None
                         for k, (_, face) in enumerate(found)]
        it = iter(zip(vectors, estimates))
        out = []
        for m in methods:
            vec, est = (None, None) if m == "failed" else next(it)
            out.append(EmbedResult(vec, m, est))
        return out

    def _estimate(self, landmarks: np.ndarray, mask: np.ndarray | None, logits: np.ndarray | None,
                  k: int) -> OcclusionEstimate:
        """Face ``k``'s occlusion estimate, read from the logits by the recognizer's own
        :func:`~fromface.occlusion.patterns.predicted_pattern`, so the eval scores the numbers a user is shown. With
        flip fusion, the estimate is the unmirrored crop's."""
        h, w = self.preprocess.size
        est = OcclusionEstimate(np.asarray(landmarks, np.float64).copy(), self.preprocess.template, (h, w))
        if mask is not None and mask.ndim == 4:
            est.heatmap = mask[k].mean(axis=0).astype(np.float32)
        if logits is not None and num_patterns(self._grid) == logits.shape[1]:
            seen = predicted_pattern(logits[k], pattern_boxes(h, w, self._grid), h, w)
            est.pattern, est.pattern_probability = seen.pattern, seen.probability
            est.occlusion_probability, est.pattern_box, est.visible_fraction = seen.occlusion_probability, seen.box, \
                seen.visible_fraction
        return est


def load_embedder(spec: str, select: str = "central", fallback: bool = True, flip: bool = False,
                  batch_size: int = 16, refine: bool = True, backend: str = "auto") -> Embedder:
    """Resolve ``--model``: a peer name (``sface``, ``face_recognition``, optionally ``peer:``-prefixed), a
    trainer checkpoint (``.pt``/``.pth``), an ONNX file from ``fromface export`` or a registered model name.
    ``refine=False`` ignores a FROM model's align head (faces stay where the detector put them). ``backend``: as
    :func:`~fromface.inference.face_model.load_face_model` (peers and ONNX files ignore it)."""
    embedder = _resolve(spec, select, fallback, flip, batch_size, refine, backend)
    embedder.factory = (spec, {"select": select, "fallback": fallback, "flip": flip, "batch_size": batch_size,
                               "refine": refine, "backend": backend})
    return embedder


def _resolve(spec: str, select: str, fallback: bool, flip: bool, batch_size: int, refine: bool,
             backend: str) -> Embedder:
    peer = spec.removeprefix("peer:")
    if peer in PEER_NAMES:
        return make_peer(peer, select=select, flip=flip)
    options = {"select": select, "fallback": fallback, "flip": flip, "batch_size": batch_size}
    path = Path(os.path.expanduser(spec))
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".onnx"):
        if not path.is_file():
            kind = "ONNX" if path.suffix.lower() == ".onnx" else "checkpoint"
            raise ConfigError(f"{path}: {kind} file not found")
        model = load_face_model(path, refine=refine)
        return ModelEmbedder(model, path.stem, _file_identity(path), refine=refine, **options)
    model = load_face_model(spec, backend=backend, refine=refine)
    # The cache key holds the weights' digest only: renaming or adding a pretrained tag must not invalidate it.
    name = spec if spec != "default" else model.model_id
    return ModelEmbedder(model, name, f"sha256:{state_digest(model.torch_model)}", refine=refine, **options)
