"""Similarity-transform alignment of five landmarks to a named template.

A template is part of a model's preprocessing (``Preprocess.template``), so users pick a model, not a template.
Points are (x, y) in the crop's pixel coordinates, in the landmark order of :class:`~.detection.Detection`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from fromface.errors import ConfigError


@dataclass(frozen=True)
class AlignmentTemplate:
    """Where the five landmarks land in the aligned crop of ``size = (height, width)`` pixels."""

    name: str
    size: tuple[int, int]
    points: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        pts = np.asarray(self.points, dtype=np.float64)
        if pts.shape != (5, 2):
            raise ConfigError(f"template {self.name!r}: points must have shape (5, 2), got {pts.shape}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"template {self.name!r}: size must be (height, width), got {self.size}")
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    def points_at(self, size: tuple[int, int]) -> np.ndarray:
        """The five points in a crop of ``size = (height, width)`` (a network input of another size than the
        template's): where a synthesiser anchors masks and glasses on an aligned crop."""
        return self.points * np.array([size[1] / self.size[1], size[0] / self.size[0]])


#: SphereFace / CosFace / the FROM paper's 112x96 (h x w) template.
_SPHEREFACE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                        [62.7299, 92.2041]])

TEMPLATES: dict[str, AlignmentTemplate] = {}


def register_template(template: AlignmentTemplate, overwrite: bool = False) -> AlignmentTemplate:
    """Add a template under its name (e.g. ``dlib150`` from the dlib port); refuses silent replacement."""
    if template.name in TEMPLATES and not overwrite:
        raise ConfigError(f"alignment template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


register_template(AlignmentTemplate("sphereface112x96", (112, 96), _SPHEREFACE))
# InsightFace's ArcFace template: the same points shifted 8 px right in a 112x112 crop.
register_template(AlignmentTemplate("arcface112", (112, 112), _SPHEREFACE + np.array([8.0, 0.0])))


def get_template(name: str | AlignmentTemplate) -> AlignmentTemplate:
    """Look a template up by name, with a clear error listing the known ones."""
    if isinstance(name, AlignmentTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown alignment template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def similarity_transform(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst, as a 2x3 matrix.

    Umeyama's closed form, with reflections excluded, so a face is never mirrored by alignment.
    """
    src = np.asarray(src_points, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_points, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or infinite values")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("source landmarks are all at one point; cannot align")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = dst_mean - scale * rot @ src_mean
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def context_geometry(template_name: str | AlignmentTemplate, context: float) -> tuple[tuple[int, int], np.ndarray]:
    """(canvas size, offset of the crop inside it) for a crop widened ``context`` times around the same centre.

    The offset is whole pixels, so the template's crop is exactly the canvas's centre window at the same scale.
    """
    if context < 1.0:
        raise ConfigError(f"context must be >= 1 (how many times wider than the crop), got {context}")
    height, width = get_template(template_name).size
    off_y, off_x = round((context - 1.0) * height / 2.0), round((context - 1.0) * width / 2.0)
    return (height + 2 * off_y, width + 2 * off_x), np.array([off_x, off_y], dtype=np.float64)


def warp_face(image_rgb: np.ndarray, landmarks: np.ndarray, template_name: str | AlignmentTemplate,
              context: float = 1.0) -> np.ndarray:
    """Crop and align one face: warp the image so its five landmarks fall on the template's points.

    Returns a uint8 RGB array of the template's (height, width); pixels from outside the photo are black.
    ``context`` > 1 returns a wider canvas around the same crop (see :func:`context_geometry`): training
    re-detects faces in it after occluding them, as the product does on an occluded photo.
    """

    template = get_template(template_name)
    (height, width), offset = context_geometry(template, context)
    matrix = similarity_transform(landmarks, template.points + offset)
    crop = cv2.warpAffine(np.ascontiguousarray(image_rgb), matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return crop
