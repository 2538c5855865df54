"""Find, choose and align faces, with occlusion-aware fallbacks and an honest record of how each was aligned.

Order of attempts: a normal detection; a retry with a lower score threshold on an upscaled image (occluded faces
often score low); and, only when asked (``fallback=True``), a fixed centre crop for photos already centred on one
face (LFW, MFR2, aligned datasets). Each :class:`AlignedFace` says which of these produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from fromface.data.images import ImageSource, describe_source, load_image
from fromface.errors import ConfigError, NoFaceError
from fromface.faces.alignment import TEMPLATES, get_template, similarity_transform, transform_points, warp_face
from fromface.faces.detection import Detection, FaceDetector, YuNetDetector

#: How one face is chosen among several: the largest box, or the box whose centre is nearest the image centre.
ONE_FACE_RULES = ("largest", "central")
#: What :class:`FaceAligner` keeps: one face by a :data:`ONE_FACE_RULES` rule, or every face.
SELECTIONS = (*ONE_FACE_RULES, "all")
METHODS = ("detected", "retry", "fallback")

#: Centre-crop fallback box, as fractions of the image: (centre x, centre y, side / min(height, width)).
#: The arcface112 template's 112x112 crop is laid on this square to estimate the five landmarks. Calibrated on
#: 250x250 LFW photos with :func:`estimate_fallback_box` over the YuNet landmarks of all 7,701 photos (median
#: centre x 0.505, y 0.467, side 0.506; see docs/detection.md), centred horizontally: a 126.5 px square centred
#: at (125, 116.75), i.e. x 61.75-188.25, y 53.5-180.
FALLBACK_BOX = (0.5, 0.467, 0.506)


#: crops -> (N, 5, 2) shifts of each face's five alignment points from the template's, in fractions of the crop
#: size. One call takes every face of a batch of photos: the align head runs once per batch, not once per face.
Refiner = Callable[[list[np.ndarray]], np.ndarray]


def refined_landmarks(shift: np.ndarray, landmarks: np.ndarray, template: str) -> np.ndarray:
    """Where the face's points really are, in the photo: the face was warped from ``landmarks`` onto ``template``
    and its align head says the points lie ``shift`` (5, 2) away from the template's; mapped back through that warp."""

    tpl = get_template(template)
    to_crop = similarity_transform(landmarks, tpl.points)
    in_crop = tpl.points + np.asarray(shift, dtype=np.float64) * np.array(tpl.size[::-1], dtype=np.float64)
    return transform_points(cv2.invertAffineTransform(to_crop), in_crop)


@dataclass
class AlignedFace:
    """An aligned crop and where it came from: box/landmarks in the source image, score, method and template."""

    crop: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    method: str  # "detected" | "retry" | "fallback"
    template: str
    faces_found: int = 1  # faces detected in the image (this one was chosen by the selection rule); 0: fallback


BoxFractions = tuple[float, float, float]


def fallback_landmarks(height: int, width: int, box: BoxFractions = FALLBACK_BOX) -> tuple[np.ndarray, np.ndarray]:
    """Estimated (box, landmarks) for a photo centred on one face: arcface112's points placed in a centred square."""
    cx, cy, side_frac = box
    side = side_frac * min(height, width)
    x1, y1 = cx * width - side / 2.0, cy * height - side / 2.0
    canonical = TEMPLATES["arcface112"]
    ch, cw = canonical.size
    landmarks = np.array([x1, y1]) + canonical.points * np.array([side / cw, side / ch])
    return np.array([x1, y1, x1 + side, y1 + side]), landmarks


def placement_face(aligner: FaceAligner | None, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(box, landmarks, how) of the face an occluder is placed on: the aligner's chosen detection, else (or with no
    aligner) the centre box of :func:`fallback_landmarks` with ``how="centre-box"``. ``occlude-pairs`` places
    occluders so, and the eval rebuilds their exact masks the same way."""
    h, w = image_rgb.shape[:2]
    if aligner is not None:
        faces, method = aligner.detect(image_rgb)
        chosen = aligner.choose(faces, h, w)
        if chosen:
            return chosen[0].box, chosen[0].landmarks, method
    box, landmarks = fallback_landmarks(h, w)
    return box, landmarks, "centre-box"


def covers_centre(face: Detection, height: int, width: int) -> bool:
    """Whether the face's box contains the image centre (true for the subject of every clean LFW photo)."""
    x1, y1, x2, y2 = face.box
    return bool(x1 <= width / 2.0 <= x2 and y1 <= height / 2.0 <= y2)


def estimate_fallback_box(landmarks: list[np.ndarray], height: int, width: int) -> BoxFractions:
    """Calibrate a centre-crop box for a dataset of same-framed photos from detected landmarks (one (5, 2) array
    per photo): the median square on which arcface112's points best fit them, as :data:`FALLBACK_BOX` fractions."""
    canonical = TEMPLATES["arcface112"]
    ch, cw = canonical.size
    boxes = []
    for pts in landmarks:
        matrix = similarity_transform(canonical.points, np.asarray(pts, dtype=np.float64))
        scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
        centre = matrix[:, :2] @ np.array([cw / 2.0, ch / 2.0]) + matrix[:, 2]
        boxes.append((centre[0] / width, centre[1] / height, scale * cw / min(height, width)))
    if not boxes:
        raise ValueError("need the landmarks of at least one photo")
    cx, cy, side = np.median(np.array(boxes), axis=0)
    return float(cx), float(cy), float(side)


def choose_face(boxes: np.ndarray, height: int, width: int, rule: str, scores: np.ndarray | None = None) -> int:
    """Index of the face a :data:`ONE_FACE_RULES` rule picks among (x1, y1, x2, y2) boxes; ties go to the higher
    score, then to the earlier box. Shared with the peers, so every engine picks the same face of a photo."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.zeros(len(b)) if scores is None else np.asarray(scores, dtype=np.float64)
    if rule == "largest":
        key = -((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    elif rule == "central":
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0], axis=1)
        key = np.linalg.norm(centres - np.array([width / 2.0, height / 2.0]), axis=1)
    else:
        raise ConfigError(f"one face is chosen by one of {', '.join(ONE_FACE_RULES)}; got {rule!r}")
    return int(np.lexsort((-s, key))[0])


class FaceAligner:
    """Detect, choose and align faces to one template; shareable between threads.

    ``select``: ``"largest"`` (default), ``"central"`` (box centre nearest the image centre -- use it for
    benchmark photos centred on the labelled face) or ``"all"``. ``fallback=True`` enables the centre crop; with
    ``"central"`` it is also used when the only faces found lie away from the centre (see :meth:`detect`).
    """

    def __init__(self, template: str, select: str = "largest", fallback: bool = False,
                 detector: FaceDetector | None = None, retry_threshold: float = 0.3, retry_scale: float = 2.0,
                 fallback_box: BoxFractions = FALLBACK_BOX, refine: Refiner | None = None):
        self.template = get_template(template).name
        if select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}; got {select!r}")
        self.select = select
        self.fallback = bool(fallback)
        self.detector = detector if detector is not None else YuNetDetector()
        self.retry_threshold = float(retry_threshold)
        self.retry_scale = float(retry_scale)
        self.fallback_box = tuple(fallback_box)
        self.refine = refine

    def detect(self, image_rgb: np.ndarray) -> tuple[list[Detection], str]:
        """All detections (best first) and how they were found: ``"detected"``, or ``"retry"`` when the first
        pass found nothing (the list is then empty if the retry found nothing too).

        With ``select="central"`` a pass only counts when some face covers the image centre: on centred photos
        an occluded subject often hides behind well-lit background faces, which must not be taken for it.
        """
        h, w = image_rgb.shape[:2]
        first = self.detector.detect(image_rgb)
        if first and self._acceptable(first, h, w):
            return first, "detected"
        retry = self._retry(image_rgb)
        if retry and (self._acceptable(retry, h, w) or not first):
            return retry, "retry"
        return (first, "detected") if first else (retry, "retry")

    def _acceptable(self, faces: list[Detection], height: int, width: int) -> bool:
        return self.select != "central" or any(covers_centre(f, height, width) for f in faces)

    def _retry(self, image_rgb: np.ndarray) -> list[Detection]:
        """Lower threshold on an upscaled copy, then on a zero-padded copy (for faces that fill the frame)."""

        h, w = image_rgb.shape[:2]
        threshold = min(self.retry_threshold, self.detector.score_threshold)
        scale = self.retry_scale if max(h, w) * self.retry_scale <= 2048 else 1.0
        work = image_rgb
        if scale != 1.0:
            work = cv2.resize(image_rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
        upscaled = [f.scaled(1.0 / scale) for f in self.detector.detect(work, score_threshold=threshold)]
        if upscaled and self._acceptable(upscaled, h, w):
            return upscaled
        pad = max(h, w) // 4
        padded = cv2.copyMakeBorder(image_rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        framed = [f.scaled(1.0, (-pad, -pad)) for f in self.detector.detect(padded, score_threshold=threshold)]
        if framed and (self._acceptable(framed, h, w) or not upscaled):
            return framed
        return upscaled

    def choose(self, faces: list[Detection], height: int, width: int) -> list[Detection]:
        """Apply the selection rule to detections of an image of the given size."""
        if not faces or self.select == "all":
            return list(faces)
        boxes, scores = np.array([f.box for f in faces]), np.array([f.score for f in faces])
        index = choose_face(boxes, height, width, self.select, scores)
        return [faces[index]]

    def align_array(self, image_rgb: np.ndarray, name: str = "<array>") -> list[AlignedFace]:
        """Like :meth:`align` for an already loaded (H, W, 3) uint8 RGB image."""
        faces = self.locate(image_rgb, name)
        self.recrop([(image_rgb, face) for face in faces])
        return faces

    def locate(self, image_rgb: np.ndarray, name: str = "<array>") -> list[AlignedFace]:
        """Detect, choose and warp the faces of one image, from the detector's landmarks (the first look):
        :meth:`recrop` then applies the align head to the faces of many images at once."""
        faces, method = self.detect(image_rgb)
        h, w = image_rgb.shape[:2]
        chosen = self.choose(faces, h, w)
        if chosen and self.fallback and self.select == "central" and not covers_centre(chosen[0], h, w):
            chosen = []  # only faces away from the centre: on a centred photo the centre crop is the better guess
        if chosen:
            return [self._aligned(image_rgb, f.box, f.landmarks, f.score, method, len(faces)) for f in chosen]
        if not self.fallback:
            raise NoFaceError(f"{name}: no face found (also retried with score threshold {self.retry_threshold} "
                              f"on a {self.retry_scale:g}x upscaled image); use fallback=True for centred photos")
        box, landmarks = fallback_landmarks(h, w, self.fallback_box)
        return [self._aligned(image_rgb, box, landmarks, 0.0, "fallback", len(faces))]

    def recrop(self, faces: list[tuple[np.ndarray, AlignedFace]]) -> None:
        """With ``refine``: warp each (image, face) again, in place, from the points the model says the face
        really has; one ``refine`` call for all of them. Without ``refine`` nothing changes."""
        if self.refine is None or not faces:
            return
        shifts = self.refine([face.crop for _, face in faces])
        for (image_rgb, face), shift in zip(faces, shifts):
            face.landmarks = refined_landmarks(shift, face.landmarks, self.template)
            face.crop = warp_face(image_rgb, face.landmarks, self.template)

    def _aligned(self, image_rgb: np.ndarray, box: np.ndarray, landmarks: np.ndarray, score: float,
                 method: str, faces_found: int) -> AlignedFace:
        return AlignedFace(crop=warp_face(image_rgb, landmarks, self.template), box=box, landmarks=landmarks,
                           score=score, method=method, template=self.template, faces_found=faces_found)

    def align(self, image: ImageSource) -> list[AlignedFace]:
        """Aligned faces of an image (path, bytes, PIL image or RGB array), per the selection rule.

        Raises :class:`~fromface.errors.NoFaceError` naming the source when no face is found and fallback is off,
        and :class:`~fromface.errors.ImageError` for unreadable images.
        """
        return self.align_array(load_image(image), describe_source(image))
