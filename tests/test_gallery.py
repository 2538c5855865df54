"""Gallery on its default SQLite store: the file format, the in-memory matrix and its index, images to identities.
What every store must do alike (enrol, remove, top-k, concurrency, a killed enrolment) is in test_stores.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromface.errors import AlreadyEnrolledError, ConfigError, DataError, ImageError, NoFaceError
from fromface.inference.gallery import Gallery, Template
from fromface.storage.sqlite import SqliteStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


def unit(rng: np.random.Generator, dim: int = 64) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


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
    assert b.store.matrix() is b.store.matrix()  # cached while nothing changes
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
    # several people at once: each all or nothing, one person's failure does not stop the others
    fresh = [np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((112, 112)))
             for _ in range(4)]
    results = g.enroll_each({"dan": [pics[1]], "cid": [fresh[0], b"not an image"], "bob": [fresh[1]],
                             "fay": fresh[2:4], "hal": [fresh[0]]})
    assert list(results) == ["dan", "cid", "bob", "fay", "hal"]
    assert isinstance(results["cid"], ImageError) and "cid" not in g.names()
    assert isinstance(results["bob"], AlreadyEnrolledError)  # refused before any embedding, nothing added
    assert results["dan"].added == 0 and "already enrolled as 'ann'" in results["dan"].skipped[0]
    assert results["fay"].added == 2 and results["hal"].added == 1  # hal's photo is not lost with cid's
    assert g.counts() == {"ann": 2, "bob": 1, "fay": 2, "hal": 1}
    g.close()
    strict.close()


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
    g.store.matrix()  # load once
    top = g.search(probe, top_k=3)
    unit_vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    best = (unit_vecs @ (probe / np.linalg.norm(probe))).reshape(4_000, 5).max(axis=1)
    assert [m.name for m in top] == [f"p{i:05d}" for i in np.argsort(-best)[:3]]
    assert top[0].name == "p02667" and top[0].score == pytest.approx(best.max(), abs=1e-5)
    g.close()


def test_enrolments_are_appended_to_the_loaded_matrix(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    g = Gallery(tmp_path / "g.db")
    other = Gallery(tmp_path / "g.db")  # another process's view of the same file
    g.enroll_templates("a", [Template(unit(rng)) for _ in range(3)])
    g.store.matrix()
    reads = []
    original = SqliteStore._rows_after
    monkeypatch.setattr(SqliteStore, "_rows_after", lambda self, cache, last: reads.append(last) or
                        original(self, cache, last))
    g.enroll_templates("b", [Template(unit(rng))])
    other.enroll_templates("a", [Template(unit(rng))], mode="add")  # added to an identity already loaded
    mat, ids, names, owner, _ = g.store.matrix()
    assert reads == [3] and len(mat) == 5 and names == ["a", "b"]  # only the rows after id 3 were read
    assert [names[o] for o in owner] == ["a", "a", "a", "b", "a"]
    assert other.remove("b") == 1  # a removal reloads the matrix whole
    mat, _, names, owner, _ = g.store.matrix()
    assert reads[-1] == 0 and len(mat) == 4 and names == ["a"]
    assert [m.name for m in g.search(unit(rng), top_k=5)] == ["a"]
    g.close()
    other.close()


def test_approximate_index_above_the_exact_size_keeps_recall(tmp_path):
    pytest.importorskip("faiss")  # a test extra; installed in CI
    rng = np.random.default_rng(10)
    vecs = rng.standard_normal((6_000, 64)).astype(np.float32)
    people = {f"p{i:04d}": [Template(v) for v in vecs[3 * i:3 * i + 3]] for i in range(2_000)}
    exact = Gallery(tmp_path / "g.db", use_faiss=False)
    exact.enroll_many(people)
    approx = Gallery(tmp_path / "g.db", exact_up_to=1_000)
    probes = vecs[rng.choice(6_000, 200, replace=False)] + 0.3 * rng.standard_normal((200, 64)).astype(np.float32)
    hits = sum(approx.search(p, top_k=1)[0].name == exact.search(p, top_k=1)[0].name for p in probes)
    assert approx.store._ann is not None and hits / len(probes) >= 0.95  # recall@1 of the index against exact search
    top = approx.search(probes[0], top_k=5)
    assert len({m.name for m in top}) == 5 and [m.score for m in top] == sorted((m.score for m in top), reverse=True)
    approx.enroll_templates("late", [Template(probes[1])])  # added to the index as enrolled
    assert approx.search(probes[1], top_k=1)[0].name == "late"
    assert approx.remove("late") == 1 and approx.search(probes[1], top_k=1)[0].name != "late"  # index rebuilt
    exact.close()
    approx.close()


# ---------------------------------------------------------------------------------------- real faces, default model
LFW_ENROLLED = ("Abdullah_Gul", "Adrien_Brody", "Alejandro_Toledo", "Angelina_Jolie", "Arnold_Schwarzenegger")
LFW_STRANGER = "Alan_Greenspan"  # not enrolled


def photos(name: str) -> list[Path]:
    from conftest import LFW_IMAGES

    return sorted((LFW_IMAGES / name).iterdir())


@pytest.fixture(scope="module")
def default_recognizer():
    from fromface.inference.recognizer import FaceRecognizer

    return FaceRecognizer()  # the shipped default model, from_sface_net:celeba1140-photometric


@pytest.mark.data("lfw/images")
def test_identify_a_photo_that_is_not_enrolled(default_recognizer, tmp_path):
    """Five LFW people enrolled with their first two photos; each one's third photo is identified as them, and a
    sixth person, not enrolled, matches no one."""
    from fromface.inference.gallery import image_digest
    from fromface.models import get_spec

    rec = default_recognizer
    clean_threshold = get_spec("from_sface_net").pretrained["celeba1140-photometric"]["thresholds"]["clean"]["far1e-3"]
    enrol = {name: photos(name)[:2] for name in LFW_ENROLLED}
    probes = {name: photos(name)[2] for name in LFW_ENROLLED} | {LFW_STRANGER: photos(LFW_STRANGER)[0]}
    paths = [p for ps in enrol.values() for p in ps] + list(probes.values())
    faces = dict(zip(paths, (found[0] for found in rec.embed(paths))))  # every photo embedded once
    g = Gallery(tmp_path / "g.db", recognizer=rec)
    for name, ps in enrol.items():  # as the REST service enrols: faces embedded by the gallery's recognizer
        assert g.enroll_faces(name, [faces[p] for p in ps], [image_digest(p) for p in ps]).added == 2
    assert g.counts() == {name: 2 for name in LFW_ENROLLED}
    for name, probe_photo in probes.items():
        probe = faces[probe_photo]
        # The expected ranking, by brute force: each identity's best template score, descending.
        best = {who: max(float(faces[p].embedding @ probe.embedding) for p in ps) for who, ps in enrol.items()}
        want = sorted(best, key=best.get, reverse=True)
        matches = g.identify(probe, top_k=len(LFW_ENROLLED))
        names = [m.name for m in matches]
        assert names == want and len(set(names)) == len(names) == len(LFW_ENROLLED)
        np.testing.assert_allclose([m.score for m in matches], [best[n] for n in want], atol=1e-4)
        assert all(a.score >= b.score for a, b in zip(matches, matches[1:]))
        assert all((m.condition, m.threshold) == ("clean", clean_threshold) for m in matches)
        if name in enrol:
            assert names[0] == name and matches[0].score - matches[1].score > 0.3, [(m.name, m.score) for m in matches]
            assert [m.same for m in matches] == [True] + [False] * (len(matches) - 1)
        else:  # unknown: even the best match is well below the threshold
            assert matches[0].score < clean_threshold - 0.1 and not any(m.same for m in matches)
    assert [m.name for m in g.identify(probes["Angelina_Jolie"], top_k=1)] == ["Angelina_Jolie"]  # a photo path
    g.close()


def test_views_round_and_name_every_field():
    from fromface.inference.gallery import Enrolment, Match

    match = Match("ann", 0.1234567, 3, True, same=False, threshold=0.3775449, condition="occluded")
    assert match.to_dict() == {"name": "ann", "score": 0.12346, "template_id": 3, "template_occluded": True,
                               "same": False, "threshold": 0.37754, "condition": "occluded"}
    assert Match("bo", 0.5, 1, None).to_dict()["threshold"] is None
    assert Enrolment("ann", 2, ["x.jpg: same image as y.jpg"], 5).to_dict() == {
        "name": "ann", "added": 2, "skipped": ["x.jpg: same image as y.jpg"], "templates": 5}


def test_model_spec_and_mismatch_messages(tmp_path):
    g = Gallery(tmp_path / "g.db")
    assert g.model_spec() is None  # empty: no model yet

    def meta(**values: str) -> None:
        with g.store._write() as conn:
            conn.execute("DELETE FROM meta")
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", values.items())

    meta(model_id="from_sface_net:celeba299-realign", model="from_sface_net")
    assert g.model_spec() == "from_sface_net:celeba299-realign"
    with pytest.raises(ConfigError, match=r"enrolled with model from_sface_net:celeba299-realign, not other:x; "):
        g.check_model("other:x")
    meta(model_id="sha256:abc", source="/models/mine.onnx")
    with pytest.raises(ConfigError, match=r"model file /models/mine\.onnx \(sha256:abc\); fromface does not load"):
        g.model_spec()
    with pytest.raises(ConfigError, match=r"enrolled with model sha256:abc \(/models/mine\.onnx\), not m:1"):
        g.check_model("m:1")
    meta(model_id="module:mobilefacenet:0123abcd")  # a module built in Python: nothing to rebuild it from
    with pytest.raises(ConfigError, match=r"enrolled with a model built in Python \(module:mobilefacenet:0123abcd\)"):
        g.model_spec()
    meta(model="mobilefacenet", source="mobilefacenet")  # schema 1: a registered name
    assert g.model_spec() == "mobilefacenet"
    with pytest.raises(ConfigError, match="enrolled with model 'mobilefacenet', not 'sface_net_face'"):
        g.check_model(None, "sface_net_face")
    meta(model="from_x", source="/runs/best.pt")  # schema 1: a checkpoint file
    with pytest.raises(ConfigError, match=r"model file /runs/best\.pt \(file:\)"):
        g.model_spec()


def test_foreign_empty_and_newer_files_are_refused(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices(id INTEGER)")
    for path, what in ((empty, "an empty file"), (foreign, "an SQLite database of another application")):
        with pytest.raises(DataError, match=f"^{path}: {what}, not a fromface gallery$"):
            Gallery(path, read_only=True)
    newer = tmp_path / "newer.db"
    Gallery(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE schema_version SET version = 9")
    with pytest.raises(DataError, match=f"^{newer}: gallery schema version 9, this fromface reads 1, 2$"):
        Gallery(newer, read_only=True)
