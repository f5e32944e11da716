"""What the real-workspace contracts cost: reading results chunk by chunk, the 25 MiB INLINE cap and
external links, Genie polls that fail in transit, and a cold warehouse. Runs on a sandbox in a separate
process (so its work is not on this process's clock). Prints figures; asserts nothing on speed.

    .venv/bin/python bench/contracts.py [--cold-start 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import httpx

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.workspace import DatabricksWorkspace
from sandbox import SandboxProcess
from tasks.calls import ask_genie, run_sql

WAREHOUSE = "sandbox-warehouse"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold-start", type=float, default=30, help="seconds the stopped warehouse takes to start")
    args = parser.parse_args()
    with SandboxProcess() as sb:
        client = DatabricksWorkspace(host=sb.host, token=sb.token).client(60)
        admin = httpx.Client(base_url=sb.host, headers={"Authorization": f"Bearer {sb.token}"}, timeout=30)
        print("| result | rows | chunks | statements | seconds | peak MiB (client) |")
        print("|---|---|---|---|---|---|")
        for label, sql, limit in (
            ("20,000 narrow rows, 64 KiB chunks", "SELECT i, i * 2 AS d FROM range(20000) AS t(i)", 100_000),
            ("100,000 narrow rows, 64 KiB chunks", "SELECT i, i * 2 AS d FROM range(100000) AS t(i)", 100_000),
            (
                "5,000 rows of 6 KB (30 MB > 25 MiB)",
                "SELECT i, repeat('x', 6000) AS pad FROM range(5000) AS t(i)",
                5000,
            ),
        ):
            admin.post("/sandbox/reset").raise_for_status()
            tracemalloc.start()
            t0 = time.perf_counter()
            result = run_sql(client, WAREHOUSE, sql, 120, row_limit=limit)
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            statements = admin.get("/sandbox/stats").json()["sql"]["calls"]
            figures = f"{result['row_count']:,} | {result['chunks']} | {statements} | {seconds:.2f} | {peak:.0f}"
            print(f"| {label} | {figures} |")

        admin.post("/sandbox/reset").raise_for_status()
        admin.put("/sandbox/faults/genie", json={"latency_ms": 1000}).raise_for_status()
        admin.put("/sandbox/faults/genie_poll", json={"script": ["503", "500", "reset", "429", "503"]})
        t0 = time.perf_counter()
        answer = ask_genie(client, "retail", "How many customers do we have?", 120, 0.2, 1.0)
        stats = admin.get("/sandbox/stats").json()
        conversations = admin.get("/api/2.0/genie/spaces/retail/conversations").json().get("conversations", [])
        print(
            f"\nGenie with 5 failed polls: {time.perf_counter() - t0:.1f} s, {answer['poll_errors']} poll errors, "
            f"{stats['genie']['calls']} question(s) asked, {len(conversations)} conversation(s) left"
        )

        admin.post("/sandbox/reset").raise_for_status()
        admin.put("/sandbox/contracts", json={"cold_start_s": args.cold_start}).raise_for_status()
        t0 = time.perf_counter()
        answer = ask_genie(client, "retail", "How many customers do we have?", 600, 1.0, 5.0)
        genie_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_sql(client, WAREHOUSE, answer["sql"], 300)
        print(
            f"Cold warehouse ({args.cold_start:g} s to start): Genie answered in {genie_s:.1f} s "
            f"(polls 1-5 s), its SQL then ran in {time.perf_counter() - t0:.2f} s"
        )


if __name__ == "__main__":
    main()
