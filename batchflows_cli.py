"""The `batchflows` command: one sub-command per job, plus the sandbox workspace."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasks import stopping

app = typer.Typer(
    help="Prefect pipelines for slow, flaky, rate-limited Databricks AI and data APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

SANDBOX_SPACE = "retail"
SANDBOX_BARE_SPACE = "retail-bare"  # what `improve --sandbox` improves: a space with no instructions yet
SANDBOX_WAREHOUSE = "sandbox-warehouse"


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: a free one)")] = 8765,
    token: Annotated[str | None, typer.Option(help="token clients must send (default: a random one)")] = None,
    seed: Annotated[int, typer.Option(help="seed of Genie's answers and of random faults")] = 0,
    data: Annotated[
        Path | None,
        typer.Option(help="your tables: a folder of Parquet/CSV files (subfolders = schemas) or a DuckDB file"),
    ] = None,
    genie_answers: Annotated[
        Path | None, typer.Option(help="recorded Genie answers, JSONL: question, sql or text, delay_ms?, error?")
    ] = None,
    allow_writes: Annotated[bool, typer.Option(help="let statements write (e.g. a vector table)")] = False,
) -> None:
    """Run the sandbox workspace until Ctrl-C; prints DATABRICKS_HOST and DATABRICKS_TOKEN to use."""
    from sandbox import Sandbox, SandboxError
    from sandbox.userdata import UserDataError

    try:
        t0 = time.monotonic()
        sb = Sandbox(
            port=port,
            token=token,
            seed=seed,
            data=str(data) if data else None,
            genie_answers=str(genie_answers) if genie_answers else None,
            allow_writes=allow_writes,
        )
        loaded = time.monotonic() - t0
        sb.start()
    except (SandboxError, UserDataError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for problem in sb.problems:
        console.print(f"[yellow]not loaded:[/yellow] {problem}")
    if data:
        tables = sb.workspace.warehouse.user_tables
        console.print(
            f"Loaded {len(tables)} table(s) from {data} in {loaded:.1f} s: {', '.join(tables)} "
            f"(unqualified names resolve in {sb.workspace.warehouse.default_namespace})"
        )
    if genie_answers:
        console.print(
            f"Genie replays {len(sb.workspace.genie.recorded)} recorded answers in any space; score them with "
            "--space-id rehearsal"
        )
    console.print(
        f"Sandbox workspace on {sb.host}\n  export DATABRICKS_HOST={sb.host}\n"
        f"  export DATABRICKS_TOKEN={sb.token}\n"
        f"Genie spaces: retail, retail-bare; warehouse: {SANDBOX_WAREHOUSE}. Ctrl-C stops it."
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sb.stop()


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
    output_dir: Annotated[Path, typer.Option(help="where the scorecard files go")] = Path("out"),
    fresh: Annotated[bool, typer.Option(help="ignore finished rows of earlier runs")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Score a Genie space against benchmark questions (Genie → SQL → compare → judge)."""

    overrides: dict[str, Any] = {
        "genie_max_concurrent": genie_concurrent,
        "sql_max_concurrent": sql_concurrent,
        "genie_rpm": genie_rpm,
        "repeats": repeats,
    }
    overrides.update(_key_values(set_))
    _, benchmarks_file = _scoring_inputs(preset, overrides, use_sandbox, benchmarks, space_id, warehouse_id)
    with _job(use_sandbox, workspace_block) as block_name:
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
    from flows.improve import ImproveError, ImproveSettings

    settings = _settings(ImproveSettings, set_, iterations=iterations, margin=margin)
    scoring, benchmarks_file = _scoring_inputs(
        preset, _key_values(score_set), use_sandbox, benchmarks, space_id, warehouse_id
    )
    with _job(use_sandbox, workspace_block) as block_name:
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
    from flows.rerun import rerun_failed

    with _job(use_sandbox, None):
        summary = _run(rerun_failed, report, kinds=kinds.split(",") if kinds else None, fresh=fresh)
    for row_id, why in summary["not_rerun"].items():
        console.print(f"[yellow]not rerun:[/yellow] {row_id}: {why}")
    console.print(
        f"Rerun {summary['rerun']} failed rows: {summary.get('fixed', 0)} now judged, "
        f"{summary.get('still_failed', 0)} still failed; merged report {summary['files']['csv']}"
    )
    _exit_status(0, 0, "")  # only a signal's stop decides the status here


@app.command()
def limits(
    reset: Annotated[
        str | None, typer.Option(help="set this limit's taken slots to 0 (slots no run holds, e.g. after a restart)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="NAME=VALUE: calls at once, or calls a minute for a NAME ending in -rpm; every run then uses it",
        ),
    ] = None,
) -> None:
    """The global concurrency and rate limits batchflows uses (one set per service and workspace), with their
    taken slots. A run never changes a limit that exists: it says so and uses it."""
    from prefect.client.orchestration import get_client

    from tasks.limits import PREFIX, ensure_limit, reset_limit

    if reset:
        console.print(f"{reset}: {reset_limit(reset)} taken slot(s) set to 0")
    for name, value in _key_values(set_).items():
        try:
            number = float(value)
            if number <= 0 or (not name.endswith("-rpm") and not number.is_integer()):
                raise ValueError
        except ValueError as exc:
            raise typer.BadParameter(f"{name}={value}: give a positive number (a whole one for calls at once)") from exc
        if name.endswith("-rpm"):
            ensure_limit(name, 1, number / 60, change=True)
        else:
            ensure_limit(name, int(number), change=True)
    with get_client(sync_client=True) as client:
        found = [g for g in client.read_global_concurrency_limits(limit=200) if g.name.startswith(PREFIX)]
    table = Table(title="batchflows limits")
    for column in ("name", "limit", "taken", "active", "decay per s"):
        table.add_column(column)
    for g in sorted(found, key=lambda g: g.name):
        table.add_row(g.name, str(g.limit), str(g.active_slots), str(g.active), str(g.slot_decay_per_second))
    console.print(table)


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
    for column in ("run", "when", "version", "score", "correct", "config_change", "flipped", "flaky"):
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

    with _job(False, workspace_block) as block_name:
        try:
            result = rollback_space(space_id, to, workspace_block=block_name, ledger_block=ledger_block, force=force)
        except RollbackError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(f"Space {space_id}: version {result['restored']} restored as version {result['version']}")


@app.command()
def enrich(
    text_columns: Annotated[str, typer.Option("--text-columns", help="comma-separated columns sent to the model")],
    input_path: Annotated[Path | None, typer.Option("--input", help="rows file: CSV, JSONL, JSON or Parquet")] = None,
    query: Annotated[str | None, typer.Option(help="SQL query whose result is the rows (instead of --input)")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that runs --query")] = None,
    id_column: Annotated[str | None, typer.Option(help="id column (default: a hash of the row's text)")] = None,
    schema: Annotated[
        Path | None, typer.Option(help="JSON schema of the new columns (default: tldr, challenge)")
    ] = None,
    instructions: Annotated[str | None, typer.Option(help="what to ask the model for each row")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the enriched rows go")] = Path("out"),
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Add LLM-generated columns to rows: 20 rows per call, validated, cached per row, rate-limited."""
    from flows.enrich import DEFAULT_INSTRUCTIONS, EnrichSettings
    from flows.enrich import enrich as enrich_flow

    settings = _settings(EnrichSettings, set_)
    with _job(use_sandbox, workspace_block) as block_name:
        summary = _run(
            enrich_flow,
            [c.strip() for c in text_columns.split(",") if c.strip()],
            input_path=str(input_path) if input_path else None,
            query=query,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            id_column=id_column,
            schema_path=str(schema) if schema else None,
            instructions=instructions or DEFAULT_INSTRUCTIONS,
            settings=settings,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    if json_out:
        console.print_json(json.dumps(summary, default=str))
    else:
        console.print(
            f"Total rows: {summary['total']}; cache hits: {summary['cache_hits']}; newly enriched: "
            f"{summary['newly_enriched']}; failed: {summary['failed']}; success rate: {summary['success_rate']:.1%}; "
            f"API calls: {summary['api_calls']}; tokens: {summary['tokens']}; {summary['wall_time_s']} s"
        )
        console.print(f"Rows: {summary['files']['parquet']} and {summary['files']['csv']}")
    _exit_status(summary["total"] - summary["failed"], summary["total"], "rows enriched")


@app.command()
def analyse(
    input_path: Annotated[Path | None, typer.Option("--input", help="items file: CSV, JSONL, JSON or Parquet")] = None,
    query: Annotated[str | None, typer.Option(help="SQL query whose result is the items (instead of --input)")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that runs --query")] = None,
    id_column: Annotated[str, typer.Option(help="id column")] = "id",
    position_column: Annotated[str, typer.Option(help="order column")] = "position",
    text_column: Annotated[str, typer.Option(help="text column")] = "text",
    batch_size: Annotated[int | None, typer.Option(help="items analysed at once (default 10)")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="one item at a time (same output)")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the report goes")] = Path("out"),
) -> None:
    """Analyse ordered items in parallel, then merge fragments with the item before them, in order."""
    from flows.analyse import AnalyseSettings
    from flows.analyse import analyse as analyse_flow

    settings = _settings(AnalyseSettings, set_, batch_size=batch_size)
    with _job(use_sandbox, workspace_block) as block_name:
        summary = _run(
            analyse_flow,
            input_path=str(input_path) if input_path else None,
            query=query,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            id_column=id_column,
            position_column=position_column,
            text_column=text_column,
            settings=settings,
            sequential=sequential,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    console.print(
        f"{summary['items']} items: {summary['analysed']} analysed ({summary['cached']} cached), "
        f"{summary['failed']} failed; {summary['groups']} groups; analysis {summary['analysis_s']} s, "
        f"run {summary['wall_time_s']} s"
    )
    console.print(f"Report: {summary['files']['csv']}; groups: {summary['files']['groups']}")
    _exit_status(summary["analysed"], summary["items"], "items analysed")


@app.command()
def embed(
    input_path: Annotated[Path | None, typer.Option("--input", help="documents file with id, text (, kind)")] = None,
    catalog: Annotated[str, typer.Option(help="without --input: the catalog to document")] = "samples",
    schema: Annotated[
        str, typer.Option(help="without --input: the schema whose tables and keys are documented")
    ] = "retail",
    warehouse_id: Annotated[str | None, typer.Option(help="warehouse that reads the information_schema")] = None,
    estimate_only: Annotated[bool, typer.Option("--estimate", help="report tokens and cost, call nothing")] = False,
    max_cost: Annotated[float | None, typer.Option(help="refuse to run over this estimated cost, USD")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any setting, KEY=VALUE (repeatable)")] = None,
    store: Annotated[Path | None, typer.Option(help="vector store file (default ~/.batchflows/vectors.duckdb)")] = None,
    store_table: Annotated[
        str | None, typer.Option(help="instead, a table on the warehouse for the vectors, e.g. main.docs.vectors")
    ] = None,
    use_sandbox: Annotated[bool, typer.Option("--sandbox", help="run against an embedded sandbox workspace")] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
    output_dir: Annotated[Path, typer.Option(help="where the per-item results go")] = Path("out"),
) -> None:
    """Embed documents 100 per call into a searchable store, after a cost estimate and within a budget."""
    from flows.embed import EmbedSettings
    from flows.embed import embed as embed_flow

    settings = _settings(EmbedSettings, set_, max_cost_usd=max_cost)
    with _job(use_sandbox, workspace_block, allow_writes=bool(store_table)) as block_name:
        summary = _run(
            embed_flow,
            input_path=str(input_path) if input_path else None,
            catalog=catalog,
            schema_name=schema,
            warehouse_id=warehouse_id or (SANDBOX_WAREHOUSE if use_sandbox else None),
            settings=settings,
            estimate_only=estimate_only,
            store_path=str(store) if store else None,
            store_table=store_table,
            workspace_block=block_name,
            output_dir=str(output_dir),
        )
    plan = summary["estimate"]
    console.print(
        f"Estimate: {plan['pending']} pending {plan['pending_by_kind']}, {plan['estimated_batches']} batches, "
        f"~{plan['estimated_tokens']} tokens, ${plan['estimated_cost_usd']:.4f} "
        f"(${plan['cost_per_item_usd']:.6f} per item; {plan['tokenizer']})"
    )
    if estimate_only:
        return
    console.print(
        f"Embedded {summary['successful']}/{summary['processed']} ({summary['cache_hits']} cached) in "
        f"{summary['api_calls']} calls, {summary['tokens']} tokens, {summary['wall_time_s']} s; by kind: "
        f"{summary['by_kind']}"
    )
    console.print(f"Vectors: {summary['store']}; results: {summary['files']['csv']}")
    _exit_status(summary["successful"], summary["processed"], "documents embedded")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="what to look for")],
    k: Annotated[int, typer.Option(help="how many items")] = 5,
    endpoint: Annotated[str, typer.Option(help="the embedding endpoint the store was built with")] = (
        "databricks-gte-large-en"
    ),
    store: Annotated[Path | None, typer.Option(help="vector store file (default ~/.batchflows/vectors.duckdb)")] = None,
    store_table: Annotated[str | None, typer.Option(help="instead, the warehouse table holding the vectors")] = None,
    warehouse_id: Annotated[str | None, typer.Option(help="the warehouse of --store-table")] = None,
    use_sandbox: Annotated[
        bool, typer.Option("--sandbox", help="embed TEXT with an embedded sandbox workspace")
    ] = False,
    workspace_block: Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block to use")] = None,
) -> None:
    """The stored items nearest to TEXT (cosine similarity of their embeddings)."""
    from flows.embed import default_store
    from flows.phase import load_blocks
    from tasks.embed import DeltaVectorStore, VectorStore

    path = str(store) if store else default_store()
    if not store_table and not Path(path).exists():
        console.print(f"[red]error:[/red] no vector store at {path}; run `batchflows embed` first")
        raise typer.Exit(2)
    if store_table and not (warehouse_id or use_sandbox):
        raise typer.BadParameter("--store-table needs --warehouse-id")
    with _workspace(use_sandbox, workspace_block) as block_name:
        workspace, _ = load_blocks(block_name, None)
        client = workspace.client(60)
        response = client.serving_endpoints.query(name=endpoint, input=[text])
        vector = response.data[0].embedding if response.data else None
        if not vector:
            console.print(f"[red]error:[/red] {endpoint} returned no embedding")
            raise typer.Exit(2)
        if store_table:
            table_store = DeltaVectorStore(client, warehouse_id or SANDBOX_WAREHOUSE, store_table)
            hits = table_store.search(endpoint, vector, k)
        else:
            hits = VectorStore(path).search(endpoint, vector, k)
    if not hits:
        console.print(f"no items stored for {endpoint} in {path}")
    for hit in hits:
        console.print(f"{hit['score']:.4f}  {hit['id']}  {hit['text'][:100]}")


def _catalog(
    workspace_block: str | None,
    benchmarks: Path | None,
    space_id: str | None,
    warehouse_id: str | None,
    cron: str | None,
    interval: float | None,
    score_set: list[str] | None,
    output_dir: Path | None = None,
) -> list[Any]:
    from blocks.settings import ScoreSettings
    from deployments.catalog import jobs

    score: dict[str, Any] = {"benchmarks": str(benchmarks.resolve()) if benchmarks else None, "space_id": space_id}
    score["warehouse_id"] = warehouse_id
    if score_set:
        score["settings"] = _settings(ScoreSettings, score_set).model_dump(exclude_defaults=True)
    if (cron or interval) and not (space_id and warehouse_id):
        raise typer.BadParameter("a schedule needs --space-id and --warehouse-id (the runs' parameters)")
    out = str(output_dir.resolve()) if output_dir else None
    # benchmarks stays a parameter when absent: None scores the ones the space keeps
    return jobs(workspace_block, {k: v for k, v in score.items() if v or k == "benchmarks"}, cron, interval, out)


_BLOCK = Annotated[str | None, typer.Option(help="saved DatabricksWorkspace block every deployment uses")]
_BENCH = Annotated[
    Path | None, typer.Option(help="benchmarks file of the scheduled scoring (default: the ones the space keeps)")
]
_SPACE = Annotated[str | None, typer.Option(help="Genie space of the scheduled scoring")]
_WAREHOUSE = Annotated[str | None, typer.Option(help="SQL warehouse of the scheduled scoring")]
_CRON = Annotated[str | None, typer.Option(help="cron schedule of the scoring, e.g. '0 2 * * *' (nightly)")]
_INTERVAL = Annotated[float | None, typer.Option(help="or: score every this many seconds")]
_SCORE_SET = Annotated[
    list[str] | None, typer.Option("--score-set", help="scoring setting of the deployment's defaults, KEY=VALUE")
]


@app.command()
def serve(
    limit: Annotated[int, typer.Option(help="flow runs at once in this process")] = 4,
    workspace_block: _BLOCK = None,
    benchmarks: _BENCH = None,
    space_id: _SPACE = None,
    warehouse_id: _WAREHOUSE = None,
    cron: _CRON = None,
    interval: _INTERVAL = None,
    score_set: _SCORE_SET = None,
) -> None:
    """Serve every job as a deployment from this process (no work pool): run them from the Prefect UI with
    typed forms, or on the scoring schedule."""
    from prefect import serve as prefect_serve

    from deployments.catalog import register_blocks, served

    register_blocks()
    catalog = _catalog(workspace_block, benchmarks, space_id, warehouse_id, cron, interval, score_set)
    prefect_serve(*served(catalog), limit=limit)


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="process work pool (created if missing)")] = "batchflows",
    workspace_block: _BLOCK = None,
    benchmarks: _BENCH = None,
    space_id: _SPACE = None,
    warehouse_id: _WAREHOUSE = None,
    cron: _CRON = None,
    interval: _INTERVAL = None,
    score_set: _SCORE_SET = None,
    output_dir: Annotated[Path | None, typer.Option(help="where every job's reports go (default: ./out)")] = None,
) -> None:
    """Deploy every job to a process work pool, with this checkout as the code; start workers with
    `prefect worker start --pool POOL`. Also registers the block types and saves the scoring presets."""
    from deployments.catalog import deploy as deploy_all
    from deployments.catalog import register_blocks

    blocks = register_blocks()
    catalog = _catalog(workspace_block, benchmarks, space_id, warehouse_id, cron, interval, score_set, output_dir)
    ids = deploy_all(catalog, pool)
    table = Table(title=f"Deployments on work pool {pool!r}")
    table.add_column("deployment")
    table.add_column("id")
    for name, deployment_id in ids.items():
        table.add_row(name, deployment_id)
    console.print(table)
    console.print(f"Blocks registered: {', '.join(blocks)}")
    console.print(f"Start a worker: prefect worker start --pool {pool}")


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


def _settings(model: Any, set_: list[str] | None, **explicit: Any) -> Any:
    """A job's settings model from --set KEY=VALUE pairs and explicit flags; exit 2 naming a bad value."""
    from pydantic import ValidationError

    values = {**_key_values(set_), **{k: v for k, v in explicit.items() if v is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


@contextlib.contextmanager
def _job(use_sandbox: bool, workspace_block: str | None, allow_writes: bool = False) -> Iterator[str | None]:
    """Around a job's run: the workspace block (or an embedded sandbox), progress bars, and a clean exit 2
    for inputs the job refuses."""
    from databricks.sdk.errors import NotFound

    from tasks import progress
    from tasks.embed import BudgetExceeded
    from tasks.inputs import InputError
    from tasks.local_server import local_server

    def stopping_now(name: str) -> None:
        Console(stderr=True).print(
            f"[yellow]{name}: stopping[/yellow] - no new calls; calls in flight finish, then the report is "
            f"written with the rest as 'interrupted' ({name} again quits at once)"
        )

    stopping.clear()
    with (
        local_server(),  # without PREFECT_API_URL: a temporary server that dies with this command
        _workspace(use_sandbox, workspace_block, allow_writes) as block_name,
        _Bars() as bars,
        progress.listening(bars),
        stopping.graceful_signals(stopping_now),
    ):
        try:
            yield block_name
        except (InputError, BudgetExceeded, NotFound) as exc:  # NotFound: an unknown space, warehouse or endpoint
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        except KeyboardInterrupt as exc:
            console.print(f"[red]quit:[/red] {exc or 'interrupted'}; rows finished so far are in the ledger")
            raise typer.Exit(130) from exc


def _run(job: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a job's flow in a worker thread, so the main thread keeps the signal handlers: Prefect replaces
    SIGTERM's handler for a flow run in the main thread, and a signal must stop the calls, not the flow."""
    import contextvars
    import threading

    from prefect import tags

    from flows.phase import TAGS, summary_of

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            with tags(*TAGS):
                result["value"] = summary_of(job(*args, return_state=True, **kwargs))
        except BaseException as exc:  # handed to the main thread as is
            result["error"] = exc

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="batchflows-job", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _exit_status(succeeded: int, total: int, what: str) -> None:
    """A run stopped by a signal exits 130 (SIGINT) or 143 (SIGTERM); one that succeeded on none of its rows
    exits 1. Either way its report is written, failures included."""
    if (code := stopping.exit_code()) is not None:
        done = f"; {succeeded} of {total} {what}" if total else ""
        console.print(f"[red]stopped:[/red] {stopping.reason()}{done}; the rest is recorded as failed, to rerun")
        raise typer.Exit(code)
    if total and not succeeded:
        console.print(f"[red]failed:[/red] 0 of {total} {what}; every row failed (see the report's failures)")
        raise typer.Exit(1)


def _key_values(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


class _Bars:
    """One rich progress bar per phase, fed by the phases' progress events."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.tasks: dict[str, Any] = {}

    def started(self, phase: str, total: int) -> None:
        self.tasks[phase] = self.bars.add_task(phase, total=total, failed=0)

    def advanced(self, phase: str, done: int, failed: bool) -> None:
        task = self.tasks[phase]
        failures = self.bars.tasks[task].fields["failed"] + (done if failed else 0)
        self.bars.update(task, advance=done, failed=failures)

    def __enter__(self) -> _Bars:
        self.bars.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bars.stop()


class _workspace:
    """The block name to use; with --sandbox, a running embedded sandbox saved as block 'sandbox'."""

    def __init__(self, use_sandbox: bool, block: str | None, allow_writes: bool = False) -> None:
        self.use_sandbox, self.block, self.allow_writes = use_sandbox, block, allow_writes
        self.sb: Any = None

    def __enter__(self) -> str | None:
        if not self.use_sandbox:
            return self.block
        from blocks.workspace import EMBEDDED_SANDBOX_BLOCK, DatabricksWorkspace
        from sandbox import Sandbox

        self.sb = Sandbox(port=0, allow_writes=self.allow_writes).start()
        self.sb.set_faults("genie", latency_ms=800, latency_jitter_ms=400)
        self.sb.set_faults("sql", latency_ms=150, latency_jitter_ms=100)
        self.sb.set_faults("chat", latency_ms=400)
        DatabricksWorkspace(host=self.sb.host, token=self.sb.token).save(EMBEDDED_SANDBOX_BLOCK, overwrite=True)
        console.print(f"Embedded sandbox workspace on {self.sb.host}")
        return EMBEDDED_SANDBOX_BLOCK

    def __exit__(self, *_: object) -> None:
        if self.sb is not None:
            self.sb.stop()


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


if __name__ == "__main__":
    app()
