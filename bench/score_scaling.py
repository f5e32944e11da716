"""Scoring flow, sequential (--no-batch) against batch at concurrency 2, 3, 7 and 10, for 20 and 100
benchmarks, with the sandbox's Genie latency set so that one sequential run of 20 takes about 20 s.
Also: how many judge calls the deterministic comparison saves. Prints figures; asserts nothing on speed.

    .venv/bin/python bench/score_scaling.py [--sizes 20 100] [--concurrency 2 3 7 10] [--repeat 1]

The ideal speed-up at concurrency c for N items is N / ceil(N / c) (every phase runs at c here).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect.client.orchestration import get_client

from batchflows_cli.common import loaded
from blocks.ledger import RowLedger
from blocks.settings import score_settings
from blocks.workspace import DatabricksWorkspace
from flows.phase import no_idle_heartbeats
from flows.score import score
from sandbox import SandboxProcess
from tasks.benchmarks import Benchmark, load_benchmarks
from tasks.limits import PREFIX, drop_limits, ensure_limit
from tasks.prefect_client import command_client

SAMPLE = str(Path(__file__).resolve().parents[1] / "sandbox" / "data" / "benchmarks.yaml")
GENIE_LATENCY_MS = 800  # + polling and the SQL of each benchmark: ~1 s a benchmark when sequential


def benchmarks(n: int) -> list[Benchmark]:
    """n benchmarks from the 32 samples; repeats get another id and extra inner spaces (Genie normalises
    whitespace, so it answers them as the original; batchflows sees a new question)."""
    base = load_benchmarks(SAMPLE)
    out = []
    for i in range(n):
        b = base[i % len(base)]
        copy = i // len(base)
        question = b.question.replace(" ", " " * (copy + 1), 1)
        out.append(b.model_copy(update={"id": f"{b.id}-{copy}" if copy else b.id, "question": question}))
    return out


def limits_at(c: int) -> None:
    """Each run at its own concurrency: every concurrency limit of batchflows set to `c` before it, as
    `batchflows limits --set NAME=c` does (a run never changes a shared limit that exists). The run finds its
    limits there, as every run after a team's first one does; the warm-up run creates them."""
    with get_client(sync_client=True) as client:
        names = [g.name for g in client.read_global_concurrency_limits(limit=200) if g.name.startswith(PREFIX)]
    for name in names:
        if not name.endswith("-rpm"):
            ensure_limit(name, c, change=True)


def run(items: list[Benchmark], concurrency: int | None, ledger: str) -> tuple[dict, float]:
    """The run's summary and its wall time, as a command's flow run (without the limits' reset before it).
    Called inside `no_idle_heartbeats`, as the command's flow is."""
    c = concurrency or 1
    limits_at(c)
    settings = score_settings(
        genie_rpm=0,
        genie_max_concurrent=c,
        sql_max_concurrent=c,
        eval_max_concurrent=c,
        genie_poll_initial=0.1,
        genie_poll_max=0.5,
    )
    t0 = time.monotonic()
    out = score(
        items,
        "retail",
        "sandbox-warehouse",
        settings,
        sequential=concurrency is None,
        workspace_block="bench-sandbox",
        ledger_block=ledger,
        output_dir=tempfile.mkdtemp(),
        fresh=True,
    )
    return out, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 3, 7, 10])
    parser.add_argument("--repeat", type=int, default=1, help="runs at each concurrency (a table row each)")
    args = parser.parse_args()
    # as the `batchflows` command runs its flow: no idle heartbeats, one Prefect client, and (`loaded`, after
    # the warm-up) the objects of start-up frozen, out of Python's full garbage collections (0.25 s each, one
    # in ~4 runs here)
    with (
        SandboxProcess() as sb,
        tempfile.TemporaryDirectory() as tmp,
        no_idle_heartbeats(),
        command_client(),
    ):
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        RowLedger(path=str(Path(tmp) / "ledger.sqlite")).save("bench-ledger", overwrite=True)
        sb.set_faults("genie", latency_ms=GENIE_LATENCY_MS)
        sb.set_faults("sql", latency_ms=30)
        sb.set_faults("chat", latency_ms=300)
        print(f"Genie latency {GENIE_LATENCY_MS} ms, SQL 30 ms, judge 300 ms per call; polls from 0.1 s")
        drop_limits()  # the warm-up creates them
        run(benchmarks(3), 3, "bench-ledger")  # warm up: the Prefect API server starts, modules load
        loaded()
        for n in args.sizes:
            items = benchmarks(n)
            seq, seq_s = run(items, None, "bench-ledger")
            print(
                f"\nN={n}: sequential {seq_s:.1f} s ({seq['wall_time_s']:.1f} s inside the flow), "
                f"score {seq['score']:.1%}"
            )
            seq_in = seq["wall_time_s"]
            print(
                "| concurrency | flow run wall time | speed-up | ideal speed-up | of ideal "
                "| inside the flow | speed-up | of ideal | same verdicts |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            of_ideal: dict[int, list[float]] = {}
            for c in args.concurrency:
                ideal = n / math.ceil(n / c)
                for _ in range(args.repeat):
                    out, wall = run(items, c, "bench-ledger")
                    same = [r["verdict"] for r in out["rows"]] == [r["verdict"] for r in seq["rows"]]
                    inside = out["wall_time_s"]
                    of_ideal.setdefault(c, []).append(seq_s / wall / ideal)
                    print(
                        f"| {c} | {wall:.1f} s | {seq_s / wall:.2f}x | {ideal:.2f}x | {seq_s / wall / ideal:.3f} "
                        f"| {inside:.1f} s | {seq_in / inside:.2f}x | {seq_in / inside / ideal:.3f} | {same} |"
                    )
            if args.repeat > 1:
                print(
                    f"whole flow run, of ideal, median of {args.repeat} runs (lowest-highest): "
                    + "; ".join(
                        f"c={c} {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})" for c, r in of_ideal.items()
                    )
                )
            compared = n - seq["judged"]
            print(
                f"judge: the comparison decided {compared} of {n} cases; {seq['judged']} went to the LLM in "
                f"{seq['judge_calls']} calls, against {math.ceil(n / 10)} calls to judge every case in chunks of 10 "
                f"(or {n} one by one)"
            )


if __name__ == "__main__":
    main()
