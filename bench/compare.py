"""The result comparator: how much of the sample scoring it decides without the LLM judge (for each
`extra_columns` setting), and how long it takes on large results. Prints figures; asserts nothing on speed.

    .venv/bin/python bench/compare.py [--rows 20000 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.ledger import RowLedger
from blocks.settings import score_settings
from blocks.workspace import DatabricksWorkspace
from flows.score import score
from sandbox import SandboxProcess
from tasks.compare import Rules, Sorting, compare

SAMPLE = str(Path(__file__).resolve().parents[1] / "sandbox" / "data" / "benchmarks.yaml")


def decided_without_llm() -> None:
    print("| extra_columns | compared | decided by comparison | judged by LLM | LLM calls | score |")
    print("|---|---|---|---|---|---|")
    with SandboxProcess() as sb, tempfile.TemporaryDirectory() as tmp:
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-compare", overwrite=True)
        for extra in ("allow", "judge"):
            RowLedger(path=f"{tmp}/{extra}.sqlite").save(f"bench-compare-{extra}", overwrite=True)
            result = score(
                SAMPLE,
                "retail",
                "sandbox-warehouse",
                score_settings(genie_rpm=0, genie_poll_initial=0.05, genie_poll_max=0.2, extra_columns=extra),
                workspace_block="bench-compare",
                ledger_block=f"bench-compare-{extra}",
                output_dir=tmp,
            )
            compared = [r for r in result["rows"] if r["stage"] in ("comparison", "judge") and r["genie_rows"]]
            judged = [r for r in compared if r["stage"] == "judge"]
            share = (len(compared) - len(judged)) / len(compared)
            print(
                f"| {extra} | {len(compared)} | {len(compared) - len(judged)} ({share:.1%}) | {len(judged)} | "
                f"{result['judge_calls']} | {result['score']:.1%} |"
            )


def speed(sizes: list[int]) -> None:
    print("\n| rows | columns | equal results | one value changed | shuffled, columns swapped | peak memory |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(7)
    for n in sizes:
        rows: list[list[Any]] = [
            [i, f"name-{i % 997}", rng.random() * 1000, f"{rng.randint(0, 10**6)}.{rng.randint(0, 99):02d}"]
            for i in range(n)
        ]
        expected = {"columns": ["id", "name", "x", "d"], "types": ["LONG", "STRING", "DOUBLE", "DECIMAL"], "rows": rows}
        changed = {**expected, "rows": [*rows[:-1], [rows[-1][0], rows[-1][1], rows[-1][2] + 1, rows[-1][3]]]}
        shuffled = [[r[3], r[2], r[1], r[0]] for r in rows]
        rng.shuffle(shuffled)
        swapped = {
            "columns": ["d", "x", "name", "id"],
            "types": ["DECIMAL", "DOUBLE", "STRING", "LONG"],
            "rows": shuffled,
        }
        figures = []
        for actual, want in ((expected, "correct"), (changed, "incorrect"), (swapped, "correct")):
            t0 = time.perf_counter()
            decision, reason = compare(expected, actual, Sorting(), Rules())
            figures.append(f"{time.perf_counter() - t0:.2f} s")
            assert decision == want, reason
        tracemalloc.start()  # memory apart: tracing slows the comparison several times over
        compare(expected, swapped, Sorting(), Rules())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"| {n:,} | 4 | {' | '.join(figures)} | {peak / 2**20:.0f} MiB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[20000, 100000])
    args = parser.parse_args()
    decided_without_llm()
    speed(args.rows)
