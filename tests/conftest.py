"""Shared fixtures: one Prefect test server and one sandbox workspace per session."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.server_env import set_server_defaults

set_server_defaults()  # for the Prefect test server, as the CLI sets them for its own
# a CLI command a test runs without PREFECT_API_URL starts a temporary Prefect server that ends with it, never
# a warm one that outlives the tests (tests/test_local_server.py tests the warm one in its own home)
os.environ.setdefault("BATCHFLOWS_PREFECT_SERVER", "temporary")
# a phase that cannot get its slots fails inside the test's 300 s with the reason (who holds them), not as a
# pytest timeout while the wait goes on for 900 s (CLI commands the tests run inherit it)
os.environ.setdefault("BATCHFLOWS_SLOT_WAIT_S", "180")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Commands run in this process froze what it had loaded (batchflows_cli.common.loaded): give it back to
    the collector, or duckdb's bindings list each frozen object of theirs as leaked when the tests end."""
    gc.unfreeze()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    from flows.phase import no_idle_heartbeats

    os.environ["BATCHFLOWS_HOME"] = str(tmp_path_factory.mktemp("batchflows-home"))
    with prefect_test_harness(server_startup_timeout=90), no_idle_heartbeats():  # as the CLI runs flows
        yield


@pytest.fixture
def command(prefect_api: None, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed `batchflows` command in a process of its own (its exit, its stderr), on the test's
    Prefect API, with a BATCHFLOWS_HOME of the test's."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHFLOWS_")}
    env |= {"BATCHFLOWS_HOME": str(tmp_path / "home"), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    env |= {"PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}
    cli = str(Path(sys.executable).with_name("batchflows"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(autouse=True)
def _fresh_limits(request: pytest.FixtureRequest) -> None:
    """Each test that talks to Prefect starts like a new team set-up: no global limits of ours yet (a run never
    changes an existing limit, so a test's concurrency would otherwise be whatever an earlier test set)."""
    if "prefect_api" not in request.fixturenames:
        return
    request.getfixturevalue("prefect_api")
    from tasks.limits import drop_limits

    drop_limits()


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[object]:
    from sandbox import Sandbox

    with Sandbox(seed=0) as sb:
        yield sb


@pytest.fixture
def sb(sandbox_server: object) -> object:
    """The session's sandbox with faults cleared and counters reset."""
    sandbox_server.reset()  # type: ignore[attr-defined]
    return sandbox_server


@pytest.fixture
def client(sb: object) -> object:
    from blocks.workspace import DatabricksWorkspace

    return DatabricksWorkspace(host=sb.host, token=sb.token).client(5)  # type: ignore[attr-defined]


@pytest.fixture
def workspace_block(prefect_api: None, sb: object) -> str:
    from blocks.workspace import DatabricksWorkspace

    DatabricksWorkspace(host=sb.host, token=sb.token).save("test-sandbox", overwrite=True)  # type: ignore[attr-defined]
    return "test-sandbox"


@pytest.fixture
def ledger_block(prefect_api: None, tmp_path: Path) -> str:
    from blocks.ledger import RowLedger

    name = f"ledger-{uuid.uuid4().hex[:8]}"
    RowLedger(path=str(tmp_path / "ledger.sqlite")).save(name)
    return name
