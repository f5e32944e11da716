"""Enrichment throughput and memory. Prints figures; asserts only the call counts.

1. 150 rows at the seed's 15 requests per minute, chat latency 2 s +/- 0.5 s per call (the seed: ~30 s
   batched, ~10 min one row per call).
2. 100,000 rows, no rpm limit, 8 calls in flight: calls must be ceil(rows / 20); wall time and peak
   memory (target under 1 GB).

    .venv/bin/python bench/enrich.py [--rows 100000]
"""

from __future__ import annotations

import argparse
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

import pandas as pd

from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from flows.enrich import EnrichSettings, enrich
from sandbox import SandboxProcess
from tasks.limits import drop_limits


def rows_file(directory: Path, n: int) -> str:
    path = directory / f"rows-{n}.parquet"
    pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "topic": [f"Topic {i}" for i in range(n)],
            "description": [f"How a team handles concern {i} in day to day delivery and planning." for i in range(n)],
        }
    ).to_parquet(path, index=False)
    return str(path)


def run(path: str, settings: EnrichSettings, ledger: str, out: Path) -> tuple[dict, float]:
    t0 = time.monotonic()
    summary = enrich(
        ["topic", "description"],
        input_path=path,
        id_column="id",
        settings=settings,
        workspace_block="bench-sandbox",
        ledger_block=ledger,
        output_dir=str(out),
    )
    return summary, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    drop_limits()  # the runs below create the limits from their own settings
    with SandboxProcess() as sb, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        RowLedger(path=str(home / "a.sqlite")).save("bench-ledger-a", overwrite=True)
        RowLedger(path=str(home / "b.sqlite")).save("bench-ledger-b", overwrite=True)

        sb.set_faults("chat", latency_ms=2000, latency_jitter_ms=500)
        summary, wall = run(rows_file(home, 150), EnrichSettings(rpm=15), "bench-ledger-a", home / "out")
        calls = sb.stats()["chat"]["calls"]
        print(
            f"150 rows at 15 rpm, chat 2 s +/- 0.5 s: {wall:.1f} s, {calls} calls, {summary['newly_enriched']} "
            f"enriched, {summary['tokens']} tokens (one row per call would need 150 calls: "
            f"{150 / 15 * 60 / 60:.0f} min at 15 rpm)"
        )
        assert calls == 8, calls

        sb.reset()
        n = args.rows
        path = rows_file(home, n)
        summary, wall = run(path, EnrichSettings(rpm=0, max_concurrent=8), "bench-ledger-b", home / "out")
        calls = sb.stats()["chat"]["calls"]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{n} rows, no rpm limit, 8 in flight, no latency: {wall:.1f} s, {calls} calls "
            f"(ceil(rows/20) = {math.ceil(n / 20)}), {summary['newly_enriched']} enriched, "
            f"peak RSS {rss_mb:.0f} MB"
        )
        assert calls == math.ceil(n / 20), calls
        sb.reset()
        summary, wall = run(path, EnrichSettings(rpm=0, max_concurrent=8), "bench-ledger-b", home / "out")
        print(f"{n} rows again, all cached: {wall:.1f} s, {sb.stats()['chat']['calls']} calls")


if __name__ == "__main__":
    main()
