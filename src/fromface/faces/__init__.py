"""Face detection and alignment: YuNet detector, similarity alignment to named templates, fallbacks."""

from fromface.faces.aligner import FALLBACK_BOX, AlignedFace, FaceAligner, estimate_fallback_box, fallback_landmarks
from fromface.faces.alignment import (
    TEMPLATES,
    AlignmentTemplate,
    get_template,
    register_template,
    similarity_transform,
    warp_face,
)
from fromface.faces.detection import Detection, FaceDetector, YuNetDetector, yunet_model_path

__all__ = [
    "FALLBACK_BOX",
    "TEMPLATES",
    "AlignedFace",
    "AlignmentTemplate",
    "Detection",
    "FaceAligner",
    "FaceDetector",
    "YuNetDetector",
    "estimate_fallback_box",
    "fallback_landmarks",
    "get_template",
    "register_template",
    "similarity_transform",
    "warp_face",
    "yunet_model_path",
]
