"""Commands that run the workplace: the sandbox workspace, the shared limits, serving and deploying the jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from batchflows_cli.common import (
    SANDBOX_WAREHOUSE,
    _key_values,
    _settings,
    _uses_prefect,
    app,
    console,
    loaded,
)


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
        load_s = time.monotonic() - t0
        sb.start()
    except (SandboxError, UserDataError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for problem in sb.problems:
        console.print(f"[yellow]not loaded:[/yellow] {problem}")
    if data:
        tables = sb.workspace.warehouse.user_tables
        console.print(
            f"Loaded {len(tables)} table(s) from {data} in {load_s:.1f} s: {', '.join(tables)} "
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
    loaded()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sb.stop()


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
    _uses_prefect()
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
    _uses_prefect()
    from prefect import serve as prefect_serve

    from deployments.catalog import register_blocks, served

    register_blocks()
    catalog = _catalog(workspace_block, benchmarks, space_id, warehouse_id, cron, interval, score_set)
    loaded()
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
    ledger_url: Annotated[
        str | None,
        typer.Option(
            help="the team's database for finished rows and the score history (postgresql+psycopg://...), "
            "saved as the RowLedger block team-ledger that every deployment uses: workers on any machine share it"
        ),
    ] = None,
) -> None:
    """Deploy every job to a process work pool, with this checkout as the code; start workers with
    `prefect worker start --pool POOL`. Also registers the block types and saves the scoring presets."""
    _uses_prefect()
    from deployments.catalog import create_limits, register_blocks
    from deployments.catalog import deploy as deploy_all

    blocks = register_blocks()
    ledger_block = None
    if ledger_url:
        from blocks.ledger import RowLedger

        ledger_block = "team-ledger"
        ledger = RowLedger(url=ledger_url)
        ledger.count()  # reachable, and its table made, before any worker needs it
        ledger.save(ledger_block, overwrite=True)
    catalog = _catalog(workspace_block, benchmarks, space_id, warehouse_id, cron, interval, score_set, output_dir)
    for job in catalog:
        if ledger_block and job.name != "rerun-failed":  # a rerun uses the ledger its report names
            job.parameters["ledger_block"] = ledger_block
    ids = deploy_all(catalog, pool)
    limits = create_limits(workspace_block, next(j for j in catalog if j.name == "score").parameters.get("settings"))
    table = Table(title=f"Deployments on work pool {pool!r}")
    table.add_column("deployment")
    table.add_column("id")
    for name, deployment_id in ids.items():
        table.add_row(name, deployment_id)
    console.print(table)
    console.print(f"Blocks registered: {', '.join(blocks)}")
    console.print(f"Shared limits: {', '.join(limits) or 'made by the first run (the workspace block names no host)'}")
    console.print(f"Start a worker: prefect worker start --pool {pool}")


server_app = typer.Typer(
    help="This machine's warm Prefect server, which commands start once and share (unless PREFECT_API_URL is set).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start() -> None:
    """Start the warm Prefect server now (a command starts it when it first needs it), or say where it runs."""
    from prefect.settings import PREFECT_API_URL

    from tasks.local_server import server_status, warm_server

    if PREFECT_API_URL.value():
        console.print(f"PREFECT_API_URL is set: commands use {PREFECT_API_URL.value()}, not a local server")
        return
    before, state = server_status()
    server = warm_server()
    started = "already running" if state == "running" and before == server else "started"
    console.print(
        f"Prefect server {started} on {server.url} (pid {server.pid}); UI at {server.ui}; log {server.log}\n"
        "Commands use it until `batchflows server stop`."
    )


@server_app.command("stop")
def server_stop() -> None:
    """Stop the warm Prefect server (the next command that needs one starts it again)."""
    from tasks.local_server import stop_server

    server = stop_server()
    console.print(f"stopped the Prefect server on {server.url} (pid {server.pid})" if server else "no server running")


@server_app.command("status")
def server_status_command() -> None:
    """Whether the warm Prefect server runs, where, and for how long; exits 1 when it does not run."""
    from tasks.local_server import server_status

    server, state = server_status()
    if server is None or state == "not running":
        console.print("no server running; the next command starts one")
        raise typer.Exit(1)
    up = time.time() - server.started
    console.print(
        f"{state}: {server.url} (pid {server.pid}, up {up / 60:.0f} min, Prefect {server.prefect_version}); "
        f"UI at {server.ui}; database {server.database}; log {server.log}"
    )
    if state != "running":
        raise typer.Exit(1)
