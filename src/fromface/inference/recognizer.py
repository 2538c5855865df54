"""FaceRecognizer: image in, per-face embedding plus what the model saw of the occlusion, and calibrated verification.

Every peer library returns a bare vector and applies one global threshold. A FROM model also predicts which part of
the face was hidden; :class:`FaceEmbedding` carries that estimate (heat map, predicted pattern, visible fraction),
and :meth:`FaceRecognizer.verify` uses it to pick the threshold calibrated for that condition (clean or occluded).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fromface.data.images import ImageSource, describe_source, load_image
from fromface.errors import ConfigError, FromfaceError

#: The best available pretrained recognizer: OpenCV's SFace ported to PyTorch (no occlusion head).
DEFAULT_MODEL = "sface_net_face"
#: Used only when DEFAULT_MODEL is not registered: an UNTRAINED FROM model (its scores mean nothing).
FALLBACK_MODEL = "from_mobilefacenet"
#: Cosine threshold used when the model has no calibrated thresholds (``reason="uncalibrated"``). 0.35 is a
#: middle ground for 128-512-d ArcFace-style embeddings (SFace's own cosine threshold is 0.363); calibrate your own.
DEFAULT_THRESHOLD = 0.35
#: Operating point looked up in a pretrained tag's ``thresholds`` (``far1e-3``: 0.1% false accepts).
DEFAULT_FAR = "far1e-3"
#: A face whose visible fraction is below this counts as occluded when choosing the threshold.
OCCLUDED_BELOW = 0.9
#: The condition switch needs a confident prediction: below this probability of its most likely occlusion pattern, a
#: face counts as clean. The pattern head spreads its probability over 226 patterns on faces unlike its training
#: data (grayscale photos: 21% were called occluded from the bare argmax); benchmarks/occlusion_condition.py
#: measures the rule (docs/api.md).
MIN_PATTERN_PROBABILITY = 0.05
SELECTIONS = ("largest", "central", "all", "single")


class ManyFacesError(FromfaceError):
    """More than one face where exactly one was required (``select="single"``)."""


@dataclass
class FaceEmbedding:
    """One face: its unit-length embedding, where it was found and what the model saw of its occlusion.

    ``heatmap`` is FROM's soft mask averaged over channels on the last feature map's grid (e.g. 7x7): near 1 where
    the model kept the features, near 0 where it suppressed them as occluded. ``pattern`` is the predicted occlusion
    pattern (0 = clean) of the K x K grid vocabulary, ``pattern_box`` its (top, left, bottom, right) in crop pixels,
    and ``visible_fraction`` = 1 - (area of the predicted pattern / crop area). All four are None for plain models.
    """

    embedding: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    method: str  # "detected" | "retry" | "fallback"
    score: float  # detection score
    crop: np.ndarray  # the aligned crop fed to the model (uint8 RGB)
    heatmap: np.ndarray | None = None
    pattern: int | None = None
    pattern_probability: float | None = None
    occlusion_probability: float | None = None  # 1 - the predicted probability of pattern 0 (no occlusion)
    pattern_box: tuple[int, int, int, int] | None = None
    visible_fraction: float | None = None
    source: str = ""
    faces_found: int = 1  # faces detected in the image; this one was chosen by the recognizer's ``select`` rule

    @property
    def occluded(self) -> bool | None:
        """Whether the model thinks the face is occluded (a pattern other than 0, or little visible, predicted with
        probability >= MIN_PATTERN_PROBABILITY); None when it has no occlusion estimate."""
        if self.pattern is None and self.visible_fraction is None:
            return None
        if self.pattern_probability is not None and self.pattern_probability < MIN_PATTERN_PROBABILITY:
            return False  # no confident prediction: compared as clean
        low = self.visible_fraction is not None and self.visible_fraction < OCCLUDED_BELOW
        return bool((self.pattern is not None and self.pattern != 0) or low)

    def to_dict(self, with_embedding: bool = True) -> dict[str, Any]:
        """JSON-ready view (no crop)."""
        out: dict[str, Any] = {
            "source": self.source, "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "method": self.method, "detection_score": round(float(self.score), 4), "faces_found": self.faces_found,
            "occluded": self.occluded,
            "pattern": self.pattern, "pattern_probability": _round(self.pattern_probability),
            "occlusion_probability": _round(self.occlusion_probability),
            "pattern_box": list(self.pattern_box) if self.pattern_box is not None else None,
            "visible_fraction": _round(self.visible_fraction),
            "heatmap": None if self.heatmap is None else np.round(self.heatmap, 3).tolist(),
        }
        if with_embedding:
            out["embedding"] = [float(v) for v in self.embedding]
        return out


@dataclass
class Verification:
    """Verdict on two faces: the cosine ``score``, the ``threshold`` used, the calibration ``condition``
    ("clean" or "occluded") it came from, and ``reason`` (how the threshold was chosen)."""

    same: bool
    score: float
    threshold: float
    condition: str
    reason: str
    faces: tuple[FaceEmbedding, FaceEmbedding] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"same": self.same, "score": round(self.score, 5), "threshold": round(self.threshold, 5),
               "condition": self.condition, "reason": self.reason}
        if self.faces is not None:
            out["faces"] = [f.to_dict(with_embedding=False) for f in self.faces]
        return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def resolve_default_model() -> str:
    """The model ``FaceRecognizer()`` uses: a model with a pretrained tag registered with ``default=True`` (how a
    trained default model takes over), else DEFAULT_MODEL, else FALLBACK_MODEL with a loud warning (untrained)."""
    from fromface.models import get_spec, list_models

    try:
        import fromface.models.sface  # noqa: F401  (registers sface_net_face if the port is present)
    except ImportError:
        pass
    for name in list_models():
        if any(isinstance(info, dict) and info.get("default") for info in get_spec(name).pretrained.values()):
            return name
    try:
        get_spec(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except ConfigError:
        warnings.warn(f"{DEFAULT_MODEL} is not available; falling back to {FALLBACK_MODEL}, which is UNTRAINED: "
                      "its embeddings and verdicts are meaningless", UserWarning, stacklevel=3)
        return FALLBACK_MODEL


def default_model_spec() -> str:
    """What ``"default"`` names wherever a model is taken: the default model with its default tag (``name:tag``)."""
    from fromface.models import get_spec

    name = resolve_default_model()
    tag = pick_tag(get_spec(name).pretrained, None, name)
    return f"{name}:{tag}" if tag else name


def pick_tag(pretrained: dict, tag: str | None, model: str) -> str | None:
    """The pretrained tag to use: the one asked for, else the one marked ``default``, else the first."""
    if tag is not None and tag not in pretrained:
        known = ", ".join(sorted(pretrained)) or "none"
        raise ConfigError(f"model {model!r} has no pretrained tag {tag!r}; known: {known}")
    if tag is None:
        tag = next((t for t, info in pretrained.items() if isinstance(info, dict) and info.get("default")), None)
    return tag or next(iter(pretrained), None)


def lookup_threshold(thresholds: dict | None, condition: str, far: str) -> float | None:
    """Threshold for (condition, far) from a pretrained tag's ``thresholds``: nested ``{cond: {far: t}}``
    or flat keys ``cond/far``, ``cond_far``, ``cond-far``, ``cond:far``."""
    if not thresholds:
        return None
    nested = thresholds.get(condition)
    if isinstance(nested, dict) and far in nested:
        return float(nested[far])
    for sep in ("/", "_", "-", ":"):
        if f"{condition}{sep}{far}" in thresholds:
            return float(thresholds[f"{condition}{sep}{far}"])
    return None


def crops_to_input(crops: np.ndarray, preprocess: Any) -> np.ndarray:
    """uint8 RGB crops (N, H, W, 3) -> float32 NCHW as the model's Preprocess says: (pixel/255 - mean) / std."""
    arr = np.asarray(crops, dtype=np.float32)
    if preprocess.channel_order.upper() == "BGR":
        arr = arr[..., ::-1]
        mean, std = preprocess.mean[::-1], preprocess.std[::-1]
    else:
        mean, std = preprocess.mean, preprocess.std
    arr = (arr / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _is_batch(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class FaceRecognizer:
    """Detect, align and embed faces with one model, and verify pairs with calibrated thresholds.

    ``model``: a registered name (default: :data:`DEFAULT_MODEL`), a training checkpoint (``.pt``), an exported
    ``.onnx`` file (implies the ONNX backend) or a built ``nn.Module``. ``backend="onnx"`` exports the torch model
    once (cached under ``$FROMFACE_CACHE``) and runs it with onnxruntime. ``select``: which face of each image --
    ``"largest"``, ``"central"``, ``"all"``, or ``"single"`` (error when several faces are found). ``fallback``:
    centre-crop photos with no detected face (for pre-cropped photos). ``detector``: any
    :class:`~fromface.inference.detection.FaceDetector` (default YuNet). ``threshold`` overrides calibration.
    ``refine``: a FROM model with an align head re-crops each face from the points it predicts (a detector's
    landmarks move on occluded faces); False skips that second look. ONNX files have no align head.
    """

    def __init__(self, model: Any = None, backend: str = "torch", device: str = "cpu", select: str = "largest",
                 fallback: bool = False, tag: str | None = None, far: str = DEFAULT_FAR,
                 threshold: float | None = None, batch_size: int = 16, onnx_path: str | os.PathLike | None = None,
                 detector: Any = None, refine: bool = True):
        if backend not in ("torch", "onnx"):
            raise ConfigError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}; got {select!r}")
        self.device, self.select, self.far, self.batch_size = device, select, far, int(batch_size)
        self.user_threshold = threshold
        if model is None or (isinstance(model, str) and model == "default"):
            model = default_model_spec()
        if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
            backend, onnx_path = "onnx", model
        self.backend = backend
        if backend == "onnx" and onnx_path is not None:
            model_file = Path(onnx_path)
        elif isinstance(model, (str, os.PathLike)) and Path(model).suffix in (".pt", ".pth", ".ckpt"):
            model_file = Path(model)
        else:
            model_file = None
        # Where the model came from (a note stored in galleries, never used to load anything).
        self.model_source = str(model_file.resolve()) if model_file is not None else None
        if backend == "onnx" and onnx_path is not None:
            from fromface.inference.onnx_backend import OnnxFaceModel

            self._onnx = OnnxFaceModel(onnx_path)
            self.torch_model, self._by_name = None, False
            self.model_name, self.preprocess, self.grid = self._onnx.model_name, self._onnx.preprocess, self._onnx.grid
        else:
            self.torch_model = self._build_torch(model, tag)
            self.model_name = getattr(self.torch_model, "model_name", type(self.torch_model).__name__)
            self.preprocess = self.torch_model.preprocess
            self.grid = getattr(self.torch_model, "grid", None)
            self._onnx = None
        self.model_source = self.model_source or self.model_name
        self.tag, self.thresholds = self._pretrained_info(tag)
        self.model_id = self._model_id(model_file)
        if backend == "onnx" and self._onnx is None:
            from fromface.inference.onnx_backend import OnnxFaceModel, cached_export

            self._onnx = OnnxFaceModel(cached_export(self.torch_model, self.tag, self.thresholds))
        from fromface.inference.faces import FaceAligner, model_refiner

        aligner_select = "all" if select == "single" else select
        refiner = model_refiner(self.torch_model, self.preprocess) if refine and self.torch_model is not None else None
        self.aligner = FaceAligner(self.preprocess.template, select=aligner_select, fallback=fallback,
                                   detector=detector, refine=refiner)
        self._vocab = None

    # ------------------------------------------------------------------ model loading
    def _build_torch(self, model: Any, tag: str | None):
        import torch

        from fromface.models import create_model, get_spec

        self._by_name = isinstance(model, str) and Path(model).suffix not in (".pt", ".pth", ".ckpt")
        if isinstance(model, torch.nn.Module):
            if not hasattr(model, "preprocess"):
                raise ConfigError("a model passed as a module needs a .preprocess (build it with create_model)")
            net = model
        elif isinstance(model, (str, os.PathLike)) and Path(model).suffix in (".pt", ".pth", ".ckpt"):
            from fromface.models.checkpoint import load_model

            net = load_model(model)
        elif isinstance(model, str):
            name, _, tag_in_name = model.partition(":")
            chosen = pick_tag(get_spec(name).pretrained, tag or tag_in_name or None, name)
            net = create_model(name, pretrained=chosen)  # the factory loads (and checksums) a tag's shipped weights
        else:
            raise ConfigError(f"model must be a registered name, a checkpoint path or an nn.Module; got {model!r}")
        return net.to(self.device).eval()

    def _model_id(self, model_file: Path | None) -> str:
        """What a gallery records to refuse another model later: ``name:tag`` (or ``name``) for a registered model,
        ``sha256:...`` of a checkpoint or ONNX file, ``module:name:digest`` of the weights otherwise (a built module,
        or a registered model without pretrained weights, whose random weights differ every time)."""
        from fromface.models.pretrained import sha256_of
        from fromface.models.weights import state_digest

        if model_file is not None:
            return f"sha256:{sha256_of(model_file)}"
        if self.tag and (self._by_name or getattr(self.torch_model, "pretrained_tag", None) == self.tag):
            return f"{self.model_name}:{self.tag}"
        return f"module:{self.model_name}:{state_digest(self.torch_model)}"

    def _pretrained_info(self, tag: str | None) -> tuple[str | None, dict]:
        """(tag, thresholds) of the model's pretrained tag: the one asked for, else the only/first one."""
        if self._onnx is not None:
            return self._onnx.tag, self._onnx.thresholds
        from fromface.models import get_spec

        tag = tag or getattr(self.torch_model, "pretrained_tag", None)
        if not self._by_name and tag is None:
            return None, {}  # a checkpoint or module: a tag's thresholds were calibrated for other weights
        try:
            pretrained = get_spec(self.model_name).pretrained
        except ConfigError:
            return None, {}
        tag = pick_tag(pretrained, tag, self.model_name)
        return tag, dict((pretrained.get(tag) or {}).get("thresholds") or {})

    # ------------------------------------------------------------------ embedding
    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Normalised input (N, 3, H, W) -> (embedding, mask, pattern_logits) as numpy; mask/logits None if absent."""
        if self._onnx is not None:
            return self._onnx(batch)
        import torch

        with torch.inference_mode():
            out = self.torch_model(torch.from_numpy(batch).to(self.device))
        as_np = [None if t is None else t.float().cpu().numpy() for t in (out.embedding, out.mask, out.pattern_logits)]
        return as_np[0], as_np[1], as_np[2]

    def _aligned(self, image: ImageSource) -> list:
        name = describe_source(image)
        faces = self.aligner.align_array(load_image(image), name)
        if self.select == "single" and len(faces) > 1:
            raise ManyFacesError(f"{name}: {len(faces)} faces found where one was expected; crop the photo or use "
                                 "select='largest'")
        return faces

    def embed(self, images: ImageSource | Sequence[ImageSource]) -> list[FaceEmbedding] | list[list[FaceEmbedding]]:
        """Faces of one image (a list of :class:`FaceEmbedding`) or, for a list/tuple of images, one such list per
        image. Images may be paths, encoded bytes, PIL images or RGB arrays; crops run through the model in batches."""
        batch = list(images) if _is_batch(images) else [images]
        aligned = [self._aligned(img) for img in batch]
        flat = [(i, f) for i, faces in enumerate(aligned) for f in faces]
        results: list[list[FaceEmbedding]] = [[] for _ in batch]
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            for (i, face), emb in zip(chunk, self._embed_crops([f.crop for _, f in chunk])):
                emb.box, emb.landmarks, emb.method, emb.score = face.box, face.landmarks, face.method, face.score
                emb.faces_found = face.faces_found
                emb.source = describe_source(batch[i])
                results[i].append(emb)
        return results if _is_batch(images) else results[0]

    def embed_one(self, image: ImageSource) -> FaceEmbedding:
        """The selected face of one image (the largest by default)."""
        return self.embed(image)[0]

    def _embed_crops(self, crops: list[np.ndarray]) -> list[FaceEmbedding]:
        import cv2

        h, w = self.preprocess.size
        crops = [c if c.shape[:2] == (h, w) else cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in crops]
        emb, mask, logits = self.forward(crops_to_input(np.stack(crops), self.preprocess))
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        out = []
        for k, crop in enumerate(crops):
            fe = FaceEmbedding(embedding=emb[k].astype(np.float32), box=np.zeros(4), landmarks=np.zeros((5, 2)),
                               method="", score=0.0, crop=crop)
            if mask is not None and mask.ndim == 4:
                fe.heatmap = mask[k].mean(axis=0).astype(np.float32)
            if logits is not None:
                self._add_pattern(fe, logits[k], h, w)
            out.append(fe)
        return out

    def _add_pattern(self, fe: FaceEmbedding, logits: np.ndarray, h: int, w: int) -> None:
        from fromface.occlusion.patterns import PatternVocabulary, num_patterns

        if self._vocab is None:
            grid = self.grid or next((k for k in range(1, 33) if num_patterns(k) == logits.shape[0]), None)
            if grid is None or num_patterns(grid) != logits.shape[0]:
                return
            self._vocab = PatternVocabulary(h, w, grid)
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        idx = int(prob.argmax())
        top, left, bottom, right = (int(v) for v in self._vocab.boxes[idx])
        fe.pattern, fe.pattern_probability = idx, float(prob[idx])
        fe.occlusion_probability = float(1.0 - prob[0])
        fe.pattern_box = (top, left, bottom, right)
        fe.visible_fraction = 1.0 - (bottom - top) * (right - left) / float(h * w)

    # ------------------------------------------------------------------ verification
    def threshold_for(self, *faces: FaceEmbedding) -> tuple[float, str, str]:
        """(threshold, condition, reason) for comparing these faces: "occluded" if any of them is."""
        return self.condition_threshold(any(f.occluded for f in faces), any(f.occluded is not None for f in faces))

    def condition_threshold(self, occluded: bool, estimated: bool = True) -> tuple[float, str, str]:
        """(threshold, condition, reason) for one condition; ``estimated`` says whether occlusion was predicted."""
        condition = "occluded" if occluded else "clean"
        if self.user_threshold is not None:
            return float(self.user_threshold), condition, "user threshold"
        value = lookup_threshold(self.thresholds, condition, self.far)
        if value is not None:
            how = "predicted occlusion" if estimated else "model has no occlusion head"
            return value, condition, f"calibrated ({self.tag}, {condition}, {self.far}; condition from {how})"
        return DEFAULT_THRESHOLD, condition, "uncalibrated"

    def verify(self, a: ImageSource | FaceEmbedding, b: ImageSource | FaceEmbedding) -> Verification:
        """Same person or not, with the score, the threshold used and which calibration condition chose it."""
        todo = [x for x in (a, b) if not isinstance(x, FaceEmbedding)]
        embedded = iter(self.embed(todo)) if todo else iter(())
        fa, fb = (x if isinstance(x, FaceEmbedding) else next(embedded)[0] for x in (a, b))
        score = float(np.dot(fa.embedding, fb.embedding))
        threshold, condition, reason = self.threshold_for(fa, fb)
        return Verification(score >= threshold, score, threshold, condition, reason, faces=(fa, fb))
