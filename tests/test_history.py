"""Score history, space versions and rollback, flaky benchmarks, the trend artifact and the HTML report,
against the sandbox and the session's Prefect server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from blocks.ledger import RowLedger
from blocks.settings import ScoreSettings
from flows.improve import ImproveSettings, improve
from flows.score import score
from flows.versions import RollbackError, rollback_space
from sandbox.genie import bare_configuration
from tasks import history as history_module
from tasks.history import HistoryStore

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
SCORING = ScoreSettings(genie_rpm=0, genie_retry_delay=0.1, genie_poll_initial=0.05, genie_poll_max=0.2)


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return str(found[0].data)


def test_history_versions_rollback_and_flaky(sb, client, workspace_block, tmp_path):
    ledger = f"ledger-{uuid.uuid4().hex[:8]}"
    RowLedger(path=str(tmp_path / "ledger.sqlite")).save(ledger)
    space_id = str(
        client.genie.create_space(
            warehouse_id="sandbox-warehouse", serialized_space=json.dumps(bare_configuration()), title="prod"
        ).space_id
    )

    def run(settings: ScoreSettings = SCORING, **kw: Any) -> dict[str, Any]:
        return score(
            BENCHMARKS,
            space_id,
            "sandbox-warehouse",
            settings,
            workspace_block=workspace_block,
            ledger_block=ledger,
            output_dir=str(tmp_path / "out"),
            breaker_block=f"b-{uuid.uuid4().hex[:8]}",
            **kw,
        )

    first = run(fresh=True)
    assert first["history"]["version"] == 1
    improved = improve(
        BENCHMARKS,
        space_id,
        "sandbox-warehouse",
        ImproveSettings(iterations=1, margin=0.05),
        SCORING,
        workspace_block=workspace_block,
        ledger_block=ledger,
        output_dir=str(tmp_path / "out"),
    )
    assert improved["promoted"] and improved["versions"] == [2]
    assert "Versions created: v2" in _artifact("improvement-summary")

    after = run(fresh=True)
    assert after["history"]["version"] == 2 and after["score"] > first["score"]
    steady = next(r["id"] for r in after["rows"] if r["verdict"] == "correct")
    question = next(r["question"] for r in after["rows"] if r["id"] == steady)
    sb.set_flaky(question)  # right, wrong, right ...
    runs = [run(fresh=True) for _ in range(3)]
    flaky_at = [{r["id"] for r in card["rows"] if r["flaky"]} for card in runs]
    assert flaky_at == [set(), set(), {steady}]  # the second change of verdict at the same version marks it

    store = HistoryStore(f"sqlite:///{tmp_path / 'history.sqlite'}")
    history = store.runs("local-sandbox", space_id)
    assert len(history) == 6  # first, improve's scoring of production, after, three more
    assert [h["version"] for h in history] == [1, 1, 2, 2, 2, 2]
    assert history[-1]["flaky"] == [steady] and history[-1]["verdicts"][steady] == "correct"
    assert [h["verdicts"][steady] for h in history[2:]] == ["correct", "correct", "incorrect", "correct"]
    assert history[0]["figures"]["genie_latency_p50_s"] is not None
    assert history[0]["figures"]["phases"][0]["calls"] == 32

    trend = _artifact("score-trend")
    assert "last 6 of 6 runs" in trend and "v1 -> v2" in trend and steady in trend
    assert f"history-{space_id}.html" in trend

    versions = store.versions("local-sandbox", space_id)
    assert [(v.version, v.source) for v in versions] == [(1, "score"), (2, "improve")]
    assert versions[0].config == bare_configuration() and "+" in versions[1].diff

    sb.reset()  # no more flaky answers
    restored = rollback_space(space_id, 1, workspace_block=workspace_block, ledger_block=ledger)
    assert restored["version"] == 3
    live = client.genie.get_space(space_id, include_serialized_space=True)
    assert json.loads(live.serialized_space) == versions[0].config
    back = run(SCORING.model_copy(update={"genie_adaptive": True}), fresh=True)
    assert back["score"] == first["score"] and back["history"]["version"] == 3
    table = [line for line in _artifact("score-trend").splitlines() if line.startswith("|")]
    assert re.search(r"\| genie \d+→\d+[^|]* \|$", table[-1]), table[-1]  # where its adaptive concurrency went
    assert [v.source for v in store.versions("local-sandbox", space_id)] == ["score", "improve", "rollback"]

    # a change made by hand since the history last saw the space is not overwritten unseen
    client.genie.update_space(space_id, title="renamed by hand")
    with pytest.raises(RollbackError, match="changed since the history last saw it"):
        rollback_space(space_id, 2, workspace_block=workspace_block, ledger_block=ledger)
    with pytest.raises(RollbackError, match=r"no version 9 in the history \(known: v1, v2, v3\)"):
        rollback_space(space_id, 9, workspace_block=workspace_block, ledger_block=ledger)

    from batchflows_cli import app

    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    shown = CliRunner().invoke(
        app,
        ["history", "--space-id", space_id, "--history-url", url, "--output-dir", str(tmp_path / "cli")],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    assert "v1 -> v2" in shown.output and "v2 -> v3" in shown.output and (tmp_path / "cli").exists()
    assert re.search(r"genie \d+→\d+", shown.output)  # where the adaptive run's concurrency went
    listed = CliRunner().invoke(app, ["versions", "--space-id", space_id, "--history-url", url], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "improve" in listed.output and "rollback" in listed.output
    unknown = CliRunner().invoke(app, ["history", "--space-id", "nope", "--history-url", url])
    assert unknown.exit_code == 2 and "knows no space 'nope'" in unknown.output

    page = Path(back["history"]["report"])
    _check_in_chromium(page, tmp_path)


def _check_in_chromium(page: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("no chromium here (apt-get install chromium) to open the HTML report")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count('class="main-svg"') >= 3, dom[-2000:]  # plotly drew its charts (3 figures)
    shot = tmp_path / "history.png"
    subprocess.run(
        [*flags, "--window-size=1200,1800", "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20000


def test_migrations_are_applied_once_in_order(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    store = HistoryStore(url)
    store.record_version("w", "s", "e1", {"a": 1}, "score", None)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT value FROM batchflows_meta").scalar() == "1"
    # a release that adds a column: the old database is migrated on open, its rows kept
    monkeypatch.setattr(
        history_module, "MIGRATIONS", [*history_module.MIGRATIONS, ["ALTER TABLE score_runs ADD COLUMN note TEXT"]]
    )
    monkeypatch.setattr(history_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(history_module, "_ENGINES", {})
    migrated = HistoryStore(url)
    with migrated.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT value FROM batchflows_meta").scalar() == "2"
        assert "note" in [c[1] for c in conn.exec_driver_sql("PRAGMA table_info(score_runs)")]
    assert [v.version for v in migrated.versions("w", "s")] == [1]
    HistoryStore(url)  # opening again changes nothing
    # an older batchflows refuses a newer schema instead of writing into it
    monkeypatch.setattr(history_module, "SCHEMA_VERSION", 1)
    monkeypatch.setattr(history_module, "MIGRATIONS", history_module.MIGRATIONS[:1])
    monkeypatch.setattr(history_module, "_ENGINES", {})
    with pytest.raises(RuntimeError, match="schema version 2, newer than this batchflows knows"):
        HistoryStore(url)


def _three_runs_q1_alternating(store: HistoryStore, others: int, reason: str) -> None:
    """Three runs of version 2 of space "s", as a scoring run writes them: q1 correct, incorrect, correct
    (flaky at the third), the `others` benchmarks always correct."""
    for i, verdict in enumerate(["correct", "incorrect", "correct"]):
        verdicts = {"q1": verdict, **{f"q{b}": "correct" for b in range(2, 2 + others)}}
        flaky = store.flaky("w", "s", 2, verdicts, window=5)
        store.append_run(
            {
                "run_id": f"run-{i}",
                "workspace": "w",
                "space_id": "s",
                "etag": "e2",
                "version": 2,
                "score": 0.9,
                "total": len(verdicts),
                "correct": len(verdicts) - 1,
                "verdicts": {},
                "figures": {"p": 1},
                "breaker_events": [],
                "settings": {},
                "report": None,
                "created_at": f"2026-11-25T00:00:0{i}Z",
            },
            [
                {
                    "benchmark_id": b,
                    "verdict": v,
                    "stage": "comparison",
                    "reason": reason,
                    "genie_latency_s": None if b == "q1" else 0.5,
                    "attempts": 1,
                    "cached": b == "q1",
                    "flaky": b in flaky,
                }
                for b, v in verdicts.items()
            ],
        )


def test_history_on_postgresql(tmp_path):
    """The team set-up: the history in PostgreSQL (the server Prefect uses), same behaviour as SQLite."""
    from deployments.local import Postgres, ServerError

    try:
        pg = Postgres().start()
    except ServerError as exc:
        pytest.skip(f"PostgreSQL unavailable here: {exc}")
    try:
        store = HistoryStore(pg.url)  # Prefect's asyncpg URL is accepted as it is
        assert store.engine.dialect.name == "postgresql"
        assert store.record_version("w", "s", "e1", {"a": 1}, "score", "r0") == 1
        assert store.record_version("w", "s", "e1", {"a": 1}, "score", "r1") == 1
        assert store.record_version("w", "s", "e2", {"a": 2}, "improve", "r2") == 2
        _three_runs_q1_alternating(store, others=1, reason="")
        runs = store.runs("w", "s")
        assert [r["run_id"] for r in runs] == ["run-0", "run-1", "run-2"]
        assert runs[-1]["flaky"] == ["q1"] and runs[1]["flaky"] == []
        assert [v.version for v in store.versions("w", "s")] == [1, 2]
    finally:
        pg.stop()


def test_history_on_a_sql_warehouse(tmp_path):
    """The history as Delta tables on a warehouse, written with parameter markers: same behaviour, and a value
    that looks like SQL stays a value."""
    from blocks.workspace import DatabricksWorkspace
    from sandbox import Sandbox
    from tasks.calls import run_sql

    with Sandbox(allow_writes=True) as wsb:
        client = DatabricksWorkspace(host=wsb.host, token=wsb.token).client(30)
        url = "databricks://sandbox-warehouse/samples.retail"
        store = HistoryStore(url, client)
        HistoryStore(url, client)  # migrated once; opening again changes nothing
        statements = [r["statement"] for r in wsb.requests("sql")]
        assert sum("CREATE TABLE samples.retail.score_rows" in s for s in statements) == 1
        assert not any("CREATE INDEX" in s or "PRIMARY KEY" in s for s in statements)
        hostile = "x'); DROP TABLE samples.retail.orders; --\\"
        assert store.record_version("w", "s", "e1", {"note": hostile}, "score", None) == 1
        assert store.record_version("w", "s", "e2", {"note": "other"}, "improve", "r1") == 2
        assert store.versions("w", "s")[0].config == {"note": hostile}
        _three_runs_q1_alternating(store, others=43, reason=hostile)
        runs = store.runs("w", "s")
        assert [r["run_id"] for r in runs] == ["run-0", "run-1", "run-2"]
        assert runs[-1]["flaky"] == ["q1"] and len(runs[-1]["verdicts"]) == 44
        orders = run_sql(client, "sandbox-warehouse", "SELECT COUNT(*) AS n FROM samples.retail.orders", 10)
        assert orders["rows"][0][0] > 0  # the hostile text dropped nothing


def test_sandbox_binds_named_parameters_as_a_warehouse_does(client):
    from tasks.calls import run_sql

    got = run_sql(
        client,
        "sandbox-warehouse",
        "SELECT :n + 1 AS n, :s AS s, :b AS b, :z AS z",
        10,
        parameters={"n": 41, "s": "it's \\ fine", "b": True, "z": None},
    )
    assert got["rows"] == [[42, "it's \\ fine", True, None]]
    unbound = run_sql(client, "sandbox-warehouse", "SELECT :missing AS m", 10, parameters={"other": 1})
    assert "UNBOUND_SQL_PARAMETER" in unbound["error"]
