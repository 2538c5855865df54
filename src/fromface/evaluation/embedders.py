"""What the evaluation runner embeds with: one interface over our models, trainer checkpoints and peers.

An :class:`Embedder` turns loaded RGB images into embeddings, each with the method that found the face
(``detected`` / ``retry`` / ``fallback``, or ``failed`` when its pipeline gives up). Its ``cache_key`` names
everything that changes the numbers (weights, preprocessing, face choice, flip), so cached embeddings are
never reused across settings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fromface.errors import ConfigError

PEER_NAMES = ("sface", "face_recognition")


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


def _file_identity(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.resolve()}:{st.st_size}:{digest.hexdigest()[:16]}"


def _to_batch(crops: list[np.ndarray], preprocess) -> np.ndarray:
    """Aligned uint8 RGB crops -> normalised float32 N x 3 x H x W, as the model's Preprocess says."""
    import cv2

    h, w = preprocess.size
    batch = np.empty((len(crops), h, w, 3), dtype=np.float32)
    for i, crop in enumerate(crops):
        if crop.shape[:2] != (h, w):
            crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
        batch[i] = crop
    if preprocess.channel_order.upper() == "BGR":
        batch = batch[..., ::-1]
    batch = batch / 255.0
    batch = (batch - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class AlignedEmbedder(Embedder):
    """A fromface network: our aligner (YuNet, retry, optional centre fallback) + the model's own preprocessing.

    Subclasses implement :meth:`forward` (normalised N x 3 x H x W float32 -> N x D embeddings).
    """

    def __init__(self, preprocess, model_name: str, name: str, source: str, weights_id: str,
                 select: str = "central", fallback: bool = True, flip: bool = False, batch_size: int = 16,
                 kind: str = "fromface"):
        from fromface.inference.faces import FaceAligner

        super().__init__(name=name, source=source, batch_size=batch_size)
        self.preprocess = preprocess
        self.flip = flip
        self.aligner = FaceAligner(preprocess.template, select=select, fallback=fallback)
        det = self.aligner.detector
        self.info = {"kind": kind, "model": model_name, "weights": weights_id, "preprocess": repr(preprocess),
                     "select": select, "fallback": fallback, "flip": flip,
                     "detector": f"{type(det).__name__}({getattr(det, 'score_threshold', '?')})"}

    def forward(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        from fromface.errors import NoFaceError

        crops, methods = [], []
        for image in images:
            try:
                face = self.aligner.align_array(image)[0]
            except NoFaceError:
                methods.append("failed")
                continue
            crops.append(face.crop)
            methods.append(face.method)
        vectors: list[np.ndarray] = []
        if crops:
            x = _to_batch(crops, self.preprocess)
            emb = _unit(self.forward(x))
            if self.flip:  # flip fusion: sum of the unit embeddings of the crop and its mirror
                emb = _unit(emb + _unit(self.forward(np.ascontiguousarray(x[..., ::-1]))))
            vectors = list(emb.astype(np.float32))
        it = iter(vectors)
        return [EmbedResult(None if m == "failed" else next(it), m) for m in methods]


class TorchEmbedder(AlignedEmbedder):
    """A PyTorch fromface model (registry name or trainer checkpoint)."""

    def __init__(self, model, name: str, source: str, weights_id: str, refine: bool = True, **kw):
        from fromface.inference.faces import model_refiner

        self.model = model.eval()
        super().__init__(model.preprocess, getattr(model, "model_name", name), name, source, weights_id, **kw)
        if refine:  # FROM's align head re-crops the face
            self.aligner.refine = model_refiner(self.model, self.preprocess)
        if self.aligner.refine is not None:  # (only then: older cache keys stay valid)
            self.info["refine"] = True

    def forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch))
        emb = out.embedding if hasattr(out, "embedding") else out
        return emb.float().cpu().numpy()


class OnnxEmbedder(AlignedEmbedder):
    """A model exported by ``fromface export`` (preprocessing read from the file's metadata), via onnxruntime."""

    def __init__(self, path: Path, **kw):
        from fromface.inference.onnx_backend import OnnxFaceModel

        self.model = OnnxFaceModel(path)
        super().__init__(self.model.preprocess, self.model.model_name, path.stem, str(path), _file_identity(path),
                         kind="fromface-onnx", **kw)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(batch)[0], dtype=np.float32)


def load_embedder(spec: str, select: str = "central", fallback: bool = True, flip: bool = False,
                  batch_size: int = 16, refine: bool = True) -> Embedder:
    """Resolve ``--model``: a peer name (``sface``, ``face_recognition``, optionally ``peer:``-prefixed), a
    trainer checkpoint (``.pt``/``.pth``), an ONNX file from ``fromface export`` or a registered model name.
    ``refine=False`` ignores a FROM model's align head (faces stay where the detector put them)."""
    embedder = _resolve(spec, select, fallback, flip, batch_size, refine)
    embedder.factory = (spec, {"select": select, "fallback": fallback, "flip": flip, "batch_size": batch_size,
                               "refine": refine})
    return embedder


def _resolve(spec: str, select: str, fallback: bool, flip: bool, batch_size: int, refine: bool) -> Embedder:
    peer = spec.removeprefix("peer:")
    if peer in PEER_NAMES:
        from fromface.evaluation.peers import make_peer

        return make_peer(peer, select=select, flip=flip)
    path = Path(os.path.expanduser(spec))
    if path.suffix.lower() in (".pt", ".pth", ".ckpt"):
        if not path.is_file():
            raise ConfigError(f"{path}: checkpoint file not found")
        from fromface.models.checkpoint import load_model

        model = load_model(path)
        return TorchEmbedder(model, name=path.stem, source=str(path), weights_id=_file_identity(path),
                             select=select, fallback=fallback, flip=flip, batch_size=batch_size, refine=refine)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise ConfigError(f"{path}: ONNX file not found")
        return OnnxEmbedder(path, select=select, fallback=fallback, flip=flip, batch_size=batch_size)
    from fromface.inference.recognizer import default_model_spec
    from fromface.models import create_model, get_spec
    from fromface.models.weights import state_digest

    if spec == "default":
        spec = default_model_spec()
    spec_obj = get_spec(spec.split(":", 1)[0])  # "name:tag" too; unknown names list close matches
    model = create_model(spec)
    tags = ",".join(sorted(spec_obj.pretrained)) or "none"
    # The cache key holds the weights' digest only: renaming or adding a pretrained tag must not invalidate it.
    return TorchEmbedder(model, name=spec, source=f"registry:{spec} (pretrained tags: {tags})",
                         weights_id=f"sha256:{state_digest(model)}", select=select, fallback=fallback, flip=flip,
                         batch_size=batch_size, refine=refine)
