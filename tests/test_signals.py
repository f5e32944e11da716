"""Signals and kill -9 against the real CLI process (issue #18, defects 10 and 11): a signal stops new calls,
lets those in flight finish, writes the partial report with the rest as failed, releases the slots and
exits 130/143; a killed command leaves no Prefect server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
CLI = str(Path(sys.executable).with_name("batchflows"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {
        **env,
        "PREFECT_HOME": str(home / "prefect"),
        "BATCHFLOWS_HOME": str(home / "batchflows"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "COLUMNS": "200",
        **extra,
    }


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server` of this module's own (its limits and leases are what the tests read)."""
    home = tmp_path_factory.mktemp("server")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def _save_workspace(api: str, name: str, sb: object) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks.workspace import DatabricksWorkspace

    with temporary_settings(updates={PREFECT_API_URL: api}):
        DatabricksWorkspace(host=sb.host, token=sb.token).save(name, overwrite=True)  # type: ignore[attr-defined]


def _active_slots(api: str, name: str) -> int:
    """Through Prefect's client, which asks again when the server (SQLite) is busy for a moment (503)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def test_a_signal_stops_calls_writes_the_report_and_frees_slots(sb, prefect_server, tmp_path):
    """SIGTERM here; Ctrl-C (SIGINT, exit 130) takes the same path: bench/signals.py measures both."""
    sig, code = signal.SIGTERM, 143
    sb.set_faults("genie", latency_ms=1500)
    _save_workspace(prefect_server, "signal-sandbox", sb)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            CLI,
            "score",
            "--benchmarks",
            BENCHMARKS,
            "--space-id",
            "retail",
            "--warehouse-id",
            "sandbox-warehouse",
            "--workspace-block",
            "signal-sandbox",
            "--genie-rpm",
            "0",
            "--output-dir",
            str(out),
        ],
        env=_env(tmp_path, PREFECT_API_URL=prefect_server),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while sb.stats()["genie"]["calls"] < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(sig)
    asked = sb.stats()["genie"]["calls"]
    output, _ = process.communicate(timeout=120)

    assert process.returncode == code, output
    assert "stopped: interrupted by" in output
    assert sb.stats()["genie"]["calls"] <= asked + 3  # at most those already past their check (3 in flight)
    report = pd.read_parquet(next(out.glob("score-*/scorecard.parquet")))
    assert len(report) == 32  # every row, answered or not
    interrupted = report[report["error_kind"] == "interrupted"]
    assert len(interrupted) >= 32 - asked - 3  # the questions not asked, and the SQL of those answered
    assert set(interrupted["verdict"]) <= {"genie_error", "sql_error"}
    assert _active_slots(prefect_server, "batchflows-genie-local-sandbox") == 0
    assert _active_slots(prefect_server, "batchflows-sql-local-sandbox") == 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombie: dead
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_cli_leaves_no_temporary_prefect_server(tmp_path):
    process = subprocess.Popen(
        [CLI, "score", "--sandbox", "--genie-rpm", "0", "--output-dir", str(tmp_path)],
        env=_env(tmp_path, BATCHFLOWS_PREFECT_SERVER="temporary"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:  # the temporary server is up once the sandbox block is saved in it
        if "Embedded sandbox workspace on" in line:
            break
    servers = _children(process.pid)
    assert servers, "the CLI runs its temporary Prefect server as a child"
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in servers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the temporary Prefect server outlived the killed CLI"


def _server(home: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("prefect server did not start")


def test_slots_come_back_after_a_server_restart_and_a_stranded_wait_says_why(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from batchflows_cli import app
    from tasks import limits

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("BATCHFLOWS_HOME", str(tmp_path / "batchflows"))
    server = _server(tmp_path, port)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            limits.ensure_limit("batchflows-restart", 2)
            with limits.hold("restart", occupy=2):
                server.terminate()
                server.wait(timeout=30)
                server = _server(tmp_path, port)  # the restart drops the lease, keeps the 2 slots taken
                assert _active_slots(api, "batchflows-restart") == 2
            assert _active_slots(api, "batchflows-restart") == 0

            # slots no run holds (stranded by a restart under a run that then died): the wait is bounded
            monkeypatch.setattr(limits, "SLOT_CHECK_S", 1)
            monkeypatch.setattr(limits, "SLOT_WAIT_S", 2)
            with get_client(sync_client=True) as client:  # retries a 503 of the just restarted server (SQLite)
                client.update_global_concurrency_limit(
                    "batchflows-restart", GlobalConcurrencyLimitUpdate(active_slots=2)
                )
            with pytest.raises(limits.SlotWaitError) as info, limits.hold("restart", occupy=1):
                pass
            assert "2 of batchflows-restart's 2 slots are taken, 0 of them by live runs on this machine" in str(
                info.value
            )
            assert "batchflows limits --reset batchflows-restart" in str(info.value)
            reset = CliRunner().invoke(app, ["limits", "--reset", "batchflows-restart"], env={"COLUMNS": "200"})
            assert reset.exit_code == 0, reset.output
            assert _active_slots(api, "batchflows-restart") == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
