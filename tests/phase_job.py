"""A minimal job for multi-process tests: one phase of N chat calls, each tagged with its row key.

    python tests/phase_job.py --host H --token T --rows 200 --concurrency 5 --service S [--ledger PATH]

Run as a separate process against the Prefect API in PREFECT_API_URL (the tests' shared server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow

from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, run_phase
from tasks.calls import chat
from tasks.resilience import Cache, RetryPolicy, Row

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


@flow(name="phase-job", persist_result=False)
def phase_job(
    host: str, token: str, rows: int, concurrency: int, service: str, rpm: float, ledger: str | None, prefix: str
) -> dict[str, int]:
    client = DatabricksWorkspace(host=host, token=token).client(30)
    spec = PhaseSpec(
        "job",
        service,
        concurrency,
        RetryPolicy(retries=1, base_delay_s=0.1),
        rpm=rpm,
        cache=Cache(RowLedger(path=ledger), "job", "v1") if ledger else None,
    )
    work = [Row(f"{prefix}{i}", i, json.dumps({"task": "tag", "items": [{"id": f"{prefix}{i}"}]})) for i in range(rows)]
    outcomes = run_phase(spec, work, lambda prompt: chat(client, ENDPOINT, prompt, max_tokens=16))
    return {"ok": sum(o.status == "ok" for o in outcomes.values()), "cached": sum(o.cached for o in outcomes.values())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--service", default="test")
    parser.add_argument("--rpm", type=float, default=0)
    parser.add_argument("--ledger", default=None)
    parser.add_argument("--prefix", default="row-")
    a = parser.parse_args()
    result = phase_job(a.host, a.token, a.rows, a.concurrency, a.service, a.rpm, a.ledger, a.prefix)
    print(json.dumps(result), flush=True)
