import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def require_data(name: str | None = None) -> None:
    """Skip when the real-model corpus is absent locally; CI sets ONNXCC_REQUIRE_DATA=1 so a
    missing corpus fails there instead of silently skipping."""
    import models

    if models.available(name):
        return
    msg = f"real-model corpus {'(' + name + ') ' if name else ''}not fetched: run python tools/fetch_data.py"
    if os.environ.get("ONNXCC_REQUIRE_DATA") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency tables measured by the tests stay in the session (a user's cache holds numbers
    measured under their own load, not under a parallel test run's)."""
    old = os.environ.get("ONNXCC_CACHE")
    os.environ["ONNXCC_CACHE"] = str(tmp_path_factory.mktemp("onnxcc-cache"))
    yield
    if old is None:
        os.environ.pop("ONNXCC_CACHE", None)
    else:
        os.environ["ONNXCC_CACHE"] = old
