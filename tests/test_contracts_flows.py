"""The jobs on the strict sandbox: results over many chunks compared in full, Genie's parameterized answers
run with their parameters, polls retried on the same message, conversations cleaned up, a cold
warehouse at default settings, and benchmarks read from the space itself."""

from __future__ import annotations

import json
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from blocks.settings import score_settings
from blocks.workspace import DatabricksWorkspace
from flows.enrich import EnrichSettings, enrich
from flows.score import score
from sandbox import Sandbox
from sandbox.genie import bare_configuration
from tasks.benchmarks import Benchmark, load_benchmarks
from tasks.inputs import InputError

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

FAST: dict[str, Any] = {"genie_rpm": 0, "genie_poll_initial": 0.05, "genie_poll_max": 0.2, "genie_retry_delay": 0.05}
NUMBERS = "SELECT i AS n, i % 7 AS m FROM range(20000) AS t(i)"
IN_CITY = "SELECT COUNT(*) AS customers FROM customers WHERE city = :city"


def _block(sandbox: Any) -> str:
    name = f"ws-{uuid.uuid4().hex[:8]}"
    DatabricksWorkspace(host=sandbox.host, token=sandbox.token).save(name)
    return name


def _conversations(sandbox: Any, space_id: str) -> list[Any]:
    client = DatabricksWorkspace(host=sandbox.host, token=sandbox.token).client(10)
    return list(client.genie.list_conversations(space_id).conversations or [])


def test_large_and_parameterized_answers_are_compared_in_full(prefect_api, ledger_block, tmp_path):
    answers = [
        {"question": "All the numbers", "sql": f"{NUMBERS} ORDER BY n DESC"},
        {"question": "All the numbers but the last", "sql": NUMBERS.replace("i % 7", "IF(i = 19999, 9, i % 7)")},
        {"question": "Customers in Seoul", "sql": IN_CITY, "parameters": [_city("Seoul")]},
        {"question": "Customers in Incheon", "sql": IN_CITY, "parameters": [_city("Seoul")]},  # the wrong city
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(a) for a in answers))
    benchmarks = [
        Benchmark(id="all", question="All the numbers", expected_sql=NUMBERS),
        Benchmark(id="but-last", question="All the numbers but the last", expected_sql=NUMBERS),
        Benchmark(id="seoul", question="Customers in Seoul", expected_sql=IN_CITY.replace(":city", "'Seoul'")),
        Benchmark(id="incheon", question="Customers in Incheon", expected_sql=IN_CITY.replace(":city", "'Incheon'")),
    ]
    with Sandbox(genie_answers=str(path)) as sb:
        sb.set_faults("genie", latency_ms=200)
        sb.set_faults("genie_poll", script=["503", "500", "reset", "503", "500"])
        result = score(
            benchmarks,
            "rehearsal",
            "sandbox-warehouse",
            score_settings(**FAST),
            workspace_block=_block(sb),
            ledger_block=ledger_block,
            output_dir=str(tmp_path),
            breaker_block=f"b-{uuid.uuid4().hex[:8]}",
        )
        rows = {r["id"]: r for r in result["rows"]}
        # 20,000 rows over several chunks, compared in full: one changed row in the last chunk is found
        assert rows["all"]["verdict"] == "correct" and rows["all"]["expected_rows"] == 20_000
        assert rows["but-last"]["verdict"] == "incorrect" and rows["but-last"]["genie_rows"] == 20_000
        # Genie's parameterized SQL runs with its parameters and is judged on their values
        assert rows["seoul"]["verdict"] == "correct" and rows["incheon"]["verdict"] == "incorrect"
        bound = [r["parameters"] for r in sb.requests("sql") if r["statement"] == IN_CITY]
        assert bound == [[{"name": "city", "value": "Seoul", "type": "STRING"}]]
        # five failed polls, no question asked twice, and no conversation of ours left behind
        assert sb.stats()["genie"]["calls"] == 4 and sum(sb.stats()["genie_poll"]["faults"].values()) == 5
        assert _conversations(sb, "rehearsal") == []


def _city(name: str) -> dict[str, str]:
    return {"keyword": "city", "sql_type": "STRING", "value": name}


def test_a_cold_warehouse_at_default_settings(prefect_api, ledger_block, tmp_path):
    """A warehouse that takes 90 s to start: Genie waits in PENDING_WAREHOUSE, statements in PENDING, and the
    default timeouts (Genie 10 minutes, as Databricks advises) see it through."""
    sample = load_benchmarks(str(resources.files("sandbox").joinpath("data/benchmarks.yaml")))[:3]
    with Sandbox() as sb:
        sb.set_contracts(cold_start_s=90)
        started = time.monotonic()
        result = score(
            sample,
            "retail",
            "sandbox-warehouse",
            score_settings(),  # the defaults, rate limit included
            workspace_block=_block(sb),
            ledger_block=ledger_block,
            output_dir=str(tmp_path),
            breaker_block=f"b-{uuid.uuid4().hex[:8]}",
        )
        assert time.monotonic() - started >= 90
        assert [r["verdict"] for r in result["rows"]] == ["correct"] * 3, result["rows"]
        assert result["failures"] == [] and sb.stats()["genie"]["calls"] == 3


def test_the_benchmarks_a_space_keeps_are_scored(sb, workspace_block, ledger_block, client, tmp_path):
    result = score(
        None,
        "retail",
        "sandbox-warehouse",
        score_settings(**FAST),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path),
        breaker_block=f"b-{uuid.uuid4().hex[:8]}",
    )
    sample = load_benchmarks(str(resources.files("sandbox").joinpath("data/benchmarks.yaml")))
    assert result["total"] == 32 and {r["question"] for r in result["rows"]} == {b.question for b in sample}
    assert all(len(r["id"]) == 8 for r in result["rows"])
    assert _conversations(sb, "retail") == []

    config = bare_configuration()
    del config["benchmarks"]
    empty = client.genie.create_space(warehouse_id="sandbox-warehouse", serialized_space=json.dumps(config))
    with pytest.raises(InputError, match="keeps no benchmark"):
        score(None, empty.space_id, "sandbox-warehouse", score_settings(**FAST), workspace_block=workspace_block)


def test_enrich_reads_every_chunk_of_its_query(sb, workspace_block, ledger_block, tmp_path: Path):
    sb.set_contracts(chunk_bytes=300)
    query = "SELECT order_id, status, channel FROM orders ORDER BY order_id LIMIT 120"
    result = enrich(
        ["status", "channel"],
        query=query,
        warehouse_id="sandbox-warehouse",
        id_column="order_id",
        settings=EnrichSettings(rpm=0, timeout=30, retry_delay=0.05),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
    )
    out = pd.read_parquet(result["files"]["parquet"])
    assert result["newly_enriched"] == 120 and len(out) == 120 and out["order_id"].nunique() == 120
