"""Analyse ordered items in parallel (one LLM call each, with the previous item's text as context), then
merge them in order: an item the analysis calls a fragment joins the item before it.
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

from blocks.settings import FORM
from blocks.workspace import workspace_slug
from flows.phase import PhaseSpec, load_blocks, rows_state, run_name, run_phase
from tasks.analyse import FAILED_ANALYSIS, PROMPT_VERSION, analyse_item, merge
from tasks.calls import Call
from tasks.inputs import InputError, read_input
from tasks.preflight import check_workspace
from tasks.report import publish, stable_key, write_frame
from tasks.resilience import Cache, RetryPolicy, Row, run_logger


class AnalyseSettings(BaseModel):
    """How items are analysed. Every key can be set from the CLI (--set KEY=VALUE)."""

    model_config = FORM

    endpoint: str = Field("databricks-meta-llama-3-3-70b-instruct", description="chat serving endpoint")
    batch_size: int = Field(10, ge=1, le=64, description="items analysed at once (the seed's EXAMINA_BATCH_SIZE)")
    retry_attempts: int = Field(2, ge=0, le=10, description="retries per call after the first attempt")
    retry_delay: float = Field(1, ge=0, description="first retry delay, seconds (doubles each retry)")
    timeout: float = Field(30, gt=0, le=600, description="seconds per call")
    rpm: float = Field(0, ge=0, description="calls per minute, shared by all runs (0: no limit)")


@flow(
    name="analyse-items",
    flow_run_name=run_name("analyse"),
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    persist_result=False,
)
def analyse(
    input_path: str | None = None,
    query: str | None = None,
    warehouse_id: str | None = None,
    id_column: str = "id",
    position_column: str = "position",
    text_column: str = "text",
    settings: AnalyseSettings | None = None,
    sequential: bool = False,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    output_dir: str = "out",
) -> dict[str, Any]:
    """Analyse every item concurrently, then merge fragments in position order.

    Args:
        input_path: CSV, JSONL, JSON or Parquet file of items (or use `query`).
        query: a SQL query on `warehouse_id` whose result is the items.
        warehouse_id: the warehouse that runs `query`.
        id_column: the items' id column.
        position_column: the column giving the items' order.
        text_column: the column holding each item's text.
        settings: endpoint, concurrency (batch size), retries, timeout, rpm.
        sequential: analyse one item at a time (for debugging); the output is the same.
        workspace_block: saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: saved RowLedger block holding finished analyses (default: ~/.batchflows).
        output_dir: where the report goes.
    """
    log = run_logger()
    settings = settings or AnalyseSettings()
    started = time.monotonic()
    workspace, ledger = load_blocks(workspace_block, ledger_block)
    check_workspace(workspace, warehouse_id=warehouse_id if query else None, endpoints=[settings.endpoint])
    client = workspace.client(settings.timeout)
    items = _items(
        read_input(client, input_path, query, warehouse_id, settings.timeout), id_column, position_column, text_column
    )
    for n, item in enumerate(items):
        item["previous"] = items[n - 1]["text"] if n else None

    version = stable_key(PROMPT_VERSION, settings.endpoint)
    spec = PhaseSpec(
        "analyse",
        "llm",
        settings.batch_size,
        RetryPolicy(retries=settings.retry_attempts, base_delay_s=settings.retry_delay),
        rpm=settings.rpm,
        cache=Cache(ledger, "analyse", version),
        sequential=sequential,
        workspace=workspace_slug(client.config.host),
    )
    rows = [Row(stable_key(i["text"], i["previous"]), n, i) for n, i in enumerate(items, start=1)]
    mode = "sequentially" if sequential else f"in parallel, {settings.batch_size} at a time"
    log.info(f"Analysing {len(items)} items {mode}")
    t0 = time.monotonic()
    outcomes = run_phase(
        spec, rows, Call(analyse_item, workspace, settings.timeout, "item", {"endpoint": settings.endpoint})
    )
    analysis_s = time.monotonic() - t0
    analyses: dict[str, dict[str, Any]] = {}
    failures = []
    for row in rows:
        outcome = outcomes[row.key]
        if outcome.status == "ok":
            analyses[row.payload["id"]] = {**outcome.value, "status": "ok", "error": None}
        else:
            analyses[row.payload["id"]] = {**FAILED_ANALYSIS, "status": "failed", "error": outcome.message}
            failures.append(
                {**outcome.failure_record("analyse"), "row_key": row.payload["id"]}  # the item's id, not its hash
            )
    groups = merge(items, analyses)
    log.info(f"Merged {len(items)} items into {len(groups)} groups; {len(failures)} analyses failed")
    summary = _finish(items, analyses, groups, failures, outcomes, rows, analysis_s, started, output_dir)
    return rows_state(summary, summary["items"], (f["error_kind"] for f in summary["failures"]), "analysed")  # type: ignore[return-value]  # Prefect ends the run in this state and returns its data


def _items(frame: pd.DataFrame, id_column: str, position_column: str, text_column: str) -> list[dict[str, Any]]:
    missing = [c for c in (id_column, position_column, text_column) if c not in frame.columns]
    if missing:
        raise InputError(
            f"column(s) {', '.join(missing)} not in the input (it has: {', '.join(map(str, frame.columns))})"
        )
    problems = []
    items = []
    seen_ids: dict[str, int] = {}
    seen_positions: dict[float, int] = {}
    for n, record in enumerate(frame.to_dict("records"), start=1):
        item_id = str(record[id_column]).strip() if record[id_column] is not None else ""
        text = str(record[text_column] or "").strip()
        try:
            position = float(record[position_column])
        except (TypeError, ValueError):
            problems.append(f"row {n}: position {record[position_column]!r} is not a number")
            continue
        if not item_id:
            problems.append(f"row {n}: empty id")
        elif item_id in seen_ids:
            problems.append(f"row {n}: duplicate id {item_id!r} (first at row {seen_ids[item_id]})")
        elif position in seen_positions:
            problems.append(
                f"row {n}: position {record[position_column]} already used by row {seen_positions[position]}"
            )
        elif not text:
            problems.append(f"row {n} (id {item_id}): empty text")
        else:
            seen_ids[item_id], seen_positions[position] = n, n
            items.append({"id": item_id, "position": position, "text": text})
    if problems:
        # an ordered merge with a hole in it would attach fragments to the wrong item: refuse, naming every row
        raise InputError("items cannot be merged in order:\n" + "\n".join(problems))
    return sorted(items, key=lambda i: i["position"])


def _finish(
    items: list[dict[str, Any]],
    analyses: dict[str, dict[str, Any]],
    groups: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    outcomes: dict[str, Any],
    rows: list[Row],
    analysis_s: float,
    started: float,
    output_dir: str,
) -> dict[str, Any]:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    directory = Path(output_dir) / f"analyse-{stamp}"
    frame = pd.DataFrame([{"id": i["id"], "position": i["position"], **analyses[i["id"]]} for i in items])
    files = write_frame(frame, directory, "analyses")
    (directory / "groups.json").write_text(json.dumps(groups, ensure_ascii=False, indent=1))
    files["groups"] = str(directory / "groups.json")
    summary = {
        "items": len(items),
        "analysed": len(items) - len(failures),
        "failed": len(failures),
        "cached": sum(1 for r in rows if outcomes[r.key].cached),
        "groups": len(groups),
        "merged": [g["ids"] for g in groups],
        "analysis_s": round(analysis_s, 3),
        "wall_time_s": round(time.monotonic() - started, 2),
        "failures": failures,
        "files": files,
    }
    markdown = (
        f"# Item analysis\n\n{summary['items']} items: {summary['analysed']} analysed ({summary['cached']} from "
        f"earlier runs), {summary['failed']} failed; merged into {summary['groups']} groups.\n\n"
        f"Analysis phase {summary['analysis_s']} s; whole run {summary['wall_time_s']} s.\n\nReport: "
        f"`{files['csv']}`, groups: `{files['groups']}`"
    )
    publish(
        "analysis", [{"group": g["group"], "ids": ", ".join(g["ids"]), "topic": g["topic"]} for g in groups], markdown
    )
    return summary
