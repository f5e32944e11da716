"""Improve a Genie space from its failures: score production, learn the domain's patterns from all
benchmarks, propose fixes for the failures, apply them to a dev copy, rescore the copy, promote only
when it is better, and always remove the copy.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound, ResourceConflict
from prefect import flow, tags
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from blocks.ledger import history_store
from blocks.settings import FORM, ScoreSettings
from blocks.workspace import DatabricksWorkspace, workspace_key, workspace_slug
from flows.batched import BatchedJob, run_all
from flows.phase import TAGS, load_blocks, run_name, summary_of
from flows.score import score
from tasks.benchmarks import Benchmark, load_benchmarks, space_benchmarks
from tasks.calls import Call, read_again
from tasks.improve import (
    CATEGORIES,
    LEARN_PROMPT,
    PROPOSE_PROMPT,
    apply_fixes,
    check_fix,
    fix_key,
    learn_batch,
    merge_patterns,
    propose_batch,
    space_summary,
)
from tasks.preflight import check_workspace
from tasks.report import publish, stable_key
from tasks.resilience import Cache, RetryPolicy, run_logger
from tasks.space_config import SpaceConfigError
from tasks.space_config import check as check_space_config

DEV_MARK = "batchflows dev copy of {space_id} for flow run "
ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


class ImproveSettings(BaseModel):
    """How the improvement loop learns, proposes and decides. Every key can be set from the CLI."""

    model_config = FORM

    iterations: int = Field(3, ge=1, le=20, description="improvement rounds at most (stops early when none helps)")
    margin: float = Field(
        0.0, ge=0, le=1, description="score gain (0-1) the dev copy needs over production to be promoted"
    )
    allow_regressions: bool = Field(False, description="promote even if a benchmark that passed now fails")
    endpoint: str = Field(
        "databricks-meta-llama-3-3-70b-instruct", description="chat endpoint that learns and proposes"
    )
    learn_batch_size: int = Field(10, ge=1, le=50, description="benchmarks per learning call")
    propose_batch_size: int = Field(5, ge=1, le=50, description="failing benchmarks per proposal call")
    max_concurrent: int = Field(4, ge=1, le=32, description="LLM calls in flight at once")
    rpm: float = Field(0, ge=0, description="LLM calls per minute across all runs (0: no limit)")
    retry_attempts: int = Field(2, ge=0, le=10, description="retries per call after the first attempt")
    retry_delay: float = Field(2, ge=0, description="first retry delay, seconds (doubles each retry)")
    timeout: float = Field(60, gt=0, le=600, description="seconds per LLM call")


class ImproveError(RuntimeError):
    """The loop cannot go on (e.g. production changed while it ran); production is left as it was."""


@flow(
    name="improve-genie-space",
    flow_run_name=run_name("improve", "space_id"),
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    persist_result=False,
)
def improve(
    benchmarks: str | list[Benchmark] | None,
    space_id: str,
    warehouse_id: str,
    settings: ImproveSettings | None = None,
    score_settings: ScoreSettings | None = None,
    cleanup: bool = True,
    dry_run: bool = False,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    output_dir: str = "out",
    breaker_block: str | None = None,
) -> dict[str, Any]:
    """Raise a Genie space's benchmark score by fixing its configuration, safely.

    Args:
        benchmarks: path of a JSON/YAML/CSV benchmarks file, or the benchmarks themselves; None: the
            benchmarks the space keeps.
        space_id: the production Genie space; it changes only when a dev copy scores better.
        warehouse_id: the SQL warehouse the scoring runs on.
        settings: iterations, promotion margin, regressions, LLM endpoint and batch sizes.
        score_settings: how each scoring runs (a preset with overrides).
        cleanup: remove each dev copy when its round ends (keep it with False, to inspect it).
        dry_run: score and propose fixes only; no space is created or changed.
        workspace_block: saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: saved RowLedger block (default: ~/.batchflows/ledger.sqlite).
        output_dir: where the reports go.
        breaker_block: name of the CircuitBreaker block guarding Genie during each scoring.
    """
    log = run_logger()
    settings = settings or ImproveSettings()
    started = time.monotonic()
    workspace, ledger = load_blocks(workspace_block, ledger_block)
    check_workspace(
        workspace,
        space_id=space_id,
        warehouse_id=warehouse_id,
        endpoints=[settings.endpoint, (score_settings or ScoreSettings()).judge_endpoint],
    )
    client = workspace.client(settings.timeout)
    run_id = _run_id()
    out = Path(output_dir) / f"improve-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    _sweep_dev_copies(client, space_id)

    production = read_again(lambda: client.genie.get_space(space_id, include_serialized_space=True), "the space")
    config = json.loads(production.serialized_space or "{}")
    etag = production.etag
    if isinstance(benchmarks, str):
        items = load_benchmarks(benchmarks)
    else:  # None: the space's own, which its dev copies carry too
        items = list(benchmarks) if benchmarks is not None else space_benchmarks(config, space_id)[0]

    def rescore(target: str, folder: str) -> dict[str, Any]:
        with tags(*TAGS):
            state = score(
                benchmarks,  # a file's path stays a path: flow parameters are capped (512 KB by default)
                target,
                warehouse_id,
                score_settings,
                workspace_block=workspace_block,
                ledger_block=ledger_block,
                output_dir=str(out / folder),
                breaker_block=breaker_block,
                history=target == space_id,  # dev copies live for one round: no history of their own
                return_state=True,
            )
        summary: dict[str, Any] = summary_of(state)
        return summary

    current = rescore(space_id, "production")
    log.info(f"Production {space_id}: {current['score']:.1%} ({_passed(current)}/{current['total']})")
    baseline = current["score"]

    llm = RetryPolicy(retries=settings.retry_attempts, base_delay_s=settings.retry_delay)
    patterns, learn_problems = _learn(workspace, ledger, settings, llm, items)
    by_id = {p["id"]: p for p in patterns}
    log.info(
        f"Learned {len(patterns)} patterns from {len(items)} benchmarks: {dict(Counter(p['kind'] for p in patterns))}"
    )

    rounds: list[dict[str, Any]] = []
    stop = f"{settings.iterations} iteration(s) done"
    for k in range(1, settings.iterations + 1):
        failing = [r for r in current["rows"] if r["verdict"] != "correct" and not r.get("flaky")]
        noise = sorted(r["id"] for r in current["rows"] if r["verdict"] != "correct" and r.get("flaky"))
        if noise:
            log.info(f"Not chasing flaky benchmarks (Genie's noise, not the configuration): {', '.join(noise)}")
        if not failing:
            stop = "every benchmark passes" if not noise else "every steady benchmark passes"
            break
        fixes, rejected, errors = _propose(workspace, ledger, settings, llm, failing, patterns, config)
        new_config, applied, skipped = apply_fixes(config, fixes)
        try:  # checked before any write: a workspace refuses what breaks its rules, after the dev copy's costs
            check_space_config(new_config)
        except SpaceConfigError as exc:
            raise ImproveError(f"iteration {k}: {exc}") from exc
        record: dict[str, Any] = {
            "iteration": k,
            "failing": len(failing),
            "proposed": len(fixes),
            "applied": applied,
            "skipped": [{**f, "reason": why} for f, why in skipped],
            "rejected": rejected,
            "proposal_errors": errors,
            "by_category": dict(Counter(f["category"] for f in applied)),
            "score_before": current["score"],
        }
        rounds.append(record)
        log.info(
            f"Iteration {k}: {len(failing)} failing; {len(fixes)} fixes proposed, {len(applied)} new, "
            f"{len(rejected)} rejected ({record['by_category']})"
        )
        for bad in rejected:
            log.warning(f"Rejected fix for {bad['benchmark']}: {bad['problem']}")
        if not applied:
            stop = "no new fix to try"
            break
        if dry_run:
            stop = "dry run: no space was created or changed"
            break
        dev = client.genie.create_space(
            warehouse_id=production.warehouse_id or warehouse_id,
            serialized_space=json.dumps(new_config, ensure_ascii=False),
            title=f"{production.title} (batchflows dev {k})",
            description=DEV_MARK.format(space_id=space_id)
            + f"{run_id} by process {os.getpid()}@{socket.gethostname()}",
            parent_path=production.parent_path,
        )
        record["dev_space_id"] = dev.space_id
        log.info(f"Dev copy {dev.space_id} created with {len(applied)} fixes")
        try:
            candidate = rescore(dev.space_id, f"dev-{k}")
            record.update(_compare(current, candidate, settings))
            log.info(
                f"Iteration {k}: dev {candidate['score']:.1%} vs production {current['score']:.1%}: "
                f"{record['decision']}"
            )
            if record["promoted"]:
                etag = _promote(client, space_id, etag, new_config)
                config, current = new_config, candidate
                record["version"] = _record_version(ledger, client, space_id, etag, config, run_id, candidate["score"])
                log.info(f"Production {space_id} is now version {record['version']} in the score history")
        finally:
            if cleanup:
                _remove(client, dev.space_id)
                record["dev_removed"] = True
        if not record["promoted"]:
            stop = f"iteration {k} did not improve enough: {record['decision']}"
            break

    summary = {
        "space_id": space_id,
        "dry_run": dry_run,
        "score_before": baseline,
        "score_after": current["score"],
        "promoted": any(r.get("promoted") for r in rounds),
        "versions": [r["version"] for r in rounds if r.get("version")],
        "stopped": stop,
        "patterns": patterns,
        "learn_problems": learn_problems,
        "iterations": rounds,
        "wall_time_s": round(time.monotonic() - started, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "improve.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    summary["report"] = str(out / "improve.json")
    publish("improvement", _table(rounds, by_id), _markdown(summary))
    log.info(f"Improvement: {baseline:.1%} -> {current['score']:.1%}; {stop}; report in {summary['report']}")
    return summary


def _record_version(
    ledger: Any,
    client: WorkspaceClient,
    space_id: str,
    etag: str | None,
    config: dict[str, Any],
    run_id: str,
    score: float,
) -> int:
    """The promoted configuration as a new version of the space, with the score its dev copy earned."""
    store = history_store(ledger, client)
    workspace = workspace_key(client.config.host or "")
    version = store.record_version(workspace, space_id, etag, config, "improve", run_id)
    store.set_version_score(workspace, space_id, version, score)
    return version


def _run_id() -> str:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else uuid.uuid4().hex


def _passed(card: dict[str, Any]) -> int:
    return int(card["verdicts"]["correct"])


def _learn(
    workspace: DatabricksWorkspace,
    ledger: Any,
    settings: ImproveSettings,
    policy: RetryPolicy,
    items: list[Benchmark],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Patterns of all benchmarks (passing and failing), one call per batch, each benchmark's cached."""
    cache = Cache(ledger, "learn", f"{LEARN_PROMPT}:{settings.endpoint}")
    job = BatchedJob("learn", "llm", cache, settings.max_concurrent, policy, workspace=_slug(workspace, settings))
    todo_items = [{"id": b.id, "question": b.question, "expected_sql": b.expected_sql} for b in items]
    result = run_all(
        job,
        todo_items,
        key=_learned_key,
        pack=lambda todo: _batches(todo, settings.learn_batch_size),
        call=Call(learn_batch, workspace, settings.timeout, "items", {"endpoint": settings.endpoint}),
    )
    return merge_patterns(result.values), result.errors


def _learned_key(item: dict[str, Any]) -> str:
    return stable_key(item["question"], item["expected_sql"])


def _proposed_key(item: dict[str, Any], context: str) -> str:
    return stable_key(item, context)


def _slug(workspace: DatabricksWorkspace, settings: ImproveSettings) -> str:
    return workspace_slug(workspace.client(settings.timeout).config.host)


def _propose(
    workspace: DatabricksWorkspace,
    ledger: Any,
    settings: ImproveSettings,
    policy: RetryPolicy,
    failing: list[dict[str, Any]],
    patterns: list[dict[str, Any]],
    config: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """(valid fixes merged across benchmarks, rejected fixes with their problem, benchmarks with no answer)."""
    space = space_summary(config)
    job = BatchedJob(
        "propose",
        "llm",
        Cache(ledger, "propose", f"{PROPOSE_PROMPT}:{settings.endpoint}"),
        settings.max_concurrent,
        policy,
        workspace=_slug(workspace, settings),
    )
    fields = ("id", "question", "expected_sql", "genie_sql", "verdict", "reason")
    todo_items = [{f: r[f] for f in fields} for r in failing]
    shown = [{k: p[k] for k in ("id", "kind", "term", "name", "maps_to")} for p in patterns]
    result = run_all(
        job,
        todo_items,
        key=functools.partial(_proposed_key, context=stable_key(patterns, space)),
        pack=lambda todo: _batches(todo, settings.propose_batch_size),
        call=Call(
            propose_batch,
            workspace,
            settings.timeout,
            "items",
            {"endpoint": settings.endpoint, "patterns": shown, "space": space},
        ),
    )
    by_id = {p["id"]: p for p in patterns}
    merged: dict[str, dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    for benchmark_id, raw_fixes in sorted(result.values.items()):
        if not raw_fixes:
            rejected.append({"benchmark": benchmark_id, "fix": None, "problem": "no fix proposed (empty answer)"})
        for raw in raw_fixes:
            fix, problem = check_fix(raw, by_id)
            if fix is None:
                rejected.append({"benchmark": benchmark_id, "fix": raw, "problem": problem})
                continue
            entry = merged.setdefault(fix_key(fix), {**fix, "benchmarks": []})
            entry["benchmarks"].append(benchmark_id)
    return list(merged.values()), rejected, result.errors


def _batches(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _compare(before: dict[str, Any], after: dict[str, Any], settings: ImproveSettings) -> dict[str, Any]:
    """The promotion decision for a dev copy's scorecard `after` against production's `before`."""
    was = {r["id"]: r["verdict"] == "correct" for r in before["rows"]}
    now = {r["id"]: r["verdict"] == "correct" for r in after["rows"]}
    flaky = {r["id"] for r in before["rows"] if r.get("flaky")}
    flipped = sorted(i for i in now if now[i] and not was.get(i))
    regressed = sorted(i for i in now if was.get(i) and not now[i] and i not in flaky)
    gain = round(after["score"] - before["score"], 4)
    if gain <= 0:
        decision = f"no gain ({gain:+.1%})"
    elif gain < settings.margin:
        decision = f"gain {gain:+.1%} is below the margin {settings.margin:.1%}"
    elif regressed and not settings.allow_regressions:
        decision = f"gain {gain:+.1%} but {len(regressed)} passing benchmark(s) regressed: {', '.join(regressed)}"
    else:
        decision = f"promoted: gain {gain:+.1%}"
    return {
        "score_after": after["score"],
        "gain": gain,
        "flipped": flipped,
        "regressed": regressed,
        "promoted": decision.startswith("promoted"),
        "decision": decision,
    }


def _promote(client: WorkspaceClient, space_id: str, etag: str | None, config: dict[str, Any]) -> str | None:
    """Write `config` to production, only if production is still the version that was scored."""
    check_space_config(config)
    try:
        space = client.genie.update_space(space_id, serialized_space=json.dumps(config, ensure_ascii=False), etag=etag)
    except ResourceConflict as exc:
        raise ImproveError(
            f"production space {space_id} changed while the improvement ran (etag {etag}); not promoted, "
            "rerun to start from its new configuration"
        ) from exc
    run_logger().info(f"Promoted the dev configuration to production space {space_id}")
    return space.etag


def _remove(client: WorkspaceClient, space_id: str) -> None:
    try:
        client.genie.trash_space(space_id)
        run_logger().info(f"Dev copy {space_id} removed")
    except NotFound:
        pass


def _sweep_dev_copies(client: WorkspaceClient, space_id: str) -> None:
    """Remove dev copies of `space_id` left by runs that ended without cleaning up: runs the Prefect API knows
    as finished, or whose process on this machine is gone (a killed run stays RUNNING in the API)."""
    mark = DEV_MARK.format(space_id=space_id)
    stale = []
    page_token = None
    while True:
        page = read_again(functools.partial(client.genie.list_spaces, page_token=page_token), "the spaces")
        for space in page.spaces or []:
            if space.description and space.description.startswith(mark):
                run_id, _, owner = space.description[len(mark) :].partition(" by process ")
                stale.append((space.space_id, run_id, owner))
        page_token = page.next_page_token
        if not page_token:
            break
    if not stale:
        return
    with get_client(sync_client=True) as prefect:
        for dev_id, run_id, owner in stale:
            try:
                state = prefect.read_flow_run(uuid.UUID(run_id)).state
            except Exception:  # not a run this Prefect API knows: its run is not going on here
                state = None
            if state is not None and state.type.value in ACTIVE_STATES and _alive(owner):
                continue
            _remove(client, dev_id)
            run_logger().warning(f"Removed dev copy {dev_id} left by flow run {run_id}")


def _alive(owner: str) -> bool:
    """Whether the process `pid@host` may still run (a process on another machine is assumed alive)."""
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _table(rounds: list[dict[str, Any]], patterns: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in rounds:
        for fix in r["applied"]:
            pattern = patterns.get(fix.get("pattern") or "", {})
            rows.append(
                {
                    "iteration": r["iteration"],
                    "category": fix["category"],
                    "benchmarks": ", ".join(fix["benchmarks"]),
                    "pattern": f"{fix.get('pattern')}: {pattern.get('term') or pattern.get('name') or ''} -> "
                    f"{pattern.get('maps_to', '')}"
                    if pattern
                    else "(the benchmark itself)",
                    "flipped": ", ".join(b for b in fix["benchmarks"] if b in r.get("flipped", [])),
                    "promoted": r.get("promoted", False),
                }
            )
    return rows


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Genie space improvement: {summary['score_before']:.1%} -> {summary['score_after']:.1%}",
        "",
        f"Space `{summary['space_id']}`; {'dry run; ' if summary['dry_run'] else ''}"
        f"{'promoted' if summary['promoted'] else 'production unchanged'}; stopped: {summary['stopped']}.",
        f"{len(summary['patterns'])} patterns learned from all benchmarks.",
        "",
        "| iteration | failing | fixes applied | "
        + " | ".join(CATEGORIES)
        + " | rejected | score before | after | flipped | regressed | decision |",
        "|---" * (10 + len(CATEGORIES)) + "|",
    ]
    for r in summary["iterations"]:
        counts = " | ".join(str(r["by_category"].get(c, 0)) for c in CATEGORIES)
        after = r.get("score_after")
        lines.append(
            f"| {r['iteration']} | {r['failing']} | {len(r['applied'])} | {counts} | {len(r['rejected'])} | "
            f"{r['score_before']:.1%} | {'' if after is None else f'{after:.1%}'} | "
            f"{', '.join(r.get('flipped', []))} | {', '.join(r.get('regressed', []))} | {r.get('decision', '')} |"
        )
    versions = [f"v{r['version']} (iteration {r['iteration']})" for r in summary["iterations"] if r.get("version")]
    if versions:
        lines += [
            "",
            f"Versions created: {', '.join(versions)}; `batchflows versions --space-id {summary['space_id']}` lists "
            f"them, `batchflows rollback --space-id {summary['space_id']} --to V` restores one.",
        ]
    lines += ["", f"Report: `{summary.get('report', '')}`"]
    return "\n".join(lines)
