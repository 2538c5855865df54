"""Seeded occlusion synthesis: paste one occluder on a face and say exactly what was covered.

All randomness comes from the ``Generator`` the caller passes (:func:`rng_for`); pixel work is
OpenCV's fixed-point uint8 resize/warp, so the same seed gives the same bytes. Presets: ``paper``
(FROM's recipe: random centre, factor 1.0-5.0 x native size, whole box pasted, clean with p = 1/3;
native size = longer side at 0.2 of the frame's shorter side), ``paper2`` (factor 2.0, never clean)
and ``face`` (covered fraction of the face box from a range, category-aware placement, MaskTheFace
mouth masks fitted to the landmarks). The face frame is the face box clipped to the image, or the
whole image for an aligned crop. Details: docs/occluded-benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from fromface.data.images import ImageSource, load_image
from fromface.errors import ConfigError
from fromface.occlusion.occluders import Occluder, OccluderLibrary
from fromface.occlusion.patterns import PatternVocabulary
from fromface.occlusion.variation import vary_occluder

#: Where each category goes in the face presets; unknown categories go "anywhere".
PLACEMENT = {
    "sunglasses": "eyes", "eyeglasses": "eyes", "eye_mask": "eyes",
    "mouth_mask": "lower", "scarf": "lower",
}
#: Mean landmark positions as fractions of a detector face box (x, y): eyes, nose, mouth corners.
BOX_LANDMARKS = np.array([[0.31, 0.40], [0.69, 0.40], [0.50, 0.58], [0.35, 0.78], [0.65, 0.78]])


@dataclass(frozen=True)
class Preset:
    """How occluders are sized and placed; override fields with ``Synthesizer(..., clean_prob=0)``."""

    name: str
    mode: str  # "paper" or "face"
    clean_prob: float = 0.0
    factors: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    native_fraction: float = 0.2
    coverage: tuple[float, float] = (0.20, 0.45)
    anchored_masks: bool = True
    max_turn_deg: float = 30.0
    vary: float = 0.0  # probability that a pasted occluder gets a new colour and outline (occlusion.variation)


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", "paper", clean_prob=1 / 3),
    "paper2": Preset("paper2", "paper", factors=(2.0,)),
    "face": Preset("face", "face"),
    "face-train": Preset("face-train", "face", clean_prob=1 / 3, coverage=(0.10, 0.50)),
}
PRESETS["from"] = dataclasses.replace(PRESETS["paper"], name="from")  # alias used by the training config


@dataclass
class OcclusionResult:
    image: np.ndarray  # (H, W, 3) uint8, the occluded image
    mask: np.ndarray  # (H, W) bool, True where the occluder is
    covered_fraction: float  # fraction of the face frame covered by the mask
    pattern_label: int | None  # argmax-IoU pattern for the requested grid (None without a grid)
    record: dict = field(default_factory=dict)  # occluder, category, kind, box, scale, ...


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator seeded from (seed, *keys), e.g. (seed, index) or (seed, epoch, index)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, keys)])))


def box_label(vocab: PatternVocabulary, mask: np.ndarray) -> int:
    """``vocab.label(mask)`` computed from a summed-area table over the vocabulary's own boxes.

    Same float32 IoU arithmetic, so the same argmax, but O(N) lookups instead of an (N x H*W) product
    that streams ~10 MB per call for K = 5 (several ms on a shared CPU, more than the pasting itself).
    """
    if mask.shape != (vocab.height, vocab.width):
        raise ValueError(f"mask is {mask.shape} but the vocabulary is {(vocab.height, vocab.width)}")
    sat = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)
    t, left, b, r = vocab.boxes.T
    inter = (sat[b, r] - sat[t, r] - sat[b, left] + sat[t, left]).astype(np.float32)
    area = np.float32(sat[-1, -1])
    if area == 0:
        return 0
    vocab_area = ((b - t) * (r - left)).astype(np.float32)
    union = area + vocab_area - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return int(iou.argmax())


def resolve_preset(preset: str | Preset, **overrides) -> Preset:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown occlusion preset {preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    try:
        preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as exc:
        raise ConfigError(f"bad preset override: {exc}") from None
    lo, hi = preset.coverage
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"coverage range must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    if not 0.0 <= preset.clean_prob <= 1.0:
        raise ConfigError(f"clean_prob must be in [0, 1], got {preset.clean_prob}")
    if not 0.0 <= preset.vary <= 1.0:
        raise ConfigError(f"vary must be in [0, 1], got {preset.vary}")
    if preset.mode not in ("paper", "face"):
        raise ConfigError(f"preset mode must be 'paper' or 'face', got {preset.mode!r}")
    return preset


def face_frame(shape: tuple[int, ...], face_box: np.ndarray | None) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of the face box clipped to the image; the whole image without a box."""
    height, width = shape[:2]
    if face_box is None:
        return 0, 0, width, height
    x1, y1, x2, y2 = np.asarray(face_box, dtype=np.float64).reshape(4)
    fx0, fy0 = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
    fx1, fy1 = min(width, int(math.ceil(x2))), min(height, int(math.ceil(y2)))
    if fx1 - fx0 < 2 or fy1 - fy0 < 2:
        return 0, 0, width, height
    return fx0, fy0, fx1, fy1


def landmarks_from_box(frame: tuple[int, int, int, int]) -> np.ndarray:
    """Mean five-point landmarks inside a face box, for faces without detected landmarks."""
    x0, y0, x1, y1 = frame
    return np.array([x0, y0]) + BOX_LANDMARKS * np.array([x1 - x0, y1 - y0])


def _affine(center: np.ndarray, angle: float, scale: float, occ: Occluder) -> np.ndarray:
    """2x3 map from occluder pixels to image pixels: scale, rotate about its centre, move to ``center``."""
    h, w = occ.size
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    ox, oy = (w - 1) / 2.0, (h - 1) / 2.0
    return np.array([[cos, -sin, center[0] - cos * ox + sin * oy],
                     [sin, cos, center[1] - sin * ox - cos * oy]])


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine taking src points to dst points (stabler than a homography)."""
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return sol.T


def _warp_roi(shape: tuple[int, ...], occ: Occluder, m: np.ndarray):
    """Region of the image the warped occluder touches, and the map shifted into that region."""
    h, w = occ.size
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64) - [0.5, 0.5, 0]
    pts = corners @ m.T
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(shape[1], x1), min(shape[0], y1)
    if x1 <= x0 or y1 <= y0:
        return None, None
    shifted = m.copy()
    shifted[:, 2] -= (x0, y0)
    return (x0, y0, x1, y1), shifted


def _warped_alpha(occ: Occluder, size: tuple[int, int], m: np.ndarray) -> np.ndarray:
    alpha = cv2.warpAffine(occ.alpha, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if occ.kind == "box":
        return np.where(alpha >= 128, np.uint8(255), np.uint8(0))
    alpha[alpha < 8] = 0  # interpolation dust at the edges would be an invisible "occlusion"
    return alpha


def _blend(out: np.ndarray, roi: tuple[int, int, int, int], rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend into ``out`` in place; returns the (H, W) mask ``alpha > 0``.

    Integer arithmetic over the whole region: (rgb*a + img*(255-a) + 127) // 255 is exactly ``img``
    where a = 0 and exactly ``rgb`` where a = 255, so pixels outside the alpha stay byte-identical.
    """
    x0, y0, x1, y1 = roi
    region = out[y0:y1, x0:x1]
    a = alpha.astype(np.uint16)[:, :, None]
    mixed = (rgb.astype(np.uint16) * a + region.astype(np.uint16) * (255 - a) + 127) // 255
    region[...] = mixed.astype(np.uint8)
    mask = np.zeros(out.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = alpha > 0
    return mask


def _bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] (exclusive) of a boolean mask, zeros when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _coverage(mask_roi: np.ndarray, roi: tuple[int, int, int, int], frame: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = roi
    fx0, fy0, fx1, fy1 = frame
    ix0, iy0, ix1, iy1 = max(x0, fx0), max(y0, fy0), min(x1, fx1), min(y1, fy1)
    if ix1 <= ix0 or iy1 <= iy0:
        return 0.0
    covered = np.count_nonzero(mask_roi[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0])
    return covered / float((fx1 - fx0) * (fy1 - fy0))


class Synthesizer:
    """Applies one preset's occlusions; reusable across images and worker processes."""

    def __init__(self, library: OccluderLibrary, preset: str | Preset = "face", grid: int | None = None,
                 label_size: tuple[int, int] = (112, 96), **overrides):
        self.library = library
        self.preset = resolve_preset(preset, **overrides)
        self.grid = grid
        self.label_size = (int(label_size[0]), int(label_size[1]))
        self._vocab: dict[tuple[int, int, int], PatternVocabulary] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_vocab"] = {}  # ~10 MB per vocabulary: rebuilt in each worker rather than pickled
        return state

    def vocabulary(self, height: int, width: int, grid: int) -> PatternVocabulary:
        key = (height, width, grid)
        if key not in self._vocab:
            self._vocab[key] = PatternVocabulary(height, width, grid)
        return self._vocab[key]

    def occlude(self, image: ImageSource, rng: np.random.Generator, face_box: np.ndarray | None = None,
                landmarks: np.ndarray | None = None, grid: int | None = None) -> OcclusionResult:
        """Occlude one image (aligned crop, or original photo with its face box/landmarks)."""
        out = load_image(image).copy()
        frame = face_frame(out.shape, face_box)
        lms = landmarks_from_box(frame) if landmarks is None else np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        grid = self.grid if grid is None else grid
        record: dict = {"preset": self.preset.name, "frame": list(frame)}
        if rng.random() < self.preset.clean_prob:
            mask = np.zeros(out.shape[:2], dtype=bool)
            record.update(clean=True, occluder="", category="clean", kind="", box=[0, 0, 0, 0], scale=0.0)
            return OcclusionResult(out, mask, 0.0, 0 if grid else None, record | {"covered_fraction": 0.0})
        occ = self.library.choose(rng)
        if self.preset.mode == "face":
            occ = self._turned_variant(occ, lms)
        varied = bool(self.preset.vary) and rng.random() < self.preset.vary  # no draw at 0: old seeds keep their bytes
        if varied:
            occ = vary_occluder(occ, rng)
        if self.preset.mode == "paper":
            mask, info = self._paste_paper(out, occ, rng, frame)
        else:
            mask, info = self._paste_face(out, occ, rng, frame, lms)
        fx0, fy0, fx1, fy1 = frame
        covered = float(np.count_nonzero(mask[fy0:fy1, fx0:fx1])) / float((fx1 - fx0) * (fy1 - fy0))
        box = _bbox(mask)
        record.update(clean=False, occluder=occ.file, category=occ.category, kind=occ.kind, box=box, **info,
                      covered_fraction=round(covered, 6), **({"varied": True} if varied else {}))
        label = self._label(mask, frame, out.shape, grid) if grid else None
        return OcclusionResult(out, mask, covered, label, record)

    def occlude_seeded(self, image: ImageSource, seed: int, index: int, **kwargs) -> OcclusionResult:
        """:meth:`occlude` with the generator of (seed, index); the record then carries both."""
        result = self.occlude(image, rng_for(seed, index), **kwargs)
        result.record.update(seed=int(seed), index=int(index))
        return result

    def _label(self, mask: np.ndarray, frame, shape, grid: int) -> int:
        fx0, fy0, fx1, fy1 = frame
        if (fx0, fy0, fx1, fy1) == (0, 0, shape[1], shape[0]):
            return box_label(self.vocabulary(shape[0], shape[1], grid), mask)
        h, w = self.label_size
        crop = mask[fy0:fy1, fx0:fx1].astype(np.uint8)
        small = cv2.resize(crop, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        return box_label(self.vocabulary(h, w, grid), small)

    def _paste_paper(self, out: np.ndarray, occ: Occluder, rng: np.random.Generator, frame) -> tuple[np.ndarray, dict]:
        """FROM's recipe: integer box at a random centre in the frame, the rectangle pasted whole."""
        fx0, fy0, fx1, fy1 = frame
        fw, fh = fx1 - fx0, fy1 - fy0
        factor = float(self.preset.factors[int(rng.integers(len(self.preset.factors)))])
        oh, ow = occ.size
        native = self.preset.native_fraction * min(fw, fh) / max(oh, ow)
        new_w = int(np.clip(round(factor * native * ow), 1, fw - 1))
        new_h = int(np.clip(round(factor * native * oh), 1, fh - 1))
        cx, cy = fx0 + int(rng.integers(fw)), fy0 + int(rng.integers(fh))
        bx0, by0 = cx - new_w // 2, cy - new_h // 2
        rgb = cv2.resize(occ.rgb, (new_w, new_h), interpolation=cv2.INTER_AREA if factor * native < 1 else
                         cv2.INTER_LINEAR)
        alpha = cv2.resize(occ.alpha, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        x0, y0 = max(0, bx0), max(0, by0)
        x1, y1 = min(out.shape[1], bx0 + new_w), min(out.shape[0], by0 + new_h)
        mask = np.zeros(out.shape[:2], dtype=bool)
        if x1 > x0 and y1 > y0:
            sl = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
            mask = _blend(out, (x0, y0, x1, y1), rgb[sl], alpha[sl])
        info = {"placement": "random", "factor": factor, "scale": round(new_w / ow, 6), "angle": 0.0,
                "pasted_box": [bx0, by0, bx0 + new_w, by0 + new_h]}
        return mask, info

    def _turned_variant(self, occ: Occluder, lms: np.ndarray) -> Occluder:
        """Swap a frontal mouth-mask template for its _left/_right version on a turned face."""
        if occ.template is None or not self.preset.anchored_masks:
            return occ
        yaw = _yaw(lms)
        base = occ.template.removesuffix("_left").removesuffix("_right")
        want = base + ("_left" if yaw < -0.12 else "_right" if yaw > 0.12 else "")
        for cand in self.library.in_category(occ.category):
            if cand.template == want:
                return cand
        return occ

    def _paste_face(self, out, occ: Occluder, rng: np.random.Generator, frame, lms) -> tuple[np.ndarray, dict]:
        """Face-relative: a target coverage, category-aware placement, scale found by a few fits."""
        target = float(rng.uniform(*self.preset.coverage))
        fx0, fy0, fx1, fy1 = frame
        face_area = float((fx1 - fx0) * (fy1 - fy0))
        place, placement, angle, bounds = self._placement(occ, rng, frame, lms)

        def make(k: float) -> np.ndarray:
            # rounded so that last-bit differences between libm/LAPACK builds cannot move a pixel
            return np.round(place(k), 6)

        oh, ow = occ.size
        k = 1.0 if placement == "anchored" else math.sqrt(target * face_area / (oh * ow * max(occ.coverage, 1e-3)))
        k = float(np.clip(k, *bounds))
        for _ in range(4):
            roi, m = _warp_roi(out.shape, occ, make(k))
            cov = 0.0 if roi is None else _coverage(_warped_alpha(occ, (roi[2] - roi[0], roi[3] - roi[1]), m) > 0,
                                                    roi, frame)
            if abs(cov - target) < 0.005:
                break
            step = math.sqrt(target / cov) if cov > 0 else 2.0
            new_k = float(np.clip(k * np.clip(step, 0.5, 2.0), *bounds))
            if new_k == k:
                break
            k = new_k
        roi, m = _warp_roi(out.shape, occ, make(k))
        mask = np.zeros(out.shape[:2], dtype=bool)
        if roi is not None:
            size = (roi[2] - roi[0], roi[3] - roi[1])
            alpha = _warped_alpha(occ, size, m)
            rgb = cv2.warpAffine(occ.rgb, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            mask = _blend(out, roi, rgb, alpha)
        mat = make(k)
        scale = float(np.sqrt(abs(mat[0, 0] * mat[1, 1] - mat[0, 1] * mat[1, 0])))
        info = {"placement": placement, "factor": round(k, 6), "scale": round(scale, 6),
                "angle": round(math.degrees(angle), 3), "target_coverage": round(target, 6),
                "template": occ.template or ""}
        return mask, info

    def _placement(self, occ: Occluder, rng: np.random.Generator, frame, lms):
        """(k -> 2x3 map, placement name, angle, bounds on k) for this occluder's category."""
        eye_c, u, v, iod, em = _face_axes(lms)
        tilt = math.atan2(u[1], u[0])
        where = PLACEMENT.get(occ.category, "anywhere")
        if where == "lower" and occ.anchors is not None and self.preset.anchored_masks:
            dst = _mask_targets(lms)
            centre = dst.mean(0)

            def make_anchored(k: float) -> np.ndarray:
                return _fit_affine(occ.anchors, centre + k * (dst - centre))

            return make_anchored, "anchored", tilt, (0.75, 1.4)
        big = 4.0 * max(frame[2] - frame[0], frame[3] - frame[1]) / min(occ.size)
        if where == "eyes":
            centre = eye_c + rng.normal(0.0, 0.04 * iod, 2)
            angle = tilt + math.radians(rng.normal(0.0, 3.0))
        elif where == "lower":
            chin = (lms[3] + lms[4]) / 2 + 0.6 * em * v
            centre = (lms[2] + chin) / 2 + rng.normal(0.0, 0.04 * iod, 2)
            angle = tilt + math.radians(rng.normal(0.0, 3.0))
        else:
            fx0, fy0, fx1, fy1 = frame
            centre = np.array([fx0 + (fx1 - fx0) * rng.uniform(0.15, 0.85),
                               fy0 + (fy1 - fy0) * rng.uniform(0.15, 0.85)])
            angle = tilt + math.radians(rng.uniform(-self.preset.max_turn_deg, self.preset.max_turn_deg))

        def make(k: float) -> np.ndarray:
            return _affine(centre, angle, k, occ)

        return make, where, angle, (1e-3, big)


def _face_axes(lms: np.ndarray):
    """Eye centre, unit eye axis u, downward axis v, inter-ocular and eye-to-mouth distances."""
    eye_c = (lms[0] + lms[1]) / 2
    d = lms[1] - lms[0]
    iod = float(np.hypot(*d)) or 1.0
    u = d / iod
    v = np.array([-u[1], u[0]])
    em = float(np.dot((lms[3] + lms[4]) / 2 - eye_c, v)) or iod
    return eye_c, u, v, iod, abs(em)


def _yaw(lms: np.ndarray) -> float:
    """Nose offset from the eye centre along the eye axis, in inter-ocular units (sign: image side)."""
    eye_c, u, _, iod, _ = _face_axes(lms)
    return float(np.dot(lms[2] - eye_c, u)) / iod


def _mask_targets(lms: np.ndarray) -> np.ndarray:
    """Where MaskTheFace's six anchors (a..f) sit on a face, from five landmarks."""
    eye_c, u, v, iod, em = _face_axes(lms)
    yaw = float(np.clip(_yaw(lms), -0.6, 0.6))
    bridge = eye_c + 0.5 * (lms[2] - eye_c)
    bridge_y = float(np.dot(bridge - eye_c, v))
    mouth_y = em
    left, right = 1.05 * iod * (1 + yaw), 1.05 * iod * (1 - yaw)
    jaw_y = mouth_y + 0.25 * em
    chin = (lms[3] + lms[4]) / 2 + 0.6 * em * v

    def at(x: float, y: float) -> np.ndarray:
        return eye_c + x * u + y * v

    return np.array([at(-left, bridge_y), bridge, at(right, bridge_y),
                     at(-0.85 * left, jaw_y), chin, at(0.85 * right, jaw_y)])
