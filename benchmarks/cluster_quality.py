"""How well `fromface cluster` groups LFW people, clean and with occluded copies mixed in, and how fast it is.

    .venv/bin/python benchmarks/cluster_quality.py --people 150 --photos 4

People: the LFW identities of ../shared/data/lfw/images with at least 2 photos (1,559), sorted by name, every
k-th of them so that ``--people`` are taken (deterministic); their first ``--photos`` photos (by file name). Occluded
copies: every other photo of each person (the 1st, 3rd, ...) gets a copy occluded by the project's synthesiser
(preset "face", all occluder categories of ../shared/data/occluders, seed ``--seed``, image index = its position
in that list; the face box from YuNet, as `fromface occlude-pairs` does). Two settings: the clean photos alone,
and clean plus occluded copies.

Each model embeds the mixed folder once through :func:`fromface.inference.clustering.cluster_folder` (every face
of every photo, as `fromface cluster` does; its time gives faces/s); the clean setting re-clusters the faces of
the clean photos. Scores use the largest face of each photo, labelled with the photo's person (other faces are
bystanders: clustered, but unlabelled). Models: the default one with its calibrated clean/occluded thresholds,
and its trunk `sface_net_face` (no calibration, no occlusion estimate: the uncalibrated default threshold for every
pair). Then the clustering step alone on 10,000 planted embeddings (500 people x 20, 30% flagged occluded, cosine
~0.45 within a person and ~0.1 between people).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("FROMFACE_SHARED_DATA") or ROOT.parent / "shared" / "data")


def choose_people(images: Path, people: int, photos: int) -> dict[str, list[Path]]:
    names = sorted(p.name for p in images.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) >= 2)
    step = len(names) / people
    chosen = [names[int(i * step)] for i in range(min(people, len(names)))]
    return {n: sorted((images / n).glob("*.jpg"))[:photos] for n in chosen}


def build_folder(chosen: dict[str, list[Path]], out: Path, seed: int) -> dict[str, tuple[str, bool]]:
    """clean/<person>/<photo> links and occluded/<person>/<photo>_occ.png copies; file -> (person, occluded)."""
    from PIL import Image

    from fromface.data.images import load_image
    from fromface.faces.aligner import FaceAligner, fallback_landmarks
    from fromface.occlusion.occluders import OccluderLibrary
    from fromface.occlusion.synth import Synthesizer

    synth = Synthesizer(OccluderLibrary.from_folder(DATA / "occluders"), preset="face", clean_prob=0.0)
    aligner = FaceAligner("arcface112", select="central")
    truth, index = {}, 0
    for person, files in chosen.items():
        for k, src in enumerate(files):
            link = out / "clean" / person / src.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
            truth[f"clean/{person}/{src.name}"] = (person, False)
            if k % 2:
                continue
            image = load_image(src)
            faces, _ = aligner.detect(image)
            chosen_face = aligner.choose(faces, *image.shape[:2])
            box, lms = ((chosen_face[0].box, chosen_face[0].landmarks) if chosen_face
                        else fallback_landmarks(*image.shape[:2]))
            result = synth.occlude_seeded(image, seed, index, face_box=box, landmarks=lms)
            index += 1
            dst = out / "occluded" / person / f"{src.stem}_occ.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(result.image).save(dst)
            truth[f"occluded/{person}/{dst.name}"] = (person, True)
    return truth


def scores(faces, labels, truth, keep) -> dict:
    """Pairwise and BCubed scores on the largest face of each photo that ``keep(file)`` selects."""
    from fromface.inference.clustering import bcubed, pair_counts

    largest: dict[str, int] = {}
    for i, f in enumerate(faces):
        area = (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])
        if f.file in truth and keep(f.file) and (f.file not in largest or area > _area(faces[largest[f.file]])):
            largest[f.file] = i
    idx = sorted(largest.values())
    lab, people = [int(labels[i]) for i in idx], [truth[faces[i].file][0] for i in idx]
    pp, pr = pair_counts(lab, people)
    bp, br, bf = bcubed(lab, people)
    clusters = len({x for x in lab if x >= 0})
    return {"faces": len(idx), "clusters": clusters, "pp": pp, "pr": pr, "bp": bp, "br": br, "bf": bf}


def _area(f) -> float:
    return float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def run_model(name: str | None, folder: Path, truth: dict, rows: list, speeds: list) -> None:
    from fromface.inference.clustering import cluster_embeddings, cluster_folder, pair_thresholds
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(name, select="all")
    start = time.perf_counter()
    col = cluster_folder(rec, folder, batch=16)
    seconds = time.perf_counter() - start
    speeds.append((rec.model_id if name is None else name, len(col.faces), seconds, col.cluster_seconds,
                   len(col.skipped)))
    clean_t, occ_t = pair_thresholds(rec)
    emb = np.stack([f.embedding for f in col.faces])
    occ = [f.occluded for f in col.faces]
    label = f"{rec.model_id if name is None else name} ({clean_t:.3f} / {occ_t:.3f})"
    in_clean = np.array([f.file.startswith("clean/") for f in col.faces])
    for linkage in ("average", "single"):
        mixed = cluster_embeddings(emb, occ, clean_t, occ_t, linkage=linkage)
        clean_only = np.full(len(emb), -1)
        clean_only[in_clean] = cluster_embeddings(emb[in_clean], np.asarray(occ, dtype=object)[in_clean],
                                                  clean_t, occ_t, linkage=linkage)
        rows.append(("clean", label, linkage, scores(col.faces, clean_only, truth, lambda f: f.startswith("clean/"))))
        rows.append(("clean + occluded", label, linkage, scores(col.faces, mixed, truth, lambda f: True)))


def planted_timing(n: int = 10_000, people: int = 500) -> list[tuple]:
    from fromface.inference.clustering import bcubed, cluster_embeddings

    rng = np.random.default_rng(0)
    ids = rng.integers(0, people, n)
    centres = rng.normal(size=(people, 512))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shared = rng.normal(size=512)
    shared /= np.linalg.norm(shared)
    emb = centres[ids] + 0.045 * rng.normal(size=(n, 512))  # cosine ~0.45 within a person
    # A direction every face shares, so that scores between people spread around 0.1 as real ones do (candidate
    # edges within the slack, not an empty graph).
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True) + 0.35 * shared).astype(np.float32)
    occ = rng.random(n) < 0.3
    cluster_embeddings(emb[:50], occ[:50], 0.378, 0.424)  # imports (scikit-learn) out of the timing
    out = []
    for linkage in ("average", "single"):
        start = time.perf_counter()
        labels = cluster_embeddings(emb, occ, 0.378, 0.424, linkage=linkage)
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second run for memory: tracing slows Python down several times
        cluster_embeddings(emb, occ, 0.378, 0.424, linkage=linkage)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out.append((linkage, n, seconds, peak, bcubed(labels, ids)[2]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--photos", type=int, default=4, help="photos per person at most")
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()
    images = DATA / "lfw" / "images"
    if not images.is_dir() or not (DATA / "occluders").is_dir():
        print(f"needs {images} and {DATA / 'occluders'}", file=sys.stderr)
        return 2
    chosen = choose_people(images, args.people, args.photos)
    rows: list = []
    speeds: list = []
    with tempfile.TemporaryDirectory(prefix="cluster-quality-") as tmp:
        folder = Path(tmp)
        truth = build_folder(chosen, folder, args.seed)
        n_occ = sum(o for _, o in truth.values())
        print(f"{len(chosen)} LFW people, {len(truth) - n_occ} clean photos + {n_occ} occluded copies "
              f"(seed {args.seed})\n")
        for name in (None, "sface_net_face"):
            run_model(name, folder, truth, rows, speeds)
    print("| photos | model (clean / occluded threshold) | linkage | faces scored | clusters | pair precision | "
          "pair recall | BCubed P | BCubed R | BCubed F |\n|---|---|---|---|---|---|---|---|---|---|")
    for setting, label, linkage, s in sorted(rows, key=lambda r: (r[0] != "clean", r[2] != "average")):
        print(f"| {setting} | {label} | {linkage} | {s['faces']} | {s['clusters']} | {s['pp']:.3f} | {s['pr']:.3f} | "
              f"{s['bp']:.3f} | {s['br']:.3f} | {s['bf']:.3f} |")
    print("\n| model | faces (all, bystanders too) | whole `cluster` s | faces/s | of which clustering s | "
          "files skipped |\n|---|---|---|---|---|---|")
    for model, faces, seconds, cluster_s, skipped in speeds:
        print(f"| {model} | {faces} | {seconds:.1f} | {faces / seconds:.1f} | {cluster_s:.2f} | {skipped} |")
    print("\n| clustering step | faces | seconds | peak traced memory MiB | BCubed F (planted) |")
    print("|---|---|---|---|---|")
    for linkage, n, seconds, peak, f in planted_timing():
        print(f"| {linkage} | {n:,} | {seconds:.1f} | {peak:.0f} | {f:.3f} |")
    print(f"\n(n x n float32 scores for 10,000 faces would be {10_000 ** 2 * 4 / 2**20:.0f} MiB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
