"""The Genie phase with one Prefect task per question against the chunked phase, at the same rate limit:
N questions to the sandbox (Genie answer latency L) through `run_phase`, both ways, in one flow run each,
against the rate limit's bound (N-1)*60/rpm. Prints figures; asserts nothing.

    .venv/bin/python bench/genie_tasks.py --n 100 --rpm 300 --concurrency 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, run_phase
from sandbox import SandboxProcess
from tasks.calls import ask_genie
from tasks.resilience import RetryPolicy, Row


@flow(name="bench-genie-tasks", persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=16))  # type: ignore[arg-type]
def bench_flow(n: int, spec: PhaseSpec, host: str, token: str) -> tuple[int, float]:
    """Returns (questions answered, seconds spent in run_phase)."""
    client = DatabricksWorkspace(host=host, token=token).client(30)
    rows = [Row(f"q{i}-{uuid.uuid4().hex[:6]}", i, f"How many orders are there? ({i})", f"q{i:03d}") for i in range(n)]
    t0 = time.monotonic()
    outcomes = run_phase(spec, rows, lambda q: ask_genie(client, "retail", q, 60, 0.05, 0.2))
    return sum(o.status == "ok" for o in outcomes.values()), time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--rpm", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--latency-ms", type=int, default=300, help="Genie's answer time in the sandbox")
    args = parser.parse_args()
    bound = (args.n - 1) * 60 / args.rpm
    print(f"N={args.n} questions, rpm={args.rpm:g}, concurrency={args.concurrency}, answer {args.latency_ms} ms")
    print(f"rate-limit bound (N-1)*60/rpm = {bound:.1f} s\n")
    print("| Genie phase | answered | seconds | bound / seconds |")
    print("|---|---|---|---|")
    with SandboxProcess() as sb:
        sb.set_faults("genie", latency_ms=args.latency_ms)
        spec = PhaseSpec("genie", "", args.concurrency, RetryPolicy(), rpm=args.rpm)
        bench_flow(3, replace(spec, service=f"bench-warm-{uuid.uuid4().hex[:6]}"), sb.host, sb.token)  # imports
        for label, per_row in (("chunked (≤ 8 tasks)", False), ("a task per question", True)):
            # each its own limit: a shared one would make the second wait for the first's last slot to decay
            own = replace(spec, service=f"bench-genie-{uuid.uuid4().hex[:6]}", task_per_row=per_row)
            ok, seconds = bench_flow(args.n, own, sb.host, sb.token)
            print(f"| {label} | {ok}/{args.n} | {seconds:.1f} | {bound / seconds:.3f} |")


if __name__ == "__main__":
    main()
