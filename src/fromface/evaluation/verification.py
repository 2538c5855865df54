"""Score one pair list with several models on the same pixels, overall and per occlusion category/bin."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fromface.data.pairs import Pair, pair_images
from fromface.errors import DataError
from fromface.evaluation.embedding import Embedder
from fromface.evaluation.metrics import DEFAULT_FARS, assign_folds, roc_curve, verification_metrics
from fromface.evaluation.occlusion_estimate import estimate_section, no_estimate_section
from fromface.evaluation.occlusion_truth import Truth, set_truth
from fromface.evaluation.runner import EmbeddingSet, check_images_exist, embed_images, pair_scores

DEFAULT_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)
_PATH_COLUMNS = ("path", "file", "image", "output", "occluded_path", "dst")
_CATEGORY_COLUMNS = ("category", "occluder_category")
_COVERED_COLUMNS = ("covered_fraction", "covered", "coverage", "face_covered_fraction")


@dataclass
class OcclusionInfo:
    """Occluder category and covered fraction of one occluded image (from an ``occlude-pairs`` manifest)."""

    category: str
    covered_fraction: float | None
    record: dict = field(default_factory=dict)  # the whole manifest row (box, kind, seed, ...: the truth to score)


def _pick(columns: list[str], wanted: tuple[str, ...], manifest: Path, required: bool) -> str | None:
    for name in wanted:
        if name in columns:
            return name
    if required:
        raise DataError(f"{manifest}: manifest needs one of the columns {', '.join(wanted)}; has {', '.join(columns)}")
    return None


def read_manifest(manifest: Path, root: Path | None = None) -> dict[Path, OcclusionInfo]:
    """Map each occluded image (resolved path) to its category and covered fraction.

    Paths in the manifest are resolved against the manifest's folder (and also ``root`` when given).
    """
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise DataError(f"{manifest}: manifest not found") from None
    if not rows:
        raise DataError(f"{manifest}: manifest has no rows")
    columns = list(rows[0].keys())
    pcol = _pick(columns, _PATH_COLUMNS, manifest, True)
    ccol = _pick(columns, _CATEGORY_COLUMNS, manifest, True)
    fcol = _pick(columns, _COVERED_COLUMNS, manifest, False)
    out: dict[Path, OcclusionInfo] = {}
    for line, row in enumerate(rows, start=2):
        raw = (row.get(pcol) or "").strip()
        if not raw:
            raise DataError(f"{manifest}: line {line}: empty {pcol!r}")
        covered = None
        if fcol and (row.get(fcol) or "").strip():
            try:
                covered = float(row[fcol])
            except ValueError:
                raise DataError(f"{manifest}: line {line}: {fcol} {row[fcol]!r} is not a number") from None
        info = OcclusionInfo((row.get(ccol) or "").strip() or "none", covered, dict(row))
        bases = [manifest.parent] + ([root] if root is not None else [])
        for base in bases:
            out[(base / raw).resolve()] = info
    return out


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo:.2f}-{hi:.2f}"


def occlusion_groups(pairs: list[Pair], occlusion: dict[Path, OcclusionInfo], bins=DEFAULT_BINS
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Boolean pair masks per occluder category and per covered-fraction bin.

    A pair belongs to the category of its occluded image (the second, or the first if only it is occluded);
    pairs without an occluded image form the category ``clean``.
    """
    cats, fracs = [], []
    for p in pairs:
        info = occlusion.get(Path(p.path2).resolve()) or occlusion.get(Path(p.path1).resolve())
        cats.append(info.category if info else "clean")
        fracs.append(info.covered_fraction if info and info.covered_fraction is not None else np.nan)
    cats_arr, fr = np.array(cats), np.array(fracs, dtype=np.float64)
    by_cat = {c: cats_arr == c for c in sorted(set(cats))}
    by_bin = {}
    edges = list(bins)
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        upper = fr <= hi if k == len(edges) - 2 else fr < hi
        mask = (fr >= lo) & upper
        if mask.any():
            by_bin[_bin_label(lo, hi)] = mask
    return by_cat, by_bin


def evaluate_pairs(pairs: list[Pair], embedders: list[Embedder], cache_dir: Path | None = None,
                   occlusion: dict[Path, OcclusionInfo] | None = None, bins=DEFAULT_BINS, n_folds: int = 10,
                   fars=DEFAULT_FARS, progress: bool = True, workers: int = 1, occluders: Path | None = None,
                   source_root: Path | None = None) -> list[dict]:
    """Every model's metrics on the same pairs (plus per-category / per-bin ones with ``occlusion``).

    With ``occlusion``, each model also gets ``occlusion_estimate``: its occlusion estimate scored against the
    manifest's truth (:mod:`~fromface.evaluation.occlusion_estimate`); ``occluders`` (and ``source_root``) let the
    exact occluder masks be rebuilt instead of using the manifest's boxes (:mod:`~fromface.evaluation.occlusion_truth`).
    """
    if not pairs:
        raise DataError("no pairs to evaluate")
    images = pair_images(pairs)
    check_images_exist(images)
    same = np.array([p.same for p in pairs], dtype=bool)
    folds = np.array([p.fold for p in pairs], dtype=np.int64)
    p1 = [Path(p.path1) for p in pairs]
    p2 = [Path(p.path2) for p in pairs]
    groups = occlusion_groups(pairs, occlusion, bins) if occlusion else None
    truth = set_truth(pairs, {p: i.record for p, i in occlusion.items()}, occluders, source_root, progress) \
        if occlusion else None
    results = []
    for emb in embedders:
        es = embed_images(emb, images, cache_dir, progress, workers, estimates=truth is not None)
        scores, failed = pair_scores(es, p1, p2, emb.metric)
        res = {
            "name": emb.name, "source": emb.source, "metric": emb.metric, "settings": dict(emb.info),
            "face_methods": es.counts(), "failed_images": int(sum(m == "failed" for m in es.methods)),
            "failed_pairs": int(failed.sum()), "failed_positive_pairs": int((failed & same).sum()),
            "seconds": round(es.seconds, 2), "images_computed": es.computed, "images_cached": es.cached,
            "metrics": verification_metrics(scores, same, folds, n_folds, fars),
        }
        if failed.any() and (~failed).sum() >= 4:  # what the recogniser does where its detector found both faces
            res["metrics_found_faces_only"] = verification_metrics(scores[~failed], same[~failed], folds[~failed],
                                                                   n_folds, fars)
        fpr, tpr, _ = roc_curve(scores, same)
        res["_roc"] = (fpr, tpr)
        res["_scores"] = scores
        if groups:
            by_cat, by_bin = groups
            correct = _correct_at_overall_thresholds(scores, same, folds, n_folds, res["metrics"])
            res["per_category"] = {c: _subset(scores, same, folds, m, n_folds, fars, failed, correct)
                                   for c, m in by_cat.items()}
            res["per_covered_fraction"] = {b: _subset(scores, same, folds, m, n_folds, fars, failed, correct)
                                           for b, m in by_bin.items()}
        if truth is not None:
            res["occlusion_estimate"] = _estimate(emb, es, truth)
        results.append(res)
    return results


def _estimate(emb: Embedder, es: EmbeddingSet, truth: Truth) -> dict:
    """A model's occlusion-estimate section, or "no estimate" for a model without an occlusion head."""
    if not emb.gives_estimate:
        return no_estimate_section()
    section = estimate_section([Path(p).resolve() for p in es.paths], es.estimates, es.methods, truth.regions,
                               truth.clean, truth.note)
    section["images_embedded_again_for_estimates"] = es.estimates_added
    return section


def _correct_at_overall_thresholds(scores, same, folds, n_folds, metrics) -> np.ndarray | None:
    """Per pair: right or wrong under its fold's threshold from the whole set (what a deployed system sees)."""
    if "fold_thresholds" not in metrics:
        return None
    f = assign_folds(same, n_folds, folds)
    thresholds = dict(zip(np.unique(f).tolist(), metrics["fold_thresholds"]))
    t = np.array([thresholds[int(k)] for k in f])
    return (scores > t) == same


def _subset(scores, same, folds, mask, n_folds, fars, failed, correct) -> dict:
    """The protocol run within a group (thresholds from the group's other folds), plus its accuracy under the
    whole set's thresholds."""
    out = verification_metrics(scores[mask], same[mask], folds[mask], n_folds, fars)
    out["failed_pairs"] = int(failed[mask].sum())
    if correct is not None:
        out["accuracy_at_overall_thresholds"] = float(np.mean(correct[mask]))
    return out
