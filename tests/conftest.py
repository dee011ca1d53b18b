"""Shared fixtures: the real-data folder beside the repository, and CPU thread limits."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS_DIR = REPO_ROOT / "models" / "weights"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: torch threads of a test process: CI has 2 cores; under pytest-xdist (``make test-fast``) each worker takes 1.
SESSION_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
#: The empty folder that stands in for models/weights during the session (removed at its end).
_HIDDEN_WEIGHTS = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    # Unit tests choose their models explicitly: the default weights are hidden for the whole
    # session (module fixtures load models before any function fixture could hide them).
    from corona_ct.models import weights

    weights.WEIGHTS_DIR = Path(tempfile.mkdtemp(prefix="corona-ct-no-default-weights-"))
    config.stash[_HIDDEN_WEIGHTS] = weights.WEIGHTS_DIR
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(SESSION_THREADS)


def pytest_unconfigure(config: pytest.Config) -> None:
    hidden = config.stash.get(_HIDDEN_WEIGHTS, None)
    if hidden is not None:
        shutil.rmtree(hidden, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the ``shared_data`` fixture are marked ``realdata`` (``make test-fast`` leaves them out)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(autouse=True)
def _shipped_weights_when_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked ``shipped_weights`` see the default weights (they test the files that ship)."""
    if request.node.get_closest_marker("shipped_weights") is not None:
        monkeypatch.setattr("corona_ct.models.weights.WEIGHTS_DIR", SHIPPED_WEIGHTS_DIR)


@pytest.fixture(autouse=True)
def _thread_limits_restored() -> Iterator[None]:
    """Undo ``--threads`` of an in-process CLI call: its limits would change later tests' floats.

    ``set_threads`` sets the thread variables (inherited by child processes), torch's pool and
    the loaded BLAS/OpenMP pools; each test starts from this session's 2 threads.
    """
    from corona_ct.pipeline.threads import THREAD_ENV_VARS

    saved_env = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
    yield
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    import torch

    if torch.get_num_threads() != SESSION_THREADS:
        torch.set_num_threads(SESSION_THREADS)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=SESSION_THREADS)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CT); tests using it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (clone the project beside ../shared)")
    return SHARED_DATA
