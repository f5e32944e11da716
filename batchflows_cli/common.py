"""What every command shares: the Typer app, the console, the run wrapper (embedded sandbox, progress bars,
signals, exit codes) and the settings parsing."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

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


def _settings(model: Any, set_: list[str] | None, **explicit: Any) -> Any:
    """A job's settings model from --set KEY=VALUE pairs and explicit flags; exit 2 naming a bad value."""
    from pydantic import ValidationError

    values = {**_key_values(set_), **{k: v for k, v in explicit.items() if v is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


def loaded() -> None:
    """The command's modules are loaded: keep them out of every later garbage collection, and collect again.

    A command loads Prefect, databricks-sdk, pandas and ours: hundreds of thousands of objects that live until
    it exits. Collecting while they load (collection is off until now, see `batchflows_cli.main`) and going through them
    again at exit cost ~1.2 s of every command (`python -c "import flows.rerun"`: 2.8 s; with collection off
    while importing, then gc.freeze: 1.6 s). Call it before a command's long work (a flow run, a server)."""
    gc.freeze()
    gc.enable()


_UNTIL_EXIT = contextlib.ExitStack()  # what a command holds until it ends: its Prefect server


@app.callback()
def _around_every_command(ctx: typer.Context) -> None:
    import os

    if os.environ.get("BATCHFLOWS_PREFECT_SERVER", "warm") not in ("warm", "temporary"):
        console.print("[red]error:[/red] BATCHFLOWS_PREFECT_SERVER must be 'warm' (the default) or 'temporary'")
        raise typer.Exit(2)
    ctx.call_on_close(_UNTIL_EXIT.close)


def _uses_prefect() -> None:
    """Point the running command at the local Prefect server until it ends (see tasks.local_server): the warm
    one, started if need be, unless PREFECT_API_URL names a server."""
    from prefect.settings import PREFECT_API_URL

    from tasks.local_server import local_server

    if not PREFECT_API_URL.value():  # once set, here or by the user, a command has its server
        _UNTIL_EXIT.enter_context(local_server())


@contextlib.contextmanager
def _job(workspace: _workspace) -> Iterator[str | None]:
    """Around a job's run: the workspace block (or the embedded sandbox), progress bars, and a clean exit 2
    for inputs the job refuses."""
    from databricks.sdk.errors import NotFound

    from tasks import progress
    from tasks.inputs import InputError  # a budget too, and the pre-flight's refusals

    def stopping_now(name: str) -> None:
        Console(stderr=True).print(
            f"[yellow]{name}: stopping[/yellow] - no new calls; calls in flight finish, then the report is "
            f"written with the rest as 'interrupted' ({name} again quits at once)"
        )

    from tasks.prefect_client import command_client

    loaded()
    stopping.clear()
    _uses_prefect()
    with (
        # one Prefect client for the command's block saves, loads and flow run (a thread of it copies this
        # context): each new one cost ~17 ms, mostly CA certificates loaded for an SSL context that Prefect
        # makes for an http:// server too, and opened its own connections (a `score` made 12, now 10); it
        # asks a busy server again in ms, not Prefect's 2 s
        command_client(),
        workspace as block_name,
        _Bars() as bars,
        progress.listening(bars),
        stopping.graceful_signals(stopping_now),
    ):
        try:
            yield block_name
        except (InputError, NotFound) as exc:  # NotFound: an unknown space, warehouse or endpoint
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

    from flows.phase import TAGS, no_idle_heartbeats, summary_of

    loaded()  # again: the flow's modules may have loaded since
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            with tags(*TAGS), no_idle_heartbeats():
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

    def resized(self, phase: str, total: int) -> None:
        self.bars.update(self.tasks[phase], total=total)

    def __enter__(self) -> _Bars:
        self.bars.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bars.stop()


class _workspace:
    """The block name to use; with --sandbox, an embedded sandbox saved as block 'sandbox'.

    Made first thing in a command: the sandbox's own process starts at once and loads beside the command's
    imports (on another core; its server never shares the command's GIL), and it ends with the command, even
    one killed with -9."""

    def __init__(self, use_sandbox: bool, block: str | None, allow_writes: bool = False) -> None:
        self.block = block
        self.sb: Any = None
        if use_sandbox:
            from sandbox.process import SandboxProcess

            self.sb = SandboxProcess(allow_writes=allow_writes, tied=True).launch()
            _UNTIL_EXIT.callback(self.sb.stop)  # also when the command ends before it uses the sandbox

    def __enter__(self) -> str | None:
        if self.sb is None:
            return self.block
        from blocks.workspace import EMBEDDED_SANDBOX_BLOCK, DatabricksWorkspace

        self.sb.start()
        self.sb.set_faults("genie", latency_ms=800, latency_jitter_ms=400)
        self.sb.set_faults("sql", latency_ms=150, latency_jitter_ms=100)
        self.sb.set_faults("chat", latency_ms=400)
        DatabricksWorkspace(host=self.sb.host, token=self.sb.token).save(EMBEDDED_SANDBOX_BLOCK, overwrite=True)
        console.print(f"Embedded sandbox workspace on {self.sb.host}")
        return EMBEDDED_SANDBOX_BLOCK

    def __exit__(self, *_: object) -> None:
        if self.sb is not None:
            self.sb.stop()
