"""Orchestration overhead: N calls at concurrency C through `run_phase` in a Prefect flow, against a plain
thread pool making the same databricks-sdk calls, a plain asyncio + httpx loop, and the ideal ceil(N/C)*L.
The whole flow run is timed as a command runs it (no Prefect heartbeats: flows.phase.no_idle_heartbeats;
start-up objects frozen out of garbage collection: batchflows_cli.common.loaded; one Prefect client for the
command) and with Prefect's default heartbeats. Prints figures; asserts nothing.

    .venv/bin/python bench/overhead.py --n 1000 --concurrency 20 --latency 0.2 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from prefect import flow

from batchflows_cli.common import loaded
from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, no_idle_heartbeats, run_phase
from sandbox import SandboxProcess
from tasks.calls import chat
from tasks.prefect_client import command_client
from tasks.resilience import RetryPolicy, Row

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


@flow(name="bench-overhead", persist_result=False)
def bench_flow(n: int, concurrency: int, host: str, token: str) -> tuple[int, float, float]:
    """Returns (rows ok, seconds spent in run_phase, this process's CPU seconds in it)."""
    client = DatabricksWorkspace(host=host, token=token).client(30)
    rows = [Row(f"r{i}", i, f"call {i}") for i in range(n)]
    spec = PhaseSpec("bench", f"bench-{uuid.uuid4().hex[:6]}", concurrency, RetryPolicy(retries=0))  # its own limit
    t0, cpu = time.monotonic(), time.process_time()
    outcomes = run_phase(spec, rows, lambda p: chat(client, ENDPOINT, p))
    return sum(o.status == "ok" for o in outcomes.values()), time.monotonic() - t0, time.process_time() - cpu


async def asyncio_loop(host: str, token: str, n: int, concurrency: int) -> float:
    """The same calls from a plain asyncio + httpx loop with a semaphore; returns its wall time."""
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=host, headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=30
    ) as http:

        async def one(i: int) -> None:
            async with limit:
                body = {"messages": [{"role": "user", "content": f"call {i}"}], "max_tokens": 512, "temperature": 0}
                (await http.post(f"/serving-endpoints/{ENDPOINT}/invocations", json=body)).raise_for_status()

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.2, 0.5])
    args = parser.parse_args()
    with SandboxProcess() as sb, command_client():  # one Prefect client, as a command has
        client = DatabricksWorkspace(host=sb.host, token=sb.token).client(30)
        bench_flow(10, 5, sb.host, sb.token)  # warm up the ephemeral API
        loaded()  # as a command does before its flow: start-up objects out of the full collections
        print(f"N={args.n} concurrency={args.concurrency}")
        print(
            "| latency | ideal | asyncio+httpx | plain pool | run_phase | whole flow run | phase / ideal "
            "| phase / plain | flow / ideal | flow / plain | flow / ideal, heartbeats on | peak in flight "
            "| CPU: plain pool | CPU: run_phase |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for latency in args.latency:
            sb.set_faults("chat", latency_ms=latency * 1000)
            ideal = math.ceil(args.n / args.concurrency) * latency
            t0, cpu = time.monotonic(), time.process_time()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda i: chat(client, ENDPOINT, f"call {i}"), range(args.n)))
            plain, plain_cpu = time.monotonic() - t0, time.process_time() - cpu
            sb.reset(clear_faults=False)
            aio = asyncio.run(asyncio_loop(sb.host, sb.token, args.n, args.concurrency))
            sb.reset(clear_faults=False)
            t0 = time.monotonic()
            bench_flow(args.n, args.concurrency, sb.host, sb.token)
            beating = time.monotonic() - t0
            sb.reset(clear_faults=False)
            t0 = time.monotonic()
            with no_idle_heartbeats():
                ok, phase_s, phase_cpu = bench_flow(args.n, args.concurrency, sb.host, sb.token)
            flow_s = time.monotonic() - t0
            calls = sb.stats()["chat"]
            assert ok == args.n == calls["calls"], (ok, calls)
            print(
                f"| {latency} s | {ideal:.1f} s | {aio:.2f} s ({ideal / aio:.3f}) "
                f"| {plain:.2f} s ({ideal / plain:.3f}) | {phase_s:.2f} s "
                f"| {flow_s:.2f} s | {ideal / phase_s:.3f} | {phase_s / plain:.3f}x | {ideal / flow_s:.3f} "
                f"| {flow_s / plain:.3f}x | {ideal / beating:.3f} | {calls['max_in_flight']} | {plain_cpu:.2f} s "
                f"| {phase_cpu:.2f} s |"
            )


if __name__ == "__main__":
    main()
