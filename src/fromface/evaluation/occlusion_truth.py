"""The true occluder of each image of an ``occlude-pairs`` set, from its manifest: the box, or the exact pixels.

The manifest's ``box`` is the bounding box of the occluder mask; for a shaped occluder (``kind`` rgba: glasses, a
worn mask) it covers much more than the occluder does. The synthesiser is seeded per image, so the exact mask can be
made again: the same photo, the same face (detected as ``occlude-pairs`` detects it, or its centre box), the same
preset and the generator of (seed, index) give the same pixels. Each rebuilt image is compared with the stored
occluded image pixel by pixel, and its mask is used only when they are identical; otherwise (another occluder
folder, ``--categories`` or ``--coverage`` at creation, edited images) that image keeps its box, and the counts say so.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from fromface.data.images import load_image
from fromface.errors import DataError, FromfaceError
from fromface.evaluation.occlusion_estimate import TrueRegion
from fromface.faces.aligner import FaceAligner, placement_face
from fromface.occlusion.occluders import OccluderLibrary
from fromface.occlusion.synth import Synthesizer

#: The aligner ``occlude-pairs`` places occluders with (its face box and landmarks decide where they go).
PLACEMENT_TEMPLATE = "arcface112"


def _box(text: str) -> tuple[int, int, int, int] | None:
    parts = text.split()
    if len(parts) != 4:
        return None
    try:
        x0, y0, x1, y1 = (int(float(v)) for v in parts)
    except ValueError:
        return None
    return x0, y0, x1, y1


def regions_from_records(records: dict[Path, dict]) -> dict[Path, TrueRegion]:
    """Occluded image (resolved path) -> its true region from the manifest's ``box`` (the whole box covered).

    ``records``: the manifest row of each occluded image. Rows without a usable box are left out (they cannot be
    scored); rows whose box is empty keep an empty region.
    """
    out = {}
    for path, row in records.items():
        box = _box(row.get("box") or "")
        if box is not None:
            out[path] = TrueRegion((row.get("category") or "").strip() or "none", (row.get("kind") or "").strip(), box)
    return out


def infer_source_root(first_images: list[Path], records: dict[Path, dict]) -> Path | None:
    """The folder the manifest's ``source`` paths are relative to, found from the set's clean images.

    ``occlude-pairs`` keeps the first image of a pair as the original photo, under the same root as the photos it
    occluded: the root is that many folders above a clean image as a source path has parts. The most common
    candidate is checked against the manifest (its sources must exist there); None when nothing fits.
    """
    sources = [row.get("source") or "" for row in records.values()]
    sources = [s for s in sources if s]
    if not sources or not first_images:
        return None
    depth = len(PurePosixPath(sources[0]).parts)
    candidates = Counter(p.resolve().parents[depth - 1] for p in first_images if len(p.resolve().parents) >= depth)
    for root, _ in candidates.most_common(3):
        if all((root / s).is_file() for s in sources[:20]):
            return root
    return None


class MaskRebuilder:
    """Re-creates the occluded images of a manifest, row by row, with the occluder library it was made with."""

    def __init__(self, occluders: Path, source_root: Path):
        self.library = OccluderLibrary.from_folder(occluders)
        self.source_root = Path(source_root)
        self.aligner = FaceAligner(PLACEMENT_TEMPLATE, select="central")
        self._synths: dict[str, Synthesizer] = {}

    def mask(self, row: dict, occluded_path: Path) -> np.ndarray | None:
        """The exact occluder mask (photo size, True = covered) of one manifest row, or None when the rebuilt
        image differs from the stored one in any pixel (then the mask cannot be trusted)."""
        preset = row.get("preset") or "face"
        if preset not in self._synths:
            self._synths[preset] = Synthesizer(self.library, preset=preset, grid=None, clean_prob=0.0)
        image = load_image(self.source_root / row["source"])
        aligner = None if (row.get("face") or "") == "centre-box" else self.aligner
        box, landmarks, _ = placement_face(aligner, image)
        result = self._synths[preset].occlude_seeded(image, int(row["seed"]), int(row["index"]), face_box=box,
                                                     landmarks=landmarks)
        stored = load_image(occluded_path)
        return result.mask if np.array_equal(result.image, stored) else None


def rebuild_masks(regions: dict[Path, TrueRegion], records: dict[Path, dict], occluders: Path,
                  source_root: Path, progress: bool = True) -> tuple[int, int]:
    """Give every region whose image can be re-created exactly its pixel mask (in place); (rebuilt, box only)."""
    rebuilder = MaskRebuilder(occluders, source_root)
    rebuilt = 0
    todo = [p for p in regions if all(records[p].get(k) for k in ("source", "seed", "index"))]
    for path in tqdm(todo, desc="true masks", unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=2.0,
                     disable=not progress):
        try:
            mask = rebuilder.mask(records[path], path)
        except (FromfaceError, OSError, ValueError, KeyError):
            mask = None
        if mask is not None and mask.any():
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
            regions[path].box = (x0, y0, x1, y1)  # the mask's own bounding box (the manifest's, to the pixel)
            regions[path].mask = mask[y0:y1, x0:x1].copy()
            rebuilt += 1
    return rebuilt, len(regions) - rebuilt


@dataclass
class Truth:
    """What every model's estimate is scored against: the true region of each occluded image (resolved path), the
    clean images of the set, and a sentence saying where the regions came from."""

    regions: dict[Path, TrueRegion]
    clean: set[Path]
    note: str


def set_truth(pairs: list, records: dict[Path, dict], occluders: Path | None = None, source_root: Path | None = None,
              progress: bool = True) -> Truth:
    """The truth of a pair set: ``records`` maps each occluded image (resolved) to its manifest row; every other
    image of the pairs is clean. With ``occluders`` (the folder the set was made with) the exact masks are rebuilt,
    from ``source_root`` or the root :func:`infer_source_root` finds; without it, the manifest's boxes are used."""
    images = {Path(q).resolve() for p in pairs for q in (p.path1, p.path2)}
    records = {p: r for p, r in records.items() if p in images}
    regions = regions_from_records(records)
    clean = images - set(records)
    note = "manifest box (bounding box of the occluder mask) mapped into each crop"
    if occluders is not None:
        root = source_root or infer_source_root([Path(p.path1) for p in pairs if Path(p.path1).resolve() in clean],
                                                records)
        if root is None:
            raise DataError("cannot tell which folder the manifest's source photos are in; pass --source-root")
        rebuilt, boxed = rebuild_masks(regions, records, Path(occluders), root, progress)
        note = (f"exact occluder mask rebuilt from the manifest (identical pixels) for {rebuilt} of {len(regions)} "
                f"images, manifest box for {boxed}; mapped into each crop")
    return Truth(regions, clean, note)
