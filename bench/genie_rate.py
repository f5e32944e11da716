"""Genie phases at their rate limit, one run alone and two runs at once sharing the limit: each run is its own
process (as two commands are) on one Prefect server, asking N questions through `run_phase` with a task per
question, as the scoring job does. Prints the phase time against the bound (N-1)*60/rpm, for two runs the
span from the first phase's start to the last one's end against (2N-1)*60/rpm, the most calls that started
in any 60 s (never above rpm), the smallest gap between two calls, and how often the Prefect client retried
a request (a 503 or a dropped connection).
Prints figures; asserts nothing.

    .venv/bin/python bench/genie_rate.py [--cases 5:12 60:30 120:30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENCY_MS = 300  # Genie's answer time in the sandbox


def child(n: int, rpm: float, service: str, host: str, token: str) -> None:
    """One run: a flow whose Genie phase asks `n` questions; prints its phase's start, end and call starts."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from blocks.workspace import DatabricksWorkspace
    from flows.phase import PhaseSpec, no_idle_heartbeats, run_phase
    from tasks.calls import ask_genie
    from tasks.resilience import RetryPolicy, Row

    starts: list[float] = []
    retries: list[str] = []

    class Retries(logging.Handler):  # the Prefect client's retries of 503s and dropped connections (DEBUG lines)
        def emit(self, record: logging.LogRecord) -> None:
            if "retryable" in (message := record.getMessage()):
                retries.append(message)

    client_log = logging.getLogger("prefect.client")
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(Retries(logging.DEBUG))

    @flow(name="bench-genie-rate", persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=16))  # type: ignore[arg-type]
    def run() -> dict[str, object]:
        client = DatabricksWorkspace(host=host, token=token).client(30)

        def ask(question: str) -> object:
            starts.append(time.time())
            return ask_genie(client, "retail", question, 60, 0.05, 0.2)

        rows = [
            Row(f"q{i}-{uuid.uuid4().hex[:6]}", i, f"How many orders are there? ({i})", f"q{i:03d}") for i in range(n)
        ]
        spec = PhaseSpec("genie", service, 3, RetryPolicy(), rpm=rpm, task_per_row=True)
        began = time.time()
        outcomes = run_phase(spec, rows, ask)
        return {"ok": sum(o.status == "ok" for o in outcomes.values()), "began": began, "ended": time.time()}

    with no_idle_heartbeats():
        result = run()
    print(json.dumps({**result, "starts": starts, "retries": len(retries), "why": sorted(set(retries))[:3]}))


def _runs(count: int, n: int, rpm: float, host: str, token: str, env: dict[str, str]) -> list[dict]:
    service = f"bench-rate-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, __file__, "--child", str(n), str(rpm), service, host, token]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(stderr[-3000:])
        out.append(json.loads(stdout.strip().splitlines()[-1]))
        if out[-1]["why"]:
            print("  Prefect client retried:", *out[-1]["why"], sep="\n    ", file=sys.stderr)
    return out


def _most_in_a_minute(starts: list[float]) -> int:
    starts = sorted(starts)
    most, first = 0, 0
    for last, t in enumerate(starts):
        while starts[first] <= t - 60:
            first += 1
        most = max(most, last - first + 1)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=["5:12", "60:30", "120:30"], help="rpm:N")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, rpm, service, host, token = args.child
        child(int(n), float(rpm), service, host, token)
        return

    from sandbox import SandboxProcess
    from tasks.local_server import stop_server, warm_server

    home = Path(tempfile.mkdtemp(prefix="bench-genie-rate-"))
    os.environ.update(BATCHFLOWS_HOME=str(home / "batchflows"), PREFECT_HOME=str(home / "prefect"))
    server = warm_server()  # one `prefect server` for every run, as on a machine with the warm server
    env = {**os.environ, "PREFECT_API_URL": server.url}
    print(f"Genie answers in {LATENCY_MS} ms; a task per question; concurrency 3; `prefect server` on SQLite\n")
    print(
        "| rpm | N | runs | bound s | phase s | bound / phase | each run's phase s | most calls in 60 s "
        "| smallest gap s | Prefect client retries |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        with SandboxProcess() as sb:
            sb.set_faults("genie", latency_ms=LATENCY_MS)
            _runs(1, 2, 600, sb.host, sb.token, env)  # warm the OS's file cache
            for case in args.cases:
                rpm, n = float(case.split(":")[0]), int(case.split(":")[1])
                for count in (1, 2):
                    runs = _runs(count, n, rpm, sb.host, sb.token, env)
                    span = max(r["ended"] for r in runs) - min(r["began"] for r in runs)
                    bound = (count * n - 1) * 60 / rpm
                    starts = sorted(t for r in runs for t in r["starts"])
                    gap = min(b - a for a, b in itertools.pairwise(starts))
                    ok = sum(r["ok"] for r in runs)
                    each = " / ".join(f"{r['ended'] - r['began']:.1f}" for r in runs)
                    assert ok == count * n, runs
                    print(
                        f"| {rpm:g} | {n} | {count} | {bound:.1f} | {span:.1f} | {bound / span:.3f} "
                        f"| {each} "
                        f"| {_most_in_a_minute(starts)} | {gap:.2f} | {sum(r['retries'] for r in runs)} |",
                        flush=True,
                    )
    finally:
        stop_server()


if __name__ == "__main__":
    main()
