"""The occluder library: images listed in ``occluders.csv``, optionally with mouth-mask anchor points.

A folder holds the images and ``occluders.csv`` (columns ``file, category, kind, source, licence``).
Kind ``box`` pastes the whole rectangle (FROM's recipe); kind ``rgba`` pastes with its alpha channel
and the occlusion mask is ``alpha > 0``. An optional ``masktheface_masks.cfg`` (MaskTheFace's format:
one section per template with six anchor points ``mask_a`` .. ``mask_f``) lets mouth masks be placed
on a face from its landmarks, as worn. The anchors are in the template's ORIGINAL pixel coordinates;
our copies are downscaled, so each anchor set is scaled by saved size / original size. The original
size comes from a ``size: W, H`` line in the section when present, else from the table of the public
MaskTheFace templates below, else the image is taken to be at its original size.
"""

from __future__ import annotations

import configparser
import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fromface.errors import DataError, ImageError

KINDS = ("box", "rgba")
CSV_COLUMNS = ("file", "category", "kind", "source", "licence")
CFG_NAME = "masktheface_masks.cfg"
ANCHOR_KEYS = ("mask_a", "mask_b", "mask_c", "mask_d", "mask_e", "mask_f")

#: (width, height) of the public MaskTheFace templates (masks/templates/*.png) the anchors refer to.
MASKTHEFACE_SIZES: dict[str, tuple[int, int]] = {
    "KN95": (764, 642), "KN95_left": (716, 630), "KN95_right": (716, 630),
    "N95": (676, 540), "N95_left": (1172, 1126), "N95_right": (1172, 1126),
    "cloth": (800, 533), "cloth_left": (770, 494), "cloth_right": (770, 494),
    "gas": (1774, 1222), "gas_left": (860, 592), "gas_right": (860, 592),
    "surgical": (594, 496), "surgical_left": (570, 356), "surgical_right": (570, 356),
    "surgical_blue": (620, 518), "surgical_blue_left": (570, 356), "surgical_blue_right": (570, 356),
    "surgical_green": (594, 496), "surgical_green_left": (570, 356), "surgical_green_right": (570, 356),
}


@dataclass
class Occluder:
    """One occluder image, cropped to its visible part (alpha > 0 for rgba)."""

    file: str
    category: str
    kind: str
    source: str
    licence: str
    rgb: np.ndarray  # (h, w, 3) uint8
    alpha: np.ndarray  # (h, w) uint8; all 255 for kind "box"
    anchors: np.ndarray | None = None  # (6, 2) float x,y in this (cropped) image: a, b, c, d, e, f
    template: str | None = None  # MaskTheFace section name the anchors came from
    coverage: float = field(init=False)  # fraction of the rectangle that alpha covers

    def __post_init__(self) -> None:
        self.coverage = float((self.alpha > 0).mean()) if self.alpha.size else 0.0

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    @property
    def stem(self) -> str:
        return Path(self.file).stem


def _read_rgba(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode an occluder as (rgb, alpha); rgba files must carry an alpha channel."""
    if not path.is_file():
        raise ImageError(path, "occluder image listed in occluders.csv does not exist")
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, f"cannot read occluder image ({exc})") from None
    if rgba.shape[0] < 2 or rgba.shape[1] < 2:
        raise ImageError(path, f"occluder image is too small ({rgba.shape[1]}x{rgba.shape[0]})")
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    if kind == "box":
        return rgb, np.full(rgb.shape[:2], 255, dtype=np.uint8)
    if not has_alpha:
        raise ImageError(path, "kind is 'rgba' in occluders.csv but the image has no alpha channel")
    alpha = np.ascontiguousarray(rgba[:, :, 3])
    if not (alpha > 0).any():
        raise ImageError(path, "rgba occluder is fully transparent")
    return rgb, alpha


def crop_to_alpha(rgb: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Both images cropped to the rectangle where alpha > 0, and that rectangle's top-left corner."""
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return (np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(alpha[y0:y1, x0:x1]), (int(x0), int(y0)))


def _parse_point(text: str, where: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise DataError(f"{where}: expected 'x, y', got {text!r}") from None


def read_anchor_config(path: str | Path) -> dict[str, dict]:
    """Parse a MaskTheFace masks.cfg: section -> {"template": str, "points": (6,2), "size": (w,h)|None}.

    Sections without a template (MaskTheFace's ``empty``/``inpaint`` modes) are skipped.
    """
    path = Path(path)
    parser = configparser.ConfigParser(inline_comment_prefixes=None, comment_prefixes=(";", "#"))
    parser.optionxform = str  # keep key case
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed anchor config ({exc})") from None
    out: dict[str, dict] = {}
    for name in parser.sections():
        sec = parser[name]
        if "template" not in sec:
            continue
        missing = [k for k in ANCHOR_KEYS if k not in sec]
        if missing:
            raise DataError(f"{path}: section [{name}] lacks {', '.join(missing)}")
        points = np.array([_parse_point(sec[k], f"{path} [{name}] {k}") for k in ANCHOR_KEYS], dtype=np.float64)
        size = None
        if "size" in sec:
            w, h = _parse_point(sec["size"], f"{path} [{name}] size")
            size = (w, h)
        out[name] = {"template": sec["template"].strip(), "points": points, "size": size}
    return out


def _match_anchor(row: dict, anchors: dict[str, dict]) -> str | None:
    """The cfg section describing this occluder: by source path, else by file-stem suffix."""
    source = row["source"].replace("\\", "/")
    for name, info in anchors.items():
        if info["template"] and source.endswith(info["template"].replace("\\", "/")):
            return name
    stem = Path(row["file"]).stem
    hits = [n for n in anchors if stem.endswith("_" + n) or stem == n]
    return max(hits, key=len) if hits else None


def _scaled_anchors(info: dict, name: str, full_size: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """Anchors in the cropped saved image: scale by saved/original size, then shift by the crop."""
    width, height = full_size
    orig = info["size"] or MASKTHEFACE_SIZES.get(name) or (width, height)
    scale = np.array([width / orig[0], height / orig[1]])
    return info["points"] * scale - np.asarray(offset, dtype=np.float64)


def _read_rows(csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no occluders.csv in the occluder folder")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path}: header lacks column(s) {', '.join(missing)} (need {', '.join(CSV_COLUMNS)})")
    rows = []
    for line_no, raw in enumerate(reader, start=2):
        if None in raw or any(raw.get(c) is None for c in CSV_COLUMNS):
            raise DataError(f"{csv_path}:{line_no}: expected {len(header)} fields")
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if not row["file"] or not row["category"]:
            raise DataError(f"{csv_path}:{line_no}: empty file or category")
        if row["kind"] not in KINDS:
            raise DataError(f"{csv_path}:{line_no}: kind {row['kind']!r} is not one of {', '.join(KINDS)}")
        row["line"] = line_no
        rows.append(row)
    if not rows:
        raise DataError(f"{csv_path}: lists no occluders")
    return rows


class OccluderLibrary:
    """Occluders loaded into memory once, grouped by category (order as in occluders.csv)."""

    def __init__(self, occluders: Iterable[Occluder], root: Path | None = None):
        self.occluders = list(occluders)
        if not self.occluders:
            raise DataError(f"{root or 'occluder library'}: no occluders selected")
        self.root = root
        self._by_category: dict[str, list[Occluder]] = {}
        for occ in self.occluders:
            self._by_category.setdefault(occ.category, []).append(occ)

    @classmethod
    def from_folder(cls, path: str | Path, categories: Iterable[str] | None = None) -> OccluderLibrary:
        """Read ``occluders.csv`` (and ``masktheface_masks.cfg`` if present) from ``path``."""
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"{root}: occluder folder does not exist")
        rows = _read_rows(root / "occluders.csv")
        if categories is not None:
            wanted = [c.strip() for c in categories if c.strip()]
            known = sorted({r["category"] for r in rows})
            unknown = [c for c in wanted if c not in known]
            if unknown:
                raise DataError(f"{root}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                                f"{', '.join(unknown)}; known: {', '.join(known)}")
            rows = [r for r in rows if r["category"] in wanted]
        cfg = root / CFG_NAME
        anchors = read_anchor_config(cfg) if cfg.is_file() else {}
        occluders = []
        for row in rows:
            rgb, alpha = _read_rgba(root / row["file"], row["kind"])
            full_size = (rgb.shape[1], rgb.shape[0])
            offset = (0, 0)
            if row["kind"] == "rgba":
                rgb, alpha, offset = crop_to_alpha(rgb, alpha)
            section = _match_anchor(row, anchors) if row["kind"] == "rgba" else None
            points = _scaled_anchors(anchors[section], section, full_size, offset) if section else None
            occluders.append(Occluder(row["file"], row["category"], row["kind"], row["source"], row["licence"],
                                      rgb, alpha, points, section))
        return cls(occluders, root)

    def __len__(self) -> int:
        return len(self.occluders)

    def __iter__(self) -> Iterator[Occluder]:
        return iter(self.occluders)

    @property
    def categories(self) -> list[str]:
        return list(self._by_category)

    def in_category(self, category: str) -> list[Occluder]:
        return list(self._by_category.get(category, []))

    def choose(self, rng: np.random.Generator, balanced: bool = True) -> Occluder:
        """Pick an occluder: a category uniformly, then a file in it (or a file uniformly)."""
        if not balanced:
            return self.occluders[int(rng.integers(len(self.occluders)))]
        cats = self.categories
        members = self._by_category[cats[int(rng.integers(len(cats)))]]
        return members[int(rng.integers(len(members)))]
