"""Score history at scale: 1,000 runs x 100 benchmarks of one space, then the trend query (every run with
its verdicts), the trend table, the flaky check a scoring run makes, and the HTML report. Prints figures;
asserts nothing on speed.

    .venv/bin/python bench/history.py [--runs 1000] [--benchmarks 100] [--url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.history import HistoryStore
from tasks.trend import trend_rows, write_html


def fill(store: HistoryStore, runs: int, benchmarks: int) -> float:
    rng = random.Random(7)
    t0 = time.perf_counter()
    for i in range(runs):
        version = 1 + i // 100
        verdicts = {f"q{b:03d}": "correct" if rng.random() < 0.8 else "incorrect" for b in range(benchmarks)}
        store.append_run(
            {
                "run_id": f"run-{i:05d}",
                "workspace": "https://bench.example",
                "space_id": "bench",
                "etag": f"e{version}",
                "version": version,
                "score": sum(v == "correct" for v in verdicts.values()) / benchmarks,
                "total": benchmarks,
                "correct": sum(v == "correct" for v in verdicts.values()),
                "verdicts": {},
                "figures": {"genie_latency_p50_s": 2.0 + rng.random(), "genie_latency_p95_s": 6.0 + rng.random()},
                "breaker_events": [],
                "settings": {},
                "report": None,
                "created_at": f"2026-{1 + i // 90 % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:{i % 60:02d}.{i:06d}Z",
            },
            [
                {
                    "benchmark_id": b,
                    "verdict": v,
                    "stage": "comparison",
                    "reason": "same rows (row order ignored)",
                    "genie_latency_s": 2.5,
                    "attempts": 1,
                    "cached": False,
                    "flaky": False,
                }
                for b, v in verdicts.items()
            ],
        )
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--benchmarks", type=int, default=100)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore(args.url or f"sqlite:///{tmp}/history.sqlite")
        filled = fill(store, args.runs, args.benchmarks)
        print(f"{store.engine.dialect.name}: wrote {args.runs} runs x {args.benchmarks} benchmarks in {filled:.1f} s")
        for limit in (20, args.runs):
            t0 = time.perf_counter()
            runs = store.runs("https://bench.example", "bench", limit=limit)
            rows = trend_rows(runs)
            took = time.perf_counter() - t0
            print(
                f"trend of the last {len(rows)} runs ({sum(len(r['verdicts']) for r in runs)} verdicts): {took:.3f} s"
            )
        t0 = time.perf_counter()
        store.flaky("https://bench.example", "bench", 10, {f"q{b:03d}": "correct" for b in range(args.benchmarks)}, 5)
        print(f"flaky check of one scoring run (last 5 runs): {time.perf_counter() - t0:.3f} s")
        t0 = time.perf_counter()
        page = write_html("bench", store.runs("https://bench.example", "bench", limit=200), Path(tmp) / "h.html")
        print(f"HTML report of 200 runs: {time.perf_counter() - t0:.2f} s, {page.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
