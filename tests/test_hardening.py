"""Dead services, wrong inputs and what the user is told: each case fails fast with one clear line, call
counts are exact, and what is printed works as printed (issue #18, defects 7 and 9-15)."""

from __future__ import annotations

import contextlib
import json
import shlex
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from prefect import flow
from typer.testing import CliRunner, Result

from batchflows_cli import app
from batchflows_cli.common import SANDBOX_WAREHOUSE
from blocks.workspace import DatabricksWorkspace
from flows.phase import PhaseSpec, run_phase
from tasks.calls import chat
from tasks.preflight import PreflightError, check_workspace
from tasks.resilience import RetryPolicy, Row

WIDE = {"COLUMNS": "400"}


def test_rerun_hint_after_score_sandbox_works_as_printed(prefect_api, tmp_path):
    benchmarks = tmp_path / "b.json"
    benchmarks.write_text(
        '[{"id": "q01", "question": "How many customers do we have?", "expected_sql": "SELECT 1"},'
        ' {"id": "bad", "question": "How many orders were placed in 2024?", "expected_sql": "SELECT * FROM nope"}]'
    )
    out = tmp_path / "out"
    scored = _cli("score", "--sandbox", "--benchmarks", str(benchmarks), "--genie-rpm", "0", "--output-dir", str(out))
    assert scored.exit_code == 0, scored.output
    hint = next(line for line in scored.output.splitlines() if line.startswith("Rerun just the 1 failed rows: "))
    command = shlex.split(hint.split(": ", 1)[1])
    assert command[:2] == ["batchflows", "rerun-failed"] and command[-1] == "--sandbox"
    rerun = _cli(*command[1:], "--fresh")
    assert rerun.exit_code == 0, rerun.output
    assert "Rerun 1 failed rows: 0 now judged, 1 still failed" in rerun.output


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=WIDE)


def _enrich(rows: str, workspace_block: str, *more: str) -> Result:
    """`batchflows enrich` of the rows file's `text` column through a saved workspace block."""
    return _cli("enrich", "--text-columns", "text", "--input", rows, "--workspace-block", workspace_block, *more)


def _sample() -> str:
    return str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))


def _workspace(name: str, host: str, token: str) -> str:
    from blocks.workspace import DatabricksWorkspace

    DatabricksWorkspace(host=host, token=token).save(name, overwrite=True)
    return name


def _rows(tmp_path, n: int = 100) -> str:
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n" + "".join(f"t{i},customer note number {i}\n" for i in range(n)))
    return str(path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["token", "dns", "refused"])
def test_a_wrong_connection_is_one_clear_line_and_no_call(sb, prefect_api, tmp_path, case):
    host, token, words = {
        "token": (sb.host, "dapi-wrong", f"the workspace at {sb.host} refused the credentials"),
        "dns": ("http://no-such-host.invalid", sb.token, "cannot reach the workspace at http://no-such-host.invalid"),
        "refused": (f"http://127.0.0.1:{_free_port()}", sb.token, "cannot reach the workspace at http://127.0.0.1"),
    }[case]
    block = _workspace(f"wrong-{case}", host, token)
    result = _enrich(_rows(tmp_path), block, "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert "Traceback" not in result.output
    assert sb.stats()["chat"]["calls"] == 0


@contextlib.contextmanager
def _dropping_proxy(upstream: str, drop_path: str, drops: int, status: int = 0) -> Iterator[tuple[str, _Requests]]:
    """A proxy of a server (the sandbox, the Prefect API) that closes the connection, unanswered, on the first
    `drops` requests whose path (with its query) holds `drop_path` (as a server does to a keep-alive connection
    it times out just as it is reused), or answers them `status`. Yields its address and the (path, status) of
    every request, 0 for a dropped one."""
    seen = _Requests()

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path, came = self.path, time.monotonic()
            if drop_path in path and sum(drop_path in p for p, _ in seen) < drops:
                seen.add(path, status, came)
                if status:
                    refusal = b'{"exception_message": "Service Unavailable"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(refusal)))
                    self.end_headers()
                    self.wfile.write(refusal)
                else:
                    self.close_connection = True
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            answer = httpx.request(self.command, upstream + self.path, content=body, headers=headers)
            seen.add(path, answer.status_code, came)
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{proxy.server_port}", seen
    finally:
        proxy.shutdown()
        proxy.server_close()  # what is still sent to it is refused at once, not left hanging in its backlog


class _Requests(list[tuple[str, int]]):
    """The (path, status) of each request a proxy saw; `at`: when each came (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []
        self._lock = threading.Lock()

    def add(self, path: str, status: int, came: float) -> None:
        with self._lock:
            self.append((path, status))
            self.at.append(came)


def test_a_busy_prefect_server_is_asked_again_in_ms_not_after_prefects_2_s(prefect_api):
    """A Prefect server on SQLite answers 503 while its database is locked. Within a command's client
    (`command_client`), creating the flow run is asked again after 5 and 10 ms; Prefect's own client waits 2 s,
    then 4 s."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.prefect_client import command_client

    @flow
    def one() -> int:
        return 1

    api = str(PREFECT_API_URL.value())
    with (
        _dropping_proxy(api.removesuffix("/api"), "/api/flow_runs/", drops=2, status=503) as (proxy, seen),
        temporary_settings(updates={PREFECT_API_URL: f"{proxy}/api"}),
        command_client(),
    ):
        assert one() == 1
    created = [i for i, (path, _) in enumerate(seen) if path == "/api/flow_runs/"]
    assert [seen[i][1] for i in created] == [503, 503, 201]
    assert seen.at[created[-1]] - seen.at[created[0]] < 1  # 5 + 10 ms and the requests' time; Prefect's: >= 6 s


def test_the_command_clients_transport_keeps_prefects_tls_settings():
    import ssl

    from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    from tasks.prefect_client import ssl_context

    assert ssl_context().verify_mode == ssl.CERT_REQUIRED
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        assert ssl_context().verify_mode == ssl.CERT_NONE and not ssl_context().check_hostname


def test_a_dropped_connection_in_the_pre_flight_is_read_again_and_a_refusal_is_not(sb):
    me = "/scim/v2/Me"
    with _dropping_proxy(sb.host, me, drops=1) as (host, seen):
        check_workspace(DatabricksWorkspace(host=host, token=sb.token), space_id="retail")
        assert [status for path, status in seen if me in path] == [0, 200]
    with _dropping_proxy(sb.host, me, drops=3) as (host, seen):
        with pytest.raises(PreflightError, match=r"cannot reach the workspace at .*: the connection was dropped"):
            check_workspace(DatabricksWorkspace(host=host, token=sb.token + "-wrong"))
        assert [status for path, status in seen if me in path] == [0, 0, 0]
    with _dropping_proxy(sb.host, me, drops=0) as (host, seen):
        with pytest.raises(PreflightError, match="refused the credentials"):
            check_workspace(DatabricksWorkspace(host=host, token=sb.token + "-wrong"))
        assert [status for path, status in seen if me in path] == [401]


def test_unknown_warehouse_and_endpoint_are_named_before_any_call(sb, workspace_block, tmp_path):
    scored = _cli(
        "score",
        "--benchmarks",
        _sample(),
        "--space-id",
        "retail",
        "--warehouse-id",
        "no-such-warehouse",
        "--workspace-block",
        workspace_block,
        "--genie-rpm",
        "0",
        "--output-dir",
        str(tmp_path),
    )
    assert scored.exit_code == 2, scored.output
    assert "error: SQL warehouse 'no-such-warehouse' does not exist in" in scored.output
    enriched = _enrich(
        _rows(tmp_path), workspace_block, "--set", "endpoint=no-such-endpoint", "--output-dir", str(tmp_path)
    )
    assert enriched.exit_code == 2, enriched.output
    assert "error: serving endpoint 'no-such-endpoint' does not exist in" in enriched.output
    stats = sb.stats()
    assert stats["genie"]["calls"] == stats["sql"]["calls"] == stats["unknown_endpoint"]["calls"] == 0


@flow(name="stop-test-phase")
def _phase_against(host: str, token: str, endpoint: str, n: int) -> dict[str, Any]:
    client = DatabricksWorkspace(host=host, token=token).client(5)
    spec = PhaseSpec("stop-test", "stop-test", 4, RetryPolicy(retries=3, base_delay_s=0))
    rows = [Row(f"r{i}", i, f"hello {i}") for i in range(n)]
    return run_phase(spec, rows, lambda prompt: chat(client, endpoint, prompt))


def test_a_permanent_refusal_stops_the_phase_at_once(sb, prefect_api):
    outcomes = _phase_against(sb.host, sb.token, "no-such-endpoint", 40)
    calls = sb.stats()["unknown_endpoint"]["calls"]
    assert 1 <= calls <= 4  # those in flight when the first refusal came back; none after, none retried
    assert {o.error_kind for o in outcomes.values()} == {"not_found"}
    not_called = [o for o in outcomes.values() if o.message.startswith("not called:")]
    assert len(not_called) == 40 - calls and sum(o.attempts for o in outcomes.values()) == calls


def test_a_run_that_succeeds_on_nothing_exits_non_zero(sb, workspace_block, tmp_path):
    sb.set_faults("chat", down=True)
    result = _enrich(
        _rows(tmp_path, 10),
        workspace_block,
        "--set",
        "retry_attempts=0",
        "--set",
        "rpm=0",
        "--output-dir",
        str(tmp_path),
    )
    assert result.exit_code == 1, result.output
    assert "failed: 0 of 10 rows enriched" in result.output
    assert list(tmp_path.glob("enrich-*/*.csv"))  # the report with its failures is written all the same


def test_thousands_of_benchmarks_pass_by_reference(sb, workspace_block, tmp_path):
    """400 long benchmarks (~0.6 MB, like 2,500 short ones) are over Prefect's 512 KB cap on a flow run's
    parameters (a raw 422 when the rows were the parameter). Scoring takes the file's path; rerun-failed
    hands its rows on as a file."""
    from tasks.benchmarks import load_benchmarks

    sample = load_benchmarks(_sample())
    many = [
        {"id": f"b{n:04}", "question": b.question, "expected_sql": f"{b.expected_sql} -- {'x' * 1400}"}
        for n in range(400)
        for b in [sample[n % len(sample)]]
    ]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(many))
    assert path.stat().st_size > 512 * 1024
    sb.set_faults("genie", down=True)
    scored = _cli(
        "score",
        "--benchmarks",
        str(path),
        "--space-id",
        "retail",
        "--warehouse-id",
        "sandbox-warehouse",
        "--workspace-block",
        workspace_block,
        "--genie-rpm",
        "0",
        "--set",
        "genie_retry_attempts=0",
        "--set",
        "genie_circuit_threshold=1000",
        "--output-dir",
        str(tmp_path),
        "--fresh",  # not the answers earlier tests left in the shared ledger: this run's Genie is down
        "--json",
    )
    assert scored.exit_code == 1, scored.output  # nothing judged: Genie is down
    first = json.loads(scored.output[scored.output.index("{\n") : scored.output.rindex("}") + 1])
    assert first["total"] == 400 and first["verdicts"]["genie_error"] == 400

    sb.reset()
    rerun = _cli("rerun-failed", str(Path(first["files"]["csv"]).parent))
    assert rerun.exit_code == 0, rerun.output
    assert "Rerun 400 failed rows" in rerun.output and "genie_error" not in rerun.output


def test_a_row_over_the_endpoints_context_is_never_sent_whole(sb, workspace_block, ledger_block, tmp_path):
    from flows.enrich import EnrichSettings, enrich

    rows = tmp_path / "rows.csv"
    huge = "word " * 2_000_000  # 10 MB, ~2.5 M tokens
    rows.write_text("id,text\n" + "".join(f"t{i},short note {i}\n" for i in range(4)) + f"big,{huge}\n")
    kwargs = {"workspace_block": workspace_block, "ledger_block": ledger_block}
    refused = enrich(["text"], input_path=str(rows), id_column="id", output_dir=str(tmp_path / "a"), **kwargs)
    assert refused["failed"] == 1 and refused["newly_enriched"] == 4
    (failure,) = refused["failures"]
    assert failure["row_key"] == "big" and "~2,500,002 tokens, over max_item_tokens 8,000" in failure["message"]
    assert all("big" not in r["ids"] for r in sb.requests("chat"))

    cut = enrich(
        ["text"],
        input_path=str(rows),
        id_column="id",
        output_dir=str(tmp_path / "b"),
        settings=EnrichSettings(oversized="truncate", max_item_tokens=500),
        **kwargs,
    )
    assert cut["failed"] == 0 and cut["truncated"] == 1
    out = pd.read_parquet(cut["files"]["parquet"])
    assert out.set_index("id").loc["big", "truncated"]
    assert cut["tokens"] < 5000  # the cut text, not 2.5 M tokens


def test_the_team_postgres_needs_its_password():
    """scripts/postgres.sh used trust authentication: anyone on the host could read Prefect's blocks."""
    import psycopg
    from sqlalchemy.engine import make_url

    from deployments.local import Postgres, ServerError

    try:
        pg = Postgres().start()
    except ServerError as exc:
        pytest.skip(f"PostgreSQL unavailable here: {exc}")
    try:
        url = make_url(pg.url)
        assert url.password and url.host == "127.0.0.1"
        where: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": url.port,
            "user": "postgres",
            "dbname": "prefect",
            "connect_timeout": 5,
        }
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(**where, password="")
        with psycopg.connect(**where, password=url.password) as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()


def test_an_unknown_workspace_block_is_one_clear_line(prefect_api, tmp_path):
    result = _enrich(_rows(tmp_path, 3), "no-such-block")
    assert result.exit_code == 2, result.output
    assert "error: Unable to find block document named no-such-block" in result.output


def test_a_dropped_connection_on_reading_the_space_does_not_fail_the_scoring_run(sb, prefect_api, tmp_path):
    """The space's configuration is read once more after the pre-flight, on the client the run's calls use;
    a keep-alive connection of that client the server closed as it was reused failed the whole run."""
    benchmarks = tmp_path / "b.json"
    benchmarks.write_text('[{"id": "q01", "question": "How many customers do we have?", "expected_sql": "SELECT 1"}]')
    config = "include_serialized_space=true"
    with _dropping_proxy(sb.host, config, drops=1) as (host, seen):
        scored = _cli(
            "score",
            "--benchmarks",
            str(benchmarks),
            "--space-id",
            "retail",
            "--warehouse-id",
            SANDBOX_WAREHOUSE,
            "--workspace-block",
            _workspace("dropping", host, sb.token),
            "--genie-rpm",
            "0",
            "--output-dir",
            str(tmp_path / "out"),
        )
        assert scored.exit_code in (0, 1), scored.output  # 1: the answer judged wrong is still a run
        assert "Verdicts:" in scored.output
        assert [status for path, status in seen if config in path] == [0, 200]


def test_rows_from_both_or_neither_of_input_and_query_are_refused_before_anything_starts(tmp_path):
    neither = _cli("analyse", "--sandbox")
    both = _cli("enrich", "--text-columns", "text", "--input", _rows(tmp_path), "--query", "SELECT 1", "--sandbox")
    assert neither.exit_code == both.exit_code == 2, neither.output + both.output
    assert "give --input FILE or --query SQL" in neither.output and "Embedded sandbox" not in neither.output
    assert "give --input FILE or --query SQL, not both" in both.output


def test_a_bad_input_is_one_line_on_the_terminal_not_a_traceback(command, tmp_path):
    """The command says what to fix on stdout; Prefect's engine logged the same error on stderr with the
    traceback of our code (~20 lines) until `tasks.inputs` kept an InputError's log record to one line."""
    items = tmp_path / "items.csv"
    items.write_text("a,b\n1,2\n")
    done = command("analyse", "--sandbox", "--input", str(items), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: column(s) id, position, text not in the input (it has: a, b)" in done.stdout
    assert "InputError('column(s) id, position, text not in the input" in done.stderr  # Prefect's line
    assert "Traceback" not in done.stderr, done.stderr
