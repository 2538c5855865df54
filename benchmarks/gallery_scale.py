"""Gallery size against speed and recall, for the SQLite gallery: exact search against the FAISS HNSW index.

For each size: N random 128-d unit templates (the default model's size), two per identity, bulk-enrolled in
transactions of 10,000 identities; probes are enrolled templates plus noise (a planted true match each). Reported:
enrol rate, the time to load the templates into memory and to build the index, identify latency (top-5 identities,
median and 99th percentile over the probes) exact and approximate, recall@1 of the index against exact search (the
share of probes whose best identity is the same), memory (templates in RAM, and the index) and the file on disk.

    .venv/bin/python benchmarks/gallery_scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 128


def build(path: Path, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Enrol ``size`` templates (two per identity) into a new gallery; (the templates, seconds taken)."""
    from fromface.inference.gallery import Gallery, Template

    vecs = rng.standard_normal((size, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    gallery = Gallery(path)
    start = time.perf_counter()
    per_batch = 20_000  # templates per transaction: 10,000 identities
    for lo in range(0, size, per_batch):
        chunk = vecs[lo:lo + per_batch]
        gallery.enroll_many({f"id{(lo + k) // 2:08d}": [Template(chunk[k]), Template(chunk[k + 1])]
                             for k in range(0, len(chunk) - 1, 2)})
    seconds = time.perf_counter() - start
    gallery.close()
    return vecs, seconds


def latencies(gallery, probes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Top-1 names and per-probe seconds of ``gallery.search(probe, top_k=5)``."""
    names, times = [], []
    for probe in probes:
        start = time.perf_counter()
        names.append(gallery.search(probe, top_k=5)[0].name)
        times.append(time.perf_counter() - start)
    return names, np.array(times)


def measure(size: int, queries: int, folder: Path, efs: list[int]) -> list[dict]:
    from fromface.inference.gallery import Gallery

    rng = np.random.default_rng(size)
    path = folder / f"g{size}.db"
    vecs, enrol_s = build(path, size, rng)
    picks = rng.choice(size, queries, replace=False)
    probes = vecs[picks] + 0.05 * rng.standard_normal((queries, DIM)).astype(np.float32)
    exact = Gallery(path, use_faiss=False, read_only=True)
    start = time.perf_counter()
    exact.store.matrix()
    load_s = time.perf_counter() - start
    exact_names, exact_t = latencies(exact, probes)
    approx = Gallery(path, use_faiss=True, read_only=True)
    approx.store.matrix()
    start = time.perf_counter()
    approx.search(probes[0])  # builds the index
    build_s = time.perf_counter() - start
    import faiss

    index_bytes = len(faiss.serialize_index(approx.store._ann.index)) - vecs.nbytes  # the graph, beyond the vectors
    base = {"size": size, "enrol_per_s": size / enrol_s, "load_s": load_s, "build_s": build_s,
            "exact_p50_ms": 1e3 * np.median(exact_t), "exact_p99_ms": 1e3 * np.percentile(exact_t, 99),
            "planted1": float(np.mean([n == f"id{k // 2:08d}" for n, k in zip(exact_names, picks)])),
            "ram_mb": vecs.nbytes / 2**20, "index_mb": index_bytes / 2**20, "disk_mb": path.stat().st_size / 2**20}
    rows = []
    for ef in efs:
        approx.store._ann.ef_search = ef
        approx_names, approx_t = latencies(approx, probes)
        rows.append({**base, "ef": ef, "hnsw_p50_ms": 1e3 * np.median(approx_t),
                     "hnsw_p99_ms": 1e3 * np.percentile(approx_t, 99),
                     "recall1": float(np.mean([a == e for a, e in zip(approx_names, exact_names)]))})
    exact.close()
    approx.close()
    path.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200, help="probes per size")
    parser.add_argument("--ef", type=int, nargs="+", default=[512],
                        help="HNSW efSearch values to try on each index (default: the library's, 512)")
    args = parser.parse_args(argv)
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("needs faiss: pip install 'fromface[index]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fromface-scale-") as tmp:
        rows = [row for size in args.sizes for row in measure(size, args.queries, Path(tmp), args.ef)]
    print(f"\nSQLite gallery, {DIM}-d templates, 2 per identity, {args.queries} probes per size, top-5; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| templates | enrol /s | load s | index build s | exact p50 / p99 ms | HNSW efSearch | HNSW p50 / p99 ms | "
          "HNSW recall@1 | planted found@1 (exact) | RAM MB | index MB | disk MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['enrol_per_s']:,.0f} | {r['load_s']:.2f} | {r['build_s']:.1f} | "
              f"{r['exact_p50_ms']:.1f} / {r['exact_p99_ms']:.1f} | {r['ef']} | "
              f"{r['hnsw_p50_ms']:.2f} / {r['hnsw_p99_ms']:.2f} | "
              f"{r['recall1']:.3f} | {r['planted1']:.3f} | {r['ram_mb']:.0f} | {r['index_mb']:.0f} | "
              f"{r['disk_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
