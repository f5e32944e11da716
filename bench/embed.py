"""Embedding throughput: 10,000 documents, 100 per call, 4 calls in flight, sandbox latency 0.5 s per
call. Prints calls, wall time, documents per minute and peak memory; then the cached rerun.

    .venv/bin/python bench/embed.py [--docs 10000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from batchflows_cli.common import loaded
from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from flows.embed import EmbedSettings, embed
from flows.phase import no_idle_heartbeats
from sandbox import SandboxProcess
from tasks.limits import drop_limits
from tasks.prefect_client import command_client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=10_000)
    args = parser.parse_args()
    drop_limits()  # the runs below create the limits from their own settings
    n = args.docs
    # one Prefect client for the blocks and the runs, as a command has
    with SandboxProcess() as sb, tempfile.TemporaryDirectory() as tmp, command_client():
        home = Path(tmp)
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        RowLedger(path=str(home / "ledger.sqlite")).save("bench-ledger", overwrite=True)
        docs = home / "docs.jsonl"
        docs.write_text(
            "\n".join(
                json.dumps({"id": f"d{i}", "text": f"Document {i}: notes on topic {i % 97} and case {i % 13}."})
                for i in range(n)
            )
        )
        sb.set_faults("embeddings", latency_ms=500)
        loaded()  # as the command does before its flow: start-up objects out of the full garbage collections
        for label in ("first run", "rerun (all cached)"):
            sb.reset(clear_faults=False)
            t0 = time.monotonic()
            with no_idle_heartbeats():  # as the `batchflows` command runs its flows
                summary = embed(
                    input_path=str(docs),
                    settings=EmbedSettings(max_concurrent=4),
                    store_path=str(home / "vectors.duckdb"),
                    workspace_block="bench-sandbox",
                    ledger_block="bench-ledger",
                    output_dir=str(home / "out"),
                )
            wall = time.monotonic() - t0
            calls = sb.stats()["embeddings"]["calls"]
            ideal = math.ceil(math.ceil(n / 100) / 4) * 0.5
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{label}: {n} docs, {calls} calls (ceil(n/100) = {math.ceil(n / 100)}; one by one: {n}), "
                f"{wall:.1f} s (ideal ceil(calls/4) x 0.5 s = {ideal:.1f} s: {ideal / wall:.3f}), "
                f"{n / wall * 60:,.0f} docs/min, {summary['successful']} ok, "
                f"estimate ${summary['estimate']['estimated_cost_usd']:.4f}, peak RSS {rss:.0f} MB"
            )


if __name__ == "__main__":
    main()
