"""What is particular to the Milvus store (tests/test_stores.py runs the contract every backend shares): the journal
that makes an enrolment all or nothing without transactions (a SIGKILLed writer, a refused or failing write, rows
of a write in progress), filters with awkward names, paging past Milvus' 16,384-row limit, Milvus Lite's one
process per file, read-only opens, and the HNSW search against exact NumPy search. All on Milvus Lite files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fromface.errors import AlreadyEnrolledError, ConfigError, DataError  # noqa: E402
from fromface.storage import local_path, open_store  # noqa: E402
from fromface.storage import milvus as milvus_module  # noqa: E402
from fromface.storage.base import Template  # noqa: E402
from fromface.storage.milvus import QUERY_LIMIT, MilvusStore, quote  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def person(name: str, embs: np.ndarray, tag: str | None = None) -> tuple:
    """(name, rows) with digests ``<tag>-<k>`` (the name when no tag)."""
    tag = name if tag is None else tag
    return name, [(e, Template(e, digest=f"{tag}-{k}", source=f"{tag}/{k}.jpg")) for k, e in enumerate(embs)]


def rows_stored(store: MilvusStore) -> int:
    """Rows physically in the templates collection, pending or not (what the journal hides is still counted)."""
    return store._count("") if store._templates_exist() else 0


def python_command(code: str) -> list[str]:
    """A command running ``code`` with this checkout's fromface."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r})\n" + textwrap.dedent(code)]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(python_command(code), capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkilled_enrolment_leaves_nothing_and_is_rolled_back(milvus_lite_url, tmp_path):
    rng = np.random.default_rng(0)
    with MilvusStore(milvus_lite_url) as store:
        assert store.write([person("kept", unit(rng, 3, 16))], 16, "m:1", None, "new") == 3
    marker = tmp_path / "marker"
    code = f"""
        import pathlib
        import numpy as np
        from fromface.storage.base import Template
        from fromface.storage.milvus import MilvusStore
        store = MilvusStore({milvus_lite_url!r})
        original, inserts = store._call, []
        def spy(action, method, *args, **kwargs):
            out = original(action, method, *args, **kwargs)
            if method == "insert":
                inserts.append(len(args[1]))
                if len(inserts) == 2:  # 10,000 of the 50,000 rows are in: kill me now
                    pathlib.Path({str(marker)!r}).write_text("inserting")
            return out
        store._call = spy
        embs = np.random.default_rng(1).standard_normal((50_000, 16)).astype(np.float32)
        embs /= np.linalg.norm(embs, axis=1, keepdims=True)
        store.write([("killed", [(e, Template(e, digest=f"k{{k}}")) for k, e in enumerate(embs)])], 16, "m:1",
                    None, "new")
        pathlib.Path({str(marker)!r}).write_text("finished")
        """
    proc = subprocess.Popen(python_command(code), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    text = marker.read_text() if marker.exists() else ""
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert text == "inserting", f"the writer never got to its inserts (or finished first): {out[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    # a reader (no recovery) sees the killed write's rows in the collection but none of them through the store
    with MilvusStore(milvus_lite_url, read_only=True) as reader:
        assert rows_stored(reader) >= 10_003
        assert len(reader) == 3
        assert reader.counts() == {"kept": 3}
        assert reader.template_count("killed") is None
        assert reader.known_digests(["k0", "k1", "kept-0"]) == {"kept-0": "kept"}
        assert set(reader.nearest(unit(rng, 1, 16)[0], 50).names) == {"kept"}
        assert len(reader._state().pending) == 1
    # the next writer rolls it back: rows deleted, journal row gone, and the name is free again
    with MilvusStore(milvus_lite_url) as store:
        assert rows_stored(store) == 3
        assert store._state().pending == {}
        assert store.counts() == {"kept": 3}
        assert store.write([person("killed", unit(rng, 2, 16))], 16, "m:1", None, "new") == 2
        assert store.counts() == {"kept": 3, "killed": 2}
        assert len(store) == rows_stored(store) == 5


@pytest.mark.parametrize("cached", [False, True], ids=["queried", "cached"])
def test_write_refused_part_way_leaves_nothing_of_the_first(milvus_lite_url, cached):
    rng = np.random.default_rng(0)
    with MilvusStore(milvus_lite_url) as store:
        store.use_cache = cached
        store.write([person("bob", unit(rng, 2, 8))], 8, "m:1", None, "new")
        call = [person(f"fresh{k}", unit(rng, 3, 8)) for k in range(5)] + [person("bob", unit(rng, 1, 8), "bob2")]
        with pytest.raises(AlreadyEnrolledError, match="'bob' is already enrolled"):
            store.write(call, 8, "m:1", None, "new")
        assert store.counts() == {"bob": 2}
        assert store.known_digests(["fresh0-0", "fresh4-2", "bob2-0"]) == {}
        assert rows_stored(store) == 2 and store._state().pending == {}
        # the same call in mode add goes in whole
        assert store.write(call, 8, "m:1", None, "add") == 16
        assert store.counts() == {"bob": 3, **{f"fresh{k}": 3 for k in range(5)}}


def test_write_failing_mid_insert_rolls_itself_back(milvus_lite_url, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(milvus_module, "INSERT_ROWS", 10)
    with MilvusStore(milvus_lite_url) as store:
        original, inserts = store._call, []

        def failing(action, method, *args, **kwargs):
            if method == "insert":
                inserts.append(1)
                if len(inserts) == 3:
                    raise DataError("network gone")
            return original(action, method, *args, **kwargs)

        store._call = failing
        with pytest.raises(DataError, match="network gone"):
            store.write([person("ann", unit(rng, 25, 8)), person("cy", unit(rng, 25, 8))], 8, "m:1", "m.onnx", "new")
        assert len(inserts) == 3  # two chunks of 10 were in the collection
        assert rows_stored(store) == 0 and store._state().pending == {}
        assert store.meta() == {}  # the first enrolment's dim and model went with it: another model may come
        assert len(store) == 0 and store.counts() == {}
        store._call = original
        assert store.write([person("ann", unit(rng, 2, 32))], 32, "m:2", None, "new") == 2
        assert store.meta()["dim"] == "32" and store.counts() == {"ann": 2}


NAMES = ['O\'Brien "Bob"', "back\\slash\\", 'x" or identity != "', "\\\"", "名前 ✓ Zoë", "a'b''c"]


@pytest.mark.parametrize("cached", [False, True], ids=["queried", "cached"])
def test_names_with_quotes_backslashes_and_unicode_round_trip(milvus_lite_url, cached):
    rng = np.random.default_rng(0)
    with MilvusStore(milvus_lite_url) as store:
        store.use_cache = cached  # queried: the filters a Milvus server gets
        people = [person(name, unit(rng, k + 1, 8), f"d{k}") for k, name in enumerate(NAMES)]
        assert store.write(people, 8, "m:1", None, "new") == sum(range(1, len(NAMES) + 1))
        assert store.counts() == {name: k + 1 for k, name in enumerate(NAMES)}
        assert [store.template_count(name) for name in NAMES] == list(range(1, len(NAMES) + 1))
        assert store.known_digests([f"d{k}-0" for k in range(len(NAMES))] + ['"', "\\"]) == {
            f"d{k}-0": name for k, name in enumerate(NAMES)}
        assert store.template_count('x" or identity != "x') is None
        # a name that would be an injection unquoted removes only its own templates
        assert store.remove('x" or identity != "') == 3
        left = {name: k + 1 for k, name in enumerate(NAMES) if name != 'x" or identity != "'}
        assert store.counts() == left
        assert store.remove("back\\slash\\") == 2 and store.remove("back\\slash") == 0
        del left["back\\slash\\"]
        assert store.counts() == left and len(store) == sum(left.values())
        assert store.write([person("名前 ✓ Zoë", unit(rng, 1, 8), "z")], 8, "m:1", None, "add") == 1
        assert store.template_count("名前 ✓ Zoë") == 6
    assert quote('a"b\\c\n') == '"a\\"b\\\\c\\n"'


def test_counts_and_len_beyond_the_query_limit(milvus_lite_url):
    rng = np.random.default_rng(0)
    identities, each = 1_700, 10
    total = identities * each
    assert total > QUERY_LIMIT
    embs = unit(rng, total, 8)
    people = [person(f"p{k:04d}", embs[k * each:(k + 1) * each]) for k in range(identities)]
    digests = [f"p{k:04d}-{j}" for k in range(0, identities, 2) for j in range(3)]  # 2,550: three filters
    with MilvusStore(milvus_lite_url) as store:
        store.use_cache = False  # the queries a Milvus server gets: paged by id, 16,384 rows at most
        assert store.write(people, 8, "m:1", None, "new") == total
        assert len(store) == total
        counts = store.counts()
        assert len(counts) == identities and set(counts.values()) == {each}
        assert store.template_count("p1234") == each
        known = store.known_digests(digests)
        assert len(known) == len(digests) and known["p1234-2"] == "p1234"
        store.query_page = 1_000  # many pages: the cursor must neither skip nor repeat rows
        assert store.counts() == counts
        store.use_cache = True  # Milvus Lite's in-memory view, read in id ranges, agrees
        assert store.counts() == counts and len(store) == total
        assert store.known_digests(digests) == known
        assert store.write([person("p0000", unit(rng, 1, 8), "more")], 8, "m:1", None, "add") == 1
        for cached in (True, False):
            store.use_cache = cached
            assert len(store) == total + 1 and store.template_count("p0000") == each + 1
            assert store.known_digests(["more-0"]) == {"more-0": "p0000"}


def test_a_second_process_gets_one_line_error(milvus_lite_url):
    rng = np.random.default_rng(0)
    path = local_path(milvus_lite_url)
    with MilvusStore(milvus_lite_url) as store:
        store.write([person("ann", unit(rng, 1, 8))], 8, "m:1", None, "new")
        code = f"""
            from fromface.errors import DataError
            from fromface.storage.milvus import MilvusStore
            for read_only in (False, True):
                try:
                    MilvusStore({milvus_lite_url!r}, read_only=read_only)
                except DataError as exc:
                    print(exc)
            """
        done = run_python(code)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 2
        for line in lines:
            assert line.startswith(store.location) and str(path) in line
            assert "in use by another process: Milvus Lite allows one process per file" in line
        assert "Traceback" not in done.stderr
        assert store.counts() == {"ann": 1}  # the holder is unharmed
    # once this process closed it, another may open it
    done = run_python(f"""
        from fromface.storage.milvus import MilvusStore
        with MilvusStore({milvus_lite_url!r}, read_only=True) as s:
            print(s.counts())
        """)
    assert done.returncode == 0 and done.stdout.strip() == "{'ann': 1}", done.stderr


def test_read_only_never_creates_anything(milvus_lite_url):
    path = local_path(milvus_lite_url)
    with pytest.raises(DataError, match="gallery not found") as err:
        MilvusStore(milvus_lite_url, read_only=True)
    assert "\n" not in str(err.value) and not path.exists()
    with pytest.raises(DataError, match="gallery not found"):
        open_store(milvus_lite_url, read_only=True)
    assert not path.exists()
    # a file holding only another collection: no fromface collection appears
    other = f"{milvus_lite_url}?collection=other"
    MilvusStore(other).close()
    with pytest.raises(DataError, match="gallery not found"):
        MilvusStore(milvus_lite_url, read_only=True)
    with MilvusStore(other, read_only=True) as reader:  # an empty gallery opens read-only and stays as it is
        assert len(reader) == 0 and reader.counts() == {} and reader.meta() == {}
        assert len(reader.nearest(np.ones(8, np.float32) / 8**0.5, 3)) == 0
        with pytest.raises(DataError, match="read-only"):
            reader.write([person("ann", np.eye(8, dtype=np.float32)[:1])], 8, "m:1", None, "new")
        with pytest.raises(DataError, match="read-only"):
            reader.remove("ann")
        assert sorted(reader._call("list", "list_collections")) == ["other_meta"]


@pytest.mark.parametrize("cached", [False, True], ids=["queried", "cached"])
def test_rows_of_a_write_or_removal_in_progress_are_invisible(milvus_lite_url, cached):
    rng = np.random.default_rng(0)
    probe = unit(rng, 1, 8)[0]
    with MilvusStore(milvus_lite_url) as store:
        store.use_cache = cached
        store.write([person("alice", unit(rng, 2, 8)), person("carl", unit(rng, 2, 8))], 8, "m:1", None, "new")
        # a write in progress, by hand: its journal row, then its rows (the probe itself, ranked first by any search)
        batch, key = 123, "pending:123"
        entry = {"op": "write", "started": time.time(), "heartbeat": time.time()}
        store._journal(key, entry)
        store._insert([("ghost", e, Template(e, digest=f"g{k}")) for k, e in enumerate([probe] * 3)], batch, key, entry)
        assert rows_stored(store) == 7
        assert len(store) == 4
        assert store.counts() == {"alice": 2, "carl": 2}
        assert store.template_count("ghost") is None and store.known_digests(["g0", "g1"]) == {}
        hits = store.nearest(probe, 4)
        assert len(hits) == 4 and "ghost" not in hits.names and hits.scores.max() < 0.999
        assert list(hits.scores) == sorted(hits.scores, reverse=True)
        # a removal in progress hides the identity
        store._journal("removing:9", {"op": "remove", "name": "alice", "started": time.time()})
        assert store.counts() == {"carl": 2} and len(store) == 2 and store.template_count("alice") is None
        assert set(store.nearest(probe, 10).names) == {"carl"}
        # neither was written by a live writer of this process: the next write rolls back / finishes both
        assert store.write([person("dora", unit(rng, 1, 8))], 8, "m:1", None, "new") == 1
        state = store._state()
        assert state.pending == {} and state.removing == {}
        assert rows_stored(store) == 3 and store.counts() == {"carl": 2, "dora": 1}


def test_reads_during_a_write_of_this_process_see_none_of_it_until_it_commits(milvus_lite_url, monkeypatch):
    import threading

    rng = np.random.default_rng(0)
    embs = unit(rng, 6_003, 8)
    monkeypatch.setattr(milvus_module, "INSERT_ROWS", 1_000)
    with MilvusStore(milvus_lite_url) as store:
        store.use_cache = False  # reads go to Milvus and meet the write's rows there
        store.write([person("a", embs[:3])], 8, "m:1", None, "new")
        writer = threading.Thread(target=store.write, args=([person("big", embs[3:])], 8, "m:1", None, "new"))
        lengths, counts, names = set(), set(), set()
        writer.start()
        while writer.is_alive():
            lengths.add(len(store))
            counts.add(tuple(sorted(store.counts().items())))
            names.update(store.nearest(embs[5], 3).names)
        writer.join()
        assert lengths <= {3, 6_003} and 3 in lengths
        assert counts <= {(("a", 3),), (("a", 3), ("big", 6_000))}
        assert store.counts() == {"a": 3, "big": 6_000} and len(store) == 6_003
        assert names <= {"a", "big"}


def test_nearest_agrees_with_exact_search(milvus_lite_url):
    rng = np.random.default_rng(0)
    gallery = unit(rng, 3_000, 64)
    probes = unit(rng, 200, 64)
    with MilvusStore(milvus_lite_url) as store:
        store.write([person(f"p{k}", gallery[k:k + 1]) for k in range(len(gallery))], 64, "m:1", None, "new")
        store._call("flush", "flush", store.name)  # into a segment, indexed in the background
        exact = probes @ gallery.T
        top1 = [store.nearest(q, 1) for q in probes]
        agree = np.mean([hits.names[0] == f"p{int(np.argmax(row))}" for hits, row in zip(top1, exact)])
        assert agree >= 0.95
        hits = store.nearest(probes[0], 10)
        best = np.argsort(-exact[0])[:10]
        assert hits.names[0] == f"p{best[0]}"
        assert list(hits.scores) == sorted(hits.scores, reverse=True)
        np.testing.assert_allclose(hits.scores[0], exact[0, best[0]], atol=1e-4)  # IP of unit vectors = cosine
        assert hits.ids.dtype == np.int64 and hits.occluded == [None] * 10
        assert len(store.nearest(probes[0], QUERY_LIMIT + 10)) == len(gallery)  # capped at Milvus' topk limit


def test_urls_and_errors_name_the_gallery_without_the_password(tmp_path, monkeypatch):
    from conftest import free_port

    url = f"milvus://admin:s3cret@127.0.0.1:{free_port()}/faces"
    with pytest.raises(DataError, match="cannot reach the Milvus server") as err:
        MilvusStore(url, timeout=2)
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"milvus://admin@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/faces")
    with pytest.raises(ConfigError, match="collection name"):
        MilvusStore("milvus://localhost:19530/no-dashes")
    with pytest.raises(ConfigError, match="end in .db"):
        MilvusStore(f"milvus-lite://{tmp_path}/g.sqlite")
    (tmp_path / "plain.db").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(DataError, match="is a file"):
        MilvusStore(f"milvus-lite://{tmp_path}/plain.db")
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(ConfigError, match=r"pip install 'fromface\[milvus\]' milvus-lite"):
        MilvusStore(f"milvus-lite://{tmp_path}/g.db")
    with pytest.raises(ConfigError, match=r"pip install 'fromface\[milvus\]'$"):
        MilvusStore(url)

