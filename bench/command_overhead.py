"""A command's overhead: the wall time of `batchflows score|enrich|rerun-failed --sandbox` minus its flow run's
own duration (start to end, as the Prefect server records it), with the warm local Prefect server cold (not
running: the command starts it) and warm (running), and with the temporary server a command starts and stops
(BATCHFLOWS_PREFECT_SERVER=temporary, the behaviour before the warm server). Each in its own BATCHFLOWS_HOME and
PREFECT_HOME. Prints figures; asserts nothing.

    .venv/bin/python bench/command_overhead.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("batchflows"))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "BATCHFLOWS_PREFECT"))}
    return env | {
        "BATCHFLOWS_HOME": str(home / "batchflows"),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        **extra,
    }


def _flow_seconds(env: dict[str, str], flow_name: str) -> float:
    """The newest run of `flow_name` on the warm server of `env`: its end minus its start."""
    code = f"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings
from tasks.local_server import warm_server
with temporary_settings(updates={{PREFECT_API_URL: warm_server().url}}), get_client(sync_client=True) as client:
    run = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[{flow_name!r}])), sort=FlowRunSort.START_TIME_DESC, limit=1
    )[0]
    print((run.end_time - run.start_time).total_seconds())
"""
    return float(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )


def _timed(args: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.monotonic()
    done = subprocess.run([CLI, *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{args[0]} exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-command-"))
    rows = root / "rows.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, f"Item {i}: a short review of product {i % 7}."] for i in range(100))
    commands = {
        "score": (["score", "--sandbox", "--genie-rpm", "0", "--output-dir", "out"], "score-genie-space"),
        "enrich": (
            ["enrich", "--sandbox", "--input", str(rows), "--text-columns", "text", "--id-column", "id"],
            "enrich-rows",
        ),
        "rerun-failed": (["rerun-failed", "REPORT", "--sandbox", "--fresh"], "rerun-failed"),
    }
    print(f"{'command':<13} {'server':<10} {'wall s':>7} {'flow s':>7} {'overhead s':>10}")
    for mode in ("warm", "cold", "temporary"):
        home = root / mode
        home.mkdir()
        env = _env(home, **({"BATCHFLOWS_PREFECT_SERVER": "temporary"} if mode == "temporary" else {}))
        server_env = _env(home)  # reads flow runs from the warm server on the same database
        subprocess.run([CLI, "server", "start"], env=server_env, capture_output=True, check=True)
        _timed(commands["score"][0], env, home)  # warms the OS's file cache and leaves a report to rerun
        for name, (command, flow_name) in commands.items():
            overheads, walls, flows = [], [], []
            for _ in range(args.repeats):
                if name == "rerun-failed":
                    command = [*command[:1], str(max((home / "out").glob("score-*"))), *command[2:]]
                if mode != "warm":
                    subprocess.run([CLI, "server", "stop"], env=server_env, capture_output=True, check=True)
                wall = _timed(command, env, home)
                flow_s = _flow_seconds(server_env, flow_name)
                walls.append(wall)
                flows.append(flow_s)
                overheads.append(wall - flow_s)
            print(
                f"{name:<13} {mode:<10} {statistics.median(walls):7.1f} {statistics.median(flows):7.1f} "
                f"{statistics.median(overheads):10.2f}   (each: {', '.join(f'{o:.2f}' for o in overheads)})",
                flush=True,
            )
        subprocess.run([CLI, "server", "stop"], env=server_env, capture_output=True, check=True)


if __name__ == "__main__":
    main()
