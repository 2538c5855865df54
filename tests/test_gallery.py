"""Gallery: enrol/remove/identify, cache invalidation, concurrent writers and a SIGKILL mid-enrolment."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromface.errors import AlreadyEnrolledError, ConfigError, DataError, NoFaceError
from fromface.inference.gallery import Gallery, Template

SRC = str(Path(__file__).resolve().parents[1] / "src")


def unit(rng: np.random.Generator, dim: int = 64) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_enroll_search_remove(tmp_path):
    rng = np.random.default_rng(0)
    g = Gallery(tmp_path / "g.db")
    people = {name: unit(rng) for name in ("ann", "bob", "cid")}
    for name, v in people.items():
        assert g.enroll_templates(name, [Template(v), Template(unit(rng), occluded=True, pattern=7)]) == 2
    assert g.names() == ["ann", "bob", "cid"] and len(g) == 6
    probe = people["bob"] + 0.05 * unit(rng)
    top = g.search(probe, top_k=2)
    assert [m.name for m in top][0] == "bob" and len(top) == 2 and top[0].score > top[1].score
    assert top[0].template_occluded is None  # enrolled without an occlusion estimate
    with pytest.raises(AlreadyEnrolledError, match="'bob' is already enrolled"):
        g.enroll_templates("bob", [Template(unit(rng))])  # a second "bob" is not merged into the first
    assert g.enroll_templates("bob", [Template(unit(rng))], mode="add") == 1  # several templates per identity
    assert g.counts()["bob"] == 3
    assert g.remove("bob") == 3 and g.remove("nobody") == 0
    assert "bob" not in [m.name for m in g.search(probe, top_k=5)]
    with pytest.raises(ConfigError, match="64-d"):
        g.enroll_templates("dan", [Template(np.ones(32, np.float32))])
    with pytest.raises(DataError, match="non-empty name"):
        g.enroll_templates("  ", [Template(unit(rng))])
    with pytest.raises(DataError, match="not finite"):
        g.enroll_templates("eve", [Template(np.full(64, np.nan, np.float32))])
    g.close()


def test_search_matches_brute_force_and_cache_sees_other_writers(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.db"
    a, b = Gallery(path), Gallery(path)
    templates = {f"id{i:03d}": [Template(unit(rng)) for _ in range(3)] for i in range(50)}
    for name, ts in templates.items():
        a.enroll_templates(name, ts)
    probe = unit(rng)
    want = sorted(((max(float(t.embedding @ probe) for t in ts), n) for n, ts in templates.items()), reverse=True)
    got = b.search(probe, top_k=5)
    assert [m.name for m in got] == [n for _, n in want[:5]]
    np.testing.assert_allclose([m.score for m in got], [s for s, _ in want[:5]], atol=1e-5)
    assert b.matrix() is b.matrix()  # cached while nothing changes
    a.enroll_templates("newcomer", [Template(probe)])  # a commit by another connection invalidates b's cache
    assert b.search(probe, top_k=1)[0].name == "newcomer"
    a.close()
    b.close()


def test_schema_version_and_bad_files(tmp_path):
    Gallery(tmp_path / "g.db").close()
    con = sqlite3.connect(tmp_path / "g.db")
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="schema version 99"):
        Gallery(tmp_path / "g.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="junk.db"):
        Gallery(junk)
    with pytest.raises(DataError, match="folder"):
        Gallery(tmp_path)


class NoDetector:
    score_threshold = 0.6

    def detect(self, image_rgb, score_threshold=None):
        return []


def test_enroll_and_identify_images_all_or_nothing(tmp_path):
    import torch

    from fromface.inference.recognizer import FaceRecognizer

    torch.manual_seed(0)
    rec = FaceRecognizer("from_mobilefacenet", fallback=True, detector=NoDetector())
    rng = np.random.default_rng(2)
    pics = [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((112, 112)))
            for _ in range(3)]
    g = Gallery(tmp_path / "g.db", recognizer=rec)
    assert g.enroll("ann", [pics[0], pics[1]]).added == 2
    assert g.enroll("bob", pics[2]).added == 1
    assert rec.model_id.startswith("module:from_mobilefacenet:")  # untrained weights: named by their digest
    assert g.meta() == {"dim": "512", "model_id": rec.model_id, "model": rec.model_id, "source": "from_mobilefacenet"}
    matches = g.identify(pics[2], top_k=2)
    assert matches[0].name == "bob" and matches[0].score == pytest.approx(1.0, abs=1e-4) and matches[0].same
    assert matches[0].threshold == 0.35 and matches[0].condition in ("clean", "occluded")
    strict = Gallery(tmp_path / "g.db", recognizer=FaceRecognizer(rec.torch_model))
    blank = np.full((96, 96, 3), 127, np.uint8)
    with pytest.raises(NoFaceError):
        strict.enroll("cid", [pics[0], blank])  # second image has no face: nothing is written
    assert "cid" not in strict.names() and len(strict) == 3
    g.close()
    strict.close()


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {src!r})
    from fromface.inference.gallery import Gallery, Template
    worker = int(sys.argv[1])
    g = Gallery(sys.argv[2])
    rng = np.random.default_rng(worker)
    for i in range(10):
        g.enroll_templates(f"w{{worker}}-{{i}}", [Template(rng.standard_normal(32)) for _ in range(3)])
""")


def test_concurrent_enrolments_from_processes_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(src=SRC))
    db = tmp_path / "g.db"
    Gallery(db).close()
    procs = [subprocess.Popen([sys.executable, str(script), str(w), str(db)], stderr=subprocess.PIPE)
             for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    g = Gallery(db)
    counts = g.counts()
    assert len(counts) == 40 and set(counts.values()) == {3} and len(g) == 120
    g.close()


KILLED = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {src!r})
    from fromface.inference.gallery import Gallery, Template

    class Slow(Gallery):
        def _insert_template(self, conn, identity_id, emb, t):
            super()._insert_template(conn, identity_id, emb, t)
            open(sys.argv[2], "a").write("row\\n")  # tell the parent a row is in the open transaction
            time.sleep(0.5)

    g = Slow(sys.argv[1])
    g.enroll_templates("victim", [Template(np.ones(16)) for _ in range(100)])
""")


def test_sigkill_mid_enrolment_leaves_gallery_consistent(tmp_path):
    db, marker = tmp_path / "g.db", tmp_path / "rows.txt"
    g = Gallery(db)
    g.enroll_templates("before", [Template(np.ones(16)), Template(-np.ones(16))])
    g.close()
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(src=SRC))
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(marker)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not marker.exists() or marker.read_text().count("row") < 2):
        time.sleep(0.05)
    assert marker.exists(), "the enrolling process never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    g = Gallery(db)
    assert g._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert g.counts() == {"before": 2}  # no half-written identity
    assert g.enroll_templates("after", [Template(np.ones(16))]) == 1
    assert g.counts() == {"after": 1, "before": 2}
    g.close()


def test_faiss_optional(tmp_path):
    rng = np.random.default_rng(3)
    g = Gallery(tmp_path / "g.db", use_faiss=True)
    g.enroll_templates("x", [Template(unit(rng))])
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="faiss"):
            g.search(unit(rng))
        return
    probe = unit(rng)
    assert g.search(probe)[0].name == "x"


def test_bulk_enrolment_exact_search(tmp_path):
    rng = np.random.default_rng(4)
    vecs = rng.standard_normal((20_000, 128)).astype(np.float32)
    people = {f"p{i:05d}": [Template(v) for v in vecs[5 * i:5 * i + 5]] for i in range(4_000)}
    g = Gallery(tmp_path / "big.db")
    assert g.enroll_many(people) == 20_000
    with pytest.raises(DataError, match="different sizes"):
        g.enroll_many({"a": [Template(np.ones(128))], "b": [Template(np.ones(64))]})
    probe = vecs[13_337] + 0.1 * rng.standard_normal(128).astype(np.float32)
    g.matrix()  # load once
    start = time.perf_counter()
    top = g.search(probe, top_k=3)
    elapsed = time.perf_counter() - start
    unit_vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    best = (unit_vecs @ (probe / np.linalg.norm(probe))).reshape(4_000, 5).max(axis=1)
    assert [m.name for m in top] == [f"p{i:05d}" for i in np.argsort(-best)[:3]]
    assert top[0].name == "p02667" and top[0].score == pytest.approx(best.max(), abs=1e-5)
    assert elapsed < 2.0, f"exact search over 20k templates took {elapsed:.2f} s"
    g.close()
