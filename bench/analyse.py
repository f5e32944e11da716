"""Item analysis, the seed's case: 27 items at 500 ms simulated latency, sequential against parallel at
concurrency 10, and the same at 1,000 items (at 100 ms, so the sequential run takes ~2 min, not 8).
Reports the analysis phase's wall time (first call sent to last answer, at the sandbox) and the whole
flow's, speed-up, and efficiency against the theoretical maximum N / ceil(N / c). Prints figures only.

    .venv/bin/python bench/analyse.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from flows.analyse import AnalyseSettings, analyse
from sandbox import SandboxProcess
from tasks.limits import drop_limits


def main() -> None:
    drop_limits()  # the runs below create the limits from their own settings
    with SandboxProcess() as sb, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        for n, latency in ((27, 0.5), (1000, 0.1)):
            path = home / f"items-{n}.jsonl"
            path.write_text(
                "\n".join(
                    json.dumps({"id": f"ex{i}", "position": i, "text": f"Exercise {i}: prove statement {i}."})
                    for i in range(n)
                )
            )
            sb.set_faults("chat", latency_ms=latency * 1000)
            figures = {}
            for mode in ("sequential", "parallel"):
                RowLedger(path=str(home / f"{n}-{mode}.sqlite")).save("bench-ledger", overwrite=True)
                sb.reset(clear_faults=False)
                t0 = time.monotonic()
                summary = analyse(
                    input_path=str(path),
                    settings=AnalyseSettings(batch_size=10),
                    sequential=mode == "sequential",
                    workspace_block="bench-sandbox",
                    ledger_block="bench-ledger",
                    output_dir=str(home / "out"),
                )
                wall = time.monotonic() - t0
                log = sb.requests("chat")
                # first call sent (arrival minus nothing) to last answer (arrival + latency)
                phase = max(r["t"] for r in log) + latency - min(r["t"] for r in log)
                figures[mode] = (wall, phase, summary["analysis_s"])
                print(
                    f"N={n} latency {latency} s {mode}: flow {wall:.2f} s, analysis phase at the sandbox "
                    f"{phase:.2f} s, run_phase {summary['analysis_s']:.2f} s, {len(log)} calls, "
                    f"{summary['groups']} groups"
                )
            ideal = n / math.ceil(n / 10)
            for label, i in (("whole flow", 0), ("analysis phase", 1)):
                speedup = figures["sequential"][i] / figures["parallel"][i]
                print(f"  {label}: speed-up {speedup:.2f}x, {speedup / ideal:.1%} of the theoretical {ideal:.2f}x")


if __name__ == "__main__":
    main()
