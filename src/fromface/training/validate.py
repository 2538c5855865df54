"""Validation during training: verification accuracy on pairs of held-out identities (model selection),
and optional LFW / occluded LFW accuracy (reported only, never used to pick a checkpoint)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fromface.data.pairs import read_pairs
from fromface.evaluation.metrics import kfold_accuracy, roc_auc
from fromface.faces.aligner import FaceAligner
from fromface.models.from_net import model_refiner
from fromface.training.config import PairSetConfig
from fromface.training.data import PlainFaces
from fromface.training.pack import load_face


@torch.no_grad()
def embed(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device,
          amp: bool = False) -> np.ndarray:
    """L2-normalised embeddings of every item of ``dataset`` (model in eval mode; restored afterwards)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator())  # leaves the global RNG untouched
    out = []
    try:
        for images in loader:
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                emb = model(images.to(device)).embedding.float()
            out.append(torch.nn.functional.normalize(emb, dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def pair_accuracy(emb_a: np.ndarray, emb_b: np.ndarray, same: np.ndarray) -> float:
    """10-fold verification accuracy of cosine scores (threshold chosen on the other folds)."""
    scores = np.sum(emb_a * emb_b, axis=1)
    return float(kfold_accuracy(scores, same.astype(bool))["accuracy_mean"])


@contextlib.contextmanager
def refining(occluder, model: nn.Module, preprocess):
    """While inside, a re-aligning occluder also applies the model's align head, as the product's aligner does."""
    refine = model_refiner(model, preprocess) if getattr(occluder, "needs_context", False) else None
    if refine is None:
        yield occluder
        return
    occluder.refine = refine
    try:
        yield occluder
    finally:
        occluder.refine = None


def validate(model: nn.Module, source, pairs: np.ndarray, *, preprocess, device: torch.device, batch_size: int,
             occluder=None, seed: int = 0, amp: bool = False) -> dict[str, float]:
    """``val_acc`` on clean pairs; with an occluder also ``val_occ_acc`` (second image occluded) and ``val_mean``."""
    rows = np.unique(pairs[:, :2])
    where = {int(r): i for i, r in enumerate(rows)}
    a = np.array([where[int(r)] for r in pairs[:, 0]])
    b = np.array([where[int(r)] for r in pairs[:, 1]])
    emb = embed(model, PlainFaces(source, rows, preprocess), batch_size=batch_size, device=device, amp=amp)
    metrics = {"val_acc": pair_accuracy(emb[a], emb[b], pairs[:, 2])}
    if occluder is not None:
        second = np.unique(pairs[:, 1])
        where_b = {int(r): i for i, r in enumerate(second)}
        with refining(occluder, model, preprocess):
            occ = embed(model, PlainFaces(source, second, preprocess, occluder=occluder, seed=seed),
                        batch_size=batch_size, device=device, amp=amp)
        ob = np.array([where_b[int(r)] for r in pairs[:, 1]])
        metrics["val_occ_acc"] = pair_accuracy(emb[a], occ[ob], pairs[:, 2])
        metrics["val_mean"] = (metrics["val_acc"] + metrics["val_occ_acc"]) / 2.0
    return metrics


class _Crops(torch.utils.data.Dataset):
    def __init__(self, crops: list[np.ndarray], preprocess):
        self.crops, self.preprocess = crops, preprocess

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.preprocess.to_input(self.crops[i]))[0]


class PairBenchmark:
    """A pair list (any format ``fromface.data.pairs`` reads), aligned once and kept in memory as crops.

    Alignment follows ``fromface eval``'s defaults (the model's template, the central face, centre-crop
    fallback) and scoring uses ``fromface.evaluation.metrics`` (10-fold accuracy with the list's folds,
    ROC AUC), so the numbers match what ``fromface eval`` reports for the same checkpoint, without
    re-detecting every image at every evaluation. Occluded sets come from ``fromface occlude-pairs``.
    """

    def __init__(self, pair_set: PairSetConfig, preprocess, progress: bool = False):
        pairs = read_pairs(pair_set.pairs, root=pair_set.root)
        limit = pair_set.limit
        if limit is not None and limit < len(pairs):  # evenly spaced: keeps every fold and both classes
            pairs = [pairs[i] for i in np.unique(np.linspace(0, len(pairs) - 1, limit).astype(int))]
        files = sorted({p.path1 for p in pairs} | {p.path2 for p in pairs})
        aligner = FaceAligner(preprocess.template, select="central", fallback=True)
        index = {f: i for i, f in enumerate(files)}
        bar = tqdm(files, desc=f"align {pair_set.name}", unit="img", leave=False, disable=not progress)
        self.crops = [load_face(f, preprocess.size, aligner) for f in bar]
        self.name, self.preprocess = pair_set.name, preprocess
        self.a = np.array([index[p.path1] for p in pairs])
        self.b = np.array([index[p.path2] for p in pairs])
        self.same = np.array([p.same for p in pairs], dtype=bool)
        self.folds = np.array([p.fold for p in pairs])

    def evaluate(self, model: nn.Module, *, device: torch.device, batch_size: int,
                 amp: bool = False) -> dict[str, float]:
        emb = embed(model, _Crops(self.crops, self.preprocess), batch_size=batch_size, device=device, amp=amp)
        scores = np.sum(emb[self.a] * emb[self.b], axis=1)
        return {f"{self.name}_acc": float(kfold_accuracy(scores, self.same, folds=self.folds)["accuracy_mean"]),
                f"{self.name}_auc": float(roc_auc(scores, self.same))}
