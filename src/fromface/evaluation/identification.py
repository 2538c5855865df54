"""Closed-set identification: rank-k accuracy of probes against a gallery, optionally with distractors.

AR-style experiments take a gallery tree and a probe tree (e.g. neutral faces vs sunglasses/scarf);
MegaFace-style ones add many distractor images to the gallery. A folder tree has one sub-folder per
identity. A gallery identity scores a probe by its best-matching image; the rank of the true identity
is one plus the number of identities that score strictly higher.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fromface.data.images import scan_images
from fromface.errors import DataError
from fromface.evaluation.embedding import Embedder
from fromface.evaluation.report import command_line, environment, write_json
from fromface.evaluation.runner import check_images_exist, embed_images

DISTRACTOR = "__distractor__"


@dataclass
class IdentificationSet:
    """Gallery and probe images with their identities; distractor images join the gallery, one identity each."""

    gallery: list[tuple[Path, str]]
    probes: list[tuple[Path, str]]
    distractors: list[Path] = field(default_factory=list)

    def gallery_with_distractors(self) -> list[tuple[Path, str]]:
        return self.gallery + [(p, f"{DISTRACTOR}{i}") for i, p in enumerate(self.distractors)]


def scan_identities(root: Path) -> dict[str, list[Path]]:
    """``{identity: sorted image paths}`` from a tree with one sub-folder per identity."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: identity folder not found")
    out = {d.name: scan_images(d)[0] for d in sorted(root.iterdir()) if d.is_dir()}
    out = {k: v for k, v in out.items() if v}
    if not out:
        raise DataError(f"{root}: no identity sub-folders with images")
    return out


def scan_distractors(folder: Path) -> list[Path]:
    """Every image under a folder, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: distractor folder not found")
    found = scan_images(folder, recursive=True)[0]
    if not found:
        raise DataError(f"{folder}: no images found")
    return found


def split_gallery_probe(identities: dict[str, list[Path]], gallery_per_id: int = 1, seed: int = 0
                        ) -> IdentificationSet:
    """Seeded split: ``gallery_per_id`` images of each identity go to the gallery, the rest are probes.

    Identities with no more than ``gallery_per_id`` images stay in the gallery only (extra candidates).
    """
    if gallery_per_id < 1:
        raise DataError("gallery_per_id must be at least 1")
    rng = np.random.default_rng(seed)
    gallery, probes = [], []
    for name in sorted(identities):
        paths = list(identities[name])
        order = rng.permutation(len(paths)) if len(paths) > gallery_per_id else np.arange(len(paths))
        chosen = set(order[:gallery_per_id].tolist())
        for i, p in enumerate(paths):
            (gallery if i in chosen else probes).append((p, name))
    if not probes:
        raise DataError(f"no probes: every identity has at most {gallery_per_id} image(s)")
    return IdentificationSet(gallery, probes)


def paired_trees(gallery_root: Path, probe_root: Path) -> IdentificationSet:
    """Gallery and probes from two trees; probes of identities absent from the gallery are refused."""
    g = scan_identities(gallery_root)
    p = scan_identities(probe_root)
    unknown = sorted(set(p) - set(g))
    if unknown:
        raise DataError(f"{probe_root}: probe identities missing from the gallery {gallery_root}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return IdentificationSet([(x, k) for k, v in g.items() for x in v], [(x, k) for k, v in p.items() for x in v])


def _similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    if metric == "euclidean":
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return -np.sqrt(np.maximum(d2, 0.0))
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return an @ bn.T


def rank_accuracy(probe_emb: np.ndarray, probe_ids: list[str], gallery_emb: np.ndarray, gallery_ids: list[str],
                  ranks=(1, 5), metric: str = "cosine") -> dict:
    """Rank-k accuracy; probes with no embedding (no face) or no usable gallery image count as misses."""
    names = sorted(set(gallery_ids))
    code = {n: i for i, n in enumerate(names)}
    g_codes = np.array([code[n] for n in gallery_ids], dtype=np.int64)
    g_ok = ~np.isnan(gallery_emb).any(axis=1)
    p_ok = ~np.isnan(probe_emb).any(axis=1)
    per_id = np.full((len(probe_ids), len(names)), -np.inf)
    if g_ok.any() and p_ok.any():
        sim = _similarity(probe_emb[p_ok].astype(np.float64), gallery_emb[g_ok].astype(np.float64), metric)
        block = np.full((int(p_ok.sum()), len(names)), -np.inf)
        np.maximum.at(block.T, g_codes[g_ok], sim.T)
        per_id[p_ok] = block
    true = np.array([code.get(n, -1) for n in probe_ids], dtype=np.int64)
    rank = np.full(len(probe_ids), np.iinfo(np.int64).max, dtype=np.int64)
    for i, t in enumerate(true):
        if t >= 0 and p_ok[i] and np.isfinite(per_id[i, t]):
            rank[i] = 1 + int(np.sum(per_id[i] > per_id[i, t]))
    out = {f"rank{k}": float(np.mean(rank <= k)) for k in ranks}
    out.update(n_probes=len(probe_ids), n_gallery_images=len(gallery_ids), n_gallery_identities=len(names),
               failed_probes=int((~p_ok).sum()), failed_gallery_images=int((~g_ok).sum()))
    return out


def evaluate_identification(data: IdentificationSet, embedders: list[Embedder], cache_dir: Path | None = None,
                            ranks=(1, 5), progress: bool = True, workers: int = 1) -> list[dict]:
    """Every model's rank-k accuracy on the same gallery and probes."""
    gallery = data.gallery_with_distractors()
    paths = list(dict.fromkeys([p for p, _ in gallery] + [p for p, _ in data.probes]))
    check_images_exist(paths, "identification set")
    results = []
    for emb in embedders:
        es = embed_images(emb, paths, cache_dir, progress, workers)
        g = es.embeddings[[es.index[p] for p, _ in gallery]]
        q = es.embeddings[[es.index[p] for p, _ in data.probes]]
        res = rank_accuracy(q, [n for _, n in data.probes], g, [n for _, n in gallery], ranks, emb.metric)
        results.append({"name": emb.name, "source": emb.source, "metric": emb.metric, "settings": dict(emb.info),
                        "face_methods": es.counts(), "seconds": round(es.seconds, 2), "metrics": res})
    return results


def _parse_ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise DataError(f"--ranks {text!r}: expected comma-separated integers") from None
    if not ranks or ranks[0] < 1:
        raise DataError(f"--ranks {text!r}: ranks start at 1")
    return ranks


def run_identification_cli(args: argparse.Namespace, embedders: list[Embedder]) -> int:
    """``fromface eval-id``: build the split, score every model, write report.json / report.md."""

    if args.root is not None and (args.gallery or args.probe):
        raise DataError("give either --root (split one tree) or --gallery and --probe, not both")
    if args.root is not None:
        data = split_gallery_probe(scan_identities(args.root), args.gallery_per_id, args.seed)
    elif args.gallery and args.probe:
        data = paired_trees(args.gallery, args.probe)
    else:
        raise DataError("eval-id needs --root, or both --gallery and --probe")
    if args.distractors:
        data.distractors = scan_distractors(args.distractors)
    ranks = _parse_ranks(args.ranks)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = None if args.no_cache else (args.cache or args.out / "cache")
    results = evaluate_identification(data, embedders, cache, ranks, progress=not args.quiet, workers=args.workers)
    report = {"command": command_line(args), "environment": environment(), "select": args.select,
              "split": {"root": str(args.root) if args.root else None, "gallery": str(args.gallery or ""),
                        "probe": str(args.probe or ""), "gallery_per_id": args.gallery_per_id, "seed": args.seed,
                        "distractors": len(data.distractors)},
              "models": results}
    write_json(report, args.out / "report.json")
    header = ["model"] + [f"rank-{k} %" for k in ranks] + ["probes", "gallery ids", "failed probes"]
    lines = [f"# Identification: {args.root or args.probe}", "", f"Command: `{report['command']}`", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        m = r["metrics"]
        cells = [r["name"]] + [f"{100 * m[f'rank{k}']:.2f}" for k in ranks]
        cells += [str(m["n_probes"]), str(m["n_gallery_identities"]), str(m["failed_probes"])]
        lines.append("| " + " | ".join(cells) + " |")
        print(f"{r['name']:<20} " + "  ".join(f"rank-{k} {100 * m[f'rank{k}']:.2f}" for k in ranks)
              + f"  ({m['n_probes']} probes, {m['n_gallery_identities']} gallery identities)")
    (args.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'}")
    return 0
