"""Scale-out: enrichment runs through a process work pool with 1 or 2 workers, under a global limit on the
LLM endpoint that every run shares. Real `prefect server` (SQLite), real workers, sandbox in its own process.

    python bench/scale_out.py [--runs 8] [--rows 400] [--latency-ms 500] [--database sqlite|postgres]

Prints, per (workers, limit): wall time of all runs, calls, calls/s against the limit's ideal, the peak of
calls in flight seen by the sandbox (never above the limit), and per-run orchestration cost (from creation
to running, and the run's time outside its calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.local import BIN, Postgres, PrefectServer, Worker
from sandbox import SandboxProcess

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batchflows-scale-"))
    database = Postgres().start() if args.database == "postgres" else None
    try:
        run(args, tmp, database.url if database else None)
    finally:
        if database:
            database.stop()


def run(args: argparse.Namespace, tmp: Path, database_url: str | None) -> None:
    with PrefectServer(tmp / "prefect", database_url) as server, SandboxProcess() as sb:
        sb.set_faults("chat", latency_ms=args.latency_ms)
        env = server.env(BATCHFLOWS_HOME=str(tmp / "home"))
        os.environ.update(PREFECT_API_URL=server.api_url)
        from blocks.workspace import DatabricksWorkspace

        DatabricksWorkspace(host=sb.host, token=sb.token).save("bench-sandbox", overwrite=True)
        print(
            f"{args.runs} enrichment runs x {args.rows} rows (20 rows/call), chat latency {args.latency_ms:.0f} ms, "
            f"Prefect server on {args.database}"
        )
        print(
            "workers | limit | wall s | calls | calls/s | ideal calls/s | ratio | peak in flight | dispatch s | "
            "run s (mean)"
        )
        for limit in (4, 16):
            for workers in (1, 2):
                pool = f"bench-{workers}-{limit}"
                deploy = [str(BIN / "batchflows"), "deploy", "--pool", pool, "--workspace-block", "bench-sandbox"]
                deploy += ["--output-dir", str(tmp / "out")]
                subprocess.run(deploy, env=env, check=True, capture_output=True)
                files = []
                for r in range(args.runs):  # distinct rows per run and per configuration: no cache hits
                    path = tmp / f"rows-{pool}-{r}.jsonl"
                    path.write_text(
                        "\n".join(
                            json.dumps({"id": f"{r}-{i}", "text": f"{pool} run {r} row {i}: text to enrich"})
                            for i in range(args.rows)
                        )
                    )
                    files.append(path)
                sb.reset(clear_faults=False)
                started = time.monotonic()
                names = [f"w{n}" for n in range(workers)]
                with _workers(server, pool, names, env):
                    runs = [_start(server, str(p), limit) for p in files]
                    finished = [_wait(server, run_id) for run_id in runs]
                wall = time.monotonic() - started
                states = {f["state"] for f in finished}
                stats = sb.stats()["chat"]
                calls = stats["calls"]
                ideal = limit / (args.latency_ms / 1000)
                dispatch = sum(f["dispatch_s"] for f in finished) / len(finished)
                run_s = sum(f["run_s"] for f in finished) / len(finished)
                print(
                    f"{workers} | {limit} | {wall:.1f} | {calls} | {calls / wall:.2f} | {ideal:.1f} | "
                    f"{calls / wall / ideal:.3f} | {stats['max_in_flight']} | {dispatch:.1f} | {run_s:.1f}"
                    f"{'' if states == {'COMPLETED'} else f'  states {states}'}",
                    flush=True,
                )


class _workers:
    def __init__(self, server: PrefectServer, pool: str, names: list[str], env: dict[str, str]) -> None:
        home = {"BATCHFLOWS_HOME": env["BATCHFLOWS_HOME"]}
        self.workers = [Worker(server, pool, name=n, limit=4, env=home) for n in names]

    def __enter__(self) -> None:
        for w in self.workers:
            w.start()

    def __exit__(self, *_: object) -> None:
        for w in self.workers:
            w.stop()


def _start(server: PrefectServer, path: str, limit: int) -> str:
    from prefect.deployments import run_deployment

    settings = {"max_concurrent": limit, "rpm": 0}
    run = run_deployment(
        "enrich-rows/enrich",
        parameters={"input_path": path, "text_columns": ["text"], "id_column": "id", "settings": settings},
        timeout=0,
    )
    return str(run.id)  # type: ignore[union-attr]


def _wait(server: PrefectServer, run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)  # type: ignore[arg-type]
            if run.state and run.state.type.value in FINAL:
                created = run.created.timestamp() if run.created else 0
                start = run.start_time.timestamp() if run.start_time else created
                end = run.end_time.timestamp() if run.end_time else start
                return {"state": run.state.type.value, "dispatch_s": start - created, "run_s": end - start}
            time.sleep(0.5)


if __name__ == "__main__":
    main()
