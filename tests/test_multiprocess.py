"""Several processes against one Prefect API and one sandbox: shared limits, kill -9 and resume."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

JOB = str(Path(__file__).with_name("phase_job.py"))


def _spawn(sb: Any, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = env or {**os.environ, "PREFECT_API_URL": _api_url(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, JOB, "--host", sb.host, "--token", sb.token, *args]
    # a process group of its own: what a job killed with -9 leaves behind can be ended with it
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> dict[str, int]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _kill_after(sb: Any, proc: subprocess.Popen[str], calls: int) -> None:
    """kill -9 `proc` once the sandbox has answered `calls` chat calls."""
    deadline = time.monotonic() + 120
    while sb.stats()["chat"]["calls"] < calls:
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # calls in flight at the kill still finish at the sandbox (and are logged then): let them land, so that
    # they are counted with this run and not with the next
    time.sleep(1)


def _ids(sb: Any) -> list[str]:
    return [i for r in sb.requests("chat") for i in r.get("ids") or []]


def test_two_runs_share_a_limit_of_three(prefect_api: None, sb: Any) -> None:
    sb.set_faults("chat", latency_ms=100)
    runs = [_spawn(sb, "--rows", "24", "--concurrency", "3", "--service", "shared3", "--prefix", p) for p in "ab"]
    results = [_finish(p) for p in runs]
    stats = sb.stats()["chat"]
    assert [r["ok"] for r in results] == [24, 24]
    assert stats["calls"] == 48
    assert stats["max_in_flight"] == 3  # measured at the sandbox: never 6


def test_genie_rpm_holds_across_two_concurrent_scoring_runs(
    prefect_api: None, sb: Any, workspace_block: str, tmp_path: Path
) -> None:
    from importlib import resources

    import yaml

    source = resources.files("sandbox").joinpath("data/benchmarks.yaml").read_text()
    benchmarks = tmp_path / "six.yaml"
    benchmarks.write_text(yaml.safe_dump(yaml.safe_load(source)[:6], allow_unicode=True))
    env = {**os.environ, "PREFECT_API_URL": str(_api_url()), "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [
        str(Path(sys.executable).with_name("batchflows")),
        "score",
        "--benchmarks",
        str(benchmarks),
        "--space-id",
        "retail",
        "--warehouse-id",
        "sandbox-warehouse",
        "--workspace-block",
        workspace_block,
        "--genie-rpm",
        "60",
        "--genie-concurrent",
        "3",
        "--fresh",
        "--json",
        "--set",
        "genie_poll_initial=0.05",
    ]
    runs = [
        subprocess.Popen(
            [*command, "--output-dir", str(tmp_path / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name in "ab"
    ]
    for run in runs:
        _, err = run.communicate(timeout=240)
        assert run.returncode == 0, err[-3000:]
    starts = sorted(r["t"] for r in sb.requests("genie"))
    assert len(starts) == 12  # six questions asked by each run
    # 60 per minute is one a second, whichever run asks: so no 60 s window can hold more than 60
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 0.8, gaps


def test_kill_9_half_way_then_rerun_repeats_no_finished_row(prefect_api: None, sb: Any, tmp_path: Path) -> None:
    from blocks.ledger import RowLedger

    ledger = str(tmp_path / "ledger.sqlite")
    sb.set_faults("chat", latency_ms=100)
    args = ("--rows", "200", "--concurrency", "5", "--service", "kill", "--ledger", ledger)
    _kill_after(sb, _spawn(sb, *args), 100)
    first = _ids(sb)
    finished = {k for k in (f"row-{i}" for i in range(200)) if RowLedger(path=ledger).get_many("job", "v1", [k])}
    assert 90 <= len(finished) < 200

    sb.reset()
    result = _finish(_spawn(sb, *args), timeout=300)
    second = _ids(sb)
    assert result == {"ok": 200, "cached": len(finished)}
    assert not finished & set(second)  # zero repeated calls for finished rows
    assert sorted(second) == sorted(f"row-{i}" for i in range(200) if f"row-{i}" not in finished)
    # what was repeated at all is only what was in flight when the process died
    assert len(set(first) & set(second)) <= 5


def test_with_the_ephemeral_api_a_killed_runs_slots_come_back(sb: Any, tmp_path: Path) -> None:
    """Without PREFECT_API_URL each process has its own API server over one SQLite database, and a lease
    dies with its process: the next run must give the dead run's slots back, not wait for ever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "PREFECT__FLOW_RUN_ID"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), BATCHFLOWS_HOME=str(tmp_path / "home"))
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"  # each job starts its own API server
    args = ("--concurrency", "4", "--service", "ephem")
    sb.set_faults("chat", latency_ms=100)
    first = _spawn(sb, *args, "--rows", "400", env=env)
    try:
        _kill_after(sb, first, 8)
        second = _spawn(sb, *args, "--rows", "8", env=env)
        out, err = second.communicate(timeout=180)
    finally:  # the killed job's temporary Prefect server (its child) outlives it: end it with the job's group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["ok"] == 8
    assert "Gave back 4 slot(s) of batchflows-ephem" in err


def test_two_machines_share_finished_rows_through_a_postgresql_ledger(
    prefect_api: None, sb: Any, workspace_block: str, tmp_path: Path
) -> None:
    """Two CLI runs with their own BATCHFLOWS_HOME (two machines) and one RowLedger on PostgreSQL: the second
    asks the workspace nothing the first finished."""
    from importlib import resources

    import yaml

    from blocks.ledger import RowLedger
    from deployments.local import Postgres, ServerError

    try:
        pg = Postgres().start()
    except ServerError as exc:
        pytest.skip(f"PostgreSQL unavailable here: {exc}")
    try:
        RowLedger(url=pg.url).save("team-ledger", overwrite=True)  # Prefect's asyncpg URL, as a team has it
        source = resources.files("sandbox").joinpath("data/benchmarks.yaml").read_text()
        benchmarks = tmp_path / "six.yaml"
        benchmarks.write_text(yaml.safe_dump(yaml.safe_load(source)[:6], allow_unicode=True))
        command = [str(Path(sys.executable).with_name("batchflows")), "score", "--benchmarks", str(benchmarks)]
        command += ["--space-id", "retail", "--warehouse-id", "sandbox-warehouse", "--workspace-block"]
        command += [workspace_block, "--ledger-block", "team-ledger", "--genie-rpm", "0", "--json"]
        calls = []
        for machine in ("a", "b"):
            env = {**os.environ, "PREFECT_API_URL": _api_url(), "BATCHFLOWS_HOME": str(tmp_path / machine)}
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            calls.append(sb.stats()["genie"]["calls"])
        assert calls == [6, 6]  # machine b asked Genie nothing: machine a's answers were in the shared ledger
        assert RowLedger(url=pg.url).count("genie") == 6
        assert not (tmp_path / "a" / "ledger.sqlite").exists()  # nothing went to a machine's own file
    finally:
        pg.stop()
