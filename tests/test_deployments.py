"""Real components: a `prefect server` (SQLite, then PostgreSQL) on a free loopback port, `batchflows deploy`
to a process work pool, workers, deployment runs against the sandbox, a schedule firing, the failed-rows
rerun from its deployment, two workers sharing a global limit, and the UI in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from deployments.local import BIN, Postgres, PrefectServer, ServerError, Worker
from flows.score import FAILED

pytestmark = pytest.mark.e2e  # the end-to-end tier: servers, workers, subprocesses or minutes of calls

BENCHMARKS = Path(__file__).resolve().parent.parent / "sandbox/data/benchmarks.yaml"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    database = None
    if request.param == "postgres":
        try:
            database = Postgres().start()
        except ServerError as exc:
            if "exit 3" in str(exc):
                pytest.skip(f"PostgreSQL cannot be installed here: {exc}")
            raise
    prefect = PrefectServer(tmp_path_factory.mktemp(f"prefect-{request.param}"), database.url if database else None)
    try:
        yield prefect.start()
    finally:
        prefect.stop()
        if database:
            database.stop()


@contextlib.contextmanager
def _api(server: PrefectServer) -> Iterator[None]:
    """This process talks to `server` (not the session's test server) inside the block. The events sent
    meanwhile are flushed before the block ends: an events worker left pointing at a server that then
    stops would retry forever and hang the session's teardown."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield
        finally:
            EventsWorker.drain_all(timeout=30)


def _deploy(server: PrefectServer, tmp: Path, pool: str, benchmarks: Path, *extra: str) -> None:
    command = [str(BIN / "batchflows"), "deploy", "--pool", pool, "--workspace-block", "e2e-sandbox"]
    command += ["--benchmarks", str(benchmarks), "--space-id", "retail", "--warehouse-id", "sandbox-warehouse"]
    command += ["--output-dir", str(tmp / "out"), *extra]
    done = subprocess.run(command, env=server.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _wait(client: Any, run_id: Any, timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.type.value in FINAL:
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s")


def _enums(schema: Any) -> list[Any]:
    """Every enum in a JSON schema."""
    if isinstance(schema, dict):
        found = [schema["enum"]] if "enum" in schema else []
        return found + [e for value in schema.values() for e in _enums(value)]
    if isinstance(schema, list):
        return [e for value in schema for e in _enums(value)]
    return []


def _start(name: str, **parameters: Any) -> Any:
    """A flow run of deployment `name`, created without waiting for it."""
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters, timeout=0)


def _subset(tmp: Path, n: int) -> Path:
    items = yaml.safe_load(BENCHMARKS.read_text())[:n]
    path = tmp / f"benchmarks-{n}.json"
    path.write_text(json.dumps(items))
    return path


def test_scheduled_and_ad_hoc_runs_on_a_work_pool_then_rerun_of_failed_rows(
    server: PrefectServer, sb: Any, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )

    from blocks.breaker import CircuitBreaker
    from blocks.workspace import DatabricksWorkspace
    from flows.rerun import find_report

    benchmarks = _subset(tmp_path, 6)
    with _api(server):
        DatabricksWorkspace(host=sb.host, token=sb.token).save("e2e-sandbox", overwrite=True)
    _deploy(
        server,
        tmp_path,
        "e2e",
        benchmarks,
        "--interval",
        "20",
        *(
            "--score-set",
            "genie_rpm=0",
            "--score-set",
            "genie_retry_attempts=0",
            "--score-set",
            "genie_poll_initial=0.2",
        ),
    )
    home = {"BATCHFLOWS_HOME": str(tmp_path / "home")}  # workers poll every second: shorter tests
    with Worker(server, "e2e", env=home, query_s=1), _api(server), get_client(sync_client=True) as client:
        score = client.read_deployment_by_name("score-genie-space/score")
        assert score.schedules and score.schedules[0].active
        # deploy made the team's limits from the deployed settings, before any run
        assert client.read_global_concurrency_limit_by_name("batchflows-genie-local-sandbox").limit == 3
        assert client.read_global_concurrency_limit_by_name("batchflows-sql-local-sandbox").limit == 10
        assert score.parameters["settings"]["genie_rpm"] == 0

        # the schedule fires a run, which completes against the sandbox
        deadline = time.monotonic() + 240
        scheduled = None
        while time.monotonic() < deadline and scheduled is None:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[score.id]))
            )
            done = [r for r in runs if r.auto_scheduled and r.state and r.state.type.value in FINAL]
            scheduled = done[0] if done else None
            time.sleep(1)
        assert scheduled is not None and scheduled.state is not None, "no scheduled run finished"
        assert scheduled.state.type.value == "COMPLETED", scheduled.state
        client.pause_deployment(score.id)
        for run in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[score.id]))
        ):
            if run.state and run.state.type.value == "SCHEDULED":
                client.delete_flow_run(run.id)
        for _ in range(100):  # let a run the worker already picked up finish
            busy = [
                r
                for r in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[score.id]))
                )
                if r.state and r.state.type.value not in FINAL
            ]
            if not busy:
                break
            time.sleep(1)

        # an ad-hoc run with 3 Genie questions failing (no retries): k = 3 failure records
        sb.reset()
        sb.set_faults("genie", script=["500", "500", "500"])
        adhoc = _start("score-genie-space/score", space_id="retail-bare")
        adhoc = _wait(client, adhoc.id)
        assert adhoc.state.type.value == "COMPLETED", adhoc.state
        folder = find_report(str(adhoc.id))
        rows = json.loads((folder / "run.json").read_text())
        assert rows["flow_run_id"] == str(adhoc.id)
        card = pd.read_parquet(folder / "scorecard.parquet")
        assert sorted(card["verdict"]).count("genie_error") == 3

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[adhoc.id]))
        )
        kinds = {(a.key, a.type) for a in artifacts}
        assert {("scorecard-rows", "table"), ("scorecard-summary", "markdown"), ("score-trend", "markdown")} <= kinds
        markdown = str(next(a.data for a in artifacts if a.key == "scorecard-summary"))
        assert "rerun-failed/rerun-failed" in markdown and str(adhoc.id) in markdown
        breaker: Any = CircuitBreaker.load("genie-breaker-local-sandbox")  # one per service and workspace
        assert breaker.current_state() == "CLOSED"

        # the failed-rows rerun from its deployment, given the run id: exactly 3 Genie calls, none left failed
        sb.reset()
        rerun = _start("rerun-failed/rerun-failed", report=str(adhoc.id))
        rerun = _wait(client, rerun.id)
        assert rerun.state.type.value == "COMPLETED", rerun.state
        assert sb.stats()["genie"]["calls"] == 3
        merged = sorted((tmp_path / "out").glob("score-merged-*"))[-1]
        verdicts = pd.read_parquet(merged / "scorecard.parquet")["verdict"]
        assert len(verdicts) == 6 and not set(verdicts) & set(FAILED)

        # blocks are registered for the UI, with the presets saved
        types = {b.slug for b in client.read_block_types()}
        assert {"batchflows-databricks-workspace", "batchflows-score-preset"} <= types, types
        assert client.read_block_document_by_name("score-conservative", "batchflows-score-preset")

        # typed forms: the improvement's settings with bounds, the scoring presets as an enum
        improve_form: Any = client.read_deployment_by_name("improve-genie-space/improve").parameter_openapi_schema
        assert {"dry_run", "cleanup", "settings"} <= set(improve_form["properties"])
        margin = improve_form["definitions"]["ImproveSettings"]["properties"]["margin"]
        assert (margin["minimum"], margin["maximum"]) == (0, 1)
        assert ["default", "conservative", "aggressive"] in _enums(score.parameter_openapi_schema)

        if server.database_url is None:  # the UI is the same on either database: check it once
            table = next(a for a in artifacts if a.type == "table")
            _check_ui(server, tmp_path, score.id, table.id)


def _check_ui(server: PrefectServer, tmp: Path, deployment_id: Any, artifact_id: Any) -> None:
    """The deployment's run form shows our typed fields; the finished run shows its table artifact."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (apt-get install chromium) for the UI check")
    shots = tmp / "ui"
    shots.mkdir()
    pages = {
        "run-form": f"{server.url}/deployments/deployment/{deployment_id}/run",
        "run-artifact": f"{server.url}/artifacts/artifact/{artifact_id}",
    }
    dom = {}
    for name, url in pages.items():
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000"]
        base += ["--virtual-time-budget=15000", f"--user-data-dir={tmp / ('chrome-' + name)}"]
        subprocess.run([*base, f"--screenshot={shots / name}.png", url], capture_output=True, timeout=120)
        done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        dom[name] = done.stdout
        assert (shots / f"{name}.png").stat().st_size > 10_000
    assert "Genie questions in flight at once" in dom["run-form"]  # a ScoreSettings field's description
    assert "space_id" in dom["run-form"].lower().replace(" ", "_")
    assert "genie_error" in dom["run-artifact"]  # a verdict in the run's scorecard table


def test_two_workers_on_one_pool_share_the_global_limit(server: PrefectServer, sb: Any, tmp_path: Path) -> None:
    """Four scoring runs at once over two workers: Genie never sees more than genie_max_concurrent (3)."""
    if server.database_url is None:
        pytest.skip("measured on PostgreSQL, the team set-up (SQLite locks under several workers: docs/scale-out.md)")
    from prefect.client.orchestration import get_client

    from blocks.workspace import DatabricksWorkspace

    benchmarks = _subset(tmp_path, 8)
    pool = f"share-{uuid.uuid4().hex[:6]}"
    with _api(server):
        DatabricksWorkspace(host=sb.host, token=sb.token).save("e2e-sandbox", overwrite=True)
    fast = ("--score-set", "genie_rpm=0", "--score-set", "genie_poll_initial=0.1")
    _deploy(server, tmp_path, pool, benchmarks, *fast, "--ledger-url", server.database_url)  # the team set-up
    sb.reset()
    sb.set_faults("genie", latency_ms=400)
    home = {"BATCHFLOWS_HOME": str(tmp_path / "home")}  # workers poll every second: shorter tests
    with (
        Worker(server, pool, name="w1", limit=2, env=home, query_s=1),
        Worker(server, pool, name="w2", limit=2, env=home, query_s=1),
        _api(server),
        get_client(sync_client=True) as client,
    ):
        runs = [
            _start("score-genie-space/score", space_id=space, fresh=True)
            for space in ("retail", "retail-bare", "retail", "retail-bare")
        ]
        finished = [_wait(client, r.id, 300) for r in runs]
    assert [r.state.type.value for r in finished] == ["COMPLETED"] * 4
    stats = sb.stats()["genie"]
    assert stats["calls"] == 4 * 8
    assert stats["max_in_flight"] <= 3, stats
    taken = [(server.home / f"{w}.log").read_text().count("submitted to infrastructure") for w in ("w1", "w2")]
    assert sum(taken) == 4 and min(taken) >= 1, taken  # both workers ran some of the four
    from blocks.ledger import RowLedger

    # both workers wrote their finished rows to the team's ledger in Prefect's own PostgreSQL
    # one answer per question of each space: a fresh run's answers replace the older ones
    assert RowLedger(url=server.database_url).count("genie") == 2 * 8


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    """A page of headless Debian chromium driven by Playwright (which cannot download its own browsers here)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (apt-get install chromium) for the UI check")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1600})
        finally:
            browser.close()


def _choose(page: Any, label: str, option: str) -> None:
    """Pick `option` in the form's select labelled `label` (Prefect's select opens on the arrow key)."""
    field = page.locator(".schema-form-property", has=page.locator("label", has_text=label)).last
    field.locator("button.p-select-button__control").focus()
    page.keyboard.press("ArrowDown")
    page.locator(".p-select-option", has_text=option).first.click()
    field.locator(".p-select-button__value", has_text=option).wait_for(timeout=10_000)  # the form took it
    page.locator(".p-select-option").first.wait_for(state="detached", timeout=10_000)  # the list is closed


def _submit(page: Any, button: str, sends: str) -> None:
    """Press the form's `button` until the server takes the request whose address holds `sends`, and wait
    until the UI has left the form (it then shows what it saved).

    Pressed again when no such request went out (a click on a form still settling can be lost) or when the
    server answered 503: the Prefect server on SQLite answers a write 503 when the database stays locked
    (its worker and the runs write too), and nothing was saved, so a user presses again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    form = page.url
    answers: list[str] = []
    for _ in range(4):
        try:
            with page.expect_request(lambda r: sends in r.url and r.method != "GET", timeout=15_000) as sent:
                page.get_by_role("button", name=button).click()
        except PlaywrightTimeout:
            answers.append("no request")
            continue
        answer = sent.value.response()
        if answer is not None and answer.ok:
            break
        answers.append(f"{answer.status} {answer.text()[:300]}" if answer is not None else "no answer")
        if answer is not None and answer.status != 503:
            break
        time.sleep(2)
    else:
        answer = None
    assert answer is not None and answer.ok, f"pressing {button!r}: {sends} {answers}; the page says:\n{_text(page)}"
    try:
        page.wait_for_url(lambda url: url != form, timeout=60_000)
    except PlaywrightTimeout:
        stuck = f"the UI stayed on the form after {sends} answered {answer.status}:\n{_text(page)}"
        raise AssertionError(stuck) from None


def _text(page: Any) -> str:
    """What the page shows, to say why a step in the browser did not happen."""
    return str(page.locator("body").inner_text(timeout=5_000))[:3000]


def _logs(client: Any, run_id: Any, wanted: str, timeout_s: float = 30) -> str:
    """The run's log, once it holds `wanted` (a run's logs reach the server a moment after its final state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while True:
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        text = "\n".join(log.message for log in found)
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_the_ui_tells_the_truth_about_a_run(server: PrefectServer, sb: Any, tmp_path: Path) -> None:
    """In the Prefect UI: the score form's preset is the run's settings, a run with every row failed shows Failed
    with its message, and a breaker set CLOSED on its block page lets the next run start CLOSED."""
    if server.database_url is not None:
        pytest.skip("the UI is the same on either database: checked on SQLite")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from blocks.workspace import DatabricksWorkspace

    pool = f"ui-{uuid.uuid4().hex[:6]}"
    with _api(server):
        DatabricksWorkspace(host=sb.host, token=sb.token).save("e2e-sandbox", overwrite=True)
    _deploy(
        server,
        tmp_path,
        pool,
        _subset(tmp_path, 6),
        "--score-set",
        "genie_rpm=0",
        "--score-set",
        "genie_poll_initial=0.1",
    )
    sb.reset()
    home = {"BATCHFLOWS_HOME": str(tmp_path / "home")}
    with (
        _api(server),
        Worker(server, pool, env=home, query_s=1),
        _browser() as page,  # closed before _api drains the events: next to Playwright's loop it could not
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name("score-genie-space/score")

        # 1. the run form: preset "aggressive" with the deployment's own settings; the run uses both and says so
        of_score = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
        before = {r.id for r in client.read_flow_runs(flow_run_filter=of_score)}  # the module's earlier tests'
        page.goto(f"{server.url}/deployments/deployment/{deployment.id}/run", wait_until="networkidle")
        _choose(page, "preset (Optional)", "aggressive")
        _submit(page, "Submit", "/create_flow_run")
        runs: list[Any] = []
        deadline = time.monotonic() + 60
        while not runs and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = [r for r in client.read_flow_runs(flow_run_filter=of_score) if r.id not in before]
        assert len(runs) == 1, f"the form created {len(runs)} runs"
        run = _wait(client, runs[0].id)
        assert run.state.type.value == "COMPLETED", run.state
        assert run.name.startswith("score-retail-20"), run.name
        wanted = "Settings: preset aggressive, changed for this run: genie_rpm=0.0, genie_poll_initial=0.1;"
        logs = _logs(client, run.id, wanted)
        assert wanted in logs
        assert '"genie_max_concurrent":10,' in logs and '"genie_timeout":300.0,' in logs

        # 2. Genie down: no row can be judged, and the run page shows Failed with the run's message
        sb.set_faults("genie", down=True, retry_after_s=0)
        down = {"genie_rpm": 0, "genie_retry_attempts": 0, "genie_circuit_threshold": 3, "genie_circuit_cooldown": 600}
        failed = _wait(
            client,
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"fresh": True, "settings": down | {"fallback_max_wait": 1}}
            ).id,
        )
        assert failed.state.type.value == "FAILED", failed.state
        assert failed.state.message == "0/6 judged, 6 failed: genie_error 6"
        page.goto(f"{server.url}/runs/flow-run/{failed.id}", wait_until="networkidle")
        page.get_by_text("0/6 judged, 6 failed: genie_error 6").first.wait_for(timeout=15_000)
        assert page.locator(".state-badge", has_text="Failed").count() >= 1
        # (blocks are read through the client: next to Playwright's event loop, Block.load is a coroutine)
        block = client.read_block_document_by_name("genie-breaker-local-sandbox", "batchflows-circuit-breaker")
        assert (block.data["state"], block.data["consecutive_failures"]) == ("OPEN", 3)

        # 3. set CLOSED on the breaker's block page: the next run starts CLOSED and completes
        page.goto(f"{server.url}/blocks/block/{block.id}/edit", wait_until="networkidle")
        _choose(page, "State (Optional)", "CLOSED")
        _submit(page, "Save", "/block_documents/")
        deadline = time.monotonic() + 30
        while block.data.get("state", "CLOSED") != "CLOSED" and time.monotonic() < deadline:
            time.sleep(0.5)
            block = client.read_block_document_by_name("genie-breaker-local-sandbox", "batchflows-circuit-breaker")
        assert block.data.get("state", "CLOSED") == "CLOSED", block.data  # the UI leaves out a default value
        sb.reset()
        healed = _wait(
            client,
            client.create_flow_run_from_deployment(deployment.id, parameters={"fresh": True, "settings": down}).id,
        )
        assert healed.state.type.value == "COMPLETED", healed.state
        wanted = "circuit breaker genie-breaker-local-sandbox CLOSED (opens after 3 failures"
        assert wanted in _logs(client, healed.id, wanted)
        block = client.read_block_document_by_name("genie-breaker-local-sandbox", "batchflows-circuit-breaker")
        assert block.data["consecutive_failures"] == 0
