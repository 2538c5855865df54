"""Bulk work on large collections: ``--shard K/N`` splits, ``fromface embed`` resumes after a real SIGKILL,
``fromface enroll`` finishes a killed enrolment, and ``fromface enroll --from`` fills a gallery from embeddings.

A seeded checkpoint stands in for a trained model (as in test_cli_product); synthetic photos go through the
centre-crop fallback, so no data is needed. The kill tests start real ``fromface`` processes and kill them with
SIGKILL part-way, then check that the same command finishes the job with the result of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fromface.cli.main import main
from fromface.errors import ConfigError, DataError
from fromface.inference.bulk import (
    EmbedJob,
    PartialRun,
    Shard,
    embed_collection,
    enroll_in_batches,
    group_templates,
    parse_shard,
    partial_folder,
    read_embeddings,
    shard_of,
    write_embeddings,
)
from fromface.inference.gallery import Gallery, Template, image_digest

SRC = Path(__file__).resolve().parents[1] / "src"
PEOPLE = 12  # identities in the collection, two photos each


class NoDetector:
    """Finds nothing, so synthetic photos go straight to the centre-crop fallback (fast, and deterministic)."""

    score_threshold = 0.6

    def detect(self, image_rgb, score_threshold=None):
        return []


def save(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """DIR/<identity>/<photos>: PEOPLE identities of two photos, a stray non-image file, a photo at the top."""
    root = tmp_path_factory.mktemp("collection") / "people"
    for i in range(PEOPLE):
        for j in range(2):
            save(root / f"id{i:02d}" / f"{j}.png", 100 * i + j)
    (root / "id03" / "notes.txt").write_text("not a photo")
    save(root / "top.png", 9999)
    return root


@pytest.fixture(scope="module")
def embedded(ckpt, people, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "all.npz"
    assert main(["embed", str(people), "-o", str(out), "--model", ckpt, "--fallback", "--batch", "8"]) == 0
    return out


@pytest.fixture(scope="module")
def enrolled(ckpt, people, tmp_path_factory) -> Path:
    """The gallery an uninterrupted ``fromface enroll DIR`` makes (the reference for the kill and --from tests)."""
    db = tmp_path_factory.mktemp("enrolled") / "g.db"
    assert main(["enroll", str(people), "--db", str(db), "--model", ckpt, "--fallback"]) == 0
    return db


def rows(db: Path) -> tuple[dict, list[tuple]]:
    """(meta, templates by source: name, source, digest, occluded, pattern, embedding) of a gallery file."""
    with sqlite3.connect(db) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        found = conn.execute("SELECT i.name, t.source, t.digest, t.occluded, t.pattern, t.embedding FROM templates t "
                             "JOIN identities i ON i.id = t.identity_id ORDER BY t.source").fetchall()
    return meta, [(*r[:5], np.frombuffer(r[5], "<f4")) for r in found]


def same_gallery(a: Path, b: Path) -> None:
    meta_a, rows_a = rows(a)
    meta_b, rows_b = rows(b)
    assert meta_a == meta_b
    assert [r[:5] for r in rows_a] == [r[:5] for r in rows_b]
    assert all(np.allclose(x[5], y[5], atol=1e-5) for x, y in zip(rows_a, rows_b))


def fromface(*args: str, hold: tuple[str, str, str], **kw) -> subprocess.Popen:
    """A real `fromface ARGS` process of this checkout, unbuffered, for the kill tests.

    ``hold`` = (module, class, method): the process parks at its second call of that method, before the call runs,
    so the kill always lands part-way with a known amount done (a fast run on tiny photos could otherwise finish
    between the test seeing progress and sending the signal)."""
    module, cls, method = hold
    code = f"""
import sys, time
sys.path.insert(0, {str(SRC)!r})
from {module} import {cls} as held
original, calls = held.{method}, []
def parked(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        time.sleep(600)
    return original(*args, **kwargs)
held.{method} = parked
from fromface.cli.main import main
sys.exit(main())
"""
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"fromface {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------ shards
def test_parse_shard_takes_k_of_n_and_refuses_the_rest():
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard("4/4") == Shard(4, 4) and parse_shard(None) is None
    assert str(parse_shard(" 2 / 3 ")) == "2/3"
    for bad in ("0/4", "5/4", "a/b", "3", "1/0", "", "-1/4", "1/4/2"):
        with pytest.raises(ConfigError, match="--shard") as info:
            parse_shard(bad)
        assert "\n" not in str(info.value)


def test_shards_split_a_list_exactly_and_keep_items_in_place():
    keys = [f"person{i // 3}/{i}.jpg" for i in range(3000)]
    for n in (1, 3, 7):
        shards = [Shard(k, n).select(keys, str) for k in range(1, n + 1)]
        assert sorted(k for s in shards for k in s) == sorted(keys)  # union: every item, each once
        assert sum(len(s) for s in shards) == len(keys)
        assert min(len(s) for s in shards) > 0.8 * len(keys) / n  # balanced up to the binomial spread
    # The documented rule, computed independently: sha256 of the key, first 8 bytes big-endian, modulo N, plus 1.
    for key in keys[:50]:
        expected = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 5 + 1
        assert shard_of(key, 5) == expected
    grown = keys + [f"new{i}.jpg" for i in range(500)]  # more files: the old ones stay where they were
    assert Shard(2, 7).select(keys, str) == [k for k in Shard(2, 7).select(grown, str) if k in set(keys)]


def test_bad_shard_is_one_line_error(people, tmp_path, capsys):
    for bad in ("0/4", "5/4", "a/b", "3"):
        assert main(["embed", str(people), "-o", str(tmp_path / "x.npz"), "--shard", bad]) == 2
        assert "--shard" in one_line_error(capsys.readouterr().err, "embed")
        assert main(["enroll", str(people), "--db", str(tmp_path / "g.db"), "--shard", bad]) == 2
        assert "--shard" in one_line_error(capsys.readouterr().err, "enroll")
    assert not (tmp_path / "g.db").exists() and not (tmp_path / "x.npz").exists()
    assert main(["enroll", str(people), "--db", str(tmp_path / "g.db"), "--name", "x", "--shard", "1/2"]) == 2
    assert "--name" in one_line_error(capsys.readouterr().err, "enroll")


def test_embed_shards_are_disjoint_and_cover_the_folder(ckpt, people, embedded, tmp_path, capsys):
    whole = np.load(embedded)
    paths, skipped = [], []
    for k in (1, 2, 3):
        out = tmp_path / f"s{k}.npz"
        assert main(["embed", str(people), "-o", str(out), "--model", ckpt, "--fallback", "--shard", f"{k}/3"]) == 0
        part = np.load(out)
        assert str(part["shard"]) == f"{k}/3"
        paths += list(part["paths"])
        skipped += list(part["skipped"])
        for key, value in zip(part["paths"], part["embeddings"]):  # the same embedding as in the whole run
            assert np.allclose(value, whole["embeddings"][list(whole["paths"]).index(key)], atol=1e-5)
    assert len(paths) == len(set(paths)) and sorted(paths) == sorted(whole["paths"])
    assert sorted(skipped) == sorted(whole["skipped"])  # the non-image file is reported by exactly one shard


# --------------------------------------------------------------------------------------------------- embed output
def test_embed_output_carries_what_a_gallery_needs(ckpt, people, embedded):
    data = np.load(embedded)
    for key in ("embeddings", "paths", "boxes", "methods", "pattern", "visible_fraction", "skipped", "model"):
        assert key in data.files  # old readers still find every key they knew
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(ckpt, fallback=True)
    assert str(data["model_id"]) == rec.model_id and str(data["root"]) == str(people)
    assert len(data["paths"]) == 2 * PEOPLE + 1 and data["embeddings"].shape == (2 * PEOPLE + 1, 128)
    assert list(data["digests"]) == [image_digest(people / p) for p in data["paths"]]
    faces = [found[0] for found in rec.embed([str(people / p) for p in data["paths"][:4]])]
    assert data["occluded"][:4].tolist() == [int(f.occluded) for f in faces]  # a FROM model always estimates it
    assert np.allclose(data["embeddings"][:4], [f.embedding for f in faces], atol=1e-5)
    assert [s.split(":")[0] for s in data["skipped"]] == ["id03/notes.txt"]
    assert not partial_folder(embedded).exists()


# ----------------------------------------------------------------------------------------------------------- resume
class Counting:
    """A recognizer that counts the images it is asked to embed and, with ``fail_after``, dies after that many
    calls (as a kill would stop it)."""

    def __init__(self, recognizer, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.images = recognizer, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_each(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += len(images)
        return self.inner.embed_each(images)


def test_interrupted_embedding_resumes_without_redoing_batches(ckpt, people, tmp_path):
    from fromface.data.images import scan_images
    from fromface.inference.recognizer import FaceRecognizer

    rec = FaceRecognizer(ckpt, fallback=True, detector=NoDetector())
    files = scan_images(people, recursive=True)[0]
    job = EmbedJob(people, files, tmp_path / "out.npz", batch=5, settings={"fallback": True})
    reference, _ = embed_collection(rec, EmbedJob(people, files, tmp_path / "ref.npz", batch=5,
                                                  settings={"fallback": True}))
    with pytest.raises(KeyboardInterrupt):
        embed_collection(Counting(rec, fail_after=2), job)
    assert len(list(partial_folder(job.output).glob("batch-*.npz"))) == 2
    again = Counting(rec)
    arrays, resumed = embed_collection(again, job)
    assert resumed == 10 and again.images == len(files) - 10  # the two finished batches were not embedded again
    for key in ("paths", "digests", "occluded", "pattern"):
        assert list(arrays[key]) == list(reference[key])
    assert np.allclose(arrays["embeddings"], reference["embeddings"], atol=1e-6)
    write_embeddings(job, arrays)
    assert job.output.is_file() and not partial_folder(job.output).exists()


def test_partial_folder_of_other_arguments_is_refused(tmp_path):
    out = tmp_path / "out.npz"
    job = {"root": "/data/a", "shard": "1/4", "model_id": "m1", "batch": 8}
    PartialRun(out, job).save(0, {"x": np.arange(3)})
    assert PartialRun(out, dict(job)).done(0)  # the same job: resumed
    for change in ({"model_id": "m2"}, {"shard": "2/4"}, {"root": "/data/b"}, {"batch": 16}):
        with pytest.raises(DataError, match=f"{list(change)[0]}: .* there, .* now") as info:
            PartialRun(out, {**job, **change})
        assert str(partial_folder(out)) in str(info.value) and "\n" not in str(info.value)
    assert PartialRun(out, job).done(0)  # refusing left it untouched
    assert not PartialRun(out, {**job, "model_id": "m2"}, force=True).done(0)  # --force discards it


def test_embed_cli_refuses_a_partial_folder_of_another_batch_size(ckpt, people, tmp_path, capsys):
    out = tmp_path / "out.npz"
    PartialRun(out, {"root": "elsewhere"}).save(0, {"x": np.arange(1)})
    assert main(["embed", str(people), "-o", str(out), "--model", ckpt, "--fallback"]) == 2
    assert "partial results of a run with other arguments (root:" in one_line_error(capsys.readouterr().err, "embed")
    assert not out.exists() and partial_folder(out).exists()
    out.write_bytes(b"mine")
    assert main(["embed", str(people), "-o", str(out), "--model", ckpt, "--fallback"]) == 2
    assert "already exists; use --force" in capsys.readouterr().err and out.read_bytes() == b"mine"


def test_killed_embed_resumes_where_it_stopped(ckpt, people, embedded, tmp_path, capsys):
    out = tmp_path / "killed.npz"  # one shard of two, one image per batch: a kill always finds batches to do
    args = ["embed", str(people), "-o", str(out), "--model", ckpt, "--fallback", "--batch", "1", "--shard", "2/2"]
    proc = fromface(*args, hold=("fromface.inference.bulk", "PartialRun", "save"), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(partial_folder(out).glob("batch-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial_folder(out).glob("batch-*.npz")))
    want = np.load(embedded)
    mine = [k for k, p in enumerate(want["paths"]) if Shard(2, 2).holds(Path(p).as_posix())]
    assert proc.returncode == -signal.SIGKILL and done == 1 < len(mine) and not out.exists()
    assert main(args) == 0
    assert f"({done} of {len(mine)} images done by an earlier run)" in capsys.readouterr().out  # every photo has a face
    got = np.load(out)
    for key in ("paths", "digests", "occluded", "pattern", "methods"):
        assert list(got[key]) == [want[key][k] for k in mine], key
    assert np.allclose(got["embeddings"], want["embeddings"][mine], atol=1e-5)
    assert not partial_folder(out).exists() and not list(tmp_path.glob(".*tmp"))


def test_killed_enroll_finishes_on_a_second_run(ckpt, people, enrolled, tmp_path):
    db = tmp_path / "killed.db"
    args = ["enroll", str(people), "--db", str(db), "--model", ckpt, "--fallback"]
    proc = fromface(*args, hold=("fromface.inference.gallery", "Gallery", "enroll_each"), stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the first identity is committed: kill it while the others are still to do
        if line.startswith("enrolled "):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        written = conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 2 * written  # no half identity
    assert 0 < written < PEOPLE
    assert main(args) == 0
    same_gallery(db, enrolled)


# ------------------------------------------------------------------------------------------------ enroll --from
def test_enroll_from_embeddings_equals_enroll_dir(embedded, enrolled, tmp_path, capsys):
    db = tmp_path / "from.db"
    assert main(["enroll", "--from", str(embedded), "--db", str(db)]) == 0
    captured = capsys.readouterr()
    assert f"enrolled {PEOPLE} identities from 1 file: {2 * PEOPLE} templates added" in captured.out
    assert "top.png: not in an identity sub-folder" in captured.err
    same_gallery(db, enrolled)  # same names, sources, digests, occlusion, embeddings and model as enroll DIR
    assert main(["enroll", "--from", str(embedded), "--db", str(db)]) == 0  # again: nothing new, no refusal
    again = capsys.readouterr().out
    assert f"0 templates added, {2 * PEOPLE} already enrolled ({PEOPLE} identities unchanged)" in again
    copy = tmp_path / "copy.db"
    shutil.copy(enrolled, copy)
    assert main(["enroll", "--from", str(embedded), "--db", str(copy)]) == 0  # photos enrolled by enroll DIR
    assert "0 templates added" in capsys.readouterr().out
    same_gallery(copy, enrolled)


def test_enroll_from_shards_split_by_identity(ckpt, embedded, people, tmp_path, capsys):
    names = []
    for k in (1, 2, 3):
        db = tmp_path / f"s{k}.db"
        assert main(["enroll", "--from", str(embedded), "--db", str(db), "--shard", f"{k}/3"]) == 0
        with Gallery(db, read_only=True) as g:
            counts = g.counts()
        assert set(counts.values()) == {2}  # an identity's photos stay together
        names += list(counts)
    assert sorted(names) == [f"id{i:02d}" for i in range(PEOPLE)]  # each identity in exactly one shard
    direct = tmp_path / "direct.db"  # enroll DIR --shard takes the same identities
    assert main(["enroll", str(people), "--db", str(direct), "--model", ckpt, "--fallback", "--shard", "1/3"]) == 0
    capsys.readouterr()
    same_gallery(direct, tmp_path / "s1.db")


def test_enroll_from_writes_batches_and_refuses_only_the_identity_at_fault(embedded, tmp_path):
    file = read_embeddings(embedded)
    people, _ = group_templates([file])
    db = tmp_path / "g.db"
    with Gallery(db) as g:
        calls = []
        enroll_many = g.enroll_many

        def counted(todo, **kw):  # records each transaction; a concurrent job enrols id05 under the first one
            calls.append(len(todo))
            if "id05" in todo and len(todo) > 1:
                with Gallery(db) as other:
                    other.enroll_many({"id05": [Template(np.ones(128))]}, model=file.model_id)
            return enroll_many(todo, **kw)

        g.enroll_many = counted
        first = enroll_in_batches(g, {n: people[n] for n in list(people)[:2]}, file.model_id, file.model_source)
        assert first.identities == 2 and first.added == 4 and calls == [2]
        extra = Template(np.random.default_rng(0).normal(size=128), digest="f" * 64, source="new.png")
        people["id00"] = [*people["id00"], extra]  # a new photo of an enrolled identity, without --add
        calls.clear()
        result = enroll_in_batches(g, people, file.model_id, file.model_source, mode="new", batch=4)
        # id00 refused and id01 unchanged before writing; the batch with id05 fails, then goes one by one
        assert calls == [2, 4, 1, 1, 1, 1, 4]
        assert set(result.refused) == {"id00", "id05"} and all("already enrolled" in why
                                                               for why in result.refused.values())
        assert result.identities == PEOPLE - 3 and result.unchanged == 1 and len(g.names()) == PEOPLE
        assert g.counts()["id05"] == 1 and g.counts()["id04"] == 2
        assert enroll_in_batches(g, people, file.model_id, file.model_source, mode="add").added == 1 + 2


def test_enroll_from_refuses_other_models_and_old_files(embedded, tmp_path, capsys):
    db = tmp_path / "other.db"
    with Gallery(db) as g:
        g.enroll_many({"someone": [Template(np.ones(128))]}, model="other:model")
    assert main(["enroll", "--from", str(embedded), "--db", str(db)]) == 2
    line = one_line_error(capsys.readouterr().err, "enroll")
    model_id = str(np.load(embedded)["model_id"])
    assert str(embedded) in line and model_id in line and "other:model" in line
    old = tmp_path / "old.npz"
    data = dict(np.load(embedded))
    np.savez(old, **{k: v for k, v in data.items() if k not in ("model_id", "model_source", "occluded", "digests")})
    assert main(["enroll", "--from", str(old), "--db", str(tmp_path / "g.db")]) == 2
    assert "re-embed" in one_line_error(capsys.readouterr().err, "enroll")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["enroll", "--from", str(tmp_path / "junk.npz"), "--db", str(tmp_path / "g.db")]) == 2
    assert "junk.npz: not a readable .npz file" in one_line_error(capsys.readouterr().err, "enroll")
    assert main(["enroll", "people", "--from", str(embedded), "--db", str(tmp_path / "g.db")]) == 2
    assert "not both" in one_line_error(capsys.readouterr().err, "enroll")
    assert main(["enroll", "--from", str(embedded), "--db", str(tmp_path / "g.db"), "--model", "x.pt"]) == 2
    assert "--model is not used with --from" in one_line_error(capsys.readouterr().err, "enroll")


def test_enroll_from_with_name_makes_one_identity(embedded, tmp_path, capsys):
    db = tmp_path / "one.db"
    assert main(["enroll", "--from", str(embedded), "--db", str(db), "--name", "everyone"]) == 0
    capsys.readouterr()
    with Gallery(db, read_only=True) as g:
        assert g.counts() == {"everyone": 2 * PEOPLE + 1}  # top.png too: --name needs no identity folders
