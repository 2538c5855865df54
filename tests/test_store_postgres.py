"""What is particular to the PostgreSQL + pgvector gallery store, on a real server (the ``postgres_url`` fixture: a
fresh database per test): one-line errors that never show a password, read-only roles and sessions, the HNSW
index and its iterative scans, transactions and the advisory lock across processes, bulk COPY. The behaviour every
store shares (enrol, add, remove, top-k, ...) is tested over all backends in test_stores.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest

from conftest import free_port
from fromface.errors import AlreadyEnrolledError, ConfigError, DataError
from fromface.storage import redact
from fromface.storage.base import Template, read_only_error
from fromface.storage.postgres import NEAREST_SQL, SCHEMA_VERSION, PostgresStore, qualified

PASSWORD = "Sup3r-Secret-pw"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    e = rng.standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def person(name: str, embs: np.ndarray, tag: str | None = None, occluded: bool | None = None):
    """(name, [(embedding, Template)...]) with digests ``{tag or name}-{k}``."""
    return name, [(e, Template(e, occluded=occluded, source=f"{name}/{k}.jpg", digest=f"{tag or name}-{k}"))
                  for k, e in enumerate(embs)]


def with_url(url: str, user: str | None = None, options: str | None = None) -> str:
    """``url`` as another (password-less, trust-authenticated) user and/or with libpq ``options``."""
    parts = urlsplit(url)
    netloc = f"{user}@{parts.netloc.rsplit('@', 1)[-1]}" if user else parts.netloc
    query = parts.query + (f"&options={options}" if options else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def one_line(exc: pytest.ExceptionInfo, location: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{location}: "), message
    return message


def fromface_tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'fromface%'")}


# ---------------------------------------------------------------------------------------------- errors
def test_unreachable_server_is_one_line_without_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "Env-Secret-pw")
    for url in (f"postgresql://fromface:{PASSWORD}@127.0.0.1:{free_port()}/gallery",
                f"postgresql://fromface:{PASSWORD}@/gallery?host={tmp_path}",  # a socket folder with no server
                f"postgresql://fromface@127.0.0.1:{free_port()}/gallery?password={PASSWORD}"):
        with pytest.raises(DataError) as exc:
            PostgresStore(url, timeout=3)
        message = one_line(exc, redact(url))
        assert "cannot connect to the server" in message
        assert PASSWORD not in message and "Env-Secret-pw" not in message
    with pytest.raises(ConfigError) as exc:  # a URL even urlsplit refuses: still no password
        PostgresStore(f"postgresql://fromface:{PASSWORD}@[bad/gallery", timeout=3)
    assert PASSWORD not in str(exc.value) and "\n" not in str(exc.value)


def test_missing_driver_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` does when it is not installed
    url = f"postgresql://fromface:{PASSWORD}@db.example/gallery"
    with pytest.raises(ConfigError) as exc:
        PostgresStore(url)
    assert one_line(exc, "postgresql://fromface@db.example/gallery").endswith("pip install 'fromface[postgres]'")


def test_missing_database(postgres_server):
    url = urlunsplit(urlsplit(postgres_server)._replace(path="/no_such_gallery_db"))
    with pytest.raises(DataError) as exc:
        PostgresStore(url)
    message = one_line(exc, redact(url))
    assert "'no_such_gallery_db' does not exist" in message and "createdb" in message


def test_read_only_open_of_an_empty_database_creates_nothing(postgres_url):
    with pytest.raises(DataError) as exc:
        PostgresStore(postgres_url, read_only=True)
    assert "gallery not found" in one_line(exc, redact(postgres_url))
    assert fromface_tables(postgres_url) == set()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0] == 0


def test_read_only_store_refuses_writes_but_reads(postgres_url):
    rng = np.random.default_rng(0)
    with PostgresStore(postgres_url) as store:
        assert store.write([person("ann", unit(rng, 2, 16))], 16, "m:1", None, "new") == 2
    with PostgresStore(postgres_url, read_only=True) as ro:
        expected = str(read_only_error(ro.location))
        with pytest.raises(DataError, match=re.escape(expected)):
            ro.write([person("bob", unit(rng, 1, 16))], 16, "m:1", None, "new")
        with pytest.raises(DataError, match=re.escape(expected)):
            ro.remove("ann")
        assert ro.counts() == {"ann": 2} and ro.nearest(unit(rng, 1, 16)[0], 5).names == ["ann", "ann"]


def test_select_only_role_gets_a_permission_error_not_a_traceback(postgres_url):
    rng = np.random.default_rng(1)
    with PostgresStore(postgres_url) as store:
        store.write([person("ann", unit(rng, 2, 16))], 16, "m:1", None, "new")
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    url = with_url(postgres_url, user=role)
    try:
        with PostgresStore(url) as store:  # read-write open: nothing to create, so it opens
            assert store.counts() == {"ann": 2}
            with pytest.raises(DataError) as exc:
                store.write([person("bob", unit(rng, 1, 16))], 16, "m:1", None, "new")
            message = one_line(exc, redact(url))
            assert "permission denied" in message and "read-only for this role" in message
            with pytest.raises(DataError, match="permission denied"):
                store.remove("ann")
            assert store.counts() == {"ann": 2}  # the session still works after the refused transactions
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_role_that_may_not_enable_pgvector_is_told_to_ask_an_admin(postgres_url):
    role = f"owner_{uuid.uuid4().hex[:8]}"
    db = urlsplit(postgres_url).path.lstrip("/")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")  # not a superuser: pgvector is not a trusted extension
        conn.execute(f"ALTER DATABASE {db} OWNER TO {role}")  # may create tables, not the extension
    url = with_url(postgres_url, user=role)
    with pytest.raises(DataError) as exc:
        PostgresStore(url)
    assert "`CREATE EXTENSION vector`" in one_line(exc, redact(url))
    assert fromface_tables(postgres_url) == set()


def test_newer_schema_version_is_refused(postgres_url):
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE fromface_schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    for read_only in (False, True):
        with pytest.raises(DataError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
            PostgresStore(postgres_url, read_only=read_only)


def test_gallery_in_its_own_schema_finds_pgvector_in_public(postgres_url):
    PostgresStore(postgres_url).close()  # enables pgvector in public
    url = with_url(postgres_url, options="-csearch_path%3Dgal")
    with pytest.raises(DataError, match="no schema to create the gallery in"):
        PostgresStore(url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA gal")
    rng = np.random.default_rng(2)
    with PostgresStore(url) as store:
        assert store.name.endswith(".gal")
        store.write([person("ann", unit(rng, 3, 8))], 8, "m:1", None, "new")
        assert store.nearest(unit(rng, 1, 8)[0], 2).names == ["ann", "ann"]
    with psycopg.connect(postgres_url) as conn:
        schemas = {r[0] for r in conn.execute("SELECT schemaname FROM pg_tables WHERE tablename = "
                                              "'fromface_templates'")}
    assert schemas == {"gal"}


def test_a_lost_connection_is_reported_once_then_reopened(postgres_url):
    rng = np.random.default_rng(8)
    with PostgresStore(postgres_url) as store:
        store.write([person("ann", unit(rng, 1, 8))], 8, "m:1", None, "new")
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # the server drops the store's session
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                          "AND pid <> pg_backend_pid()")
        with pytest.raises(DataError) as exc:
            store.counts()
        assert "lost the connection to the server" in one_line(exc, redact(postgres_url))
        assert store.counts() == {"ann": 1}  # a service keeps working after a server restart


def test_a_writer_waits_for_the_lock_at_most_timeout_seconds(postgres_url):
    from fromface.storage.postgres import LOCK_KEY

    rng = np.random.default_rng(9)
    with PostgresStore(postgres_url, timeout=1) as store:
        store.write([person("ann", unit(rng, 1, 8))], 8, "m:1", None, "new")
        with psycopg.connect(postgres_url) as other:  # another writer's transaction, still open
            other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            start = time.monotonic()
            with pytest.raises(DataError, match="write lock for more than 1 s"):
                store.write([person("bob", unit(rng, 1, 8))], 8, "m:1", None, "new")
            assert time.monotonic() - start < 10
            assert store.nearest(unit(rng, 1, 8)[0], 5).names == ["ann"]  # readers do not wait
        assert store.write([person("bob", unit(rng, 1, 8))], 8, "m:1", None, "new") == 1


# ---------------------------------------------------------------------------------------------- search
def test_hnsw_index_is_created_by_the_first_enrolment_and_used(postgres_url):
    rng = np.random.default_rng(3)
    with PostgresStore(postgres_url) as store:
        assert "fromface_templates" not in fromface_tables(postgres_url)  # its size is not known yet
        store.write([person(f"p{k}", unit(rng, 2, 32)) for k in range(50)], 32, "m:1", None, "new")
    with psycopg.connect(postgres_url) as conn:
        defs = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'fromface_templates'")]
        assert any("USING hnsw (embedding vector_cosine_ops)" in d for d in defs), defs
        conn.execute("SET enable_seqscan = off")
        from pgvector.psycopg import register_vector

        register_vector(conn)
        sql = "EXPLAIN " + qualified(NEAREST_SQL.format(count=10), "public")
        plan = "\n".join(r[0] for r in conn.execute(sql, {"q": unit(rng, 1, 32)[0]}))
    assert "Index Scan using fromface_templates_embedding" in plan, plan


def test_nearest_agrees_with_exact_search_and_returns_more_than_ef_hits(postgres_url):
    rng = np.random.default_rng(4)
    embs = unit(rng, 3000, 64)
    # no sequential scans in the store's session: a table this small would be searched exactly otherwise
    url = with_url(postgres_url, options="-cenable_seqscan%3Doff")
    with PostgresStore(url) as store:
        # a bulk-built graph (first enrolment) and rows inserted into it (the second)
        store.write([person(f"p{k}", embs[2 * k:2 * k + 2]) for k in range(1000)], 64, "m:1", None, "new")
        store.write([person(f"p{k}", embs[k + 1000:k + 1001]) for k in range(1000, 2000)], 64, "m:1", None, "new")
        probes = unit(rng, 100, 64)
        exact = probes @ embs.T
        agree = 0
        for probe, scores in zip(probes, exact):
            hits = store.nearest(probe, 1)
            agree += int(hits.ids[0] == np.argmax(scores) + 1)  # bigserial ids: row k has id k + 1
            assert hits.scores[0] == pytest.approx(scores[hits.ids[0] - 1], abs=1e-5)
        assert agree >= 95, f"{agree}/100 probes found their exact nearest template"
        hits = store.nearest(probes[0], 1500)  # beyond hnsw.ef_search's 1000: an iterative scan
        assert len(hits) == 1500 == len(set(hits.ids.tolist()))
        assert np.all(np.diff(hits.scores) <= 0)
        top = set((np.argsort(-exact[0])[:1500] + 1).tolist())
        assert len(top & set(hits.ids.tolist())) >= 0.9 * 1500
        assert hits.occluded[0] is None and hits.names[0].startswith("p")


# ---------------------------------------------------------------------------------------------- transactions
def test_a_refused_person_leaves_nothing_of_the_call(postgres_url):
    rng = np.random.default_rng(5)
    with PostgresStore(postgres_url) as store:
        # the very first write fails inside its transaction (the same name twice in mode new): the meta it
        # recorded and the templates table it created go too
        with pytest.raises(AlreadyEnrolledError):
            store.write([person("ann", unit(rng, 1, 16)), person("ann", unit(rng, 1, 16), tag="x")], 16, "m:1",
                        None, "new")
        assert store.meta() == {} and "fromface_templates" not in fromface_tables(postgres_url)
        store.write([person("bob", unit(rng, 1, 16))], 16, "m:1", None, "new")
        with pytest.raises(AlreadyEnrolledError):
            store.write([person("cat", unit(rng, 2, 16)), person("bob", unit(rng, 1, 16), tag="y")], 16, "m:1",
                        None, "new")
        assert store.template_count("cat") is None and len(store) == 1 and store.known_digests(["cat-0"]) == {}
        assert store.write([person("cat", unit(rng, 2, 16))], 16, "m:1", None, "new") == 2


_WORKER = """
import json, sys
sys.path.insert(0, {src!r})
import numpy as np
from fromface.errors import AlreadyEnrolledError
from fromface.storage.base import Template
from fromface.storage.postgres import PostgresStore
url, tag = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(ord(tag))
store = PostgresStore(url)
print("ready", flush=True)
sys.stdin.readline()  # both processes start together
def person(name, digest):
    e = rng.standard_normal((2, 16)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return name, [(v, Template(v, digest=f"{{digest}}-{{k}}")) for k, v in enumerate(e)]
added, shared = 0, "refused"
for k in range(20):
    added += store.write([person(f"{{tag}}-{{k}}", f"{{tag}}-{{k}}")], 16, "m:1", None, "new")
    if k == 10:
        try:  # both processes enrol this name with the same images at about the same time
            added += store.write([person("shared", "shared")], 16, "m:1", None, "new")
            shared = "enrolled"
        except AlreadyEnrolledError:
            pass
print(json.dumps({{"added": added, "shared": shared}}))
"""


def test_two_processes_enrolling_at_once_lose_nothing(postgres_url):
    PostgresStore(postgres_url).close()  # the tables exist; the first enrolment's DDL still races below
    code = _WORKER.format(src=SRC)
    procs = [subprocess.Popen([sys.executable, "-c", code, postgres_url, tag], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)[1][-2000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert sorted(r["shared"] for r in results) == ["enrolled", "refused"]
    with PostgresStore(postgres_url, read_only=True) as store:
        counts = store.counts()
        assert counts == {**{f"{t}-{k}": 2 for t in "ab" for k in range(20)}, "shared": 2}
        assert len(store) == 82 == sum(r["added"] for r in results)


@pytest.mark.parametrize("other_makes", ["pgvector", "the gallery"])
def test_a_writer_that_connected_before_another_enabled_pgvector_can_still_write(postgres_url, monkeypatch,
                                                                                 other_makes):
    # Processes opening a fresh database at once: this one connects while pgvector is not there yet; another
    # process enables it (or makes the whole gallery, so this open creates nothing) before this one goes on.
    # Found in CI as a KeyError 'vector' from the COPY of the first enrolment.
    original, others = PostgresStore._register_vector, []

    def then_another_process_steps_in(self, conn):
        found = original(self, conn)
        if not found and not others:
            others.append(other_makes)
            if other_makes == "pgvector":
                with psycopg.connect(postgres_url, autocommit=True) as other:
                    other.execute("CREATE EXTENSION IF NOT EXISTS vector")
            else:
                PostgresStore(postgres_url).close()
        return found

    monkeypatch.setattr(PostgresStore, "_register_vector", then_another_process_steps_in)
    rng = np.random.default_rng(0)
    with PostgresStore(postgres_url) as store:
        assert others == [other_makes]
        assert store.write([person("late", unit(rng, 2, 16))], 16, "m:1", None, "new") == 2
        assert store.counts() == {"late": 2}


def test_threads_share_one_store(postgres_url):
    rng = np.random.default_rng(6)
    embs = unit(rng, 40, 16)
    errors: list[BaseException] = []
    with PostgresStore(postgres_url) as store:
        store.write([person("seed", embs[:1])], 16, "m:1", None, "new")

        def work(t: int) -> None:
            try:
                for k in range(5):
                    store.write([person(f"t{t}-{k}", embs[8 * t + k:8 * t + k + 1])], 16, "m:1", None, "new")
                    assert len(store.search(embs[8 * t + k], 3)) >= 1
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert len(store) == 21 and len(store.counts()) == 21


# ---------------------------------------------------------------------------------------------- bulk
def test_bulk_write_of_5000_identities(postgres_url):
    rng = np.random.default_rng(7)
    embs = unit(rng, 10_000, 32)
    people = [person(f"id{k:05d}", embs[2 * k:2 * k + 2], occluded=k % 2 == 0) for k in range(5000)]
    with PostgresStore(postgres_url) as store:
        assert store.write(people, 32, "m:1", "bench", "new") == 10_000
        assert len(store) == 10_000
        counts = store.counts()
        assert len(counts) == 5000 and set(counts.values()) == {2}
        assert store.known_digests(["id04999-1", "nope"]) == {"id04999-1": "id04999"}
        assert store.write(people, 32, "m:1", "bench", "add") == 0  # every image is there already
        assert len(store) == 10_000
        hits = store.nearest(embs[9999], 1)
        assert hits.names == ["id04999"] and hits.occluded == [False]
        assert store.remove("id04999") == 2 and store.template_count("id04999") is None and len(store) == 9998


def hnsw_indexes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE indexdef LIKE '%USING hnsw%'")]


def test_a_bulk_load_builds_the_index_once_at_the_end(postgres_url):
    rng = np.random.default_rng(11)
    embs = unit(rng, 1_200, 32)
    store = PostgresStore(postgres_url)
    with store.bulk(1_000):
        store.write([person(f"a{i:03d}", embs[2 * i:2 * i + 2], tag=f"a{i}") for i in range(250)], 32, "m", None,
                    "new")
        assert hnsw_indexes(postgres_url) == []  # the first enrolment of a bulk load builds no index yet
        store.write([person(f"b{i:03d}", embs[500 + 2 * i:502 + 2 * i], tag=f"b{i}") for i in range(250)], 32, "m",
                    None, "new")
        assert store.search(embs[7], 1).names == ["a003"]  # searched exactly meanwhile
    assert hnsw_indexes(postgres_url) == ["fromface_templates_embedding"] and "bulk_load" not in store.meta()
    with store.bulk(10):  # a small load into a big gallery keeps the index and adds to it
        assert hnsw_indexes(postgres_url) == ["fromface_templates_embedding"]
        store.write([person("c", embs[1_000:1_002])], 32, "m", None, "new")
    with store.bulk(1_000):  # a load of more than a quarter of the gallery drops it and builds it again
        assert hnsw_indexes(postgres_url) == []
        store.write([person(f"d{i:03d}", embs[1_002 + 2 * i:1_004 + 2 * i], tag=f"d{i}") for i in range(99)], 32,
                    "m", None, "new")
    assert hnsw_indexes(postgres_url) == ["fromface_templates_embedding"] and len(store) == 1_200
    store.close()


KILLED_LOAD = """
import os, sys
import numpy as np
sys.path.insert(0, {src!r})
from fromface.storage.base import Template
from fromface.storage.postgres import PostgresStore
store = PostgresStore(sys.argv[1])
load = store.bulk(100)  # held: a dropped context manager would end the load
load.__enter__()
emb = np.eye(16, dtype=np.float32)[:2]
store.write([("ann", [(e, Template(e)) for e in emb])], 16, "m", None, "new")
os._exit(0)  # dies inside the load: no index is built, the heartbeat stays
"""


def test_the_index_of_a_killed_bulk_load_is_built_by_a_later_write(postgres_url, tmp_path, monkeypatch):
    import fromface.storage.postgres as pg

    script = tmp_path / "load.py"
    script.write_text(KILLED_LOAD.format(src=SRC))
    subprocess.run([sys.executable, str(script), postgres_url], check=True, timeout=60)
    assert hnsw_indexes(postgres_url) == []
    embs = unit(np.random.default_rng(12), 4, 16)
    other = PostgresStore(postgres_url)
    other.write([person("bob", embs[:2])], 16, "m", None, "new")
    assert hnsw_indexes(postgres_url) == []  # the load's heartbeat is fresh: the index is left to it
    monkeypatch.setattr(pg, "BULK_STALE", 0.0)
    other.write([person("cy", embs[2:])], 16, "m", None, "new")
    assert hnsw_indexes(postgres_url) == ["fromface_templates_embedding"]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM fromface_meta WHERE key = 'bulk_load'").fetchone()[0] == 0
    assert other.counts() == {"ann": 2, "bob": 2, "cy": 2}
    other.close()
