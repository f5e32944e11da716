"""The improvement loop against the sandbox: real Genie spaces, a real chat endpoint, faults injected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from databricks.sdk.errors import NotFound

from blocks.settings import ScoreSettings
from flows.improve import DEV_MARK, ImproveError, ImproveSettings, improve
from flows.score import score
from sandbox.genie import bare_configuration

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
SCORING = ScoreSettings(genie_rpm=0, genie_retry_delay=0.1, genie_poll_initial=0.1, genie_poll_max=0.2)


def _production(client: Any) -> str:
    """A fresh production space with no instructions, joins, snippets or sample queries."""
    space = client.genie.create_space(
        warehouse_id="sandbox-warehouse",
        serialized_space=json.dumps(bare_configuration()),
        title=f"prod-{uuid.uuid4().hex[:6]}",
    )
    return str(space.space_id)


def _breaker() -> str:
    return f"b-{uuid.uuid4().hex[:8]}"


def _dev_copies(client: Any, space_id: str) -> list[str]:
    mark = DEV_MARK.format(space_id=space_id)
    spaces = client.genie.list_spaces().spaces or []
    return [s.space_id for s in spaces if (s.description or "").startswith(mark)]


def _asked_spaces(sb: Any) -> set[str]:
    return {r["path"].split("/")[5] for r in sb.requests("genie") if "/genie/spaces/" in r["path"]}


def _run(
    space_id: str,
    block: str,
    ledger: str | None,
    tmp_path: Path,
    dry_run: bool = False,
    scoring: ScoreSettings = SCORING,
    **settings: Any,
) -> dict[str, Any]:
    return improve(
        BENCHMARKS,
        space_id,
        "sandbox-warehouse",
        ImproveSettings(**settings),
        scoring,
        dry_run=dry_run,
        workspace_block=block,
        ledger_block=ledger,
        output_dir=str(tmp_path),
        breaker_block=_breaker(),
    )


def _in_background(*args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """`_run(*args, **kwargs)` started in a thread, so the test can act on the sandbox mid-run; the outcome
    gets "summary" or "error" when it ends."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = _run(*args, **kwargs)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_improve_raises_the_score_and_promotes(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    space_id = _production(client)
    summary = _run(space_id, workspace_block, ledger_block, tmp_path)

    assert summary["promoted"] is True
    assert summary["score_after"] > summary["score_before"] + 0.3, summary["stopped"]
    first = summary["iterations"][0]
    assert set(first["by_category"]) >= {"join_spec", "sql_snippet", "instruction", "metadata"}
    for fix in first["applied"]:
        assert fix["benchmarks"], fix
        assert fix["pattern"] in {p["id"] for p in summary["patterns"]} or fix["category"] == "sample_query"
    # Korean vocabulary was learned and used
    assert any(p["kind"] == "vocabulary" and p["term"] == "부산" for p in summary["patterns"])
    # production now holds the fixes, and scoring it again (no cache: new etag) gives the promoted score
    config = json.loads(client.genie.get_space(space_id, include_serialized_space=True).serialized_space)
    assert config["instructions"]["join_specs"] and config["instructions"]["sql_snippets"]["measures"]
    rescored = score(
        BENCHMARKS,
        space_id,
        "sandbox-warehouse",
        SCORING,
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "check"),
    )
    assert rescored["score"] == summary["score_after"]
    # every dev copy was asked questions, then removed
    devs = [r["dev_space_id"] for r in summary["iterations"] if "dev_space_id" in r]
    assert devs and set(devs) <= _asked_spaces(sb)
    assert _dev_copies(client, space_id) == []
    for dev in devs:
        with pytest.raises(NotFound):
            client.genie.get_space(dev)
    report = json.loads(Path(summary["report"]).read_text())
    assert report["iterations"][0]["flipped"]


def test_a_margin_it_cannot_reach_leaves_production_untouched(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    space_id = _production(client)
    before = client.genie.get_space(space_id, include_serialized_space=True)
    summary = _run(space_id, workspace_block, ledger_block, tmp_path, margin=0.99)

    assert summary["promoted"] is False
    assert "below the margin" in summary["iterations"][0]["decision"]
    assert summary["iterations"][0]["score_after"] > summary["score_before"]  # it did improve, not enough
    assert len(summary["iterations"]) == 1
    after = client.genie.get_space(space_id, include_serialized_space=True)
    assert (after.etag, after.serialized_space) == (before.etag, before.serialized_space)
    assert _dev_copies(client, space_id) == []


def test_dry_run_touches_no_space(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    space_id = _production(client)
    spaces = {(s.space_id, s.etag) for s in client.genie.list_spaces().spaces or []}
    summary = _run(space_id, workspace_block, ledger_block, tmp_path, dry_run=True)
    assert summary["iterations"][0]["applied"] and not summary["promoted"]
    assert summary["stopped"].startswith("dry run")
    assert {(s.space_id, s.etag) for s in client.genie.list_spaces().spaces or []} == spaces
    assert _asked_spaces(sb) == {space_id}


@pytest.mark.parametrize(
    ("fault", "problem"), [("bad_enum", "does not match any of the expected tags"), ("empty", "at least 1 character")]
)
def test_invalid_or_empty_fixes_are_rejected_and_recorded(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path, fault: str, problem: str
) -> None:
    space_id = _production(client)
    sb.set_faults("chat", tasks=["propose"], script=[fault])
    summary = _run(space_id, workspace_block, ledger_block, tmp_path, dry_run=True)
    first = summary["iterations"][0]
    rejected = [r for r in first["rejected"] if problem in r["problem"]]
    assert rejected, first["rejected"]
    bad = rejected[0]
    assert bad["fix"] is not None
    applied = first["applied"]
    if fault == "empty":  # every fix of that benchmark was blank: none of them is applied
        assert all(bad["benchmark"] not in f["benchmarks"] for f in applied)
    else:  # the corrupted fix is not among the applied ones
        assert all(
            f["category"] in ("metadata", "instruction", "sample_query", "join_spec", "sql_snippet") for f in applied
        )
    propose_calls = [r for r in sb.requests("chat") if r.get("task") == "propose"]
    assert propose_calls[0]["fault"] == fault


def test_dev_copy_is_removed_when_the_run_fails(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    """Production changes while the dev copy is scored: promotion must refuse, and the copy still goes."""
    space_id = _production(client)
    original = client.genie.get_space(space_id, include_serialized_space=True).serialized_space
    sb.set_faults("genie", latency_ms=150)
    thread, outcome = _in_background(space_id, workspace_block, ledger_block, tmp_path)
    dev = _wait_for_dev_copy(sb, client, space_id)
    client.genie.update_space(space_id, title="renamed by a colleague")  # new etag
    thread.join(timeout=240)

    assert isinstance(outcome.get("error"), ImproveError), outcome
    assert "changed while the improvement ran" in str(outcome["error"])
    assert dev in _asked_spaces(sb)
    assert _dev_copies(client, space_id) == []
    assert client.genie.get_space(space_id, include_serialized_space=True).serialized_space == original


def test_dev_copy_is_removed_when_the_run_is_cancelled(
    prefect_api: None, sb: Any, client: Any, workspace_block: str, tmp_path: Path
) -> None:
    """A worker cancels a run with SIGTERM: the flow's cleanup removes the dev copy before it exits. A run
    killed outright (SIGKILL) cannot clean up: the next run on that space removes what it left."""
    from prefect.settings import PREFECT_API_URL

    space_id = _production(client)
    sb.set_faults("genie", latency_ms=150)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [
        sys.executable,
        "-m",
        "batchflows_cli",
        "improve",
        "--workspace-block",
        workspace_block,
        "--benchmarks",
        BENCHMARKS,
        "--space-id",
        space_id,
        "--warehouse-id",
        "sandbox-warehouse",
        "--score-set",
        "genie_rpm=0",
        "--output-dir",
        str(tmp_path),
    ]
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            dev = _wait_for_dev_copy(sb, client, space_id, proc)
            proc.send_signal(how)
            try:
                proc.communicate(timeout=120)  # (under a full CI run's load, a SIGTERM exit once took over 60 s)
            except subprocess.TimeoutExpired as exc:
                said = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
                raise AssertionError(f"no exit 120 s after {how.name}; its last words:\n{said[-4000:]}") from None
        finally:
            proc.kill()
        assert dev in _asked_spaces(sb)
        if how == signal.SIGTERM:
            assert _dev_copies(client, space_id) == []
        else:
            assert _dev_copies(client, space_id) == [dev]  # nobody could clean up...
    sb.set_faults("genie")
    summary = _run(space_id, workspace_block, None, tmp_path, dry_run=True)  # ...until the next run on the space
    assert summary["dry_run"] and _dev_copies(client, space_id) == []


def _wait_for_dev_copy(sb: Any, client: Any, space_id: str, proc: subprocess.Popen[str] | None = None) -> str:
    """The id of the run's dev copy, once Genie is being asked questions on it."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = _dev_copies(client, space_id)
        if found and found[0] in _asked_spaces(sb):
            return found[0]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before creating a dev copy: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    raise AssertionError("no dev copy appeared")


def test_a_dev_copy_that_breaks_passing_benchmarks_is_not_promoted(
    sb: Any, client: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    """Genie starts failing while the dev copy is scored: benchmarks that passed in production now fail."""
    space_id = _production(client)
    before = client.genie.get_space(space_id, include_serialized_space=True).serialized_space
    sb.set_faults("genie", latency_ms=100)
    scoring = SCORING.model_copy(update={"genie_retry_attempts": 0})
    thread, outcome = _in_background(space_id, workspace_block, ledger_block, tmp_path, scoring=scoring)
    _wait_for_dev_copy(sb, client, space_id)
    sb.set_faults("genie", latency_ms=100, rate_genie_failed=0.6)
    thread.join(timeout=240)

    first = outcome["summary"]["iterations"][0]
    assert first["regressed"] and first["promoted"] is False, first["decision"]
    assert client.genie.get_space(space_id, include_serialized_space=True).serialized_space == before
    assert _dev_copies(client, space_id) == []


def test_an_unknown_space_is_a_clear_error(workspace_block: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from batchflows_cli import app

    result = CliRunner().invoke(
        app,
        [
            "improve",
            "--workspace-block",
            workspace_block,
            "--benchmarks",
            BENCHMARKS,
            "--space-id",
            "no-such-space",
            "--warehouse-id",
            "sandbox-warehouse",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "no-such-space" in result.output
    assert not any(tmp_path.iterdir())  # nothing was scored or written
