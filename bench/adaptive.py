"""Adaptive concurrency against a service with a hidden capacity: the sandbox's chat endpoint answers 429
with Retry-After beyond `capacity_concurrent` calls in flight (or `capacity_rpm` calls a minute). N calls
through `run_phase` with `adaptive=True` (ceiling 20), beside fixed concurrency 20 and 3. Prints, for each,
the wall time, its ratio to the capacity's ideal, and the share of calls answered 429. Asserts nothing.

    .venv/bin/python bench/adaptive.py --n 600 --latency 0.2 --capacity 8
    .venv/bin/python bench/adaptive.py --n 250 --latency 0.2 --rpm 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")  # each 429 is a warning: thousands with fixed 20
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow

from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, adapted, run_phase
from sandbox import SandboxProcess
from tasks.calls import chat
from tasks.resilience import RetryPolicy, Row

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


@flow(name="bench-adaptive", persist_result=False)
def bench_flow(n: int, concurrency: int, adaptive: bool, host: str, token: str) -> tuple[int, float, dict[str, int]]:
    """Returns (rows ok, seconds spent in run_phase, where its adaptive concurrency went)."""
    client = DatabricksWorkspace(host=host, token=token).client(30)
    rows = [Row(f"r{i}-{uuid.uuid4().hex[:6]}", i, f"call {i}") for i in range(n)]
    policy = RetryPolicy(retries=20, base_delay_s=0.05, max_delay_s=60)  # the wait is Retry-After's
    spec = PhaseSpec("bench", f"bench-{uuid.uuid4().hex[:6]}", concurrency, policy, adaptive=adaptive)
    t0 = time.monotonic()
    outcomes = run_phase(spec, rows, lambda p: chat(client, ENDPOINT, p))
    return sum(o.status == "ok" for o in outcomes.values()), time.monotonic() - t0, adapted("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.2, help="the endpoint's answer time, seconds")
    parser.add_argument("--capacity", type=int, default=0, help="hidden concurrency capacity")
    parser.add_argument("--rpm", type=float, default=0, help="hidden rate capacity, calls a minute")
    args = parser.parse_args()
    if args.capacity:
        ideal = args.n * args.latency / args.capacity
        hidden = f"{args.capacity} calls in flight"
    else:
        # a quota of rpm calls in any 60 s: a burst of rpm calls, then the next as the first drop out
        ideal = (args.n - 1) // args.rpm * 60 + args.latency
        hidden = f"{args.rpm:g} calls a minute"
    print(f"N={args.n} calls of {args.latency * 1000:.0f} ms; hidden capacity {hidden}: ideal {ideal:.1f} s\n")
    print("| concurrency | ok | seconds | ideal / seconds | calls | answered 429 | 429 share | level |")
    print("|---|---|---|---|---|---|---|---|")
    with SandboxProcess() as sb:
        for label, concurrency, adaptive in (
            ("adaptive (≤ 20)", 20, True),
            ("fixed 20", 20, False),
            ("fixed 3", 3, False),
        ):
            sb.reset()
            sb.set_faults(
                "chat",
                latency_ms=args.latency * 1000,
                capacity_concurrent=args.capacity,
                capacity_rpm=args.rpm,
                retry_after_s=1,
            )
            ok, seconds, level = bench_flow(args.n, concurrency, adaptive, sb.host, sb.token)
            stats = sb.stats()["chat"]
            refused = stats["faults"].get("capacity", 0)
            shown = (
                f"{level['start']} → {level['level']} (low {level['lowest']}, high {level['highest']})" if level else ""
            )
            print(
                f"| {label} | {ok}/{args.n} | {seconds:.1f} | {ideal / seconds:.3f} | {stats['calls']} | {refused} | "
                f"{refused / stats['calls']:.3f} | {shown} |"
            )


if __name__ == "__main__":
    main()
