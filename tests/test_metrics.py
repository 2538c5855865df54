"""Verification metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from fromface.errors import DataError
from fromface.evaluation.metrics import (
    accuracy_at,
    assign_folds,
    best_threshold,
    candidate_thresholds,
    cosine_scores,
    equal_error_rate,
    far_label,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)
from fromface.inference.decision import accepts


def test_candidate_thresholds_and_accuracy():
    s = np.array([0.1, 0.4, 0.4, 0.9])
    y = np.array([False, False, True, True])
    c = candidate_thresholds(s)
    assert np.allclose(c, [0.1 - 1e-6, 0.25, 0.65, 0.9 + 1e-6])
    # t below all: everything "same" -> 2/4; t=0.25 -> 3/4; t=0.65 -> 3/4; t above all -> 2/4
    assert np.allclose(accuracy_at(s, y, c), [0.5, 0.75, 0.75, 0.5])


def test_best_threshold_separable_and_ties():
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(0.5)
    # two optimal candidates (0.25 and 0.65): the median of the list [0.25, 0.65] is index 1
    assert best_threshold([0.1, 0.4, 0.4, 0.9], [False, False, True, True]) == pytest.approx(0.65)


def test_assign_folds_given_and_contiguous_per_class():
    same = np.array([True] * 4 + [False] * 4)
    assert list(assign_folds(same, 2)) == [0, 0, 1, 1, 0, 0, 1, 1]
    given = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    assert list(assign_folds(same, 2, given)) == list(given)
    # any -1 (list without folds) -> contiguous
    assert list(assign_folds(same, 4, [-1] * 8)) == [0, 1, 2, 3, 0, 1, 2, 3]
    # folds are capped by the smaller class
    assert assign_folds(np.array([True, True, True, False, False]), 10).max() == 1
    with pytest.raises(DataError):
        assign_folds(np.array([True, False]), 10)


def test_kfold_threshold_comes_from_other_folds():
    # Each fold alone is perfectly separable, but its threshold is chosen on the other fold:
    # fold 1 puts it at 0.675 (between its 0.65 negative and 0.7 positive), which rejects fold 0's 0.6
    # positive; fold 0 puts it at 0.4, which accepts fold 1's 0.65 negative. Choosing on the test fold
    # itself would give 100%.
    scores = np.array([0.6, 0.9, 0.1, 0.2, 0.7, 0.8, 0.3, 0.65])
    same = np.array([True, True, False, False, True, True, False, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    out = kfold_accuracy(scores, same, folds)
    assert out["fold_thresholds"] == pytest.approx([0.675, 0.4])
    assert out["fold_accuracies"] == [0.75, 0.75]
    assert out["accuracy_mean"] == pytest.approx(0.75)
    assert out["accuracy_std"] == pytest.approx(0.0)
    assert out["n_folds"] == 2 and out["folds_from"] == "list"


def test_kfold_std_is_population_std():
    # fold 1 trains two tied best thresholds (0.2, 0.8) -> the median pick 0.8 rejects fold 0's 0.8 positive
    # (75%); fold 0 trains 0.5, which rejects fold 1's 0.3 positive and accepts its 0.7 negative (50%).
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.9, 0.7, 0.1])
    same = np.array([True, True, False, False, True, True, False, False])
    out = kfold_accuracy(scores, same, [0, 0, 0, 0, 1, 1, 1, 1])
    assert out["fold_thresholds"] == pytest.approx([0.8, 0.5])
    assert out["fold_accuracies"] == [0.75, 0.5]
    assert out["accuracy_mean"] == pytest.approx(0.625)
    assert out["accuracy_std"] == pytest.approx(0.125)  # population std, as LFW tools report


def test_roc_curve_and_auc_hand_case():
    s = [0.9, 0.8, 0.7, 0.6]
    y = [True, False, True, False]
    fpr, tpr, thr = roc_curve(s, y)
    assert np.allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    assert np.allclose(tpr, [0, 0.5, 0.5, 1.0, 1.0])
    assert np.allclose(thr, [0.9, 0.8, 0.7, 0.6, 0.6 - 1e-6])
    # Mann-Whitney: positive beats negative in 3 of 4 comparisons
    assert roc_auc(s, y) == pytest.approx(0.75)


def test_auc_counts_ties_as_half():
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == pytest.approx(1.0)


def test_eer_hand_cases():
    eer, t = equal_error_rate([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    assert eer == pytest.approx(0.0)
    # sorted desc: 0.9 P, 0.8 N, 0.7 P, 0.6 N -> rates cross exactly at FPR = FNR = 0.5
    eer, _ = equal_error_rate([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
    assert eer == pytest.approx(0.5)
    # 2 positives, 2 negatives, one negative above one positive: EER 0.5 at the crossing
    eer, _ = equal_error_rate([0.9, 0.6, 0.7, 0.1], [True, True, False, False])
    assert eer == pytest.approx(0.5)


def test_eer_exact_and_interpolated():
    # desc: .9P .8P .75N .7P .3N .2P .1N .05N -> FNR and FPR meet at 0.25 on a ROC point
    s = [0.9, 0.8, 0.7, 0.2, 0.75, 0.3, 0.1, 0.05]
    y = [True] * 4 + [False] * 4
    assert equal_error_rate(s, y)[0] == pytest.approx(0.25)
    # desc: .9P .7N .6N .5P .1N: FNR-FPR goes from +1/6 (FPR 1/3) to -1/6 (FPR 2/3): crossing at FPR 0.5
    eer, t = equal_error_rate([0.9, 0.5, 0.7, 0.6, 0.1], [True, True, False, False, False])
    assert eer == pytest.approx(0.5)
    # ">" thresholds of the ROC points: .9 .7 .6 .5 .1 (.1 - 1e-6); the crossing lies half way between the
    # points at thresholds .6 (FPR 1/3, FNR 1/2) and .5 (FPR 2/3, FNR 1/2)
    assert t == pytest.approx(0.55)


def test_tar_at_far_hand_case():
    neg = [0.9, 0.5, 0.4, 0.1]
    pos = [0.95, 0.6, 0.5, 0.3]
    s = pos + neg
    y = [True] * 4 + [False] * 4
    out = tar_at_far(s, y, 0.25)  # one false accept allowed -> threshold at the 2nd highest negative (0.5)
    assert out["threshold"] == pytest.approx(0.5)
    assert out["tar"] == pytest.approx(0.5)
    assert out["achieved_far"] == pytest.approx(0.25)
    out = tar_at_far(s, y, 0.5)  # two allowed -> threshold 0.4 -> pos above: 0.95, 0.6, 0.5
    assert out["tar"] == pytest.approx(0.75)


def test_tar_unmeasurable_far_is_stated_not_faked():
    out = tar_at_far([0.9, 0.1, 0.2], [True, False, False], 1e-3)
    assert out["tar"] is None
    assert "not measurable with 2 negative pairs" in out["note"]
    # exactly measurable: 1000 negatives, FAR 1e-3 allows one
    rng = np.random.default_rng(0)
    neg = rng.random(1000)
    out = tar_at_far(np.r_[np.ones(5) * 2, neg], np.r_[np.ones(5, bool), np.zeros(1000, bool)], 1e-3)
    assert out["tar"] == 1.0 and out["achieved_far"] == pytest.approx(1e-3)


def test_verification_metrics_bundle_and_labels():
    rng = np.random.default_rng(1)
    s = np.r_[rng.normal(1, 0.3, 100), rng.normal(0, 0.3, 100)]
    y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    m = verification_metrics(s, y)
    assert m["n_folds"] == 10 and m["folds_from"] == "contiguous"
    assert 0.9 < m["accuracy_mean"] <= 1.0 and 0.9 < m["auc"] <= 1.0
    assert set(m["tar_at_far"]) == {"1e-2", "1e-3"}
    assert m["tar_at_far"]["1e-3"]["tar"] is None
    assert far_label(1e-3) == "1e-3" and far_label(0.05) == "0.05"
    with pytest.raises(DataError):
        verification_metrics([0.1, np.nan], [True, False])


def test_cosine_scores():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    assert np.allclose(cosine_scores(a, b), [1.0, -1.0])


def _rates(s, y, t):
    s, y = np.asarray(s), np.asarray(y)
    accepted = accepts(s, t)
    return accepted[~y].mean(), accepted[y].mean()


def test_roc_thresholds_reproduce_every_point_under_the_one_rule():
    s = [0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.3]  # ties inside and across classes
    y = [True, False, True, True, False, True, False]
    fpr, tpr, thr = roc_curve(s, y)
    assert np.allclose(thr, [0.9, 0.8, 0.7, 0.6, 0.3, 0.3 - 1e-6])
    for i in range(len(thr)):
        assert _rates(s, y, thr[i]) == pytest.approx((fpr[i], tpr[i]))


def test_eer_threshold_exact_on_a_roc_point():
    # desc: .9P .8N .7P .6N: after accepting .9 and .8 (score > .7), FPR = FNR = 1/2
    eer, t = equal_error_rate([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
    assert (eer, t) == (pytest.approx(0.5), pytest.approx(0.7))
    far, tar = _rates([0.9, 0.8, 0.7, 0.6], [True, False, True, False], t)
    assert far == pytest.approx(1 - tar) == pytest.approx(0.5)


def test_tar_at_far_ties_among_negatives_never_exceed_the_far():
    pos, neg = [0.95, 0.6, 0.5, 0.3], [0.9, 0.5, 0.5, 0.1]
    s, y = pos + neg, [True] * 4 + [False] * 4
    one = tar_at_far(s, y, 0.25)  # one false accept allowed: threshold at the second-highest negative
    assert (one["threshold"], one["achieved_far"], one["tar"]) == (0.5, 0.25, 0.5)
    two = tar_at_far(s, y, 0.5)  # two allowed, but the 2nd and 3rd negatives tie: accepting one means both
    assert (two["threshold"], two["achieved_far"], two["tar"]) == (0.5, 0.25, 0.5)
    assert _rates(s, y, two["threshold"]) == (two["achieved_far"], two["tar"])


def test_tar_at_far_of_one_or_more_accepts_everything():
    s, y = [0.9, 0.2, 0.5, 0.3, 0.1], [True, True, False, False, False]
    for far in (1.0, 2.0):
        out = tar_at_far(s, y, far)
        assert out["threshold"] == pytest.approx(0.1 - 1e-6) and out["tar"] == 1.0 and out["achieved_far"] == 1.0


def test_tar_at_far_without_positives_or_negatives_says_so():
    for y in ([False, False, False], [True, True, True]):
        out = tar_at_far([0.9, 0.5, 0.1], y, 0.5)
        assert out["tar"] is None and out["threshold"] is None
        assert out["note"] == "needs both positive and negative pairs"


def test_one_rule_in_verify_and_gallery(tmp_path):
    """A score exactly at the threshold is "different" in FaceRecognizer.verify and Gallery.identify alike, as in
    the metrics that calibrated the threshold."""
    from fromface.inference.gallery import Gallery, Template
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer("mobilefacenet", fallback=True)
    face = rec.embed(np.full((120, 120, 3), 90, np.uint8))[0]
    other = rec.embed(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[:, None, None], (1, 120, 3)))[0]
    score = float(np.dot(face.embedding, other.embedding))
    at = FaceRecognizer(rec.torch_model, fallback=True, threshold=score)
    below = FaceRecognizer(rec.torch_model, fallback=True, threshold=np.nextafter(score, -1))
    assert not at.verify(face, other).same and below.verify(face, other).same
    with Gallery(tmp_path / "g.db", recognizer=rec) as gallery:
        gallery.enroll_templates("x", [Template(other.embedding, occluded=False)])
        stored = gallery.identify(face)[0].score  # the gallery scores float32 templates: its own number
        gallery.recognizer = FaceRecognizer(rec.torch_model, fallback=True, threshold=stored)
        assert not gallery.identify(face)[0].same
        gallery.recognizer = FaceRecognizer(rec.torch_model, fallback=True, threshold=np.nextafter(stored, -1))
        assert gallery.identify(face)[0].same


def test_folds_fall_back_to_contiguous_and_are_capped_by_either_class():
    same = np.array([True] * 4 + [False] * 4)
    assert list(assign_folds(same, 2, [0, 1, 0, -1, 0, 1, 0, 1])) == [0, 0, 1, 1, 0, 0, 1, 1]  # one -1: not a fold list
    assert list(assign_folds(same, 2, [3] * 8)) == [0, 0, 1, 1, 0, 0, 1, 1]  # a single fold is not a split
    assert assign_folds(np.array([True, True, False, False, False, False, False]), 10).max() == 1  # 2 positives
    with pytest.raises(DataError, match="8 fold labels for 7 pairs"):
        assign_folds(np.ones(7, bool), 2, np.zeros(8))
    with pytest.raises(DataError, match="at least two positive and two negative pairs"):
        assign_folds(np.array([True, False, False]), 10)


def test_inputs_are_checked_with_clear_messages():
    with pytest.raises(DataError, match="^3 scores but 2 labels$"):
        kfold_accuracy([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(DataError, match="^scores contain NaN or infinite values$"):
        roc_curve([0.1, np.inf], [True, False])
    for one_class in ([True, True], [False, False]):
        with pytest.raises(DataError, match="^a ROC curve needs both positive and negative pairs$"):
            roc_curve([0.1, 0.2], one_class)


def test_verification_metrics_counts_folds_and_one_class_sets():
    s = [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1]
    y = [True, True, True, True, False, False, False]
    m = verification_metrics(s, y, folds=[0, 1, 0, 1, 0, 1, 0], n_folds=2, fars=(0.5,))
    assert (m["n_pairs"], m["n_positive"], m["n_negative"]) == (7, 4, 3)
    assert m["folds_from"] == "list" and m["n_folds"] == 2
    assert m["eer_threshold"] == equal_error_rate(s, y)[1] and set(m["tar_at_far"]) == {"0.5"}
    only_same = verification_metrics([0.9, 0.8, 0.7], [True, True, True])
    assert "auc" not in only_same and "eer" not in only_same and "tar_at_far" not in only_same
    assert only_same["accuracy_note"] == "k-fold accuracy needs at least two positive and two negative pairs"


def test_cosine_scores_of_short_vectors():
    a = np.array([[0.1, 0.0], [0.0, 0.01]])
    b = np.array([[0.05, 0.05], [0.0, -0.02]])
    assert np.allclose(cosine_scores(a, b), [np.sqrt(0.5), -1.0])
