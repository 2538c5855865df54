"""What every test file shares: where the shared data lives, and the ``data`` and ``slow`` markers.

``@pytest.mark.data("lfw/pairs.txt", "occluders")`` marks a test that reads the shared data (paths relative to
:data:`SHARED_DATA`; no paths: the folder itself). Such a test skips when its data is absent, except under
``CI=true``, where the data is part of the set-up and a missing file fails the test instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
