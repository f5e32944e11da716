"""Embed documents 100 per call, with a token and cost estimate before anything is spent and a budget the
run refuses to exceed; per-item results; vectors in a searchable local store.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from blocks.ledger import default_home
from blocks.settings import FORM
from blocks.workspace import workspace_slug
from flows.batched import BatchedJob, content_key, pending, run_batched
from flows.phase import load_blocks, rows_state, run_name
from tasks.calls import Call
from tasks.embed import (
    BudgetExceeded,
    DeltaVectorStore,
    StoreWriter,
    VectorStore,
    check_documents,
    embed_batch,
    estimate,
    schema_documents,
)
from tasks.inputs import InputError, read_input
from tasks.preflight import check_workspace
from tasks.report import publish, stable_key, write_frame
from tasks.resilience import Cache, RetryPolicy, run_logger


class EmbedSettings(BaseModel):
    """How documents are embedded. Every key can be set from the CLI (--set KEY=VALUE)."""

    model_config = FORM

    endpoint: str = Field("databricks-gte-large-en", description="embedding serving endpoint")
    batch_size: int = Field(100, ge=1, le=2048, description="documents per call (EMBEDDING_BATCH_SIZE)")
    max_concurrent: int = Field(4, ge=1, le=64, description="calls in flight at once")
    adaptive: bool = Field(
        False,
        description="adapt the calls in flight to what the endpoint takes, up to max_concurrent: fewer after a "
        "429, one more after a round of successes; the next run starts where this one ended",
    )
    rpm: float = Field(0, ge=0, description="calls per minute, shared by all runs (0: no limit)")
    retry_attempts: int = Field(3, ge=0, le=10, description="retries per call after the first attempt")
    retry_delay: float = Field(1, ge=0, description="first retry delay, seconds (doubles each retry)")
    timeout: float = Field(60, gt=0, le=600, description="seconds per call")
    price_per_million_tokens: float = Field(0.13, ge=0, description="the model's price, USD per 1M input tokens")
    max_cost_usd: float | None = Field(10.0, ge=0, description="refuse a run whose estimate is higher (None: no cap)")
    max_item_tokens: int = Field(8192, ge=16, description="longest text the endpoint takes, in tokens")
    chunk_oversized: bool = Field(False, description="split texts over max_item_tokens instead of refusing them")


def default_store() -> str:
    return str(default_home() / "vectors.duckdb")


@flow(
    name="embed-documents",
    flow_run_name=run_name("embed"),
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    persist_result=False,
)
def embed(
    input_path: str | None = None,
    catalog: str = "samples",
    schema_name: str = "retail",
    warehouse_id: str | None = None,
    settings: EmbedSettings | None = None,
    estimate_only: bool = False,
    store_path: str | None = None,
    store_table: str | None = None,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    output_dir: str = "out",
) -> dict[str, Any]:
    """Embed documents: a file of id + text (+ kind), or by default the documentation of a schema's tables
    and relationships read from the warehouse's information_schema.

    Args:
        input_path: CSV, JSONL, JSON or Parquet file with `id` and `text` (and optional `kind`) columns.
        catalog: with no file, the catalog whose schema is documented.
        schema_name: with no file, the schema whose tables and foreign keys become documents.
        warehouse_id: the warehouse that reads the information_schema.
        settings: endpoint, batch size, retries, price, budget, item size limit.
        estimate_only: report the estimate (pending items, batches, tokens, cost) and call nothing.
        store_path: the DuckDB file holding the vectors (default: ~/.batchflows/vectors.duckdb).
        store_table: instead, a table on `warehouse_id` (e.g. a Delta table main.docs.vectors) for the vectors.
        workspace_block: saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: saved RowLedger block holding finished items (default: ~/.batchflows).
        output_dir: where the per-item results go.
    """
    log = run_logger()
    settings = settings or EmbedSettings()
    started = time.monotonic()
    workspace, ledger = load_blocks(workspace_block, ledger_block)
    if warehouse_id or not estimate_only:  # an estimate of a documents file needs no workspace
        check_workspace(
            workspace,
            warehouse_id=None if input_path else warehouse_id,
            endpoints=[] if estimate_only else [settings.endpoint],
        )
    client = workspace.client(settings.timeout)
    if input_path:
        frame = read_input(client, input_path, None, None, settings.timeout)
        if not {"id", "text"} <= set(frame.columns):
            raise InputError(
                f"{input_path} needs 'id' and 'text' columns (it has: {', '.join(map(str, frame.columns))})"
            )
        raw: list[dict[str, Any]] = [{str(k): v for k, v in r.items()} for r in frame.to_dict("records")]
    elif warehouse_id:
        raw = schema_documents(client, warehouse_id, catalog, schema_name, settings.timeout)
    else:
        raise InputError("give a documents file, or a warehouse id to document a schema's tables")
    docs, errors = check_documents(raw, settings.max_item_tokens, settings.chunk_oversized)
    for error in errors:
        log.warning(f"Skipped: {error['error']}")

    job = BatchedJob(
        "embed",
        "embeddings",
        Cache(ledger, "embed", stable_key("embed-v1", settings.endpoint)),
        settings.max_concurrent,
        RetryPolicy(retries=settings.retry_attempts, base_delay_s=settings.retry_delay),
        settings.rpm,
        workspace_slug(client.config.host),
        adaptive=settings.adaptive,
    )
    cached, todo = pending(job, docs, content_key)
    plan = estimate(todo, settings.batch_size, settings.price_per_million_tokens)
    log.info(
        f"Processing statistics: {plan['pending']} pending ({_kinds(plan['pending_by_kind'])}), "
        f"{plan['estimated_batches']} batches, ~{plan['estimated_tokens']} tokens, "
        f"estimated cost ${plan['estimated_cost_usd']:.4f} (${plan['cost_per_item_usd']:.6f} per item; "
        f"{plan['tokenizer']})"
    )
    if estimate_only:
        publish("embedding-estimate", [plan | {"pending_by_kind": json.dumps(plan["pending_by_kind"])}], _plan_md(plan))
        return {"estimate": plan, "errors": errors}
    if settings.max_cost_usd is not None and plan["estimated_cost_usd"] > settings.max_cost_usd:
        message = (
            f"Estimated cost ${plan['estimated_cost_usd']:.4f} is over the budget max_cost_usd="
            f"${settings.max_cost_usd:.4f}: nothing was sent. Raise max_cost_usd or embed fewer documents."
        )
        publish("embedding-estimate", [], _plan_md(plan) + f"\n\n**Stopped:** {message}")
        log.error(message)
        raise BudgetExceeded(message)

    if store_table and not warehouse_id:
        raise InputError("a vector table needs the warehouse id that writes it")
    store: VectorStore | DeltaVectorStore = (
        DeltaVectorStore(client, str(warehouse_id), store_table, settings.timeout)
        if store_table
        else VectorStore(store_path or default_store())
    )
    with StoreWriter(store, settings.endpoint, docs) as writer:  # new vectors are written while calls go on
        result = run_batched(
            job,
            cached,
            todo,
            key=content_key,
            pack=lambda items: [items[i : i + settings.batch_size] for i in range(0, len(items), settings.batch_size)],
            call=Call(embed_batch, workspace, settings.timeout, "batch", {"endpoint": settings.endpoint}),
            on_good=writer,
        )
    rest = {i: v for i, v in result.values.items() if i not in writer.written}
    stored = len(writer.written) + store.upsert(settings.endpoint, docs, rest)
    summary = _finish(docs, errors, result, plan, stored, store.path, started, output_dir)
    total = summary["successful"] + len(summary["failures"])  # every item succeeded or has a failure record
    return rows_state(summary, total, (f["error_kind"] for f in summary["failures"]), "embedded")  # type: ignore[return-value]  # Prefect ends the run in this state and returns its data


def _seed_counts(kind: str, counts: dict[str, Any]) -> dict[str, int]:
    return {f"total_{kind}s_processed": counts["processed"], f"successful_{kind}s": counts["successful"]}


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}s" for kind, n in sorted(counts.items())) or "nothing"


def _plan_md(plan: dict[str, Any]) -> str:
    return (
        f"# Embedding estimate\n\n| pending | batches | tokens | cost (USD) | per item |\n|---|---|---|---|---|\n"
        f"| {plan['pending']} ({_kinds(plan['pending_by_kind'])}) | {plan['estimated_batches']} | "
        f"{plan['estimated_tokens']} | {plan['estimated_cost_usd']:.4f} | {plan['cost_per_item_usd']:.6f} |\n\n"
        f"Price ${plan['price_per_million_tokens_usd']} per 1M tokens; tokens by {plan['tokenizer']}."
    )


def _finish(
    docs: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    result: Any,
    plan: dict[str, Any],
    stored: int,
    store: str,
    started: float,
    output_dir: str,
) -> dict[str, Any]:
    results = {d["id"]: d["id"] in result.values for d in docs} | {e["id"]: False for e in errors}
    by_kind: dict[str, dict[str, Any]] = {}
    for d in [*docs, *errors]:
        kind = by_kind.setdefault(d["kind"], {"processed": 0, "successful": 0})
        kind["processed"] += 1
        kind["successful"] += int(results[d["id"]])
    for kind in by_kind.values():
        kind["success_rate"] = round(kind["successful"] / kind["processed"], 4)
    failures = [
        {"row_key": e["id"], "phase": "input", "error_kind": "invalid_input", "message": e["error"]} for e in errors
    ]
    failures += [
        {"row_key": i, "phase": "embed", "error_kind": "failed", "message": m} for i, m in result.errors.items()
    ]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    frame = pd.DataFrame(
        [
            {"id": i, "success": ok, "cached": i in result.cached, "error": result.errors.get(i)}
            for i, ok in results.items()
        ]
    )
    files = write_frame(frame, Path(output_dir) / f"embed-{stamp}", "results")
    successful = sum(results.values())
    kinds = {d["id"]: d["kind"] for d in [*docs, *errors]}
    summary = {
        **{
            f"{kind}_processing_results": {i: ok for i, ok in results.items() if kinds[i] == kind}
            for kind in sorted(by_kind)
        },
        "summary": {
            **{k: v for kind, n in sorted(by_kind.items()) for k, v in _seed_counts(kind, n).items()},
            "overall_success_rate": round(successful / len(results), 4) if results else 0.0,
        },
        "processed": len(results),
        "successful": successful,
        "success_rate": round(successful / len(results), 4) if results else 0.0,
        "by_kind": by_kind,
        "cache_hits": len(result.cached),
        "api_calls": result.calls,
        "adaptive": result.adaptive,
        "batches": result.batches,
        "tokens": result.tokens,
        "estimate": plan,
        "stored": stored,
        "store": store,
        "failures": failures,
        "wall_time_s": round(time.monotonic() - started, 2),
        "files": files,
    }
    (Path(files["csv"]).parent / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    files["json"] = str(Path(files["csv"]).parent / "summary.json")
    lines = [
        "# Embedding results",
        "",
        f"{successful}/{len(results)} items embedded ({len(result.cached)} from earlier runs) in "
        f"{result.calls} calls, {result.tokens} tokens (estimated {plan['estimated_tokens']} for the pending "
        f"ones), {summary['wall_time_s']} s.",
        "",
        "| kind | processed | successful | success rate |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['processed']} | {v['successful']} | {v['success_rate']:.1%} |"
            for k, v in sorted(by_kind.items())
        ],
        "",
        f"Vectors: `{store}` ({stored} rows for this model). Results: `{files['csv']}`",
    ]
    publish("embedding", failures[:1000], "\n".join(lines))
    run_logger().info(
        f"Embedded {successful}/{len(results)} items in {result.calls} calls; {len(failures)} failures; "
        f"stored in {store}"
    )
    return summary
