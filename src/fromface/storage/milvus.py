"""A gallery in Milvus: a server or cluster (``milvus://host:port[/collection]``, ``milvus+https://`` for TLS) or a
local Milvus Lite file (``milvus-lite:///path/g.db[?collection=NAME]``), searched by Milvus' HNSW index.

Layout. Collection ``<name>`` (default ``fromface``) holds one row per template: a client-made random 63-bit ``id``
(never auto_id: deletes and recovery need ids known before the insert), the unit ``embedding`` (HNSW, metric IP,
which is the cosine for unit vectors), ``identity`` (the name), ``occluded`` (-1 unknown, 0, 1), ``pattern`` (-1
none), ``visible_fraction`` (-1 none), ``source``, ``digest`` ("" none), ``created`` and ``batch`` (the write that
stored it). It is made at the first enrolment, when the size of the embeddings is known. Collection ``<name>_meta``
holds key/value rows (Milvus needs a vector in every collection: a dummy 2-d one): the metadata (``dim``,
``model_id``, ``model``, ``source``, ``schema_version``), a change token and the journal below. Every call uses
Strong consistency, so a write is seen by the next read.

All or nothing without transactions: a journal in ``<name>_meta``.

- A write first stores ``pending:<batch>`` (JSON: started, heartbeat, the metadata keys it adds), then inserts its
  templates with ``batch=<batch>`` (at most :data:`INSERT_ROWS` a call), then commits by deleting that one row.
- A removal first stores ``removing:<id>`` (JSON with the name), deletes the identity's templates, then deletes
  that row.
- Readers drop templates whose batch is pending or whose identity is being removed. A search reads the journal
  after the search (a writer makes its journal row before any of its templates, so any template found belongs to a
  batch already in the journal or committed). Reads in several requests (counts, a long list of digests, ``len``)
  read the journal and a change token before and after, and read again when the token moved (a write started or
  committed, a removal ran, in between); after three tries they keep the last answer.
- Recovery, when a writer opens and before each write or removal: a journal row older than
  :data:`STALE_AFTER` (heartbeat refreshed every 30 s by its writer) is a dead writer's: its templates are deleted
  (or the removal finished), then the row. A Milvus Lite file is held by one process only, so there every journal
  row not written by this process is a dead writer's and is rolled back at once. A write that fails with an error
  rolls itself back on the spot.

Milvus Lite filters rows in Python, so every name or digest query is a pass over the whole gallery (a write's
checks would grow with it). Since one process holds a Lite file, that process keeps the committed names, counts and
digests in memory (:class:`_Committed`, read once in id ranges at first use, updated by each commit and removal;
``use_cache=False`` asks Milvus instead, as on a server). ``len`` uses it only once it exists, so a process that
only searches never reads it.

Limits. On a Milvus server, writers in different processes or machines are not serialised: each checks names,
digests and the model against what is committed when it starts, so two of them enrolling the same new name (or
image) at the same moment can both succeed; a writer whose clock is more than :data:`STALE_AFTER` off, or that
hangs that long, may be rolled back by another. Within one process writes to one gallery are serialised by a lock
(and reads go between a write's inserts, seeing none of them until it commits). Milvus Lite allows one process
per file; its search costs about 0.1 s per 100,000 indexed templates (0.3 s before Milvus Lite flushed them into
an indexed segment), and closing the last store of a file waits for Milvus Lite to flush and index what was
written (HNSW builds take about 45 s per 100,000 128-d templates on two cores). Milvus caps a search at
:data:`QUERY_LIMIT` results; queries are paged by primary key below that limit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

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
from fromface.storage.urls import local_path, redact

SCHEMA_VERSION = 1
DEFAULT_COLLECTION = "fromface"
DEFAULT_PORT = 19530
#: Milvus' limit on a search's topk and on a query's offset + limit.
QUERY_LIMIT = 16_384
#: Templates per insert call (fewer for large embeddings: a request stays under ~16 MB).
INSERT_ROWS = 5_000
#: Seconds after its last heartbeat that a server's journal row is taken for a dead writer's.
STALE_AFTER = 3600.0
HEARTBEAT = 30.0
#: HNSW graph: links per node and build-time candidates (recall against build time).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
#: Search-time candidates: recall@1 against exact search on 100,000 random 128-d unit vectors (M=32,
#: efConstruction=128): 1.000 at 1024 (300 probes through this store on Milvus Lite; 0.999 of 1,000 with FAISS'
#: HNSW alone), 0.967 at 512, 0.873 at 256. Real face embeddings are far easier than random vectors.
EF_SEARCH = 1024
#: Values in one ``in [...]`` filter.
IN_CHUNK = 1_000
_NAME_BYTES = 1024  # 200 characters of up to 4 UTF-8 bytes, with room
_SOURCE_BYTES = 4096
_DIGEST_BYTES = 256
_KEY_BYTES = 512
_VALUE_BYTES = 65_535
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,249}")
_TEMPLATE_FIELDS = {"id", "embedding", "identity", "occluded", "pattern", "visible_fraction", "source", "digest",
                    "created", "batch"}
_META_FIELDS = {"key", "value", "vec"}
_PENDING, _REMOVING, _TOKEN, _SCHEMA_KEY = "pending:", "removing:", "changed", "schema_version"
_INTERNAL_KEYS = {_TOKEN, _SCHEMA_KEY}

# Process-wide state shared by every store of this process.
_REGISTRY_LOCK = threading.Lock()
_ACTIVE: set[str] = set()  # journal keys this process is writing now: recovery leaves them alone
_WRITE_LOCKS: dict[str, threading.RLock] = {}  # one per gallery: writes of one process are serialised
_LITE_OWNERS: dict[str, int] = {}  # Milvus Lite files this module started a server for, and stores using them
_CACHES: dict[str, _Committed] = {}  # Milvus Lite galleries: what is committed, by gallery key


def quote(text: str) -> str:
    """``text`` as a string literal of a Milvus filter expression (backslashes, quotes, line breaks escaped)."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


def _in_list(values: Iterable) -> str:
    return "[" + ", ".join(quote(v) if isinstance(v, str) else str(int(v)) for v in values) + "]"


def _fit(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (never inside a character)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


class _Committed:
    """The committed identities and digests of a Milvus Lite gallery, in memory. Exact because one process holds a
    Milvus Lite file, and every write of that process to the gallery updates it when it commits; Milvus Lite
    itself filters rows in Python, so each name or digest query would cost a pass over the whole gallery."""

    def __init__(self, rows: Iterable[dict]):
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.digests: dict[str, str] = {}
        for row in rows:
            self.counts[str(row["identity"])] += 1
            if row["digest"]:
                self.digests[str(row["digest"])] = str(row["identity"])
        self.total = sum(self.counts.values())

    def add(self, plan: Sequence[tuple[str, np.ndarray, Any]]) -> None:
        with self.lock:
            for name, _, t in plan:
                self.counts[name] += 1
                if t.digest:
                    self.digests[t.digest] = name
            self.total += len(plan)

    def drop(self, name: str) -> None:
        with self.lock:
            self.total -= self.counts.pop(name, 0)
            for digest in [d for d, owner in self.digests.items() if owner == name]:
                del self.digests[digest]


@dataclass
class _State:
    """The ``<name>_meta`` collection as of one read."""

    meta: dict[str, str] = field(default_factory=dict)
    pending: dict[int, dict] = field(default_factory=dict)  # batch -> journal entry
    removing: dict[str, dict] = field(default_factory=dict)  # journal key -> entry (with "name")
    token: str | None = None
    schema: str | None = None

    @property
    def removing_names(self) -> set[str]:
        return {str(e.get("name")) for e in self.removing.values()}


def _hidden(states: Sequence[_State]) -> tuple[set[int], set[str]]:
    """(batches pending, names being removed) in any of ``states``."""
    batches = {b for s in states for b in s.pending}
    names = {n for s in states for n in s.removing_names}
    return batches, names


def _hidden_expr(batches: set[int], names: set[str], visible: bool = False) -> str:
    """A filter for the templates of ``batches`` or of ``names`` (``visible``: for all the others)."""
    test, join = ("not in", " and ") if visible else ("in", " or ")
    parts = [f"batch {test} {_in_list(sorted(batches))}"] if batches else []
    parts += [f"identity {test} {_in_list(sorted(names))}"] if names else []
    return join.join(parts)


def _visible_expr(batches: set[int], names: set[str]) -> str:
    return _hidden_expr(batches, names, visible=True)


def _pymilvus(location: str, lite: bool) -> Any:
    extra = " milvus-lite" if lite else ""
    try:
        import pymilvus
        if lite:
            import milvus_lite  # noqa: F401
    except ImportError:
        raise ConfigError(f"{location}: Milvus galleries need pymilvus: pip install 'fromface[milvus]'"
                          f"{extra}") from None
    return pymilvus


class MilvusStore(Store):
    """A gallery in a Milvus collection (see the module docstring). ``read_only=True`` never creates or changes
    anything; ``timeout`` (seconds) bounds every request (10 s at most to connect to a server). The token of a
    server is ``user:password`` from the URL, a lone ``user@`` (an API key), or ``MILVUS_TOKEN``.

    Attributes to tune: ``ef_search`` (HNSW candidates per search, at least the templates asked for: recall
    against time), ``use_cache`` (Milvus Lite: names, counts and digests from memory), ``query_page`` (rows per
    query page, at most :data:`QUERY_LIMIT`), ``stale_after`` (seconds before a server's journal row is taken for
    a dead writer's)."""

    def __init__(self, url: str, read_only: bool = False, timeout: float = 60.0):
        self.location = redact(url)
        self.read_only = bool(read_only)
        self.timeout = float(timeout)
        self.ef_search = EF_SEARCH
        self.query_page = QUERY_LIMIT
        self.stale_after = STALE_AFTER
        #: Milvus Lite: answer names, counts and digests from memory (see :class:`_Committed`)
        self.use_cache = url.lower().startswith("milvus-lite:")
        self._lock = threading.RLock()
        self._client: Any = None
        self._lite_key: str | None = None
        self._dim: int | None = None  # of the templates collection, once it is known to exist
        self._parse(url)
        self._meta_name = f"{self.name}_meta"
        self._pm = _pymilvus(self.location, self._lite is not None)
        self._errors = (self._pm.exceptions.MilvusException,)
        with _REGISTRY_LOCK:
            self._write_lock = _WRITE_LOCKS.setdefault(self._gallery_key, threading.RLock())
        self._connect()
        try:
            self._open_collections()
            if not self.read_only:
                with self._write_lock:
                    self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ connection
    def _parse(self, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self._lite: Path | None = None
        self._uri = self._token = ""
        if scheme == "milvus-lite":
            self._lite = local_path(url)
            params = dict(parse_qsl(parts.query, keep_blank_values=True))
            unknown = sorted(set(params) - {"collection"})
            if unknown:
                raise ConfigError(f"{self.location}: unknown parameter {', '.join(unknown)}; a Milvus Lite gallery "
                                  "is milvus-lite:///PATH.db[?collection=NAME]")
            if self._lite.suffix != ".db":
                raise ConfigError(f"{self.location}: a Milvus Lite file must end in .db (Milvus Lite's rule)")
            name = params.get("collection") or DEFAULT_COLLECTION
            self._gallery_key = f"lite:{os.path.abspath(self._lite)}:{name}"
        elif scheme in ("milvus", "milvus+https"):
            try:
                host, port = parts.hostname, parts.port or DEFAULT_PORT
            except ValueError:
                raise ConfigError(f"{self.location}: the port is not a number; use milvus://HOST:PORT") from None
            if not host:
                raise ConfigError(f"{self.location}: no server; use milvus://HOST:PORT[/COLLECTION]")
            path = parts.path.strip("/")
            if "/" in path or parts.query:
                raise ConfigError(f"{self.location}: use milvus://HOST:PORT[/COLLECTION] (one collection name, "
                                  "no parameters)")
            name = path or DEFAULT_COLLECTION
            host = f"[{host}]" if ":" in host else host
            self._uri = f"{'https' if scheme == 'milvus+https' else 'http'}://{host}:{port}"
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            self._token = f"{user}:{password}" if password else user or os.environ.get("MILVUS_TOKEN", "")
            self._gallery_key = f"server:{self._uri}:{name}"
        else:
            raise ConfigError(f"{self.location}: not a Milvus gallery URL; use milvus://HOST:PORT[/COLLECTION], "
                              "milvus+https://... or milvus-lite:///PATH.db")
        if not _COLLECTION_NAME.fullmatch(name):
            raise ConfigError(f"{self.location}: collection name {name!r} is not allowed; use letters, digits and "
                              "underscores, starting with a letter or underscore (at most 250)")
        self.name = name

    def _connect(self) -> None:
        client_cls = self._pm.MilvusClient
        if self._lite is None:
            try:
                self._client = client_cls(uri=self._uri, token=self._token, timeout=min(self.timeout, 10.0))
            except self._errors as exc:
                raise DataError(f"{self.location}: cannot reach the Milvus server ({_message(exc)}); is it running, "
                                "and are the address, port and token right?") from None
            return
        path = self._lite
        if path.is_file():
            raise DataError(f"{self.location}: {path} is a file; a Milvus Lite gallery is a folder Milvus Lite "
                            "makes (is this another kind of gallery? use its URL)")
        if self.read_only and not path.exists():
            raise DataError(f"{self.location}: gallery not found (create it by enrolling into it)")
        if not path.parent.is_dir():
            raise DataError(f"{self.location}: folder {path.parent} does not exist; create it first")
        key = os.path.abspath(path)
        from milvus_lite.server_manager import server_manager_instance as manager

        with _REGISTRY_LOCK:
            served = key in getattr(manager, "_servers", {})
            if not served and _locked_by_other(path):
                raise DataError(_in_use(self.location, path))
            try:
                # keepalive pings to an in-process server only earn a GOAWAY (too_many_pings) when idle
                self._client = client_cls(str(path), grpc_options={"grpc.keepalive_time_ms": 2**31 - 1,
                                                                   "grpc.keepalive_permit_without_calls": 0})
            except self._errors as exc:
                if _locked_by_other(path):
                    raise DataError(_in_use(self.location, path)) from None
                raise DataError(f"{self.location}: cannot open the Milvus Lite file ({_message(exc)})") from None
            if not served or key in _LITE_OWNERS:
                _LITE_OWNERS[key] = _LITE_OWNERS.get(key, 0) + 1
                self._lite_key = key

    def close(self) -> None:
        """Release the connection; the last store of a Milvus Lite file also releases the file (Milvus Lite
        flushes it and finishes its index first)."""
        with self._lock:
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            key, self._lite_key = self._lite_key, None
        if key is None:
            return
        with _REGISTRY_LOCK:
            _LITE_OWNERS[key] -= 1
            if _LITE_OWNERS[key] > 0:
                return
            del _LITE_OWNERS[key]
            for gallery in [g for g in _CACHES if g.startswith(f"lite:{key}:")]:
                del _CACHES[gallery]  # another process may change the file from now on
            from milvus_lite.server_manager import server_manager_instance as manager

            manager.release_server(key)

    def _call(self, action: str, method: str, *args, **kwargs) -> Any:
        """``client.method(*args, **kwargs)`` under the lock; a Milvus error becomes one DataError line."""
        with self._lock:
            if self._client is None:
                raise DataError(f"{self.location}: the gallery was closed")
            kwargs.setdefault("timeout", self.timeout)
            try:
                return getattr(self._client, method)(*args, **kwargs)
            except self._errors as exc:
                raise DataError(f"{self.location}: cannot {action} ({_message(exc)})") from None

    # ------------------------------------------------------------------ collections
    def _open_collections(self) -> None:
        has_meta = self._call("read the gallery", "has_collection", self._meta_name)
        has_templates = self._call("read the gallery", "has_collection", self.name)
        if has_templates and not has_meta:
            raise DataError(f"{self.location}: collection {self.name!r} belongs to another application (no "
                            f"{self._meta_name!r}); it was left untouched: use another collection name")
        if not has_meta:
            if self.read_only:
                raise DataError(f"{self.location}: gallery not found (no collection {self._meta_name!r}; create it "
                                "by enrolling into it)")
            self._create_meta()
        else:
            self._check_fields(self._meta_name, _META_FIELDS)
            self._ensure_loaded(self._meta_name)
        state = self._state()
        if state.schema is None and not self.read_only:
            self._put_meta({_SCHEMA_KEY: str(SCHEMA_VERSION)})
        elif state.schema is not None and state.schema != str(SCHEMA_VERSION):
            raise DataError(f"{self.location}: gallery schema version {state.schema}, this fromface reads "
                            f"{SCHEMA_VERSION}; use a matching fromface")
        if has_templates:
            self._dim = self._check_fields(self.name, _TEMPLATE_FIELDS)
            self._ensure_loaded(self.name)

    def _check_fields(self, collection: str, wanted: set[str]) -> int | None:
        """The collection's vector size, after refusing one without fromface's fields."""
        info = self._call("read the gallery", "describe_collection", collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        if not wanted <= set(fields):
            raise DataError(f"{self.location}: collection {collection!r} is not a fromface gallery's (fields "
                            f"{', '.join(sorted(fields)[:6])}); it was left untouched: use another collection name")
        vector = fields.get("embedding") or fields.get("vec")
        dim = (vector.get("params") or {}).get("dim")
        return int(dim) if dim is not None else None

    def _ensure_loaded(self, collection: str) -> None:
        state = self._call("read the gallery", "get_load_state", collection).get("state")
        if "NotLoad" in str(state):
            self._call("load the gallery", "load_collection", collection)

    def _create_meta(self) -> None:
        pm = self._pm
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", pm.DataType.VARCHAR, is_primary=True, max_length=_KEY_BYTES)
        schema.add_field("value", pm.DataType.VARCHAR, max_length=_VALUE_BYTES)
        schema.add_field("vec", pm.DataType.FLOAT_VECTOR, dim=2)
        index = pm.MilvusClient.prepare_index_params()
        index.add_index("vec", index_type="FLAT", metric_type="L2")
        self._create(self._meta_name, schema, index)

    def _create(self, collection: str, schema: Any, index: Any, optional: Sequence[str] = ()) -> None:
        """Create ``collection`` with the ``index`` params, try scalar indexes on the ``optional`` fields (where the
        server has them), and load it. Index creation does not wait (pymilvus polls every 0.5 s): the collection
        is empty."""
        pm = self._pm
        try:
            self._call("create the gallery", "create_collection", collection, schema=schema,
                       consistency_level="Strong")
        except DataError:
            if not self._call("read the gallery", "has_collection", collection):  # not made by another writer
                raise
            return
        self._call("index the gallery", "create_index", collection, index, sync=False)
        for name in optional:
            scalar = pm.MilvusClient.prepare_index_params()
            scalar.add_index(name, index_type="INVERTED")
            with contextlib.suppress(DataError):
                self._call("index the gallery", "create_index", collection, scalar, sync=False)
        self._call("load the gallery", "load_collection", collection)

    def _ensure_templates(self, dim: int) -> None:
        """The templates collection for ``dim``-d embeddings, made at the first enrolment."""
        if self._dim is None and self._call("read the gallery", "has_collection", self.name):
            self._dim = self._check_fields(self.name, _TEMPLATE_FIELDS)
        if self._dim is not None and self._dim != dim:
            if self._count("") or self._state().pending:
                raise ConfigError(f"{self.location}: collection {self.name!r} holds {self._dim}-d templates, got "
                                  f"{dim}-d embeddings; use a new gallery for another model")
            self._call("change the gallery", "drop_collection", self.name)  # empty, left by a rolled-back write
            self._dim = None
        if self._dim is not None:
            return
        pm = self._pm
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        schema.add_field("embedding", pm.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("identity", pm.DataType.VARCHAR, max_length=_NAME_BYTES)
        schema.add_field("occluded", pm.DataType.INT8)
        schema.add_field("pattern", pm.DataType.INT32)
        schema.add_field("visible_fraction", pm.DataType.FLOAT)
        schema.add_field("source", pm.DataType.VARCHAR, max_length=_SOURCE_BYTES)
        schema.add_field("digest", pm.DataType.VARCHAR, max_length=_DIGEST_BYTES)
        schema.add_field("created", pm.DataType.DOUBLE)
        schema.add_field("batch", pm.DataType.INT64)
        index = pm.MilvusClient.prepare_index_params()
        build = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        index.add_index("embedding", index_type="HNSW", metric_type="IP", params=build)
        if self._lite is not None:  # Milvus Lite reads them from a JSON "params" entry, which pymilvus 3 flattens
            index[0].get_index_configs()["params"] = dict(build)
        self._create(self.name, schema, index, optional=("identity", "digest", "batch"))
        self._dim = self._check_fields(self.name, _TEMPLATE_FIELDS)

    def _templates_exist(self) -> bool:
        if self._dim is None and self._call("read the gallery", "has_collection", self.name):
            self._dim = self._check_fields(self.name, _TEMPLATE_FIELDS)
            self._ensure_loaded(self.name)
        return self._dim is not None

    # ------------------------------------------------------------------ metadata and journal
    def _state(self) -> _State:
        rows = self._call("read the gallery", "query", self._meta_name, filter='key != ""',
                          output_fields=["key", "value"], limit=QUERY_LIMIT)
        state = _State()
        for row in rows:
            key, value = str(row["key"]), str(row["value"])
            if key.startswith((_PENDING, _REMOVING)):
                try:
                    entry = json.loads(value)
                    entry = entry if isinstance(entry, dict) else {}
                except ValueError:
                    entry = {}
                if key.startswith(_REMOVING):
                    state.removing[key] = entry
                else:
                    with contextlib.suppress(ValueError):
                        state.pending[int(key[len(_PENDING):])] = entry
            elif key == _TOKEN:
                state.token = value
            elif key == _SCHEMA_KEY:
                state.schema = value
            else:
                state.meta[key] = value
        return state

    def _put_meta(self, values: dict[str, str]) -> None:
        rows = [{"key": k, "value": _fit(str(v), _VALUE_BYTES), "vec": [0.0, 0.0]} for k, v in values.items()]
        self._call("write the gallery", "upsert", self._meta_name, rows)

    def _delete_meta(self, keys: Sequence[str]) -> None:
        if keys:
            self._call("write the gallery", "delete", self._meta_name, filter=f"key in {_in_list(keys)}")

    def _bump(self) -> None:
        """Tell readers reading in several requests that the gallery changed in between."""
        self._put_meta({_TOKEN: secrets.token_hex(8)})

    def _journal(self, key: str, entry: dict) -> None:
        self._put_meta({key: json.dumps(entry)})

    @contextlib.contextmanager
    def _active(self, key: str) -> Iterator[None]:
        with _REGISTRY_LOCK:
            _ACTIVE.add(key)
        try:
            yield
        finally:
            with _REGISTRY_LOCK:
                _ACTIVE.discard(key)

    def _recover(self) -> None:
        """Roll back the writes and finish the removals of dead writers (see the module docstring)."""
        state = self._state()
        now = time.time()
        with _REGISTRY_LOCK:
            active = set(_ACTIVE)

        def dead(key: str, entry: dict) -> bool:
            if key in active:
                return False
            last = entry.get("heartbeat", entry.get("started", 0))
            return self._lite is not None or not isinstance(last, (int, float)) or now - last > self.stale_after

        for batch, entry in state.pending.items():
            if dead(f"{_PENDING}{batch}", entry):
                self._rollback(batch, entry)
        for key, entry in state.removing.items():
            if dead(key, entry):
                self._finish_removal(key, entry)

    def _rollback(self, batch: int, entry: dict) -> None:
        """Delete the templates of ``batch`` and the metadata it added to an otherwise empty gallery, then its
        journal row (last: an interrupted rollback is done again)."""
        if self._templates_exist():
            self._call("roll back an interrupted enrolment", "delete", self.name, filter=f"batch == {int(batch)}")
        added = entry.get("meta")
        if isinstance(added, dict) and added and not (self._templates_exist() and self._count("")):
            current = self._state().meta
            self._delete_meta([k for k, v in added.items() if current.get(k) == v])
        self._delete_meta([f"{_PENDING}{batch}"])
        self._bump()

    def _finish_removal(self, key: str, entry: dict) -> None:
        name = entry.get("name")
        if isinstance(name, str) and self._templates_exist():
            self._call("remove an identity", "delete", self.name, filter=f"identity == {quote(name)}")
            cache = _CACHES.get(self._gallery_key)
            if cache is not None:
                cache.drop(name)
        self._delete_meta([key])
        self._bump()

    # ------------------------------------------------------------------ reading
    def _count(self, expr: str) -> int:
        rows = self._call("read the gallery", "query", self.name, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _query_all(self, expr: str, fields: Sequence[str]) -> list[dict]:
        """Every row matching ``expr``, in pages of :attr:`query_page` by ascending id (Milvus returns at most
        :data:`QUERY_LIMIT` rows a query)."""
        out: list[dict] = []
        last = -1
        page = max(1, min(int(self.query_page), QUERY_LIMIT))
        while True:
            cursor = f"id > {last}"
            rows = self._call("read the gallery", "query", self.name,
                              filter=f"({expr}) and {cursor}" if expr else cursor,
                              output_fields=list(fields), limit=page, iterator="True")
            out.extend(rows)
            if len(rows) < page:
                return out
            ids = [int(r["id"]) for r in rows]
            if any(b < a for a, b in zip(ids, ids[1:])):
                raise DataError(f"{self.location}: the server returned a page of rows out of id order; cannot page "
                                "through the collection (is pymilvus too new or too old for the server?)")
            last = ids[-1]

    def _consistent(self, read: Callable[[], list[dict]]) -> list[dict]:
        """``read()``'s rows without those of writes or removals in progress: the journal is read before and
        after, and everything read again when the change token moved in between (at most three times)."""
        for _ in range(3):
            before = self._state()
            rows = read()
            after = self._state()
            if before.token == after.token:
                break
        batches, names = _hidden((before, after))
        if not batches and not names:
            return rows
        return [r for r in rows if int(r["batch"]) not in batches and r["identity"] not in names]

    def _scan(self, fields: Sequence[str]) -> list[dict]:
        """Every row (Milvus Lite, which has no limit on a query: in id ranges of about 200,000 rows, without the
        sorting a page by id costs there)."""
        if self._lite is None:
            return self._query_all("", fields)
        parts = max(1, math.ceil(self._count("") / 200_000))
        step = -(-2**63 // parts)
        rows: list[dict] = []
        for k in range(parts):
            expr = f"id >= {k * step}" + (f" and id < {(k + 1) * step}" if k < parts - 1 else "")
            rows.extend(self._call("read the gallery", "query", self.name, filter=expr, output_fields=list(fields)))
        return rows

    def _committed(self) -> _Committed | None:
        """The in-memory view of a Milvus Lite gallery (built on first use by one pass over it), or None."""
        if not self.use_cache or self._lite is None:
            return None
        cache = _CACHES.get(self._gallery_key)
        if cache is None:
            with self._write_lock:  # no write of this process in between
                cache = _CACHES.get(self._gallery_key)
                if cache is None:
                    rows = self._consistent(lambda: self._scan(["identity", "digest", "batch"])) \
                        if self._templates_exist() else []
                    cache = _CACHES[self._gallery_key] = _Committed(rows)
        return cache

    def _counts_of(self, names: Sequence[str] | None) -> dict[str, int]:
        """Templates per identity, of ``names`` (None: all)."""
        cache = self._committed()
        if cache is not None:
            removing = self._state().removing_names  # a removal of this process holds the write lock till done
            with cache.lock:
                return {n: c for n, c in (cache.counts.items() if names is None else
                                          ((n, cache.counts[n]) for n in names if n in cache.counts))
                        if n not in removing}
        if not self._templates_exist():
            return {}
        if names is None:
            rows = self._consistent(lambda: self._query_all("", ["identity", "batch"]))
        else:
            unique = list(dict.fromkeys(names))
            rows = self._consistent(lambda: [r for k in range(0, len(unique), IN_CHUNK) for r in self._query_all(
                f"identity in {_in_list(unique[k:k + IN_CHUNK])}", ["identity", "batch"])])
        return dict(Counter(str(r["identity"]) for r in rows))

    def meta(self) -> dict[str, str]:
        return self._state().meta

    def counts(self) -> dict[str, int]:
        return dict(sorted(self._counts_of(None).items()))

    def template_count(self, name: str) -> int | None:
        return self._counts_of([name]).get(name)

    def __len__(self) -> int:
        cache = _CACHES.get(self._gallery_key) if self.use_cache else None
        if cache is not None:  # only when built already: a search-only process never needs it
            removing = self._state().removing_names
            with cache.lock:
                return cache.total - sum(cache.counts.get(n, 0) for n in removing)
        if not self._templates_exist():
            return 0
        for _ in range(3):
            before = self._state()
            batches, names = _hidden((before,))
            hidden = _hidden_expr(batches, names)
            first = self._count(hidden) if hidden else 0
            total = self._count("")
            second = self._count(hidden) if hidden else 0
            after = self._state()
            if before.token == after.token and first == second:
                return total - first
        return self._count(_visible_expr(*_hidden((before, after))))

    def known_digests(self, digests: Sequence[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(d for d in digests if d))
        cache = self._committed() if unique else None
        if cache is not None:
            removing = self._state().removing_names
            with cache.lock:
                return {d: cache.digests[d] for d in unique if d in cache.digests and cache.digests[d] not in removing}
        if not unique or not self._templates_exist():
            return {}
        rows = self._consistent(lambda: [r for k in range(0, len(unique), IN_CHUNK) for r in self._query_all(
            f"digest in {_in_list(unique[k:k + IN_CHUNK])}", ["digest", "identity", "batch"])])
        return {str(r["digest"]): str(r["identity"]) for r in rows}

    def people(self, batch: int = 1000) -> Iterator[list[Person]]:
        names = list(self.counts())
        fields = ["identity", "embedding", "occluded", "pattern", "visible_fraction", "source", "digest", "batch"]
        for start in range(0, len(names), max(int(batch), 1)):
            chunk = names[start:start + max(int(batch), 1)]
            exprs = [f"identity in {_in_list(chunk[k:k + IN_CHUNK])}" for k in range(0, len(chunk), IN_CHUNK)]
            rows = self._consistent(lambda exprs=exprs: [r for e in exprs for r in self._query_all(e, fields)])
            found: dict[str, list] = {name: [] for name in chunk}
            for r in rows:
                emb = np.asarray(r["embedding"], dtype=np.float32)
                occluded, pattern, visible = int(r["occluded"]), int(r["pattern"]), float(r["visible_fraction"])
                found[str(r["identity"])].append((emb, Template(
                    emb, None if occluded < 0 else bool(occluded), None if pattern < 0 else pattern,
                    None if visible < 0 else visible, str(r["source"]), str(r["digest"]) or None)))
            yield [(name, templates) for name, templates in found.items() if templates]

    def nearest(self, query: np.ndarray, count: int) -> Hits:
        empty = Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), [], [])
        if int(count) < 1 or not self._templates_exist():
            return empty
        probe = np.asarray(query, dtype=np.float32).ravel()
        if probe.size != self._dim:
            raise ConfigError(f"{self.location}: probe is {probe.size}-d but the gallery holds {self._dim}-d "
                              "templates")
        limit = min(int(count), QUERY_LIMIT)
        params = {"metric_type": "IP", "params": {"ef": max(int(self.ef_search), limit)}}
        vector = [probe.tolist()]

        def search(expr: str) -> list:
            found = self._call("search the gallery", "search", self.name, data=vector, filter=expr, limit=limit,
                               output_fields=["identity", "occluded", "batch"], search_params=params)
            return list(found[0]) if found else []

        hits = search("")
        state = self._state()  # after the search: any template found is in a committed or journaled batch
        batches, names = _hidden((state,))
        kept = [h for h in hits if int(h["entity"]["batch"]) not in batches and h["entity"]["identity"] not in names]
        if len(kept) < len(hits):  # templates of a write or removal in progress: search again without them
            hits = search(_visible_expr(batches, names))
            batches, names = _hidden((state, self._state()))
            kept = [h for h in hits if int(h["entity"]["batch"]) not in batches
                    and h["entity"]["identity"] not in names]
        kept.sort(key=lambda h: -float(h["distance"]))
        return Hits(np.array([int(h["id"]) for h in kept], np.int64),
                    np.array([float(h["distance"]) for h in kept], np.float32),
                    [str(h["entity"]["identity"]) for h in kept],
                    [None if int(h["entity"]["occluded"]) < 0 else bool(h["entity"]["occluded"]) for h in kept])

    # ------------------------------------------------------------------ writing
    def write(self, people: Sequence[Person], dim: int, model: str | None, source: str | None, mode: str) -> int:
        check_mode(mode)
        if self.read_only:
            raise read_only_error(self.location)
        people = list(people)
        dim = int(dim)
        with self._write_lock:
            self._recover()
            added_meta = model_meta(self.location, self._state().meta, dim, model, source)
            if mode == "new":
                existing = self._counts_of([name for name, _ in people])
                for name, rows in people:
                    refuse_existing(name, existing.get(name), len(rows), mode)
            for name, rows in people:
                if len(name.encode("utf-8")) > _NAME_BYTES:
                    raise DataError(f"{self.location}: identity name {name[:40]!r}... is over {_NAME_BYTES} bytes")
                long = next((t.digest for _, t in rows if t.digest and len(t.digest.encode()) > _DIGEST_BYTES), None)
                if long:
                    raise DataError(f"{self.location}: image digest {long[:40]!r}... of {name!r} is over "
                                    f"{_DIGEST_BYTES} bytes; digests are sha256 hex strings")
            seen = set(self.known_digests([t.digest for _, rows in people for _, t in rows if t.digest]))
            plan: list[tuple[str, np.ndarray, Any]] = []
            for name, rows in people:
                for emb, t in rows:
                    if t.digest:
                        if t.digest in seen:
                            continue  # already enrolled, or earlier in this call
                        seen.add(t.digest)
                    plan.append((name, emb, t))
            if not plan:
                if added_meta:
                    self._put_meta(added_meta)
                return 0
            self._ensure_templates(dim)
            batch = secrets.randbits(63)
            key = f"{_PENDING}{batch}"
            with self._active(key):
                entry = {"op": "write", "started": time.time(), "heartbeat": time.time(), "templates": len(plan),
                         "meta": added_meta, "host": socket.gethostname(), "pid": os.getpid()}
                self._journal(key, entry)  # before any template: readers and recovery know the batch
                self._bump()
                try:
                    if added_meta:
                        self._put_meta(added_meta)
                    self._insert(plan, batch, key, entry)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self._rollback(batch, entry)
                    raise
                cache = _CACHES.get(self._gallery_key)
                try:
                    self._delete_meta([key])  # the commit
                except BaseException:
                    _CACHES.pop(self._gallery_key, None)  # committed or not: read it again
                    raise
                if cache is not None:
                    cache.add(plan)
                self._bump()
            return len(plan)

    def _insert(self, plan: Sequence[tuple[str, np.ndarray, Any]], batch: int, key: str, entry: dict) -> None:
        """Insert ``plan``'s templates under ``batch``, a chunk a call, refreshing the journal's heartbeat."""
        dim = int(self._dim or 1)
        chunk = max(1, min(INSERT_ROWS, (16 << 20) // (4 * dim + 1024)))
        ids = np.random.default_rng(secrets.randbits(128)).integers(0, 2**63 - 1, len(plan), dtype=np.int64)
        created = time.time()
        last_beat = time.monotonic()
        for start in range(0, len(plan), chunk):
            part = plan[start:start + chunk]
            vectors = np.stack([np.asarray(emb, dtype=np.float32).ravel() for _, emb, _ in part]).tolist()
            rows = [{"id": i, "embedding": v, "identity": name,
                     "occluded": -1 if t.occluded is None else int(bool(t.occluded)),
                     "pattern": -1 if t.pattern is None else int(t.pattern),
                     "visible_fraction": -1.0 if t.visible_fraction is None or not math.isfinite(t.visible_fraction)
                     else float(t.visible_fraction),
                     "source": _fit(str(t.source or ""), _SOURCE_BYTES), "digest": t.digest or "",
                     "created": created, "batch": batch}
                    for i, v, (name, _, t) in zip(ids[start:start + chunk].tolist(), vectors, part)]
            self._call("enrol", "insert", self.name, rows)
            if time.monotonic() - last_beat > HEARTBEAT:
                entry["heartbeat"] = time.time()
                self._journal(key, entry)
                last_beat = time.monotonic()

    def remove(self, name: str) -> int:
        if self.read_only:
            raise read_only_error(self.location)
        with self._write_lock:
            self._recover()
            count = self.template_count(name)
            if not count:
                return 0
            key = f"{_REMOVING}{secrets.randbits(63)}"
            with self._active(key):
                entry = {"op": "remove", "name": name, "started": time.time()}
                self._journal(key, entry)
                self._bump()
                self._finish_removal(key, entry)
            return count


def _message(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return " ".join(text.split()) or type(exc).__name__


def _locked_by_other(path: Path) -> bool:
    """Whether a process holds Milvus Lite's lock on ``path`` (call only when this process does not)."""
    try:
        import fcntl
    except ImportError:  # Windows: Milvus Lite's own error says it
        return False
    lock = path / "LOCK"
    if not lock.is_file():
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _in_use(location: str, path: Path) -> str:
    return (f"{location}: {path} is in use by another process: Milvus Lite allows one process per file; use a Milvus "
            "server or PostgreSQL for several processes")


__all__ = ["DEFAULT_COLLECTION", "EF_SEARCH", "MilvusStore", "QUERY_LIMIT", "quote"]
