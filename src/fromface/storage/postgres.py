"""A gallery in PostgreSQL with pgvector: ``postgresql://user@host:port/db`` (``pip install 'fromface[postgres]'``).

Four tables in the connection's current schema (``options=-csearch_path=NAME`` in the URL chooses another):
``fromface_schema_version``, ``fromface_meta``, ``fromface_identities`` and ``fromface_templates``, whose
``embedding vector(D)`` column has an HNSW index for cosine search. The size ``D`` is known only at the first
enrolment, so the templates table and its indexes are created inside that enrolment's transaction (DDL is
transactional in PostgreSQL: a failed first enrolment leaves no table behind).

Every write is one transaction that starts by taking a transaction-level advisory lock (:data:`LOCK_KEY`), so
writers of all processes and hosts take turns: the first-enrolment DDL, the "already enrolled" check of
``mode="new"`` and the digest de-duplication see no other writer in between, and a process killed half-way
leaves nothing (the server rolls its transaction back). Readers are never blocked (MVCC).

Credentials come from the URL or libpq's own environment (``PGPASSWORD``, ``PGPASSFILE``, ``PGHOST``,
``PGUSER``, ...), read by libpq itself; messages name the gallery by its URL without the password, and the
server's or libpq's text is scrubbed of it too. ``read_only=True`` makes the session read-only
(``default_transaction_read_only``) and never creates or alters anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote

import numpy as np

from fromface.errors import ConfigError, DataError
from fromface.storage.base import (
    Hits,
    Person,
    Store,
    Template,
    check_mode,
    model_meta,
    read_only_error,
    refuse_existing,
)
from fromface.storage.urls import redact

SCHEMA_VERSION = 1
#: The advisory lock every fromface writer of a database takes for the length of its transaction: the ASCII bytes
#: of "fromface" as a signed 64-bit integer (0x66726f6d66616365; fits, the first byte is below 0x80). Advisory locks
#: are per database, so galleries in different databases never wait for each other; galleries in two schemas of
#: one database share it (their writers take turns, which costs little and keeps one key).
LOCK_KEY = int.from_bytes(b"fromface", "big")
#: HNSW graph parameters. m=16, ef_construction=64 (pgvector's defaults): inserting a template into the graph is
#: what bounds bulk enrolment (the COPY itself is ~100x faster), and m=32/ef_construction=80 made inserts 4.5x
#: slower here (150 vs 680 templates/s, 128-d) for a recall that a larger ef_search buys back at query time.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
#: hnsw.ef_search used when fewer neighbours are asked for (see PostgresStore.ef_search).
EF_SEARCH = 400
EF_SEARCH_MAX = 1000  # pgvector's upper limit for hnsw.ef_search
#: Tuples an iterative scan may visit: pgvector's default 20,000 returned 4,000 hits of 100,000 templates (and
#: 400,000 gave 20,000 hits); 20 a hit asked leaves room.
SCAN_TUPLES_PER_HIT = 20
_DIGEST_CHUNK = 5000
#: Bulk loads (:meth:`PostgresStore.bulk`): the metadata key of a load's heartbeat, the seconds after which a
#: heartbeat is a killed load's, the share of the gallery a load must add for the index to be rebuilt, and the
#: memory the build may use (a graph that does not fit is built far slower; 1M 128-d templates need about 0.8 GB).
BULK_MARKER = "bulk_load"
BULK_STALE = 3600.0
BULK_REBUILD_SHARE = 0.25
BUILD_MEMORY = "1GB"

_BASE_TABLES = ("fromface_schema_version", "fromface_meta", "fromface_identities")
_CREATE_BASE = {
    "fromface_schema_version": "CREATE TABLE fromface_schema_version (version integer NOT NULL)",
    "fromface_meta": "CREATE TABLE fromface_meta (key text PRIMARY KEY, value text NOT NULL)",
    "fromface_identities": "CREATE TABLE fromface_identities (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, "
                           "created double precision NOT NULL)",
}
_CREATE_TEMPLATES = (
    "CREATE TABLE fromface_templates (id bigserial PRIMARY KEY, "
    "identity_id bigint NOT NULL REFERENCES fromface_identities(id) ON DELETE CASCADE, "
    "embedding vector({dim}) NOT NULL, occluded boolean, pattern integer, visible_fraction real, source text, "
    "created double precision NOT NULL, digest text)",
    "CREATE INDEX fromface_templates_identity ON fromface_templates (identity_id)",
    "CREATE INDEX fromface_templates_digest ON fromface_templates (digest)",
)
#: Built after the first enrolment's rows are copied in (same transaction): pgvector's bulk build is about twice
#: as fast as inserting the same rows into an existing graph.
_CREATE_HNSW = (f"CREATE INDEX fromface_templates_embedding ON fromface_templates USING hnsw "
                f"(embedding vector_cosine_ops) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")
_COPY_TEMPLATES = ("COPY fromface_templates (identity_id, embedding, occluded, pattern, visible_fraction, source, "
                   "created, digest) FROM STDIN (FORMAT BINARY)")
_COPY_TYPES = ["int8", "vector", "bool", "int4", "float4", "text", "float8", "text"]
#: The nearest-template query: an HNSW index scan (ORDER BY distance LIMIT n) materialised before the join, so
#: the planner plans the scan on its own; %(q)s is the query vector, {count} the count (a literal: a cached generic
#: plan for an unknown LIMIT could prefer an exact scan of the whole table). Tables are qualified when run.
NEAREST_SQL = ("WITH hits AS MATERIALIZED (SELECT id, identity_id, occluded, embedding <=> %(q)s AS distance "
               "FROM fromface_templates ORDER BY distance LIMIT {count}) "
               "SELECT h.id, h.distance, i.name, h.occluded FROM hits h "
               "JOIN fromface_identities i ON i.id = h.identity_id")


def _safe_location(url: str) -> str:
    """The URL without its password, also when it is malformed (``redact`` needs a URL ``urlsplit`` accepts)."""
    try:
        return redact(url)
    except ValueError:
        return _scrub_text(url, ())


def _scrub_text(text: str, secrets: Sequence[str]) -> str:
    """``text`` as one line without ``user:password@`` passwords, ``password=`` values or any of ``secrets``."""
    text = re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1@", text)
    text = re.sub(r"(?i)\b(password|sslpassword)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", r"\1=***", text)
    for secret in secrets:
        if secret and len(secret) >= 4:  # a shorter "secret" would blank out ordinary words
            text = text.replace(secret, "***")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_TABLE = re.compile(r"\bfromface_(schema_version|meta|identities|templates)\b")


def qualified(sql: str, schema: str) -> str:
    """``sql`` with the fromface tables (not their indexes) qualified by ``schema``: the gallery is the one in the
    connection's current schema, even where the search path goes on to other schemas (pgvector's, say)."""
    quoted = '"' + schema.replace('"', '""') + '"'
    return _TABLE.sub(lambda m: f"{quoted}.{m.group(0)}", sql)


class PostgresStore(Store):
    """A gallery in a PostgreSQL database with pgvector (see the module docstring). ``timeout`` (seconds) bounds
    connecting and waiting for another process's write; the store is safe to share between threads."""

    def __init__(self, url: str, read_only: bool = False, timeout: float = 60.0):
        self.location = _safe_location(url)
        self.read_only = bool(read_only)
        self.timeout = float(timeout)
        #: hnsw.ef_search: candidates the HNSW scan keeps (at least the count asked for, at most 1000). 400 gave
        #: recall@1 0.997 (300: 0.991, 200: 0.975) against exact search at 100,000 random 128-d templates, probed
        #: with 1,000 noisy copies of enrolled templates (cosine 0.7 to them, as another photo of an enrolled person
        #: is), ~10-15 ms a query on 2 busy cores. A plain attribute: benchmarks tune it per store.
        self.ef_search = EF_SEARCH
        try:
            import pgvector.psycopg  # noqa: F401
            import psycopg
        except ImportError:
            raise ConfigError(f"{self.location}: PostgreSQL galleries need psycopg and pgvector: "
                              "pip install 'fromface[postgres]'") from None
        self._psycopg = psycopg
        self._url = url
        self._lock = threading.RLock()
        self._closed = False
        self._dim: int | None = None
        self._has_templates = False
        self._iterative = True
        self._vector_types = False  # pgvector's types are registered on the connection
        self._bulk = False
        self._secrets = self._find_secrets(url)
        params = self._conninfo(url)
        self.name = params.get("dbname") or params.get("user") or "postgres"
        self._conn: Any = None
        self._schema = "public"
        self._conn = self._connect()
        try:
            self._open_schema()
            # pgvector may have been enabled after this session connected: by this open, or by another process
            # opening the fresh database at once (then this one finds a whole gallery and creates nothing)
            if not self._vector_types:
                with self._session("opening the gallery") as conn:
                    self._register_vector(conn)
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ connecting
    def _conninfo(self, url: str) -> dict[str, Any]:
        try:
            return self._psycopg.conninfo.conninfo_to_dict(url)
        except self._psycopg.ProgrammingError as exc:
            raise ConfigError(f"{self.location}: not a valid PostgreSQL URL ({self._scrub(exc)}); expected "
                              "postgresql://USER@HOST:PORT/DATABASE") from None

    def _find_secrets(self, url: str) -> list[str]:
        secrets = [os.environ.get("PGPASSWORD", "")]
        with contextlib.suppress(Exception):
            secrets.append(self._psycopg.conninfo.conninfo_to_dict(url).get("password") or "")
        match = re.search(r"://[^:/@\s]*:([^@\s]*)@", url)
        if match:
            secrets += [match.group(1), unquote(match.group(1))]
        return sorted({s for s in secrets if s}, key=len, reverse=True)

    def _scrub(self, exc: BaseException | str) -> str:
        text = str(exc).replace(self._url, self.location) if getattr(self, "_url", None) else str(exc)
        return _scrub_text(text, getattr(self, "_secrets", ())) or type(exc).__name__

    def _connect(self) -> Any:
        """A new autocommit session (transactions are explicit) set up for this store; one-line errors."""
        psycopg = self._psycopg
        params = self._conninfo(self._url)
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
            kwargs["connect_timeout"] = max(2, math.ceil(self.timeout))
        try:
            conn = psycopg.connect(self._url, **kwargs)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"{self.location}: not a valid PostgreSQL URL ({self._scrub(exc)})") from None
        except psycopg.Error as exc:
            raise self._connect_error(exc) from None
        try:
            self._setup_session(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_error(self, exc: BaseException) -> DataError:
        reason = self._scrub(exc)
        reason = re.sub(r"^connection (failed|is bad): ", "", reason)
        missing = re.search(r'database "([^"]*)" does not exist', reason)
        if missing:
            db = missing.group(1)
            return DataError(f"{self.location}: database {db!r} does not exist on the server; create it "
                             f"(createdb {db}, or CREATE DATABASE {db} as an admin) or fix the URL")
        if "authentication failed" in reason or re.search(r'role "[^"]*" does not exist', reason):
            return DataError(f"{self.location}: the server refused the login ({reason}); check the user and the "
                             "password (in the URL, PGPASSWORD or PGPASSFILE)")
        return DataError(f"{self.location}: cannot connect to the server ({reason}); is it running and reachable, "
                         "and is the URL right?")

    def _setup_session(self, conn: Any) -> None:
        """Session settings: the lock timeout, read-only mode, pgvector's schema on the search path, its types."""
        self._gucs: dict[str, str] = {}
        with self._errors("setting up the session", conn):
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(self.timeout * 1000))}ms",))
            if self.read_only:
                conn.execute("SET default_transaction_read_only = on")
            db, schema, path = conn.execute("SELECT current_database(), current_schema(), "
                                            "current_setting('search_path')").fetchone()
            if schema is None:
                what = "nothing can be read" if self.read_only else "no schema to create the gallery in"
                raise DataError(f"{self.location}: none of the schemas of search_path {path} exists ({what}); "
                                "CREATE SCHEMA it, or fix options=-csearch_path=... in the URL")
            self._schema = schema
            self.name = db if schema == "public" else f"{db}.{schema}"
            self._add_extension_schema(conn)
            self._register_vector(conn)

    def _add_extension_schema(self, conn: Any) -> None:
        """Put the schema pgvector is installed in on the search path when it is not (a gallery in another schema
        of a database whose pgvector lives in public): its type, operators and operator classes resolve."""
        row = conn.execute("SELECT n.nspname, n.nspname = ANY(current_schemas(false)) FROM pg_extension e "
                           "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()
        if row is not None and not row[1]:
            conn.execute("SELECT set_config('search_path', current_setting('search_path') || ', ' || "
                         "quote_ident(%s), false)", (row[0],))

    def _register_vector(self, conn: Any) -> bool:
        """pgvector's types for this session (when the extension is there), after checking its version."""
        self._vector_types = False
        if conn.execute("SELECT to_regtype('vector')").fetchone()[0] is None:
            return False
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        version = tuple(int(x) for x in re.findall(r"\d+", row[0] if row else "0.8")[:2])
        if version < (0, 5):
            raise DataError(f"{self.location}: the server's pgvector is version {row[0]}; fromface needs 0.5 or "
                            "later (HNSW indexes): ask an admin to run `ALTER EXTENSION vector UPDATE`")
        self._iterative = version >= (0, 8)  # hnsw.iterative_scan came with 0.8
        from pgvector.psycopg import register_vector

        register_vector(conn)
        self._vector_types = True
        return True

    @contextlib.contextmanager
    def _session(self, action: str, write: bool = False) -> Iterator[Any]:
        """The connection under the thread lock (a new one when the old was lost), psycopg errors turned into
        one-line :class:`DataError`; ``write``: inside one transaction holding the writers' advisory lock."""
        if write and self.read_only:
            raise read_only_error(self.location)
        with self._lock:
            if self._closed:
                raise DataError(f"{self.location}: the gallery was closed; open it again")
            if self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            with self._errors(action, conn, write):
                if not write:
                    yield conn
                    return
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                    yield conn

    @contextlib.contextmanager
    def _errors(self, action: str, conn: Any, write: bool = False) -> Iterator[None]:
        errors = self._psycopg.errors
        try:
            yield
        except errors.InsufficientPrivilege as exc:
            if write:
                raise DataError(f"{self.location}: permission denied while {action} ({self._scrub(exc)}): the "
                                "gallery is read-only for this role; open it read-only, or ask an admin to GRANT "
                                "INSERT, UPDATE, DELETE on the fromface_* tables, USAGE on their sequences") from None
            raise DataError(f"{self.location}: permission denied while {action} ({self._scrub(exc)}); ask an admin "
                            "to GRANT SELECT on the fromface_* tables to this role") from None
        except errors.ReadOnlySqlTransaction as exc:
            raise DataError(f"{self.location}: the database is read-only for this session ({self._scrub(exc)}); "
                            "nothing can be enrolled or removed: use a primary server, or open the gallery "
                            "read-only") from None
        except errors.LockNotAvailable:
            raise DataError(f"{self.location}: another process held the gallery's write lock for more than "
                            f"{self.timeout:g} s; try again later, or open it with a longer timeout") from None
        except errors.UndefinedTable as exc:
            raise DataError(f"{self.location}: gallery tables are missing ({self._scrub(exc)}); was the gallery "
                            "dropped while open?") from None
        except self._psycopg.Error as exc:
            if conn.closed:  # the next call connects again
                raise DataError(f"{self.location}: lost the connection to the server while {action} "
                                f"({self._scrub(exc)}); try again") from None
            raise DataError(f"{self.location}: the server failed while {action} ({self._scrub(exc)})") from None

    # ------------------------------------------------------------------ schema
    def _tables(self, conn: Any, names: Sequence[str]) -> set[str]:
        """Those of the tables ``names`` in the gallery's schema, read from pg_class with the statement's snapshot
        (so a table another writer committed before this one took the lock is seen; a cached name lookup might
        not see it yet)."""
        return {r[0] for r in conn.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
                                           "c.relnamespace WHERE n.nspname = %s AND c.relname = ANY(%s)",
                                           (self._schema, list(names)))}

    def _state(self, conn: Any) -> tuple[set[str], bool]:
        """(the fromface base tables in the gallery's schema, whether the templates table is there too)."""
        tables = self._tables(conn, (*_BASE_TABLES, "fromface_templates"))
        return tables - {"fromface_templates"}, "fromface_templates" in tables

    def _check_version(self, conn: Any) -> int | None:
        row = self._x(conn, "SELECT max(version) FROM fromface_schema_version").fetchone()
        version = row[0] if row else None
        if version is not None and version > SCHEMA_VERSION:
            raise DataError(f"{self.location}: gallery schema version {version} is newer than this fromface reads "
                            f"({SCHEMA_VERSION}); upgrade fromface")
        return version

    def _open_schema(self) -> None:
        with self._session("opening the gallery") as conn:
            tables, has_templates = self._state(conn)
            if self.read_only:
                if not tables:
                    raise DataError(f"{self.location}: gallery not found (no fromface tables in database "
                                    f"{self.name}); create it with `fromface enroll ... --db {self.location}`")
                missing = sorted(set(_BASE_TABLES) - tables)
                if missing:
                    raise DataError(f"{self.location}: not a complete fromface gallery (no {', '.join(missing)})")
                if self._check_version(conn) is None:
                    raise DataError(f"{self.location}: gallery has no schema version; open it read-write once")
                self._has_templates = has_templates
                return
            if len(tables) == len(_BASE_TABLES) and self._check_version(conn) is not None:
                self._has_templates = has_templates
                return  # nothing to create: no lock taken, so an open never waits for a long enrolment
        with self._session("creating the gallery tables", write=True) as conn:
            self._create_schema(conn)

    def _create_schema(self, conn: Any) -> None:
        errors = self._psycopg.errors
        if conn.execute("SELECT to_regtype('vector')").fetchone()[0] is None:
            try:
                with conn.transaction():  # a savepoint: the error below is reported, not the aborted transaction
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except errors.InsufficientPrivilege:
                raise DataError(f"{self.location}: the pgvector extension is not enabled in database "
                                f"{self.name.split('.')[0]} and this role may not enable it; ask an admin to run "
                                "`CREATE EXTENSION vector` in that database") from None
            except (errors.FeatureNotSupported, errors.UndefinedFile) as exc:
                raise DataError(f"{self.location}: the server has no pgvector extension ({self._scrub(exc)}); "
                                "install pgvector on the server (https://github.com/pgvector/pgvector), then run "
                                "`CREATE EXTENSION vector` in the database") from None
        tables, self._has_templates = self._state(conn)
        try:
            with conn.transaction():
                for table in _BASE_TABLES:
                    if table not in tables:
                        self._x(conn, _CREATE_BASE[table])
        except errors.InsufficientPrivilege as exc:
            raise DataError(f"{self.location}: this role may not create the gallery tables ({self._scrub(exc)}); "
                            "ask an admin to GRANT CREATE ON SCHEMA to it, or to open the gallery read-write "
                            "once as its owner") from None
        if self._check_version(conn) is None:
            self._x(conn, "INSERT INTO fromface_schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))

    def _x(self, conn: Any, sql: str, params: Any = None) -> Any:
        """``conn.execute`` of ``sql`` with the fromface tables qualified by the gallery's schema."""
        return conn.execute(qualified(sql, self._schema), params)

    def _templates_ready(self, conn: Any) -> bool:
        """Whether the templates table exists (it is created by the first enrolment, maybe by another process)."""
        if not self._has_templates:
            self._has_templates = bool(self._tables(conn, ["fromface_templates"]))
        return self._has_templates

    # ------------------------------------------------------------------ writing
    def write(self, people: Sequence[Person], dim: int, model: str | None, source: str | None, mode: str) -> int:
        """Store ``people`` in one transaction under the writers' advisory lock; returns the templates added."""
        check_mode(mode)
        if self.read_only:
            raise read_only_error(self.location)
        dim = int(dim)
        for name, rows in people:
            for emb, _ in rows:
                if np.asarray(emb).size != dim:
                    raise DataError(f"{self.location}: enrolment of {name!r}: a {np.asarray(emb).size}-d template "
                                    f"among {dim}-d ones")
        if not people:
            return 0
        try:
            return self._write(people, dim, model, source, mode)
        except BaseException:
            self._has_templates = False  # the templates table this write may have created is rolled back too
            raise

    def _write(self, people: Sequence[Person], dim: int, model: str | None, source: str | None, mode: str) -> int:
        with self._session("enrolling", write=True) as conn:
            meta = dict(self._x(conn, "SELECT key, value FROM fromface_meta").fetchall())
            marker = meta.pop(BULK_MARKER, None)
            for key, value in model_meta(self.location, meta, dim, model, source).items():
                self._x(conn, "INSERT INTO fromface_meta (key, value) VALUES (%s, %s)", (key, value))
            created = not self._templates_ready(conn)
            if created:
                for statement in _CREATE_TEMPLATES:
                    self._x(conn, statement.format(dim=dim))
            names = list(dict.fromkeys(name for name, _ in people))
            counts = dict(self._x(conn, "SELECT i.name, count(t.id) FROM fromface_identities i LEFT JOIN "
                                  "fromface_templates t ON t.identity_id = i.id WHERE i.name = ANY(%s) "
                                  "GROUP BY i.id, i.name", (names,)).fetchall())
            digests = list({t.digest for _, rows in people for _, t in rows if t.digest})
            seen = self._digests_in(conn, digests)
            plan: list[tuple[str, list]] = []
            for name, rows in people:
                refuse_existing(name, counts.get(name), len(rows), mode)
                new = []
                for emb, t in rows:
                    if t.digest:
                        if t.digest in seen:
                            continue
                        seen.add(t.digest)
                    new.append((emb, t))
                if new:  # every image already enrolled: no identity without templates
                    plan.append((name, new))
                    counts[name] = counts.get(name, 0) + len(new)
            added = self._insert(conn, plan) if plan else 0
            if self._bulk:  # the index is built when the bulk load ends; a heartbeat for other writers
                self._mark_bulk(conn)
            elif marker is None or time.time() - float(marker) > BULK_STALE:
                self._index(conn)  # the first enrolment, or after a bulk load that was killed
        self._dim = dim
        return added

    # ------------------------------------------------------------------ bulk loads
    @contextlib.contextmanager
    def bulk(self, templates: int) -> Iterator[None]:
        """A bulk load of about ``templates`` templates: pgvector grows an HNSW graph a template at a time about
        ten times slower than it builds one (here 340-560 against about 2,500 templates/s), so when the load adds
        at least a quarter of what the gallery holds, the index is dropped first and built once at the end.
        Searches meanwhile scan the table exactly (right, but slower). Other writers see the load's heartbeat in
        the metadata and leave the index to it; if the loading process is killed, the first write
        :data:`BULK_STALE` seconds after its last batch builds the index."""
        if self.read_only or self._bulk:
            yield
            return
        with self._session("starting a bulk load", write=True) as conn:
            self._mark_bulk(conn)
            if self._templates_ready(conn) and self._has_index(conn):
                held = self._x(conn, "SELECT reltuples FROM pg_class WHERE oid = 'fromface_templates'::regclass"
                               ).fetchone()[0]
                if templates >= BULK_REBUILD_SHARE * max(float(held), 1.0):
                    schema = self._psycopg.sql.Identifier(self._schema)
                    conn.execute(self._psycopg.sql.SQL("DROP INDEX {}.fromface_templates_embedding").format(schema))
        self._bulk = True
        try:
            yield
        finally:
            self._bulk = False
            with self._session("indexing after a bulk load", write=True) as conn:
                self._index(conn)

    def _mark_bulk(self, conn: Any) -> None:
        self._x(conn, "INSERT INTO fromface_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET "
                "value = EXCLUDED.value", (BULK_MARKER, repr(time.time())))

    def _has_index(self, conn: Any) -> bool:
        return bool(self._tables(conn, ["fromface_templates_embedding"]))

    def _index(self, conn: Any) -> None:
        """Build the HNSW index when the templates table has none (in the caller's transaction), and clear the
        bulk-load heartbeat."""
        self._x(conn, "DELETE FROM fromface_meta WHERE key = %s", (BULK_MARKER,))
        if not self._templates_ready(conn) or self._has_index(conn):
            return
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (BUILD_MEMORY,))
        self._x(conn, _CREATE_HNSW)
        self._x(conn, "ANALYZE fromface_templates")

    def _insert(self, conn: Any, plan: list[tuple[str, list]]) -> int:
        """Insert the identities of ``plan`` (those not yet there) and COPY their templates in; the count."""
        now = time.time()
        names = list(dict.fromkeys(name for name, _ in plan))
        self._x(conn, "INSERT INTO fromface_identities (name, created) SELECT n, %s FROM unnest(%s::text[]) AS n "
                     "ON CONFLICT (name) DO NOTHING", (now, names))
        ids = dict(self._x(conn, "SELECT name, id FROM fromface_identities WHERE name = ANY(%s)",
                           (names,)).fetchall())
        added = 0
        with conn.cursor().copy(qualified(_COPY_TEMPLATES, self._schema)) as copy:
            copy.set_types(_COPY_TYPES)
            for name, rows in plan:
                identity = ids[name]
                for emb, t in rows:
                    copy.write_row((identity, np.asarray(emb, dtype=np.float32).ravel(),
                                    None if t.occluded is None else bool(t.occluded),
                                    None if t.pattern is None else int(t.pattern),
                                    None if t.visible_fraction is None else float(t.visible_fraction),
                                    t.source, now, t.digest))
                    added += 1
        return added

    def _digests_in(self, conn: Any, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        if not digests or not self._templates_ready(conn):
            return found
        for start in range(0, len(digests), _DIGEST_CHUNK):
            chunk = list(digests[start:start + _DIGEST_CHUNK])
            found.update(r[0] for r in self._x(conn, "SELECT DISTINCT digest FROM fromface_templates "
                                                    "WHERE digest = ANY(%s)", (chunk,)))
        return found

    def remove(self, name: str) -> int:
        """Delete identity ``name`` and its templates in one transaction; the templates removed (0 if unknown)."""
        with self._session("removing an identity", write=True) as conn:
            row = self._x(conn, "SELECT id FROM fromface_identities WHERE name = %s", (name,)).fetchone()
            if row is None:
                return 0
            count = 0
            if self._templates_ready(conn):
                count = self._x(conn, "SELECT count(*) FROM fromface_templates WHERE identity_id = %s",
                                     (row[0],)).fetchone()[0]
            self._x(conn, "DELETE FROM fromface_identities WHERE id = %s", (row[0],))  # templates: by the cascade
        return int(count)

    # ------------------------------------------------------------------ reading
    def meta(self) -> dict[str, str]:
        with self._session("reading the gallery") as conn:
            return {k: v for k, v in self._x(conn, "SELECT key, value FROM fromface_meta") if k != BULK_MARKER}

    def dim(self) -> int | None:
        if self._dim is None:  # set once, never changes afterwards
            self._dim = super().dim()
        return self._dim

    def counts(self) -> dict[str, int]:
        with self._session("reading the gallery") as conn:
            if not self._templates_ready(conn):
                rows = self._x(conn, "SELECT name, 0 FROM fromface_identities").fetchall()
            else:
                rows = self._x(conn, "SELECT i.name, count(t.id) FROM fromface_identities i LEFT JOIN "
                                    "fromface_templates t ON t.identity_id = i.id GROUP BY i.id, i.name").fetchall()
        return {name: int(n) for name, n in sorted(rows)}

    def template_count(self, name: str) -> int | None:
        with self._session("reading the gallery") as conn:
            if not self._templates_ready(conn):
                row = self._x(conn, "SELECT 0 FROM fromface_identities WHERE name = %s", (name,)).fetchone()
            else:
                row = self._x(conn, "SELECT count(t.id) FROM fromface_identities i LEFT JOIN fromface_templates t "
                                   "ON t.identity_id = i.id WHERE i.name = %s GROUP BY i.id", (name,)).fetchone()
        return None if row is None else int(row[0])

    def __len__(self) -> int:
        with self._session("reading the gallery") as conn:
            if not self._templates_ready(conn):
                return 0
            return int(self._x(conn, "SELECT count(*) FROM fromface_templates").fetchone()[0])

    def known_digests(self, digests: Sequence[str]) -> dict[str, str]:
        digests = [d for d in dict.fromkeys(digests) if d]
        out: dict[str, str] = {}
        with self._session("reading the gallery") as conn:
            if not digests or not self._templates_ready(conn):
                return out
            for start in range(0, len(digests), _DIGEST_CHUNK):
                out.update(self._x(conn, "SELECT t.digest, i.name FROM fromface_templates t JOIN fromface_identities "
                                        "i ON i.id = t.identity_id WHERE t.digest = ANY(%s)",
                                        (digests[start:start + _DIGEST_CHUNK],)).fetchall())
        return out

    def people(self, batch: int = 1000) -> Iterator[list[Person]]:
        with self._session("reading the gallery") as conn:
            if not self._templates_ready(conn):
                return
            identities = self._x(conn, "SELECT id, name FROM fromface_identities ORDER BY id").fetchall()
        for start in range(0, len(identities), max(int(batch), 1)):
            chunk = dict(identities[start:start + max(int(batch), 1)])
            with self._session("reading the gallery") as conn:
                rows = self._x(conn, "SELECT identity_id, embedding, occluded, pattern, visible_fraction, source, "
                                     "digest FROM fromface_templates WHERE identity_id = ANY(%s) ORDER BY id",
                               (list(chunk),)).fetchall()
            found: dict[int, list] = {k: [] for k in chunk}
            for owner, emb, occluded, pattern, visible, source, digest in rows:
                emb = np.asarray(emb.to_numpy() if hasattr(emb, "to_numpy") else emb, dtype=np.float32)
                found[owner].append((emb, Template(emb, occluded, pattern, visible, source or "", digest)))
            yield [(chunk[k], templates) for k, templates in found.items() if templates]

    def nearest(self, query: np.ndarray, count: int) -> Hits:
        """The ``count`` templates closest to ``query`` by cosine through the HNSW index, best first.

        ``hnsw.ef_search`` is ``max(ef_search, count)`` up to pgvector's 1000; the scan is iterative
        (``hnsw.iterative_scan = relaxed_order``), so a count above what one HNSW pass returns (or a graph thinned by
        removals) still gets ``count`` hits; their slightly relaxed order is sorted here."""
        count = int(count)
        empty = Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), [], [])
        if count <= 0:
            return empty
        q = np.asarray(query, dtype=np.float32).ravel()
        with self._session("searching the gallery") as conn:
            if not self._templates_ready(conn):
                return empty
            dim = self.dim()
            if dim is not None and q.size != dim:
                raise ConfigError(f"{self.location}: probe is {q.size}-d but the gallery holds {dim}-d templates")
            settings = {"hnsw.ef_search": min(max(int(self.ef_search), count), EF_SEARCH_MAX)}
            if self._iterative:
                settings["hnsw.iterative_scan"] = "relaxed_order"
                settings["hnsw.max_scan_tuples"] = max(20_000, SCAN_TUPLES_PER_HIT * count)
            self._settings(conn, settings)
            rows = self._x(conn, NEAREST_SQL.format(count=count), {"q": q}).fetchall()
        if not rows:
            return empty
        rows.sort(key=lambda r: (r[1], r[0]))  # relaxed_order: an iterative scan's later batches may interleave
        return Hits(np.array([r[0] for r in rows], np.int64),
                    np.array([1.0 - r[1] for r in rows], np.float32),
                    [r[2] for r in rows], [r[3] for r in rows])

    def _settings(self, conn: Any, wanted: dict[str, Any]) -> None:
        """Session settings (one round trip, and only for those that change): a search is then one query."""
        change = {k: str(v) for k, v in wanted.items() if self._gucs.get(k) != str(v)}
        if change:
            conn.execute("SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(change)),
                         [x for kv in change.items() for x in kv])
            self._gucs.update(change)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._conn is not None:
                    self._conn.close()


__all__ = ["EF_SEARCH", "LOCK_KEY", "NEAREST_SQL", "SCHEMA_VERSION", "PostgresStore", "qualified"]
