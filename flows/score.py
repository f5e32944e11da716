"""Score a Genie space against benchmark questions: ask Genie, run both SQLs, compare, judge the rest."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from sqlalchemy.exc import SQLAlchemyError

from blocks.breaker import CircuitBreaker, breaker_name
from blocks.ledger import RowLedger, history_store
from blocks.settings import Preset, ScoreOverrides, ScoreSettings, resolve_score_settings
from blocks.workspace import EMBEDDED_SANDBOX_BLOCK, DatabricksWorkspace, workspace_key, workspace_slug
from flows.phase import (
    Feed,
    PhaseSpec,
    SlotsAhead,
    adapted,
    in_background,
    in_threads,
    load_blocks,
    rows_state,
    run_name,
    run_phase,
)
from tasks.benchmarks import Benchmark, load_benchmarks, repeated_questions, space_benchmarks
from tasks.calls import Call, ask_genie, read_again, run_sql
from tasks.compare import Rounding, Rules, compare, rounding, sorting
from tasks.guard import read_only_problem
from tasks.history import HistoryError, HistoryStore
from tasks.judge import PROMPT_VERSION, case_item, judge_cases
from tasks.meter import Meter, metered
from tasks.preflight import check_workspace
from tasks.report import publish, publish_markdown, stable_key, write_frame
from tasks.resilience import Cache, RetryPolicy, Row, RowOutcome, alongside
from tasks.trend import trend_markdown, trend_rows, write_html

VERDICTS = ("correct", "incorrect", "genie_error", "sql_error", "no_sql", "timeout", "judge_error")
FAILED = ("genie_error", "sql_error", "timeout", "judge_error")  # no verdict on the answer: worth a rerun
HISTORY_ERRORS = (SQLAlchemyError, HistoryError, OSError)


@flow(
    name="score-genie-space",
    flow_run_name=run_name("score", "space_id"),
    # threads, not processes: the SQL phase takes Genie's answers as they come (a Feed). Enough of them that
    # a phase's tasks never queue behind the other's: a task waiting for its lane costs an idle thread only
    task_runner=ThreadPoolTaskRunner(max_workers=64),  # type: ignore[arg-type]
    persist_result=False,
)
def score(
    benchmarks: str | list[Benchmark] | None,
    space_id: str,
    warehouse_id: str,
    settings: ScoreOverrides | None = None,  # type: ignore[valid-type]
    sequential: bool = False,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    output_dir: str = "out",
    fresh: bool = False,
    breaker_block: str | None = None,
    preset: Preset = "default",
    settings_block: str | None = None,
    history: bool = True,
) -> dict[str, Any]:
    """Score `space_id` on the benchmarks (a file path or a list) and return the scorecard.

    Args:
        benchmarks: path of a JSON/YAML/CSV benchmarks file, or the benchmarks themselves; None scores the
            benchmarks the space keeps (serialized_space.benchmarks).
        space_id: the Genie space to score.
        warehouse_id: the SQL warehouse that runs the expected SQL and Genie's SQL.
        settings: the settings to change from the preset (or settings block) for this run; empty fields keep
            the preset's values.
        sequential: run every phase one call at a time (slow; for a service that cannot take concurrent calls).
        workspace_block: name of a saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: name of a saved RowLedger block (default: ~/.batchflows/ledger.sqlite).
        output_dir: where the report's Parquet and CSV files go.
        fresh: ask everything again, ignoring finished rows of earlier runs of the same inputs; the new answers
            replace the older ones (so a rerun of this run's failures finds them).
        breaker_block: name of the CircuitBreaker block guarding Genie (default: one per workspace, created
            CLOSED if missing). Its threshold and cooldown hold unless this run's settings set them.
        preset: the built-in settings the run starts from: default, conservative or aggressive.
        settings_block: a saved ScorePreset block to start from instead of the preset.
        history: record the run, and the space's configuration as a version, in the score history (improve
            turns it off for its short-lived dev copies).
    """
    log = get_run_logger()
    overrides = settings
    settings, changed = resolve_score_settings(preset, overrides, settings_block)
    log.info(
        f"Settings: {f'block {settings_block}' if settings_block else f'preset {preset}'}, "
        f"changed for this run: {', '.join(f'{k}={v}' for k, v in changed.items()) or 'nothing'}; in use: "
        + json.dumps(settings.model_dump(), separators=(",", ":"))
    )
    # upkeep (slots given back, conversations deleted, artifacts sent) goes on in threads while the run goes
    # on, and Genie's slots are taken while it sets up
    with alongside(), contextlib.ExitStack() as early:
        started = time.monotonic()
        workspace, ledger = load_blocks(workspace_block, ledger_block)
        # the workspace is checked, and the space read, while the breaker comes from the Prefect server; an input
        # the pre-flight refuses is the error
        checked = in_background(
            check_workspace,
            workspace,
            space_id=space_id,
            warehouse_id=warehouse_id,
            endpoints=[settings.judge_endpoint],
        )
        try:
            # one HTTP request never needs the whole answer's time: a hung one is dropped after a minute at most
            genie_timeout = min(settings.genie_timeout, 60)
            genie_client = workspace.client(genie_timeout)
            read = in_background(_space, genie_client, space_id)
            scope = workspace_slug(genie_client.config.host)
            genie_spec = PhaseSpec(  # its limits now (its slots are taken meanwhile); its breaker and cache below
                "genie",
                "genie",
                settings.genie_max_concurrent,
                RetryPolicy(retries=settings.genie_retry_attempts, base_delay_s=settings.genie_retry_delay),
                rpm=settings.genie_rpm,
                fallback_delay_s=settings.fallback_delay,
                fallback_max_wait_s=settings.fallback_max_wait,
                sequential=sequential,
                task_per_row=True,  # a few questions a minute: each one a task the UI shows, retried and cached
                adaptive=settings.genie_adaptive,
                workspace=scope,
            )
            ahead = early.enter_context(SlotsAhead(genie_spec))
            breaker_block = breaker_block or breaker_name("genie", scope)
            breaker = CircuitBreaker.load_or_create(
                breaker_block,
                changed.get("genie_circuit_threshold"),
                changed.get("genie_circuit_cooldown"),
                new=(settings.genie_circuit_threshold, settings.genie_circuit_cooldown),
            )
        finally:
            checked.result()
        space, config = read.result()
        items = _benchmarks(benchmarks, config, space_id)
        flow_run_id = str(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]
        session = stable_key(space_id, space.etag, warehouse_id, "")
        pace = f"{settings.genie_rpm:g} a minute" if settings.genie_rpm else "no rate limit"
        log.info(
            f"Phase 1 (Genie): {len(items)} questions, {settings.genie_max_concurrent} at a time, {pace}, "
            f"{settings.genie_retry_attempts} retries; circuit breaker {breaker_block} "
            f"{breaker.current_state()} (opens after {breaker.failure_threshold} failures in a row)"
            f"{'; sequential' if sequential else ''}"
        )

        # Phase 2 runs alongside phase 1, so the warehouse works (and warms up) while Genie is asked. It starts
        # with every expected SQL once Genie's first round of questions is out, or with its first answer (not
        # sooner: phase 1's start is not slowed, nor its second round's), and takes each answer's SQL as it
        # arrives. Sequential runs keep one call at a time, and tasks in other processes (a process task
        # runner) cannot take rows as they come: both run phase 2 after phase 1.
        pipelined = not sequential and in_threads()
        allowed = settings.allowed_functions
        sql_feed = Feed()
        expected_in = threading.Lock()  # taken once, by the first caller: the expected SQL goes in once
        settled: set[str] = set()  # Genie rows with their final outcome

        def expected_sql() -> None:
            # checked, and parsed for the comparison (the parses are kept), while Genie thinks
            if expected_in.acquire(blocking=False):
                for sql in dict.fromkeys(b.expected_sql for b in items):
                    if not read_only_problem(sql, "the expected SQL", allowed):
                        sql_feed.put(_sql_key(warehouse_id, sql), {"sql": sql})
                        sorting(sql)
                        rounding(sql)

        asked = itertools.count(1)

        def on_asked() -> None:
            if next(asked) == min(genie_spec.at_once, len(genie_rows)):  # the first round is out
                expected_sql()

        def answer_sql(answer: RowOutcome) -> None:
            expected_sql()
            if answer.status == "ok" and answer.value["kind"] == "sql":
                sql, parameters = answer.value["sql"], answer.value.get("parameters")
                if not read_only_problem(sql, allowed=allowed):
                    sql_feed.put(_sql_key(warehouse_id, sql, parameters), {"sql": sql, "parameters": parameters})
                    rounding(sql)
            settled.add(answer.key)
            if len(settled) == len(genie_rows):  # the last answer: phase 2 ends with its SQL, while phase 1's
                sql_feed.close()  # slots are given back (cached answers come after phase 1, which closes it then)

        sql_timeout = min(settings.sql_timeout, 55) + 5  # above the 50 s the server is asked to wait
        sql_spec = PhaseSpec(
            "sql",
            "sql",
            settings.sql_max_concurrent,
            RetryPolicy(retries=settings.sql_retry_attempts, base_delay_s=1),
            # v3: every chunk of a result is read (v2 stopped at the first); results carry column types, exact numbers
            cache=Cache(ledger, "sql", f"sql-v3:{session}:{settings.sql_row_limit}", read=not fresh),
            sequential=sequential,
            adaptive=settings.sql_adaptive,
            workspace=scope,
        )
        sql_call = Call(  # a statement is {"sql", "parameters"}
            run_sql,
            workspace,
            sql_timeout,
            None,
            {"warehouse_id": warehouse_id, "timeout_s": settings.sql_timeout, "row_limit": settings.sql_row_limit},
        )
        t2 = time.monotonic()
        with metered() as sql_calls:  # the phase's thread keeps this meter
            sql_phase = in_background(run_phase, sql_spec, sql_feed, sql_call) if pipelined else None

        # Phase 1: ask Genie (each question `repeats` times; benchmarks that repeat a question share its answers)
        t1 = time.monotonic()
        for ids in repeated_questions(items):
            log.warning(
                f"Benchmarks {', '.join(ids)} ask the same question: Genie is asked it once"
                f"{f' ({settings.repeats} times)' if settings.repeats > 1 else ''} and the answer is compared with "
                "each one's expected SQL"
            )
        genie_spec = replace(
            genie_spec,
            breaker=breaker,
            cache=Cache(ledger, "genie", f"genie-v1:{session}", read=not fresh),
            on_done=answer_sql if pipelined else None,
        )
        pairs = [(b, r) for b in items for r in range(settings.repeats)]  # log lines name q13, q13#2, ...
        asks = [
            (b, Row(_genie_key(space_id, b.question, r), i, b.question, b.id + (f"#{r + 1}" if r else "")))
            for i, (b, r) in enumerate(pairs)
        ]
        genie_rows: list[Row] = list({row.key: row for _, row in asks}.values())
        try:
            with metered() as genie_calls:
                answers = run_phase(
                    genie_spec,
                    genie_rows,
                    Call(
                        ask_genie,
                        workspace,
                        genie_timeout,
                        "question",
                        {
                            "space_id": space_id,
                            "timeout_s": settings.genie_timeout,
                            "poll_initial_s": settings.genie_poll_initial,
                            "poll_max_s": settings.genie_poll_max,
                            **({"on_asked": on_asked} if pipelined else {}),
                        },
                    ),
                    ahead,
                )
            for answer in answers.values():  # cached ones and the fallback's too; a key put twice runs once
                answer_sql(answer)
        finally:
            sql_feed.close()  # the SQL phase ends with what it has, also when phase 1 failed
        answered = sum(1 for o in answers.values() if o.status == "ok")
        phases = [_phase_figures("genie", answers, t1, genie_calls)]
        log.info(
            f"Phase 1 (Genie) complete: {answered}/{len(genie_rows)} answered in {time.monotonic() - t1:.1f}s "
            f"(circuit: {breaker.current_state().lower()})"
        )

        # Phase 2: the rest of the SQL (all of it, when not pipelined)
        if sql_phase is None:
            t2 = time.monotonic()
            with metered() as sql_calls:
                results = run_phase(sql_spec, sql_feed, sql_call)
        else:
            results = sql_phase.result()
        sql_rows = sql_feed.rows
        ran = sum(1 for o in results.values() if o.status == "ok" and "error" not in o.value)
        overlap = {"alongside": "genie"} if pipelined else {}  # its seconds overlap Genie's
        phases.append({**_phase_figures("sql", results, t2, sql_calls), "succeeded": ran, **overlap})
        log.info(
            f"Phase 2 (SQL) complete: {ran}/{len(sql_rows)} statements ran in {time.monotonic() - t2:.1f}s"
            f"{', alongside phase 1' if pipelined else ''}"
        )

        # Compare, then Phase 3: judge what the comparison cannot decide
        t3 = time.monotonic()
        rules = Rules(settings.numeric_tolerance, settings.numeric_abs_tolerance, settings.extra_columns)
        attempts = [_decide(b, answers[row.key], results, warehouse_id, rules, allowed) for b, row in asks]
        undecided = [(a, b) for a, (b, _) in zip(attempts, asks, strict=True) if a["verdict"] is None]
        with metered() as judge_calls:
            _judge(undecided, results, warehouse_id, settings, workspace, ledger, sequential)
        report = _agreement(attempts, settings.repeats)
        passed = sum(1 for r in report if r["verdict"] == "correct")
        phases.append(
            {
                "phase": "judge",
                "total": len(undecided),
                "succeeded": sum(1 for a, _ in undecided if a["verdict"] != "judge_error"),
                "cached": 0,
                "calls": judge_calls.calls,
                "seconds": round(time.monotonic() - t3, 2),
                **_adapted("judge"),
            }
        )
        log.info(
            f"Phase 3 (compare and judge) complete: {passed}/{len(report)} correct "
            f"({len(undecided)} judged in {judge_calls.calls} LLM calls, {time.monotonic() - t3:.1f}s)"
        )

        seen: dict[str, Any] = {}
        if history:  # the configuration version and flaky benchmarks, before the report is written
            try:
                seen = _history_before(ledger, genie_client, space_id, space.etag, config, report, settings)
            except HISTORY_ERRORS as exc:  # the scores matter more than their history: report them anyway
                log.error(f"Score history unavailable, this run is not recorded in it: {exc}")
        run = {
            "flow_run_id": flow_run_id,
            "space_id": space_id,
            "warehouse_id": warehouse_id,
            "workspace_block": workspace_block,
            "ledger_block": ledger_block,
            "breaker_block": breaker_block,
        }
        # the artifacts go to the Prefect server while the files are written
        summary = _finish(report, answers, breaker, output_dir, started, phases, settings, run)
        summary["settings_source"] = {"preset": preset, "settings_block": settings_block, "changed": changed}
        if seen:
            try:
                summary["history"] = _history_after(seen, summary, answers, space.etag, output_dir)
            except HISTORY_ERRORS as exc:
                log.error(f"Score history unavailable, this run is not recorded in it: {exc}")
        failed = (r["verdict"] for r in report if r["verdict"] in FAILED)
        return rows_state(summary, summary["total"], failed, "judged")  # type: ignore[return-value]  # Prefect ends the run in this state and returns its data


def _space(client: Any, space_id: str) -> tuple[Any, dict[str, Any] | None]:
    """The space and its configuration (None where this user may not read it: CAN RUN is enough to score)."""
    from databricks.sdk.errors import PermissionDenied

    try:
        space = read_again(lambda: client.genie.get_space(space_id, include_serialized_space=True), "the space")
    except PermissionDenied:
        return read_again(lambda: client.genie.get_space(space_id), "the space"), None
    return space, json.loads(space.serialized_space) if space.serialized_space else None


def _history_before(
    ledger: RowLedger,
    client: Any,
    space_id: str,
    etag: str | None,
    config: dict[str, Any] | None,
    report: list[dict[str, Any]],
    settings: ScoreSettings,
) -> dict[str, Any]:
    """Record the space's configuration as a version, and mark the report's flaky benchmarks (in place)."""
    store, workspace = history_store(ledger, client), _host(client)
    run_id = str(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]
    version = store.record_version(workspace, space_id, etag, config, "score", run_id)
    verdicts = {r["id"]: r["verdict"] for r in report}
    flaky = store.flaky(workspace, space_id, version, verdicts, settings.flaky_window)
    for row in report:
        row["flaky"] = row["id"] in flaky
    if flaky:
        get_run_logger().warning(
            f"Flaky benchmarks (verdict changed twice or more in the last {settings.flaky_window} runs of "
            f"version {version}): {', '.join(sorted(flaky))}"
        )
    return {"store": store, "workspace": workspace, "space_id": space_id, "version": version}


def _history_after(
    seen: dict[str, Any], summary: dict[str, Any], answers: dict[str, RowOutcome], etag: str | None, output_dir: str
) -> dict[str, Any]:
    """Append the run to the history, publish the trend artifact and rewrite the space's HTML history."""
    store: HistoryStore = seen["store"]
    latencies = sorted(o.latency_s for o in answers.values() if o.status == "ok" and not o.cached)
    figures = {
        "phases": summary["phases"],
        "genie_latency_p50_s": _percentile(latencies, 0.5),
        "genie_latency_p95_s": _percentile(latencies, 0.95),
        "genie_retries": sum(max(0, o.attempts - 1) for o in answers.values()),
        "cache_hits": summary["cached_genie_answers"],
    }
    store.append_run(
        {
            "run_id": summary["flow_run_id"],
            "workspace": seen["workspace"],
            "space_id": seen["space_id"],
            "etag": etag,
            "version": seen["version"],
            "score": summary["score"],
            "total": summary["total"],
            "correct": summary["verdicts"]["correct"],
            "verdicts": summary["verdicts"],
            "figures": figures,
            "breaker_events": summary["circuit_events"],
            "settings": summary["settings"],
            "report": summary["files"]["csv"],
        },
        [
            {
                "benchmark_id": r["id"],
                "verdict": r["verdict"],
                "stage": r["stage"],
                "reason": r["reason"],
                "genie_latency_s": r["genie_latency_s"],
                "attempts": r["attempts"],
                "cached": bool(r["cached"]),
                "flaky": bool(r.get("flaky")),
            }
            for r in summary["rows"]
        ],
    )
    store.set_version_score(seen["workspace"], seen["space_id"], seen["version"], summary["score"])
    runs = store.runs(seen["workspace"], seen["space_id"], limit=200)
    page = write_html(seen["space_id"], runs, Path(output_dir) / f"history-{_safe(seen['space_id'])}.html")
    markdown = trend_markdown(seen["space_id"], trend_rows(runs), str(page))
    publish_markdown("score-trend", markdown)
    return {"version": seen["version"], "report": str(page), "runs": len(runs), "trend": markdown}


def _host(client: Any) -> str:
    return workspace_key(str(client.config.host or ""))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _phase_figures(name: str, outcomes: dict[str, RowOutcome], since: float, calls: Meter) -> dict[str, Any]:
    return {
        "phase": name,
        "total": len(outcomes),
        "succeeded": sum(1 for o in outcomes.values() if o.status == "ok"),
        "cached": sum(1 for o in outcomes.values() if o.cached),
        "calls": calls.calls,
        "seconds": round(time.monotonic() - since, 2),
        **_adapted(name),
    }


def _adapted(phase: str) -> dict[str, Any]:
    """Where an adaptive phase's concurrency went in this run, for its figures (nothing for a fixed one)."""
    return {"adaptive": level} if (level := adapted(phase)) else {}


def _genie_key(space_id: str, question: str, repeat: int) -> str:
    return stable_key(space_id, question) if repeat == 0 else stable_key(space_id, question, repeat)


def _benchmarks(benchmarks: str | list[Benchmark] | None, config: dict[str, Any] | None, space_id: str) -> list[Any]:
    """The benchmarks to score: a file's, the given list, or (None) the ones the space keeps."""
    if isinstance(benchmarks, str):
        return load_benchmarks(benchmarks)
    if benchmarks is not None:
        return list(benchmarks)
    items, skipped = space_benchmarks(config, space_id)
    log = get_run_logger()
    log.info(f"Scoring the {len(items)} benchmarks space {space_id} keeps")
    if skipped:
        log.warning(f"{len(skipped)} benchmark question(s) of the space have no SQL answer and are left out: {skipped}")
    return items


def _sql_key(warehouse_id: str, sql: str, parameters: dict[str, Any] | None = None) -> str:
    """The identity of one statement run: its SQL, and the values bound to its markers (Genie's answers)."""
    return stable_key(warehouse_id, sql, parameters) if parameters else stable_key(warehouse_id, sql)


def _decide(
    b: Benchmark,
    answer: RowOutcome,
    results: dict[str, RowOutcome],
    warehouse_id: str,
    rules: Rules,
    allowed: list[str],
) -> dict[str, Any]:
    """The report row of one answer to a benchmark, with a verdict when no judge is needed (else None)."""
    row: dict[str, Any] = {
        "id": b.id,
        "question": b.question,
        "expected_sql": b.expected_sql,
        "genie_sql": None,
        "genie_parameters": None,
        "expected_rows": None,
        "genie_rows": None,
        "verdict": None,
        "stage": "comparison",
        "reason": "",
        "attempts": answer.attempts,
        "genie_latency_s": round(answer.latency_s, 3),
        "cached": answer.cached,
        "error_kind": None,
    }
    if answer.status != "ok":
        row.update(
            verdict="timeout" if answer.error_kind == "timeout" else "genie_error",
            reason=answer.message,
            error_kind=answer.error_kind,
            stage="genie",
        )
        return row
    if answer.value["kind"] != "sql":
        row.update(verdict="no_sql", reason=f"Genie answered with text only: {answer.value['text']}")
        return row
    row["genie_sql"] = answer.value["sql"]
    row["genie_parameters"] = answer.value.get("parameters")
    refused = read_only_problem(b.expected_sql, "the expected SQL", allowed)
    if refused:
        row.update(verdict="sql_error", reason=refused, error_kind="expected_not_read_only")
        return row
    expected = results[_sql_key(warehouse_id, b.expected_sql)]
    if expected.status != "ok" or "error" in expected.value:
        row.update(
            verdict="sql_error",
            error_kind=expected.error_kind or "expected_sql",
            reason=f"expected SQL failed: {expected.message or expected.value.get('error')}",
        )
        return row
    row["expected_rows"] = expected.value["row_count"]
    problem = read_only_problem(answer.value["sql"], allowed=allowed)
    if problem:
        row.update(verdict="sql_error", reason=problem, error_kind="not_read_only")
        return row
    actual = results[_sql_key(warehouse_id, answer.value["sql"], answer.value.get("parameters"))]
    if actual.status != "ok" or "error" in actual.value:
        kind = actual.error_kind or "genie_sql"
        row.update(
            verdict="timeout" if kind == "timeout" else "sql_error",
            error_kind=kind,
            reason=f"Genie's SQL failed: {actual.message or actual.value.get('error')}",
        )
        return row
    row["genie_rows"] = actual.value["row_count"]
    rounds = Rounding(rounding(b.expected_sql), rounding(answer.value["sql"]))
    decision, reason = compare(expected.value, actual.value, sorting(b.expected_sql), rules, rounds)
    row["reason"] = reason
    if decision != "undecided":
        row["verdict"] = decision
    return row


def _judge(
    undecided: list[tuple[dict[str, Any], Benchmark]],
    results: dict[str, RowOutcome],
    warehouse_id: str,
    settings: ScoreSettings,
    workspace: DatabricksWorkspace,
    ledger: RowLedger,
    sequential: bool,
) -> None:
    """Fill in verdicts of undecided report rows (in place); its calls are counted by the current meter."""
    if not undecided:
        return
    cases: dict[str, dict[str, Any]] = {}
    key_of_row: list[str] = []
    for row, b in undecided:
        expected = results[_sql_key(warehouse_id, b.expected_sql)].value
        actual = results[_sql_key(warehouse_id, row["genie_sql"], row.get("genie_parameters"))].value
        item = case_item(b, row["genie_sql"], expected, actual, row["reason"], row.get("genie_parameters"))
        key = stable_key(item, PROMPT_VERSION, settings.judge_endpoint)
        cases[key] = {**item, "id": f"c{len(cases) + 1}"} if key not in cases else cases[key]
        key_of_row.append(key)
    version = f"{PROMPT_VERSION}:{settings.judge_endpoint}"
    verdicts = ledger.get_many("judge", version, cases)
    todo = [(k, c) for k, c in cases.items() if k not in verdicts]
    chunks = [todo[i : i + settings.eval_chunk_size] for i in range(0, len(todo), settings.eval_chunk_size)]
    client = workspace.client(settings.eval_timeout)
    spec = PhaseSpec(
        "judge",
        "llm",
        settings.eval_max_concurrent,
        RetryPolicy(retries=settings.eval_retry_attempts, base_delay_s=2),
        sequential=sequential,
        adaptive=settings.eval_adaptive,
        workspace=workspace_slug(client.config.host),
    )
    rows = [Row(stable_key([k for k, _ in chunk]), i, [c for _, c in chunk]) for i, chunk in enumerate(chunks)]
    judge = Call(judge_cases, workspace, settings.eval_timeout, "items", {"endpoint": settings.judge_endpoint})
    outcomes = run_phase(spec, rows, judge)
    for chunk, chunk_row in zip(chunks, rows, strict=True):
        outcome = outcomes[chunk_row.key]
        if outcome.status != "ok":
            verdicts.update((k, {"verdict": None, "reason": f"judge call failed: {outcome.message}"}) for k, _ in chunk)
            continue
        for key, case in chunk:
            verdict = outcome.value["verdicts"][case["id"]]
            verdicts[key] = verdict
            if verdict["verdict"] is not None:
                ledger.put("judge", version, key, verdict)
    for (row, _), key in zip(undecided, key_of_row, strict=True):
        verdict = verdicts[key]
        row.update(
            stage="judge",
            reason=verdict["reason"],
            verdict=verdict["verdict"] or "judge_error",
            error_kind=None if verdict["verdict"] else "judge_invalid",
        )


def _agreement(attempts: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """One report row per benchmark. With repeats, its verdict is the most frequent one among its answers (a
    tie goes against "correct"), and `agreement` says how many answers were correct (e.g. "2/3 correct")."""
    if repeats == 1:
        return attempts
    report = []
    for start in range(0, len(attempts), repeats):
        group = attempts[start : start + repeats]
        counts = Counter(a["verdict"] for a in group)
        top = max(counts.values())
        verdict = next(v for v in (*VERDICTS[1:], "correct") if counts.get(v) == top)
        row = next(a for a in group if a["verdict"] == verdict)
        report.append(
            {
                **row,
                "agreement": f"{counts.get('correct', 0)}/{repeats} correct",
                "repeat_verdicts": ", ".join(a["verdict"] for a in group),
                "attempts": sum(a["attempts"] for a in group),
            }
        )
    return report


def _finish(
    report: list[dict[str, Any]],
    answers: dict[str, RowOutcome],
    breaker: CircuitBreaker,
    output_dir: str,
    started: float,
    phases: list[dict[str, Any]],
    settings: ScoreSettings,
    run: dict[str, Any],
) -> dict[str, Any]:
    counts = Counter(r["verdict"] for r in report)
    total = len(report)
    failures = [
        {
            "row_key": r["id"],
            "phase": r["stage"],
            "error_kind": r["error_kind"] or r["verdict"],
            "message": r["reason"],
            "attempts": r["attempts"],
        }
        for r in report
        if r["verdict"] in FAILED
    ]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = Path(output_dir) / f"score-{stamp}-{run['flow_run_id'][:8]}"  # rerun-failed finds it by run id
    files = write_frame(pd.DataFrame(report), folder, "scorecard")
    # what `rerun-failed` needs to run the failed rows again the same way
    run_file = Path(files["csv"]).with_name("run.json")
    run_file.write_text(json.dumps({**run, "settings": settings.model_dump()}, indent=1))
    summary = {
        "flow_run_id": run["flow_run_id"],
        "total": total,
        "score": round(counts["correct"] / total, 4) if total else 0.0,
        "verdicts": {v: counts.get(v, 0) for v in VERDICTS},
        "judged": phases[-1]["total"],
        "judge_calls": phases[-1]["calls"],
        "phases": phases,
        "failures": failures,
        "circuit_events": breaker.events,
        "circuit_state": breaker.current_state(),
        "cached_genie_answers": sum(1 for o in answers.values() if o.cached),
        "wall_time_s": round(time.monotonic() - started, 2),
        "files": files,
        "rows": report,
        "settings": settings.model_dump(),
        "rerun_command": rerun_command(folder, run["workspace_block"]),
    }
    publish(
        "scorecard",
        [{k: r[k] for k in ("id", "verdict", "agreement", "stage", "reason", "attempts") if k in r} for r in report],
        _markdown(summary),
    )
    get_run_logger().info(
        f"Score: {counts['correct']}/{total} correct ({summary['score']:.1%}); "
        f"{len(failures)} failure records; report in {files['csv']}"
    )
    return summary


def rerun_command(folder: Path, workspace_block: str | None) -> str:
    """The command that reruns a report's failed rows, as the user would type it."""
    embedded = workspace_block == EMBEDDED_SANDBOX_BLOCK  # a sandbox the rerun must start again
    return f"batchflows rerun-failed {folder}{' --sandbox' if embedded else ''}"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Genie space score: {summary['score']:.1%}",
        "",
        f"{summary['total']} benchmarks in {summary['wall_time_s']} s; "
        f"{summary['judged']} judged by the LLM in {summary['judge_calls']} calls; "
        f"{summary['cached_genie_answers']} Genie answers reused from earlier runs.",
        "",
        "| verdict | count |",
        "|---|---|",
    ]
    lines += [f"| {v} | {n} |" for v, n in summary["verdicts"].items()]
    lines += ["", "| phase | succeeded | from cache | calls | seconds |", "|---|---|---|---|---|"]
    lines += [
        f"| {p['phase']} | {p['succeeded']}/{p['total']} | {p['cached']} | {p['calls']} | {p['seconds']}"
        f"{' (alongside ' + p['alongside'] + ')' if p.get('alongside') else ''} |"
        for p in summary["phases"]
    ]
    lines += [
        f"- {p['phase']}: adaptive concurrency {a['start']} → {a['level']} (lowest {a['lowest']}, highest "
        f"{a['highest']}, {a['cuts']} cut(s) on 429/503); the next run starts at {a['level']}"
        for p in summary["phases"]
        if (a := p.get("adaptive"))
    ]
    lines += ["", f"Circuit breaker: {summary['circuit_state']}"]
    lines += [f"- {event}" for event in summary["circuit_events"]]
    if summary["failures"]:
        lines += [
            "",
            f"{len(summary['failures'])} rows failed. Rerun just these (finished rows come from the ledger, so "
            "only these are called again):",
            f"- terminal: `{summary['rerun_command']}`",
            f"- Prefect UI: run the deployment `rerun-failed/rerun-failed` with report = `{summary['flow_run_id']}`",
        ]
    lines += ["", f"Report: `{summary['files']['csv']}`"]
    return "\n".join(lines)
