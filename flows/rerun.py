"""Rerun only the failed rows of an earlier scoring run, reusing every cached success, and merge the new
verdicts into the earlier report so there is one up-to-date result.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, tags

from blocks.settings import ScoreSettings
from flows.phase import TAGS, run_name, summary_of
from flows.score import FAILED, score
from tasks.inputs import InputError
from tasks.report import publish, write_frame
from tasks.resilience import run_logger

# Failures a rerun repeats exactly unless it asks Genie and the warehouse again (--fresh): the SQL itself
# failed in the warehouse or was refused, and both the answer and the statement's result are in the ledger.
SAME_WITHOUT_FRESH = {
    "genie_sql": "Genie's SQL failed in the warehouse",
    "not_read_only": "Genie's SQL was refused",
    "expected_sql": "the benchmark's expected SQL failed (fix the benchmark)",
    "expected_not_read_only": "the benchmark's expected SQL was refused (fix the benchmark)",
}


def rerunnable(row: dict[Any, Any], fresh: bool) -> str | None:
    """Why a rerun cannot change this failed row (None when it can)."""
    if fresh or row["verdict"] != "sql_error":
        return None
    why = SAME_WITHOUT_FRESH.get(str(row.get("error_kind")))
    return f"{why}; the same cached answer would fail the same way (use --fresh)" if why else None


def find_report(report: str) -> Path:
    """The report folder of `report`: a folder, or the flow run id of a scoring run (its folder is found under
    that run's output_dir, which the Prefect API keeps among the run's parameters)."""
    try:
        run_id = uuid.UUID(report.strip())
    except ValueError:
        return Path(report)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except ObjectNotFound as exc:
            raise InputError(f"no flow run {run_id} in this Prefect API") from exc
    output_dir = Path(flow_run.parameters.get("output_dir") or "out")
    found = sorted(output_dir.glob(f"score-*-{str(run_id)[:8]}"))
    found = [f for f in found if json.loads((f / "run.json").read_text()).get("flow_run_id") == str(run_id)]
    if not found:
        raise InputError(
            f"flow run {run_id} ({flow_run.name}) left no scoring report under {output_dir.resolve()}: is it a "
            "score-genie-space run, and does this machine see its output folder?"
        )
    return found[-1]


@flow(name="rerun-failed", flow_run_name=run_name("rerun-failed"), persist_result=False)
def rerun_failed(
    report: str,
    kinds: list[str] | None = None,
    settings: ScoreSettings | None = None,
    fresh: bool = False,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Score again the benchmarks an earlier run could not judge (genie_error, sql_error, timeout,
    judge_error), then merge.

    Args:
        report: the earlier scoring run: its flow run id, or its report folder (out/score-…, holding
            scorecard.parquet and run.json).
        kinds: only rows whose verdict or error kind is one of these (default: every failed verdict).
        settings: other settings for the rerun (default: the earlier run's).
        fresh: ask Genie again even for answers in the ledger (e.g. after fixing the space).
        output_dir: where the rerun's and the merged reports go (default: next to the earlier report).
    """
    log = run_logger()
    folder = find_report(report)
    try:
        earlier = pd.read_parquet(folder / "scorecard.parquet")
        run = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{report} is not a scoring report folder (scorecard.parquet and run.json): {exc}") from exc
    rows = earlier.to_dict("records")
    wanted = set(kinds or FAILED)
    chosen = [r for r in rows if r["verdict"] in FAILED and (r["verdict"] in wanted or r["error_kind"] in wanted)]
    unchanged = {r["id"]: why for r in chosen if (why := rerunnable(r, fresh))}
    failed = [r for r in chosen if r["id"] not in unchanged]
    for row_id, why in unchanged.items():
        log.warning(f"{row_id} not rerun: {why}")
    log.info(f"{len(failed)} of {len(rows)} rows to rerun ({', '.join(sorted(wanted))})")
    out = output_dir or str(folder.parent)
    if not failed:
        return {
            "rerun": 0,
            "total": len(rows),
            "not_rerun": unchanged,
            "files": {"csv": str(folder / "scorecard.csv")},
        }
    # by reference: a flow run's parameters are capped (512 KB by default), a few thousand rows exceed it
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    todo = Path(out) / f"rerun-benchmarks-{stamp}.json"
    todo.parent.mkdir(parents=True, exist_ok=True)
    todo.write_text(json.dumps([{k: r[k] for k in ("id", "question", "expected_sql")} for r in failed]))
    with tags(*TAGS):
        state = score(
            str(todo),
            run["space_id"],
            run["warehouse_id"],
            settings or ScoreSettings(**run["settings"]),
            workspace_block=run["workspace_block"],
            ledger_block=run["ledger_block"],
            breaker_block=run["breaker_block"],
            output_dir=out,
            fresh=fresh,
            history=False,  # a subset of the benchmarks: its score is no point of the space's trend
            return_state=True,
        )
    again = summary_of(state)
    new = {r["id"]: r for r in again["rows"]}
    merged = [{**r, **new[r["id"]], "rerun": True} if r["id"] in new else {**r, "rerun": False} for r in rows]
    files = write_frame(pd.DataFrame(merged), Path(out) / f"score-merged-{stamp}", "scorecard")
    Path(files["csv"]).with_name("run.json").write_text(json.dumps(run, indent=1))
    counts = Counter(r["verdict"] for r in merged)
    fixed = sum(1 for r in failed if new[r["id"]]["verdict"] not in FAILED)
    summary = {
        "rerun": len(failed),
        "not_rerun": unchanged,
        "fixed": fixed,
        "still_failed": len(failed) - fixed,
        "total": len(merged),
        "score": round(counts["correct"] / len(merged), 4),
        "verdicts": dict(counts),
        "rows": merged,
        "files": files,
    }
    publish(
        "scorecard-merged",
        [{k: r[k] for k in ("id", "verdict", "stage", "reason", "rerun")} for r in merged],
        f"# Merged scorecard: {summary['score']:.1%}\n\n{len(failed)} failed rows rerun: {fixed} now have a "
        f"verdict, {summary['still_failed']} still failed.\n\nReport: `{files['csv']}`",
    )
    log.info(f"Rerun: {fixed}/{len(failed)} failed rows now judged; merged score {summary['score']:.1%}")
    return summary
