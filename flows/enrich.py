"""Enrich rows with LLM output: per-row cache first, then batches of up to 20 uncached rows per call,
validated element by element; failed batches fall back to one row per call; a shared requests-per-minute
limit; the rows back with their new columns, status and error, and the seed's summary.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from blocks.settings import FORM
from blocks.workspace import workspace_slug
from flows.batched import BatchedJob, BatchedResult, content_key, run_all
from flows.phase import load_blocks, rows_state, run_name
from tasks.calls import Call
from tasks.enrich import (
    MAX_BATCH,
    PROMPT_VERSION,
    check_rows,
    enrich_by_schema,
    field_specs,
    load_schema,
    pack,
    schema_of,
)
from tasks.inputs import read_input
from tasks.preflight import check_workspace
from tasks.report import publish, stable_key, write_frame
from tasks.resilience import Cache, RetryPolicy, run_logger

DEFAULT_INSTRUCTIONS = (
    "For each item, write a one-line tldr of its text and say whether mastering it is a matter of "
    "practice or needs an expert."
)


class EnrichSettings(BaseModel):
    """How the enrichment calls its endpoint. Every key can be set from the CLI (--set KEY=VALUE)."""

    model_config = FORM

    endpoint: str = Field("databricks-meta-llama-3-3-70b-instruct", description="chat serving endpoint")
    batch_size: int = Field(20, ge=1, le=MAX_BATCH, description="rows per call at most")
    max_batch_tokens: int = Field(6000, ge=100, description="estimated prompt tokens per call at most")
    max_item_tokens: int = Field(
        8000, ge=16, description="longest row text sent, in estimated tokens (within the endpoint's context)"
    )
    oversized: Literal["refuse", "truncate"] = Field(
        "refuse", description="a longer row: refused with an error naming it, or sent cut to max_item_tokens"
    )
    rpm: float = Field(15, ge=0, description="calls per minute, shared by all runs (0: no limit)")
    max_concurrent: int = Field(4, ge=1, le=64, description="calls in flight at once")
    adaptive: bool = Field(
        False,
        description="adapt the calls in flight to what the endpoint takes, up to max_concurrent: fewer after a "
        "429, one more after a round of successes; the next run starts where this one ended",
    )
    retry_attempts: int = Field(2, ge=0, le=10, description="retries per call after the first attempt")
    retry_delay: float = Field(5, ge=0, description="first retry delay, seconds (doubles each retry)")
    timeout: float = Field(30, gt=0, le=600, description="seconds per call")


@flow(
    name="enrich-rows",
    flow_run_name=run_name("enrich"),
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    persist_result=False,
)
def enrich(
    text_columns: list[str],
    input_path: str | None = None,
    query: str | None = None,
    warehouse_id: str | None = None,
    id_column: str | None = None,
    schema_path: str | None = None,
    instructions: str = DEFAULT_INSTRUCTIONS,
    settings: EnrichSettings | None = None,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    output_dir: str = "out",
) -> dict[str, Any]:
    """Add LLM-generated columns to rows read from a file or a warehouse query.

    Args:
        text_columns: the columns sent to the model.
        input_path: CSV, JSONL, JSON or Parquet file of rows (or use `query`).
        query: a SQL query on `warehouse_id` whose result is the rows.
        warehouse_id: the warehouse that runs `query`.
        id_column: the rows' id column (default: a hash of the row's text).
        schema_path: JSON schema file of the new columns (default: tldr of at most 12 words and challenge
            practice|expert).
        instructions: what the model is asked to do for each row.
        settings: endpoint, batch size, token budget per call, rpm, concurrency, retries, timeout.
        workspace_block: saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: saved RowLedger block holding the per-row cache (default: ~/.batchflows).
        output_dir: where the enriched rows go (Parquet and CSV).
    """
    log = run_logger()
    settings = settings or EnrichSettings()
    started = time.monotonic()
    workspace, ledger = load_blocks(workspace_block, ledger_block)
    check_workspace(workspace, warehouse_id=warehouse_id if query else None, endpoints=[settings.endpoint])
    client = workspace.client(settings.timeout)
    frame = read_input(client, input_path, query, warehouse_id, settings.timeout)
    model = load_schema(schema_path)
    items, errors = check_rows(frame, id_column, text_columns, settings.max_item_tokens, settings.oversized)
    for error in errors:
        log.warning(f"Skipped: {error['error']}")

    version = stable_key(PROMPT_VERSION, settings.endpoint, schema_of(model), instructions)
    job = BatchedJob(
        "enrich",
        "llm",
        Cache(ledger, "enrich", version),
        settings.max_concurrent,
        RetryPolicy(retries=settings.retry_attempts, base_delay_s=settings.retry_delay),
        settings.rpm,
        workspace_slug(client.config.host),
        adaptive=settings.adaptive,
    )
    result = run_all(
        job,
        items,
        key=content_key,
        pack=lambda todo: pack(todo, settings.batch_size, settings.max_batch_tokens),
        call=Call(
            enrich_by_schema,
            workspace,
            settings.timeout,
            "items",
            {"endpoint": settings.endpoint, "schema_path": schema_path, "instructions": instructions},
        ),
    )
    summary = _finish(frame, model, items, errors, result, started, output_dir)
    return rows_state(summary, summary["total"], (f["error_kind"] for f in summary["failures"]), "enriched")  # type: ignore[return-value]  # Prefect ends the run in this state and returns its data


def _finish(
    frame: pd.DataFrame,
    model: type[BaseModel],
    items: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    result: BatchedResult,
    started: float,
    output_dir: str,
) -> dict[str, Any]:
    fields = list(field_specs(model))
    columns: dict[str, list[Any]] = {f: [None] * len(frame) for f in fields}
    columns.update(
        status=["invalid_input"] * len(frame),
        error=[None] * len(frame),
        cached=[False] * len(frame),
        truncated=[False] * len(frame),
    )
    for error in errors:
        columns["error"][error["position"] - 1] = error["error"]
    failures = [
        {"row_key": e["id"], "phase": "input", "error_kind": "invalid_input", "message": e["error"]} for e in errors
    ]
    for item in items:
        at = item["position"] - 1
        columns["truncated"][at] = item.get("truncated", False)
        if item["id"] in result.values:
            for f in fields:
                columns[f][at] = result.values[item["id"]].get(f)
            columns["status"][at] = "ok"
            columns["cached"][at] = item["id"] in result.cached
        else:
            message = result.errors.get(item["id"], "no answer")
            columns["status"][at], columns["error"][at] = "failed", message
            failures.append({"row_key": item["id"], "phase": "enrich", "error_kind": "failed", "message": message})
    out = frame.copy()
    for name, values in columns.items():
        out[name if name not in frame.columns else f"enriched_{name}"] = values
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    files = write_frame(out, Path(output_dir) / f"enrich-{stamp}", "enriched")
    hits = sum(columns["cached"])
    ok = columns["status"].count("ok")
    summary = {
        "total": len(frame),
        "cache_hits": hits,
        "newly_enriched": ok - hits,
        "failed": len(frame) - ok,
        "truncated": sum(columns["truncated"]),
        "success_rate": round(ok / len(frame), 4) if len(frame) else 0.0,
        "api_calls": result.calls,
        "adaptive": result.adaptive,
        "tokens": result.tokens,
        "wall_time_s": round(time.monotonic() - started, 2),
        "failures": failures,
        "files": files,
    }
    report = "\n".join(
        [
            "=" * 60,
            "ENRICHMENT SUMMARY",
            "=" * 60,
            f"Total rows: {summary['total']}",
            f"Cache hits: {hits}",
            f"Newly enriched: {summary['newly_enriched']}",
            f"Failed: {summary['failed']}",
            f"Success rate: {summary['success_rate']:.1%}",
            f"API calls: {result.calls}",
            f"Tokens: {result.tokens}",
            f"Wall time: {summary['wall_time_s']} s",
            "=" * 60,
        ]
    )
    run_logger().info("\n" + report)
    publish("enrichment", failures[:1000], f"```\n{report}\n```\n\nRows: `{files['parquet']}`")
    return summary
