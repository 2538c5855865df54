"""Verification metrics done the way the protocols define them.

* 10-fold accuracy: for each fold, the threshold is chosen on the other nine folds only (LFW's official
  View-2 protocol); the reported figure is the mean and population standard deviation over folds.
* ROC AUC, EER and TAR at a given FAR over all pairs. A FAR below ``1 / #negatives`` cannot be measured
  (no threshold admits a fraction of one false accept); we say so instead of quietly reporting TAR at FAR 0.

Scores are "higher means more alike" (cosine similarity, or minus a distance). One convention everywhere a
threshold is applied (these metrics, the calibrated thresholds shipped with a model, ``FaceRecognizer.verify`` and
``Gallery.identify``): a pair is "same" when its score is strictly above the threshold, :func:`accepts`.
"""

from __future__ import annotations

import math

import numpy as np

from fromface.errors import DataError
from fromface.inference.decision import accepts

DEFAULT_FARS = (1e-2, 1e-3)


def _arrays(scores, same) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(same, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or infinite values")
    return s, y


def assign_folds(same, n_folds: int = 10, folds=None) -> np.ndarray:
    """Fold index of every pair: the given folds when all are >= 0 and there are at least two, else contiguous.

    Contiguous folds are made per class (the k-th run of positives and the k-th run of negatives in list
    order), as LFW's folds are, so a list sorted positives-first still gives balanced folds.
    """
    y = np.asarray(same, dtype=bool).reshape(-1)
    if folds is not None:
        f = np.asarray(folds, dtype=np.int64).reshape(-1)
        if f.shape != y.shape:
            raise DataError(f"{f.size} fold labels for {y.size} pairs")
        if (f >= 0).all() and np.unique(f).size >= 2:
            return f
    n_folds = min(n_folds, int(y.sum()), int((~y).sum()))
    if n_folds < 2:
        raise DataError("k-fold accuracy needs at least two positive and two negative pairs")
    out = np.empty(y.size, dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        for k, chunk in enumerate(np.array_split(idx, n_folds)):
            out[chunk] = k
    return out


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct scores, plus one below the lowest and one above the highest."""
    u = np.unique(scores)
    mids = (u[:-1] + u[1:]) / 2.0
    return np.concatenate([[u[0] - 1e-6], mids, [u[-1] + 1e-6]])


def accuracy_at(scores: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff score > t" for every threshold t (vectorised by sorting)."""
    pos = np.sort(scores[same])
    neg = np.sort(scores[~same])
    true_pos = pos.size - np.searchsorted(pos, thresholds, side="right")
    true_neg = np.searchsorted(neg, thresholds, side="right")
    return (true_pos + true_neg) / float(scores.size)


def best_threshold(scores, same) -> float:
    """Threshold with the best accuracy on these pairs; ties go to the median of the best candidates."""
    s, y = _arrays(scores, same)
    cands = candidate_thresholds(s)
    acc = accuracy_at(s, y, cands)
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[len(best) // 2]])


def kfold_accuracy(scores, same, folds=None, n_folds: int = 10) -> dict:
    """Per-fold accuracy with the threshold picked on the other folds; mean and population std over folds."""
    s, y = _arrays(scores, same)
    f = assign_folds(y, n_folds, folds)
    accs, thresholds = [], []
    for k in np.unique(f):
        test = f == k
        train = ~test
        if not train.any():
            raise DataError("k-fold accuracy needs at least two folds")
        t = best_threshold(s[train], y[train])
        accs.append(float(np.mean(accepts(s[test], t) == y[test])))
        thresholds.append(t)
    return {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs,
        "fold_thresholds": thresholds,
        "n_folds": len(accs),
        "folds_from": "list" if folds is not None and np.array_equal(f, np.asarray(folds)) else "contiguous",
    }


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) from the strictest threshold (nothing accepted) to the loosest (all accepted).

    ``accepts(score, thresholds[i])`` gives exactly the rates at point i: the first threshold is the highest score,
    each next one the next lower distinct score, and the last lies just below the lowest score.
    """
    s, y = _arrays(scores, same)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("a ROC curve needs both positive and negative pairs")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    distinct = s_sorted[last_of_run]
    thresholds = np.r_[distinct, distinct[-1] - 1e-6]
    return fpr, tpr, thresholds


def roc_auc(scores, same) -> float:
    """Area under the ROC curve (trapezoids; ties count one half, as in the Mann-Whitney statistic)."""
    fpr, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def equal_error_rate(scores, same) -> tuple[float, float]:
    """(EER, threshold): where the false-accept and false-reject rates cross, interpolated linearly on the ROC."""
    fpr, tpr, thr = roc_curve(scores, same)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (nothing accepted), ends at -1 (all accepted)
    i = int(np.flatnonzero(diff <= 0)[0])
    if diff[i] == 0 or i == 0:
        return float(fpr[i]), float(thr[i])
    w = diff[i - 1] / (diff[i - 1] - diff[i])
    eer = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    return float(eer), float(thr[i - 1] + w * (thr[i] - thr[i - 1]))


def far_label(far: float) -> str:
    """'1e-3' style key for a FAR, stable in JSON."""
    exponent = math.log10(far)
    return f"1e{int(round(exponent))}" if abs(exponent - round(exponent)) < 1e-9 else f"{far:g}"


def tar_at_far(scores, same, far: float) -> dict:
    """True-accept rate at the loosest threshold that accepts at most ``floor(far * #negatives)`` negatives.

    When ``far * #negatives < 1`` the FAR is not measurable on this set: ``tar`` is None and ``note`` says why.
    """
    s, y = _arrays(scores, same)
    neg = np.sort(s[~y])[::-1]
    pos = s[y]
    n_neg = neg.size
    allowed = int(math.floor(far * n_neg + 1e-9))
    out = {"far": far, "n_negatives": int(n_neg), "tar": None, "threshold": None, "achieved_far": None}
    if n_neg == 0 or pos.size == 0:
        out["note"] = "needs both positive and negative pairs"
        return out
    if allowed < 1:
        out["note"] = (f"FAR {far:g} is not measurable with {n_neg} negative pairs (the smallest non-zero FAR "
                       f"is 1/{n_neg} = {1.0 / n_neg:.2g}); not reported")
        return out
    threshold = float(neg[allowed]) if allowed < n_neg else float(neg[-1]) - 1e-6
    out.update(tar=float(np.mean(accepts(pos, threshold))), threshold=threshold,
               achieved_far=float(np.mean(accepts(neg, threshold))))
    return out


def verification_metrics(scores, same, folds=None, n_folds: int = 10, fars=DEFAULT_FARS) -> dict:
    """Every verification number for one score set: k-fold accuracy, AUC, EER and TAR at each FAR."""
    s, y = _arrays(scores, same)
    out = {"n_pairs": int(s.size), "n_positive": int(y.sum()), "n_negative": int((~y).sum())}
    try:
        out.update(kfold_accuracy(s, y, folds, n_folds))
    except DataError as exc:
        out["accuracy_note"] = str(exc)
    if out["n_positive"] and out["n_negative"]:
        out["auc"] = roc_auc(s, y)
        out["eer"], out["eer_threshold"] = equal_error_rate(s, y)
        out["tar_at_far"] = {far_label(far): tar_at_far(s, y, far) for far in fars}
    return out


def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)
