"""Resumability: a phase of N rows run once (fills the row ledger), then run again with the same inputs.
The rerun must make zero calls; prints its wall time. Also a kill-free "half done" case: the ledger holds
every other row, so the rerun makes exactly N/2 calls. Prints figures; asserts only the call counts.

    .venv/bin/python bench/resume.py --n 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow

from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, run_phase
from sandbox import SandboxProcess
from tasks.calls import chat
from tasks.resilience import Cache, RetryPolicy, Row

SERVICE = f"bench-{uuid.uuid4().hex[:6]}"  # its own global limit: an existing one is never changed by a run
ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


@flow(name="bench-resume", persist_result=False)
def phase_flow(n: int, host: str, token: str, ledger_path: str, only_even: bool = False) -> tuple[int, float]:
    """Returns (rows ok, seconds in run_phase)."""
    client = DatabricksWorkspace(host=host, token=token).client(30)
    rows = [Row(f"r{i}", i, f"call {i}") for i in range(n) if not only_even or i % 2 == 0]
    cache = Cache(RowLedger(path=ledger_path), "bench", "v1")
    spec = PhaseSpec("bench", SERVICE, 20, RetryPolicy(retries=0), cache=cache)
    t0 = time.monotonic()
    outcomes = run_phase(spec, rows, lambda p: chat(client, ENDPOINT, p))
    return sum(o.status == "ok" for o in outcomes.values()), time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    n = args.n
    with SandboxProcess() as sb, tempfile.TemporaryDirectory() as tmp:
        ledger = str(Path(tmp) / "ledger.sqlite")
        print(f"N={n}, concurrency 20, sandbox latency 0")

        t0 = time.monotonic()
        ok, phase_s = phase_flow(n, sb.host, sb.token, ledger, only_even=True)
        calls = sb.stats()["chat"]["calls"]
        print(f"half the rows (even ones) first: {ok} ok, {calls} calls, flow {time.monotonic() - t0:.2f} s")
        assert calls == n // 2 + n % 2, calls

        sb.reset()
        t0 = time.monotonic()
        ok, phase_s = phase_flow(n, sb.host, sb.token, ledger)
        calls = sb.stats()["chat"]["calls"]
        print(f"all rows, half cached:        {ok} ok, {calls} calls, flow {time.monotonic() - t0:.2f} s")
        assert calls == n // 2, calls

        sb.reset()
        t0 = time.monotonic()
        ok, phase_s = phase_flow(n, sb.host, sb.token, ledger)
        flow_s = time.monotonic() - t0
        calls = sb.stats()["chat"]["calls"]
        print(f"all rows, all cached:         {ok} ok, {calls} calls, run_phase {phase_s:.3f} s, flow {flow_s:.2f} s")
        assert calls == 0, calls
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {rss_mb:.0f} MB; ledger file {Path(ledger).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
