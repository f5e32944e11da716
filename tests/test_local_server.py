"""The warm local Prefect server (issue #20): the first command that needs a Prefect API starts it in the
background, later commands reuse it, a dead one is replaced, two commands starting at once share one, and
`batchflows server stop` ends it. Each test in its own BATCHFLOWS_HOME and PREFECT_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

CLI = str(Path(sys.executable).with_name("batchflows"))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "BATCHFLOWS_PREFECT"))}
    return env | {
        "PREFECT_HOME": str(home / "prefect"),
        "BATCHFLOWS_HOME": str(home / "batchflows"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
        **extra,
    }


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=180)


def _recorded_pid(home: Path) -> int:
    return int(json.loads((home / "batchflows" / "server" / "server.json").read_text())["pid"])


def _servers_of(home: Path) -> list[int]:
    """Live processes of a Prefect server started for this home (found by their environment)."""
    mark = f"BATCHFLOWS_HOME={home / 'batchflows'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if (
                b"prefect" in cmdline
                and b"server" in cmdline
                and state != "Z"
                and mark in (entry / "environ").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    _cli(_env(tmp_path), "server", "stop")
    for pid in _servers_of(tmp_path):  # whatever the test left
        os.kill(pid, signal.SIGKILL)


def test_commands_share_reuse_and_replace_one_warm_server(home: Path, tmp_path: Path) -> None:
    env = _env(home)
    assert _cli(env, "server", "status").returncode == 1

    # two commands that need a Prefect API, started at once: one server for both
    both = [subprocess.Popen([CLI, "limits"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    for process in both:
        assert process.wait(timeout=180) == 0, process.stdout.read() if process.stdout else ""
    pid = _recorded_pid(home)
    deadline = time.monotonic() + 10  # `prefect server start` and the API process it runs: one group
    while any(os.getpgid(p) != pid for p in _servers_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {os.getpgid(p) for p in _servers_of(home)} == {pid}
    status = _cli(env, "server", "status")
    assert status.returncode == 0 and status.stdout.startswith("running: http://127.0.0.1:"), status.stdout

    # a job runs on it and its flow run stays there (a temporary server would have gone with the command)
    out = str(tmp_path / "out")
    done = _cli(env, "score", "--sandbox", "--genie-rpm", "0", "--genie-concurrent", "10", "--output-dir", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _recorded_pid(home) == pid  # reused, not started again
    code = (
        "from prefect.client.orchestration import get_client\n"
        "from prefect.settings import PREFECT_API_URL, temporary_settings\n"
        "from tasks.local_server import warm_server\n"
        "with temporary_settings(updates={PREFECT_API_URL: warm_server().url}), get_client(sync_client=True) as c:\n"
        "    print(*[r.state.name for r in c.read_flow_runs(limit=10)])\n"
    )
    states = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert states.stdout.split() == ["Completed"], states.stdout + states.stderr

    os.killpg(pid, signal.SIGKILL)  # the server crashes: the next command replaces it
    replaced = _cli(env, "limits")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert _recorded_pid(home) != pid and pid not in _servers_of(home)

    stopped = _cli(env, "server", "stop")
    assert stopped.returncode == 0 and "stopped the Prefect server" in stopped.stdout
    assert _servers_of(home) == []
    assert _cli(env, "server", "status").returncode == 1


def test_prefect_api_url_wins_over_the_warm_server(home: Path) -> None:
    env = _env(home, PREFECT_API_URL="http://127.0.0.1:9/api")
    started = _cli(env, "server", "start")
    assert started.returncode == 0 and "PREFECT_API_URL is set" in started.stdout
    assert _servers_of(home) == []


def test_an_unknown_server_mode_is_one_clear_line(home: Path) -> None:
    refused = _cli(_env(home, BATCHFLOWS_PREFECT_SERVER="shared"), "limits")
    assert refused.returncode == 2 and "BATCHFLOWS_PREFECT_SERVER must be 'warm'" in refused.stdout
    assert _servers_of(home) == []
