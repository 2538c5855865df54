"""Evaluation: verification metrics, the embedding runner with its cache, peers, identification and reports.

Library entry points (the ``fromface eval`` / ``eval-id`` commands are thin wrappers over them):
:func:`fromface.evaluation.verification.evaluate_pairs`,
:func:`fromface.evaluation.identification.evaluate_identification`,
:func:`fromface.evaluation.embedders.load_embedder` and :mod:`fromface.evaluation.metrics`.
"""

from fromface.evaluation.metrics import (
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)

__all__ = ["equal_error_rate", "kfold_accuracy", "roc_auc", "roc_curve", "tar_at_far", "verification_metrics"]
