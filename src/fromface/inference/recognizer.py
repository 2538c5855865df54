"""FaceRecognizer: image in, per-face embedding plus what the model saw of the occlusion, and calibrated verification.

Every peer library returns a bare vector and applies one global threshold. A FROM model also predicts which part of
the face was hidden; :class:`FaceEmbedding` carries that estimate (heat map, predicted pattern, visible fraction),
and :meth:`FaceRecognizer.verify` uses it to pick the threshold calibrated for that condition (clean or occluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from fromface.data.images import ImageSource, describe_source, load_image
from fromface.errors import ConfigError, FromfaceError
from fromface.faces.aligner import FaceAligner
from fromface.faces.alignment import get_template
from fromface.inference.decision import accepts
from fromface.inference.occlusion_report import occlusion_report
from fromface.occlusion.heatmap import shown_visible_fraction
from fromface.occlusion.patterns import PatternVocabulary, num_patterns, predicted_pattern

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
    and ``visible_fraction`` the share of the crop the model sees uncovered: 1 - the share its heat map marks below
    0.5 where the map marks anything, else 1 - (area of the predicted pattern / crop area)
    (:func:`~fromface.occlusion.heatmap.shown_visible_fraction`). All four are None for plain models.
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
    #: which of eyes, nose and mouth the model sees as covered, in words (:func:`occlusion_report`); None for plain
    #: models
    occlusion_report: dict[str, Any] | None = None

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
            "occlusion_report": self.occlusion_report,
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


def _is_batch(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class FaceRecognizer:
    """Detect, align and embed faces with one model, and verify pairs with calibrated thresholds.

    ``model``: a registered name (default: the shipped model marked default), a training checkpoint (``.pt``), an
    exported ``.onnx`` file (implies the ONNX backend) or a built ``nn.Module``. ``backend``: ``"auto"`` (default)
    runs a registered model's pretrained weights with onnxruntime on the CPU (exported once, cached under
    ``$FROMFACE_CACHE``) and anything else with PyTorch; ``"onnx"`` or ``"torch"`` choose (see
    :func:`~fromface.inference.face_model.load_face_model`). ``select``: which face of each image --
    ``"largest"``, ``"central"``, ``"all"``, or ``"single"`` (error when several faces are found). ``fallback``:
    centre-crop photos with no detected face (for pre-cropped photos). ``detector``: any
    :class:`~fromface.faces.detection.FaceDetector` (default YuNet). ``threshold`` overrides calibration.
    ``refine``: a FROM model with an align head re-crops each face from the points it predicts (a detector's
    landmarks move on occluded faces); False skips that second look. Every backend runs it (an ONNX export carries
    the head as a second graph). Faces go through the model ``batch_size`` at a time, across the images of a call.
    """

    def __init__(self, model: Any = None, backend: str = "auto", device: str = "cpu", select: str = "largest",
                 fallback: bool = False, tag: str | None = None, far: str = DEFAULT_FAR,
                 threshold: float | None = None, batch_size: int = 16, detector: Any = None, refine: bool = True):
        if select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}; got {select!r}")
        self.device, self.select, self.far, self.batch_size = device, select, far, int(batch_size)
        self.user_threshold = threshold
        # Imported here, not at the top: `from fromface import FaceRecognizer` and `fromface --help` stay free of
        # torch (seconds to import) until a model is actually loaded.
        from fromface.inference.face_model import load_face_model

        self.model = load_face_model(model, tag=tag, backend=backend, device=device, refine=refine)
        m = self.model
        self.backend, self.torch_model, self.model_name, self.preprocess = m.backend, m.torch_model, m.name, \
            m.preprocess
        self.grid, self.tag, self.thresholds = m.grid, m.tag, m.thresholds
        self.model_id, self.model_source = m.model_id, m.source
        refiner = m.refiner() if refine else None
        self.aligner = FaceAligner(m.preprocess.template, select="all" if select == "single" else select,
                                   fallback=fallback, detector=detector, refine=refiner)
        self._vocab = None
        self._crop_points = get_template(m.preprocess.template).points_at(m.preprocess.size)  # eyes, nose, mouth

    # ------------------------------------------------------------------ embedding
    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Normalised input (N, 3, H, W) -> (embedding, mask, pattern_logits) as numpy; mask/logits None if absent."""
        return self.model.forward(batch)

    def _located(self, image: ImageSource) -> tuple[np.ndarray, list]:
        """The decoded image and its faces at the first look (before the align head's re-crop)."""
        name = describe_source(image)
        rgb = load_image(image)
        faces = self.aligner.locate(rgb, name)
        if self.select == "single" and len(faces) > 1:
            raise ManyFacesError(f"{name}: {len(faces)} faces found where one was expected; crop the photo or use "
                                 "select='largest'")
        return rgb, faces

    def embed(self, images: ImageSource | Sequence[ImageSource]) -> list[FaceEmbedding] | list[list[FaceEmbedding]]:
        """Faces of one image (a list of :class:`FaceEmbedding`) or, for a list/tuple of images, one such list per
        image. Images may be paths, encoded bytes, PIL images or RGB arrays. The faces of consecutive images share
        batches: ``batch_size`` of them go through the align head together, then through the network. The first
        image that fails (unreadable, no face) raises."""
        results = self._embed_images(list(images) if _is_batch(images) else [images], keep_errors=False)
        return results if _is_batch(images) else results[0]

    def embed_each(self, images: Sequence[ImageSource]) -> list[list[FaceEmbedding] | FromfaceError]:
        """Like :meth:`embed` for a list of images, but an image that fails gets its error (a
        :class:`~fromface.errors.FromfaceError`: unreadable, no face, several faces under ``select="single"``) in
        its place instead of raising, so a folder's good photos keep sharing batches."""
        return self._embed_images(list(images), keep_errors=True)

    def _embed_images(self, batch: list, keep_errors: bool) -> list:
        results: list = [[] for _ in batch]
        pending: list[tuple[int, np.ndarray, Any]] = []  # (image index, decoded image, face); images freed per batch
        for i, image in enumerate(batch):
            try:
                rgb, faces = self._located(image)
            except FromfaceError as exc:
                if not keep_errors:
                    raise
                results[i] = exc
                faces = []
            pending += [(i, rgb, face) for face in faces]
            if len(pending) >= self.batch_size or (i == len(batch) - 1 and pending):
                self._embed_pending(pending, batch, results)
                pending = []
        return results

    def _embed_pending(self, pending: list[tuple[int, np.ndarray, Any]], batch: list, results: list[list]) -> None:
        self.aligner.recrop([(rgb, face) for _, rgb, face in pending])
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            for (i, _, face), emb in zip(chunk, self._embed_crops([f.crop for _, _, f in chunk])):
                emb.box, emb.landmarks, emb.method, emb.score = face.box, face.landmarks, face.method, face.score
                emb.faces_found = face.faces_found
                emb.source = describe_source(batch[i])
                results[i].append(emb)

    def embed_one(self, image: ImageSource) -> FaceEmbedding:
        """The selected face of one image (the largest by default)."""
        return self.embed(image)[0]

    def _embed_crops(self, crops: list[np.ndarray]) -> list[FaceEmbedding]:
        h, w = self.preprocess.size
        x = self.preprocess.to_input(crops)
        crops = [c if c.shape[:2] == (h, w) else cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in crops]
        emb, mask, logits = self.forward(x)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        out = []
        for k, crop in enumerate(crops):
            fe = FaceEmbedding(embedding=emb[k].astype(np.float32), box=np.zeros(4), landmarks=np.zeros((5, 2)),
                               method="", score=0.0, crop=crop)
            if mask is not None and mask.ndim == 4:
                fe.heatmap = mask[k].mean(axis=0).astype(np.float32)
            if logits is not None:
                self._add_pattern(fe, logits[k], h, w)
            fe.visible_fraction = shown_visible_fraction(fe.heatmap, fe.visible_fraction, (h, w))
            fe.occlusion_report = occlusion_report(fe.heatmap, fe.pattern_box, fe.pattern, fe.occluded, (h, w),
                                                   self._crop_points)
            out.append(fe)
        return out

    def _add_pattern(self, fe: FaceEmbedding, logits: np.ndarray, h: int, w: int) -> None:
        if self._vocab is None:
            grid = self.grid or next((k for k in range(1, 33) if num_patterns(k) == logits.shape[0]), None)
            if grid is None or num_patterns(grid) != logits.shape[0]:
                return
            self._vocab = PatternVocabulary(h, w, grid)
        seen = predicted_pattern(logits, self._vocab.boxes, h, w)
        fe.pattern, fe.pattern_probability = seen.pattern, seen.probability
        fe.occlusion_probability, fe.pattern_box, fe.visible_fraction = seen.occlusion_probability, seen.box, \
            seen.visible_fraction

    # ------------------------------------------------------------------ verification
    def threshold_for(self, *faces: FaceEmbedding) -> tuple[float, str, str]:
        """(threshold, condition, reason) for comparing these faces: "occluded" if any of them is."""
        return self.condition_threshold(any(f.occluded for f in faces), any(f.occluded is not None for f in faces))

    def condition_threshold(self, occluded: bool, estimated: bool = True) -> tuple[float, str, str]:
        """(threshold, condition, reason) for one condition; ``estimated`` says whether occlusion was predicted."""
        condition = "occluded" if occluded else "clean"
        if self.user_threshold is not None:
            return float(self.user_threshold), condition, "user threshold"
        value = self.thresholds.get(condition, {}).get(self.far)
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
        return Verification(bool(accepts(score, threshold)), score, threshold, condition, reason, faces=(fa, fb))
