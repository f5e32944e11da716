"""Commands of the Genie space jobs: score, improve, rerun-failed, and the score history (history, versions,
rollback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from batchflows_cli.common import (
    SANDBOX_BARE_SPACE,
    SANDBOX_SPACE,
    SANDBOX_WAREHOUSE,
    _exit_status,
    _job,
    _key_values,
    _run,
    _settings,
    _uses_prefect,
    _workspace,
    app,
    console,
)


@app.command()
def score(
    benchmarks: Annotated[Path | None, typer.Option(help="benchmarks file (JSON, YAML or CSV)")] = None,
    space_id: Annotated[str | None, typer.Option(help="Genie space to score")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="SQL warehouse for expected and Genie SQL")] = None,
    preset: Annotated[str, typer.Option(help="default, conservative or aggressive")] = "default",
    genie_concurrent: Annotated[int | None, typer.Option(help="Genie questions in flight")] = None,
    sql_concurrent: Annotated[int | None, typer.Option(help="SQL statements in flight")] = None,
    genie_rpm: Annotated[float | None, typer.Option(help="Genie questions per minute (0: no limit)")] = None,
    repeats: Annotated[
        int | None, typer.Option(help="ask each question K times; report each benchmark's agreement (e.g. 2/3)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    no_batch: Annotated[bool, typer.Option("--no-batch", help="run every phase sequentially")] = False,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    ledger_block: Annotated[
        str | None, typer.Option(help="saved RowLedger block (a team's shared ledger); default ~/.batchflows")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="where the scorecard files go")] = Path("out"),
    fresh: Annotated[bool, typer.Option(help="ignore finished rows of earlier runs")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Score a Genie space against benchmark questions (Genie → SQL → compare → judge)."""
    workspace = _workspace(use_sandbox, workspace_block)

    overrides: dict[str, Any] = {
        "genie_max_concurrent": genie_concurrent,
        "sql_max_concurrent": sql_concurrent,
        "genie_rpm": genie_rpm,
        "repeats": repeats,
    }
    overrides.update(_key_values(set_))
    _, benchmarks_file = _scoring_inputs(preset, overrides, use_sandbox, benchmarks, space_id, warehouse_id)
    with _job(workspace) as block_name:
        from flows.score import score as score_flow

        summary = _run(
            score_flow,
            benchmarks_file,
            space_id or SANDBOX_SPACE,
            warehouse_id or SANDBOX_WAREHOUSE,
            {k: v for k, v in overrides.items() if v is not None},
            preset=preset,
            sequential=no_batch,
            workspace_block=block_name,
            ledger_block=ledger_block,
            output_dir=str(output_dir),
            fresh=fresh,
        )
    if json_out:
        console.print_json(json.dumps({k: v for k, v in summary.items() if k != "rows"}, default=str))
    else:
        _print_scorecard(summary)
    _exit_status(summary["total"] - len(summary["failures"]), summary["total"], "benchmarks judged")


@app.command()
def improve(
    benchmarks: Annotated[Path | None, typer.Option(help="benchmarks file (JSON, YAML or CSV)")] = None,
    space_id: Annotated[str | None, typer.Option(help="production Genie space to improve")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="SQL warehouse for expected and Genie SQL")] = None,
    iterations: Annotated[int | None, typer.Option(help="improvement rounds at most")] = None,
    margin: Annotated[float | None, typer.Option(help="score gain (0-1) needed to promote")] = None,
    no_cleanup: Annotated[bool, typer.Option("--no-cleanup", help="keep the dev copies")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="propose fixes only; touch no space")] = False,
    preset: Annotated[str, typer.Option(help="scoring preset: default, conservative or aggressive")] = "default",
    set_: Annotated[list[str] | None, typer.Option("--set", help="improvement setting KEY=VALUE")] = None,
    score_set: Annotated[list[str] | None, typer.Option("--score-set", help="scoring setting KEY=VALUE")] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the reports go")] = Path("out"),
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Improve a Genie space from its failures: learn, propose fixes, try them on a dev copy, promote if better."""
    workspace = _workspace(use_sandbox, workspace_block)
    from flows.improve import ImproveError, ImproveSettings

    settings = _settings(ImproveSettings, set_, iterations=iterations, margin=margin)
    scoring, benchmarks_file = _scoring_inputs(
        preset, _key_values(score_set), use_sandbox, benchmarks, space_id, warehouse_id
    )
    with _job(workspace) as block_name:
        from flows.improve import improve as improve_flow

        try:
            summary = _run(
                improve_flow,
                benchmarks_file,
                space_id or SANDBOX_BARE_SPACE,
                warehouse_id or SANDBOX_WAREHOUSE,
                settings,
                scoring,
                cleanup=not no_cleanup,
                dry_run=dry_run,
                workspace_block=block_name,
                output_dir=str(output_dir),
            )
        except ImproveError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    if json_out:
        console.print_json(json.dumps({k: v for k, v in summary.items() if k != "patterns"}, default=str))
        return
    table = Table(title=f"{summary['space_id']}: {summary['score_before']:.1%} -> {summary['score_after']:.1%}")
    for column in ("iteration", "failing", "applied", "rejected", "before", "after", "flipped", "decision"):
        table.add_column(column)
    for r in summary["iterations"]:
        after = r.get("score_after")
        table.add_row(
            str(r["iteration"]),
            str(r["failing"]),
            ", ".join(f"{c} {n}" for c, n in r["by_category"].items()),
            str(len(r["rejected"])),
            f"{r['score_before']:.1%}",
            "" if after is None else f"{after:.1%}",
            ", ".join(r.get("flipped", [])),
            r.get("decision", ""),
        )
    console.print(table)
    console.print(f"Stopped: {summary['stopped']}. Report: {summary['report']}")
    _exit_status(0, 0, "")  # only a signal's stop decides the status here


@app.command("rerun-failed")
def rerun_failed_command(
    report: Annotated[
        str, typer.Argument(help="an earlier scoring run: its report folder (out/score-...) or flow run id")
    ],
    kinds: Annotated[
        str | None, typer.Option(help="only these verdicts or error kinds, comma-separated (e.g. genie_error,timeout)")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="ask Genie again even for answers in the ledger")] = False,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
) -> None:
    """Score again only the rows an earlier run could not judge, and merge them into its report."""
    workspace = _workspace(use_sandbox, None)
    from flows.rerun import rerun_failed

    with _job(workspace):
        summary = _run(rerun_failed, report, kinds=kinds.split(",") if kinds else None, fresh=fresh)
    for row_id, why in summary["not_rerun"].items():
        console.print(f"[yellow]not rerun:[/yellow] {row_id}: {why}")
    console.print(
        f"Rerun {summary['rerun']} failed rows: {summary.get('fixed', 0)} now judged, "
        f"{summary.get('still_failed', 0)} still failed; merged report {summary['files']['csv']}"
    )
    _exit_status(0, 0, "")  # only a signal's stop decides the status here


@app.command()
def history(
    space_id: Annotated[str, typer.Option(help="the Genie space")],
    last: Annotated[int, typer.Option(help="runs to show")] = 20,
    workspace: Annotated[str | None, typer.Option(help="workspace URL (needed when several have this space)")] = None,
    ledger_block: Annotated[str | None, typer.Option(help="saved RowLedger block whose history to read")] = None,
    history_url: Annotated[str | None, typer.Option(help="the history's URL, instead of the ledger's")] = None,
    workspace_block: Annotated[str | None, typer.Option(help="workspace of a databricks:// history")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the HTML report goes")] = Path("out"),
) -> None:
    """A space's score trend: score per run, configuration changes, flipped and flaky benchmarks, and an HTML
    report with charts."""
    from tasks.trend import trend_rows, write_html

    store, host = _space_history(space_id, workspace, ledger_block, history_url, workspace_block)
    runs = store.runs(host, space_id, limit=max(last, 200))
    rows = trend_rows(runs)
    table = Table(title=f"Score trend of {space_id} ({host}): last {min(last, len(rows))} of {len(rows)} runs")
    for column in ("run", "when", "version", "score", "correct", "config_change", "flipped", "flaky", "adaptive"):
        table.add_column(column, overflow="fold")
    for r in rows[-last:]:
        table.add_row(
            r["run"],
            r["when"],
            f"v{r['version']}",
            f"{r['score']:.1%}",
            r["correct"],
            r["config_change"],
            r["flipped"],
            r["flaky"],
            r["adaptive"],
        )
    console.print(table)
    page = write_html(space_id, runs, output_dir / f"history-{space_id}.html")
    console.print(f"HTML report: {page}")


@app.command()
def versions(
    space_id: Annotated[str, typer.Option(help="the Genie space")],
    workspace: Annotated[str | None, typer.Option(help="workspace URL (needed when several have this space)")] = None,
    ledger_block: Annotated[str | None, typer.Option(help="saved RowLedger block whose history to read")] = None,
    history_url: Annotated[str | None, typer.Option(help="the history's URL, instead of the ledger's")] = None,
    workspace_block: Annotated[str | None, typer.Option(help="workspace of a databricks:// history")] = None,
    diff: Annotated[int | None, typer.Option(help="print this version's diff against the one before")] = None,
) -> None:
    """The configurations a space had (seen at scoring, promoted by improve, restored by rollback)."""
    store, host = _space_history(space_id, workspace, ledger_block, history_url, workspace_block)
    found = store.versions(host, space_id)
    if diff is not None:
        chosen = next((v for v in found if v.version == diff), None)
        if chosen is None:
            console.print(f"[red]error:[/red] no version {diff} of {space_id}")
            raise typer.Exit(2)
        console.print(chosen.diff or "(the first version: nothing to compare with)", markup=False, highlight=False)
        return
    table = Table(title=f"Versions of {space_id} ({host})")
    for column in ("version", "created (UTC)", "source", "score", "etag", "changed lines", "run"):
        table.add_column(column)
    for v in found:
        changed = sum(1 for line in v.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))
        table.add_row(
            f"v{v.version}",
            v.created_at[:19].replace("T", " "),
            v.source,
            "" if v.score is None else f"{v.score:.1%}",
            v.etag or "",
            str(changed),
            (v.run_id or "")[:8],
        )
    console.print(table)


@app.command()
def rollback(
    space_id: Annotated[str, typer.Option(help="the Genie space")],
    to: Annotated[int, typer.Option(help="the version to restore (see `batchflows versions`)")],
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    ledger_block: Annotated[str | None, typer.Option(help="saved RowLedger block whose history holds it")] = None,
    force: Annotated[bool, typer.Option(help="restore even if the space changed since last seen")] = False,
) -> None:
    """Restore an earlier configuration of a space (etag-checked), recorded as a new version."""
    from flows.versions import RollbackError, rollback_space

    with _job(_workspace(False, workspace_block)) as block_name:
        try:
            result = rollback_space(space_id, to, workspace_block=block_name, ledger_block=ledger_block, force=force)
        except RollbackError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(f"Space {space_id}: version {result['restored']} restored as version {result['version']}")


def _space_history(
    space_id: str,
    workspace: str | None,
    ledger_block: str | None,
    history_url: str | None,
    workspace_block: str | None,
) -> tuple[Any, str]:
    """(the score history, the workspace it knows `space_id` in); exit 2 naming what is missing."""
    from flows.versions import open_history, workspace_of
    from tasks.inputs import InputError

    if ledger_block or workspace_block:  # saved blocks: read from Prefect
        _uses_prefect()
    store = open_history(ledger_block, history_url, workspace_block)
    try:
        return store, workspace_of(store, space_id, workspace)
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _scoring_inputs(
    preset: str,
    overrides: dict[str, Any],
    use_sandbox: bool,
    benchmarks: Path | None,
    space_id: str | None,
    warehouse_id: str | None,
) -> tuple[Any, str | None]:
    """(scoring settings, the benchmarks file or None for the space's own) of a scoring or improvement
    command, the file checked here; exit 2 naming a bad value. The flow gets the file's path, never its rows:
    Prefect caps a flow run's parameters (512 KB by default), which a few thousand benchmarks exceed."""
    from blocks.settings import score_settings
    from tasks.benchmarks import BenchmarkFileError, load_benchmarks

    try:
        settings = score_settings(preset, **overrides)
    except ValueError as exc:
        console.print(f"[red]invalid scoring settings:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not use_sandbox and not (space_id and warehouse_id):
        raise typer.BadParameter("--space-id and --warehouse-id are required (or use --sandbox)")
    if benchmarks is None:  # the benchmarks the space keeps
        return settings, None
    path = str(Path(benchmarks).resolve())
    try:
        load_benchmarks(path)
        return settings, path
    except BenchmarkFileError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _print_scorecard(summary: dict[str, Any]) -> None:
    table = Table(title=f"Scorecard: {summary['score']:.1%} correct of {summary['total']}")
    repeated = any("agreement" in row for row in summary["rows"])
    for column in ("id", "verdict", *(["agreement"] if repeated else []), "stage", "reason"):
        table.add_column(column, overflow="fold", max_width=70 if column == "reason" else None)
    for row in summary["rows"]:
        style = "green" if row["verdict"] == "correct" else "red" if row["verdict"] != "no_sql" else "yellow"
        agreement = [row.get("agreement", "")] if repeated else []
        table.add_row(
            row["id"], f"[{style}]{row['verdict']}[/{style}]", *agreement, row["stage"], str(row["reason"])[:200]
        )
    console.print(table)
    console.print(f"Verdicts: {summary['verdicts']}")
    console.print(
        "Phases: "
        + "; ".join(
            f"{p['phase']} {p['succeeded']}/{p['total']} ok, {p['cached']} cached, {p['calls']} calls, {p['seconds']} s"
            f"{' alongside ' + p['alongside'] if p.get('alongside') else ''}"
            for p in summary["phases"]
        )
    )
    console.print(
        f"Judge: {summary['judged']} undecided cases in {summary['judge_calls']} LLM calls; "
        f"circuit {summary['circuit_state']}; {len(summary['failures'])} failure records; "
        f"{summary['wall_time_s']} s"
    )
    console.print(f"Report: {summary['files']['csv']} and {summary['files']['parquet']}")
    if summary["failures"]:
        console.print(
            f"Rerun just the {len(summary['failures'])} failed rows: {summary['rerun_command']}", soft_wrap=True
        )
