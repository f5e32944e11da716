"""The improvement loop on the sandbox's unconfigured space: scores per round, LLM calls by task, Genie
calls, wall time; then the same run again (a new production copy with the same configuration), whose
learning and proposals come from the ledger.

    python bench/improve.py [--genie-latency-ms 800]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.settings import ScoreSettings
from blocks.workspace import DatabricksWorkspace
from sandbox import SandboxProcess
from sandbox.genie import bare_configuration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--genie-latency-ms", type=float, default=800)
    args = parser.parse_args()
    os.environ["BATCHFLOWS_HOME"] = tempfile.mkdtemp(prefix="batchflows-improve-")
    from flows.improve import ImproveSettings, improve

    benchmarks = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
    with SandboxProcess() as sb:
        sb.set_faults("genie", latency_ms=args.genie_latency_ms, latency_jitter_ms=args.genie_latency_ms / 2)
        sb.set_faults("chat", latency_ms=400)
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        client = DatabricksWorkspace(host=sb.host, token=sb.token).client(30)
        for attempt in ("first run", "same again"):
            space = client.genie.create_space(
                warehouse_id="sandbox-warehouse", serialized_space=json.dumps(bare_configuration()), title="bench"
            )
            sb.reset(clear_faults=False)
            started = time.monotonic()
            summary = improve(
                benchmarks,
                str(space.space_id),
                "sandbox-warehouse",
                ImproveSettings(),
                ScoreSettings(genie_rpm=0),
                workspace_block="bench-sandbox",
                output_dir=os.environ["BATCHFLOWS_HOME"],
            )
            wall = time.monotonic() - started
            chat = Counter(r.get("task") for r in sb.requests("chat"))
            print(f"\n{attempt}: {summary['score_before']:.1%} -> {summary['score_after']:.1%} in {wall:.1f} s")
            for r in summary["iterations"]:
                print(
                    f"  round {r['iteration']}: {r['failing']} failing, fixes {r['by_category']}, "
                    f"{r['score_before']:.1%} -> {r.get('score_after', 0):.1%}, flipped {len(r.get('flipped', []))}, "
                    f"{r.get('decision', '')}"
                )
            print(f"  patterns learned: {len(summary['patterns'])}; stopped: {summary['stopped']}")
            print(f"  LLM calls by task: {dict(chat)}; Genie questions: {sb.stats()['genie']['calls']}")


if __name__ == "__main__":
    main()
