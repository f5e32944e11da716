"""What a Prefect user sees of a run is true: the settings it used, its name, tags and final state, the breaker
block (per workspace, reset from the UI, its own configuration, an event per transition) and shared limits
that a run does not overwrite. Against the sandbox and a real Prefect API server."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import pytest

from blocks.breaker import CircuitBreaker
from blocks.settings import PRESETS, ScoreOverrides, ScoreSettings, field_title, resolve_score_settings
from flows.analyse import AnalyseSettings
from flows.embed import EmbedSettings
from flows.enrich import EnrichSettings
from flows.improve import ImproveSettings
from flows.phase import summary_of
from flows.score import score
from tasks import limits
from tasks.resilience import alongside

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
FAST = {
    "genie_rpm": 0,
    "genie_poll_initial": 0.05,
    "genie_poll_max": 0.2,
    "genie_retry_delay": 0.05,
    "fallback_delay": 0.05,
}


def _events(resource_id: str, **event_filter: list[str]) -> list[str]:
    """The names of the events the Prefect server stored about `resource_id` (EventNameFilter's name= or
    prefix=), sorted."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            filter=EventFilter(event=EventNameFilter(**event_filter), resource=EventResourceFilter(id=[resource_id])),
            limit=50,
        )
    return sorted(e.event for e in page.events)


def test_preset_first_then_only_the_fields_set_for_the_run() -> None:
    # the form's shape: every field present, the untouched ones empty
    form = {name: None for name in ScoreOverrides.model_fields} | {"genie_rpm": 0}
    settings, changed = resolve_score_settings("aggressive", form)
    assert changed == {"genie_rpm": 0}
    assert settings.genie_rpm == 0
    assert settings.genie_max_concurrent == PRESETS["aggressive"]["genie_max_concurrent"] == 10
    assert settings.genie_timeout == 300  # the preset's, not the default's 600
    # a full settings object (code, a rerun) sets every field: the preset is overridden throughout
    assert resolve_score_settings("aggressive", ScoreSettings())[0] == ScoreSettings()
    with pytest.raises(ValueError, match="genie_max_concurrent"):
        resolve_score_settings("default", {"genie_max_concurrent": 0})
    with pytest.raises(ValueError, match="nonsense"):
        resolve_score_settings("default", {"nonsense": 1})


@pytest.mark.parametrize(
    "model", [ScoreSettings, ScoreOverrides, ImproveSettings, EnrichSettings, EmbedSettings, AnalyseSettings]
)
def test_every_form_field_has_a_plain_label_and_a_description(model: Any) -> None:
    properties = model.model_json_schema()["properties"]
    for name, schema in properties.items():
        assert schema.get("description"), f"{model.__name__}.{name} has no description"
        title = schema["title"]
        assert not any(word in title.split() for word in ("Sql", "Rpm", "S", "Usd")), f"{name}: {title}"
    assert field_title("sql_max_concurrent") == "SQL max concurrent"
    assert field_title("cooldown_s") == "Cooldown (s)"


def test_breaker_set_closed_in_the_ui_starts_from_zero_failures(prefect_api: None) -> None:
    name = f"b-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.load_or_create(name, new=(5, 600))
    for _ in range(5):
        breaker.record_failure()
    assert breaker.state == "OPEN"
    breaker.flush()
    # what the block page's edit does: State set to CLOSED, Consecutive Failures left as they were
    saved: Any = CircuitBreaker.load(name)
    saved.state = "CLOSED"
    saved.save(name, overwrite=True)
    again = CircuitBreaker.load_or_create(name)
    assert (again.state, again.consecutive_failures) == ("CLOSED", 0)
    again.record_failure()
    assert again.state == "CLOSED"  # one failure does not reopen it


def test_a_breakers_transition_does_not_wait_on_a_busy_prefect_server(prefect_api: None) -> None:
    """The calls that open a breaker go on at once while its state is saved (the proxy holds the save up for
    5 s, as Prefect's client's 2 s and 4 s backoffs on a busy server did, longer than a short cooldown); the
    saved block has the state once `flush` returns."""
    name = f"b-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.load_or_create(name, new=(2, 600))
    gate = threading.Event()
    opens = threading.Timer(5, gate.set)
    with _busy_prefect_api("/block_documents/", gate):
        opens.start()
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.state == "OPEN" and not breaker.allow() and not gate.is_set()
        breaker.flush()
    assert gate.is_set()
    saved: Any = CircuitBreaker.load(name)
    assert (saved.state, saved.consecutive_failures) == ("OPEN", 2)


def test_breaker_block_configuration_holds_unless_a_run_sets_it(prefect_api: None) -> None:
    name = f"b-{uuid.uuid4().hex[:8]}"
    CircuitBreaker.load_or_create(name, new=(5, 60))
    edited: Any = CircuitBreaker.load(name)
    edited.failure_threshold, edited.cooldown_s = 9, 30  # edited in the UI
    edited.save(name, overwrite=True)
    kept = CircuitBreaker.load_or_create(name, new=(5, 60))  # a run with the default settings
    assert (kept.failure_threshold, kept.cooldown_s) == (9, 30)
    told = CircuitBreaker.load_or_create(name, 3, None, new=(5, 60))  # a run that sets the threshold
    assert (told.failure_threshold, told.cooldown_s) == (3, 30)


def test_breaker_transitions_are_prefect_events(prefect_api: None) -> None:
    from prefect.events.worker import EventsWorker

    name = f"b-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.load_or_create(name, new=(2, 0))
    breaker.record_failure()
    breaker.record_failure()  # OPEN
    assert breaker.current_state() == "HALF_OPEN"  # cooldown 0
    breaker.record_success()  # CLOSED
    EventsWorker.drain_all(timeout=30)
    wanted = sorted(f"batchflows.circuit-breaker.{s}" for s in ("open", "half-open", "closed"))
    found: list[str] = []
    deadline = time.monotonic() + 30
    while found != wanted and time.monotonic() < deadline:  # the server stores events a moment after receipt
        time.sleep(0.5)
        found = _events(f"batchflows.circuit-breaker.{name}", prefix=["batchflows.circuit-breaker."])
    assert found == wanted


def test_held_slots_are_prefect_concurrency_events(prefect_api: None) -> None:
    """A phase's slots are taken and given back through Prefect's public client, with the events Prefect's own
    `concurrency()` emits, and leave the limit as they found it."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker

    service = f"t-{uuid.uuid4().hex[:6]}"
    limits.ensure_service_limits(service, 3)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limits.limit_name(service))
        with limits.hold(service, occupy=2):
            assert client.read_global_concurrency_limit_by_name(limit.name).active_slots == 2
        assert client.read_global_concurrency_limit_by_name(limit.name).active_slots == 0
    EventsWorker.drain_all(timeout=30)
    found: list[str] = []
    deadline = time.monotonic() + 30
    wanted = ["prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released"]
    while found != wanted and time.monotonic() < deadline:  # the server stores events a moment after receipt
        time.sleep(0.5)
        found = _events(f"prefect.concurrency-limit.{limit.id}", name=wanted)
    assert found == wanted


def _prefect_servers_started_here() -> set[int]:
    """Pids of Prefect API servers this test process runs as its children (the test harness's own among them)."""
    import os
    from pathlib import Path

    found = set()
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if b"prefect.server.api.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_held_lease_is_renewed_on_the_runs_own_prefect_api(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The API a run talks to can be a context setting (the CLI's server, the test harness): the thread that
    renews a phase's lease must use it too, not start a Prefect server of its own and renew there."""
    monkeypatch.setattr(limits, "RENEW_S", 0.2)
    service = f"t-{uuid.uuid4().hex[:6]}"
    limits.ensure_service_limits(service, 2)
    before = _prefect_servers_started_here()
    with caplog.at_level(logging.WARNING), limits.hold(service, occupy=1):
        time.sleep(1.5)
    assert _prefect_servers_started_here() - before == set()
    assert "Could not renew" not in caplog.text


def test_a_run_keeps_the_shared_limit_and_says_so(prefect_api: None, caplog: pytest.LogCaptureFixture) -> None:
    service = f"t-{uuid.uuid4().hex[:6]}"
    assert limits.ensure_service_limits(service, 3, rpm=30)[0] == 3  # the first run creates them
    with caplog.at_level(logging.WARNING):
        allowed, rate = limits.ensure_service_limits(service, 10, rpm=120)  # a later run wants more
    assert allowed == 3 and rate is not None and rate.per_minute == pytest.approx(30)
    assert "stays at 3 at once; this run's settings ask for 10 at once" in caplog.text
    assert "stays at 30 calls a minute; this run's settings ask for 120 calls a minute" in caplog.text
    limits.ensure_limit(limits.limit_name(service), 5, change=True)  # `batchflows limits --set NAME=5`
    assert limits.ensure_service_limits(service, 3)[0] == 5


def test_run_name_tags_state_and_settings_log_of_a_scoring_run(
    sb: Any, workspace_block: str, ledger_block: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect import tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    sb.set_faults("genie", script=["503"] * 2, retry_after_s=0)  # two questions fail, the breaker opens at 2
    with caplog.at_level(logging.INFO), tags("batchflows"):
        state = score(
            BENCHMARKS,
            "retail",
            "sandbox-warehouse",
            {**FAST, "genie_retry_attempts": 0, "genie_circuit_threshold": 2, "genie_circuit_cooldown": 1.0},
            preset="aggressive",
            sequential=True,  # the two failures come in a row: the breaker opens, the fallback subflow runs
            workspace_block=workspace_block,
            ledger_block=ledger_block,
            output_dir=str(tmp_path),
            return_state=True,
        )
    summary = summary_of(state)
    assert state.is_completed() and state.message == "28/32 judged, 4 failed: genie_error 2, sql_error 2", state
    assert summary["settings"]["genie_max_concurrent"] == 10  # the preset's
    assert summary["settings_source"]["changed"]["genie_circuit_threshold"] == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Settings: "))  # logged once
    assert line.startswith("Settings: preset aggressive, changed for this run: genie_retry_attempts=0, ")
    assert '"genie_max_concurrent":10,' in line and '"genie_rpm":0.0,' in line
    assert "[q" in caplog.text and "] ❌ server_error" in caplog.text  # per-row lines name the benchmark
    breaker: Any = CircuitBreaker.load("genie-breaker-local-sandbox")  # one per service and workspace
    assert breaker.failure_threshold == 2
    with get_client(sync_client=True) as client:
        assert state.state_details.flow_run_id is not None
        run = client.read_flow_run(state.state_details.flow_run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
    assert run.name.startswith("score-retail-20"), run.name
    assert children and all("batchflows" in child.tags for child in children)  # the sequential fallback


def test_each_genie_question_is_a_task_retried_by_prefect_and_cached_on_rerun(
    sb: Any, workspace_block: str, ledger_block: str, tmp_path: Any
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.benchmarks import load_benchmarks

    items = load_benchmarks(BENCHMARKS)[:4]
    sb.set_faults("genie", script=["500"])  # the first question asked fails once, then is answered

    def run() -> dict[str, Any]:
        state = score(
            items,
            "retail",
            "sandbox-warehouse",
            {**FAST, "genie_retry_attempts": 1},
            workspace_block=workspace_block,
            ledger_block=ledger_block,
            output_dir=str(tmp_path),
            breaker_block=f"b-{uuid.uuid4().hex[:8]}",
            return_state=True,
        )
        assert state.state_details.flow_run_id is not None
        # The server records task-run states from events, a moment after the flow run has ended: wait for them.
        deadline = time.monotonic() + 30
        with get_client(sync_client=True) as client:
            while True:
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                genie = {t.name: t for t in tasks if t.name.startswith("genie-")}
                if len(genie) == len(items) and all(t.state and t.state.is_final() for t in genie.values()):
                    return genie
                if time.monotonic() > deadline:
                    return genie  # the asserts below say what was missing
                time.sleep(0.1)

    first = run()
    assert sorted(first) == [f"genie-{b.id}" for b in items]  # one task per question, named by its benchmark
    assert sorted(t.run_count for t in first.values()) == [1, 1, 1, 2]  # Prefect ran the failed one again
    assert {t.state.name for t in first.values() if t.state} == {"Completed"}
    again = run()
    assert {t.state.name for t in again.values() if t.state} == {"Cached"}
    assert sb.stats()["genie"]["calls"] == 5


def _heartbeats(flow_run_id: str) -> int:
    return len(_events(f"prefect.flow-run.{flow_run_id}", name=["prefect.flow-run.heartbeat"]))


def test_a_run_from_the_terminal_does_not_wait_on_prefects_heartbeat_thread(prefect_api: None, tmp_path: Any) -> None:
    """Prefect 3.8 joins a flow run's heartbeat thread, which sleeps in 1 s steps, when the run ends: up to 1 s
    a flow run. A command's runs send no heartbeats (flows.phase.no_idle_heartbeats); a flow with heartbeats on
    sends them (the tests run flows as the CLI does, so this one turns them on)."""
    import json

    from prefect import flow
    from prefect.events.worker import EventsWorker
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from typer.testing import CliRunner

    from batchflows_cli import app

    @flow(persist_result=False)
    def direct() -> str:
        return str(flow_run.id)

    benchmarks = tmp_path / "b.json"
    benchmarks.write_text('[{"id": "q01", "question": "How many customers do we have?", "expected_sql": "SELECT 1"}]')
    args = ["score", "--sandbox", "--benchmarks", str(benchmarks), "--genie-rpm", "0", "--json"]
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):  # Prefect's default
        scored = CliRunner().invoke(app, [*args, "--output-dir", str(tmp_path / "out")], env={"COLUMNS": "400"})
        called = direct()
    assert scored.exit_code == 0, scored.output
    from_terminal = json.loads(scored.output[scored.output.index("{") :])["flow_run_id"]
    EventsWorker.drain_all(timeout=30)
    deadline = time.monotonic() + 30
    while not _heartbeats(called) and time.monotonic() < deadline:  # the server stores events a moment later
        time.sleep(0.5)
    assert _heartbeats(called) >= 1
    assert _heartbeats(from_terminal) == 0


@contextlib.contextmanager
def _busy_prefect_api(
    busy_path: str, gate: threading.Event | None = None, refuse_s: float = 0
) -> Iterator[list[tuple[float, str, int]]]:
    """Point Prefect at a proxy of the test's API that answers 503 (as a Prefect server on SQLite does while its
    database is locked) to the first request whose path ends with `busy_path`, and to every one for `refuse_s`
    after it; with a `gate`, it holds every such request until the gate opens instead. Yields (time, path,
    status)."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    upstream = str(PREFECT_API_URL.value()).rstrip("/")
    seen: list[tuple[float, str, int]] = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.removeprefix("/api")
            if gate is not None and path.endswith(busy_path):
                gate.wait()
            first = next((t for t, p, _ in seen if p.endswith(busy_path)), None)
            if gate is None and path.endswith(busy_path) and (first is None or time.monotonic() - first < refuse_s):
                status, content, kind = 503, b'{"exception_message": "Service Unavailable"}', "application/json"
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + path, content=body, headers=headers)
                status, content = answer.status_code, answer.content
                kind = answer.headers.get("content-type", "application/json")
            seen.append((time.monotonic(), path, status))
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{proxy.server_port}/api"}):
            yield seen
    finally:
        proxy.shutdown()
        proxy.server_close()  # what is still sent to it is refused at once, not left hanging in its backlog


def _asked_again_after(seen: list[tuple[float, str, int]], path: str) -> float:
    times = [(t, status) for t, p, status in seen if p.endswith(path)]
    assert times[0][1] == 503 and times[1][1] < 300, times
    return times[1][0] - times[0][0]


def test_a_busy_prefect_server_delays_a_phases_slots_by_a_poll_not_by_prefects_backoff(prefect_api: None) -> None:
    """A 503 to the request for a phase's slots or their release is asked again after 5 ms, its rate slot's
    after a poll: Prefect's client would sleep 2 s first (even with PREFECT_CLIENT_MAX_RETRIES=0), and the
    phase waits."""
    service = f"t-{uuid.uuid4().hex[:6]}"
    limits.ensure_service_limits(service, 2, rpm=600)
    name = limits.limit_name(service)
    with _busy_prefect_api("/increment-with-lease") as seen:
        granted = limits._acquire(name, 1)
    assert granted is not None
    assert _asked_again_after(seen, "/increment-with-lease") < 1.0
    with _busy_prefect_api("/decrement-with-lease") as seen:
        limits._release(granted.lease_id, name, 1, 0.1)
    assert _asked_again_after(seen, "/decrement-with-lease") < 1.0
    with _busy_prefect_api("/concurrency_limits/increment") as seen:
        limits.take_rate_slot(limits.rate_limit_name(service), 0.1)
    assert _asked_again_after(seen, "/concurrency_limits/increment") < 1.0


def test_a_release_the_server_refuses_for_seconds_is_asked_again_until_the_slots_are_back(prefect_api: None) -> None:
    """A full test run met a Prefect server (SQLite) that refused a release for longer than the ~0.9 s of a slot
    request's quick retries: the slots stayed taken, for good on a server with no lease repossessor, and the
    next phase waited 900 s for them. A release is asked again for BUSY_PATIENCE_S."""
    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    limits.ensure_service_limits(service, 2)
    with _busy_prefect_api("/decrement-with-lease", refuse_s=3) as seen, limits.hold(service, occupy=2):
        assert _active(name) == 2
    answers = [status for _, path, status in seen if path.endswith("/decrement-with-lease")]
    assert answers.count(503) > len(limits.SLOT_AGAIN_AFTER_S) + 1 and answers[-1] == 204, answers
    assert _active(name) == 0 and not list(limits._notes(name))


def test_a_slot_request_the_server_refuses_for_seconds_is_waited_for_not_failed(prefect_api: None) -> None:
    """Past the ~0.9 s of quick retries, a busy server's refusal of a phase's slots, or of a rate slot, is asked
    again (`limits._patiently`): the phase waits, as it waits for slots other runs hold, instead of failing."""
    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    limits.ensure_service_limits(service, 2, rpm=600)
    for path, take in (
        ("/increment-with-lease", lambda: limits._acquire(name, 1)),
        ("/concurrency_limits/increment", lambda: limits.take_rate_slot(limits.rate_limit_name(service), 0.1)),
    ):
        with _busy_prefect_api(path, refuse_s=2) as seen:
            granted = take()
        answers = [status for _, p, status in seen if p.endswith(path)]
        assert answers.count(503) > len(limits.SLOT_AGAIN_AFTER_S) + 1 and answers[-1] == 200, answers
        if granted is not None:
            limits._release(granted.lease_id, name, 1, 0.1)
    assert _active(name) == 0
    with _busy_prefect_api("/increment-with-lease", refuse_s=600):  # a cancelled wait ends while it is busy
        cancelled = threading.Event()
        cancel = threading.Timer(1, cancelled.set)
        cancel.start()
        asked = time.monotonic()
        assert limits._acquire(name, 1, cancelled) is None
        assert time.monotonic() - asked < 5  # the next pause (at most 2 s) and its quick retries, not a minute
    assert _active(name) == 0


def test_slots_a_run_could_not_give_back_are_given_back_by_the_next_run_that_waits(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A release refused for all of BUSY_PATIENCE_S is logged, not raised (the phase's rows are done), and
    the holder's note is left naming no live process: the next run that waits for the slots releases them."""
    monkeypatch.setattr(limits, "BUSY_PATIENCE_S", 1)
    monkeypatch.setattr(limits, "SLOT_CHECK_S", 1)
    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    limits.ensure_service_limits(service, 2)
    with _busy_prefect_api("/decrement-with-lease", refuse_s=3):  # (a note names the API it holds slots of)
        with limits.hold(service, occupy=2):
            pass
        assert _active(name) == 2
        assert f"Could not give back 2 slot(s) of {name}" in caplog.text
        asked = time.monotonic()
        with limits.hold(service, occupy=2):
            waited = time.monotonic() - asked
            assert _active(name) == 2
    assert 1 <= waited < 15  # a look for holders that are gone, once the server takes releases again
    assert _active(name) == 0 and not list(limits._notes(name))


def test_runs_that_create_the_same_limit_at_once_share_it(prefect_api: None) -> None:
    """Two runs that start together both find a service's limit missing and both create it: the one that
    comes second uses the limit the first created instead of failing on the server's 409 Conflict."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(5):
        name = f"{limits.PREFIX}-t-{uuid.uuid4().hex[:6]}"
        together = threading.Barrier(4)

        def create(_: int, name: str = name, together: threading.Barrier = together) -> tuple[int, float]:
            together.wait()
            return limits.ensure_limit(name, 3)

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(create, range(4))) == [(3, 0.0)] * 4


def _active(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def _until_active(name: str, slots: int) -> int:
    deadline = time.monotonic() + 20
    while (active := _active(name)) != slots and time.monotonic() < deadline:
        time.sleep(0.05)
    return active


def test_a_phases_slots_taken_ahead_are_held_before_it_runs_and_asked_for_once(prefect_api: None) -> None:
    """`SlotsAhead` takes a phase's slots while the flow does other work (a scoring run loads its breaker): they
    are held before the phase starts, the phase runs on them without asking again, and they come back at its
    end. A phase whose limits are not those the slots were taken for is refused."""
    from prefect import flow

    from flows.phase import PhaseSpec, SlotsAhead, run_phase
    from tasks.resilience import RetryPolicy, Row

    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    spec = PhaseSpec("p", service, 2, RetryPolicy(retries=0))
    limits.ensure_service_limits(service, 2)

    @flow(persist_result=False)
    def ahead_job() -> tuple[int, int, int]:
        with SlotsAhead(spec) as ahead:
            held_before = _until_active(name, 2)
            with pytest.raises(ValueError, match="not those its slots were taken ahead for"):
                run_phase(replace(spec, concurrency=3), [Row("r", 0, 1)], lambda x: x, ahead)
            outcomes = run_phase(spec, [Row(f"r{i}", i, i) for i in range(4)], lambda x: x * 2, ahead)
            after = _active(name)
        return held_before, sum(o.status == "ok" for o in outcomes.values()), after

    with _busy_prefect_api("/never-asked") as seen:
        assert ahead_job() == (2, 4, 0)
    assert sum(path.endswith("/increment-with-lease") for _, path, _ in seen) == 1


def test_slots_taken_ahead_that_no_phase_takes_come_back_and_a_wait_for_them_ends(
    prefect_api: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled wait ends quietly: no "still waiting" line about a wait that is over."""
    from flows.phase import PhaseSpec, SlotsAhead
    from tasks.resilience import RetryPolicy

    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    spec = PhaseSpec("p", service, 1, RetryPolicy(retries=0))
    limits.ensure_service_limits(service, 1)
    with SlotsAhead(spec):
        assert _until_active(name, 1) == 1
    assert _active(name) == 0
    with limits.hold(service, occupy=1):  # another run holds the only slot: the one ahead waits
        waiting = SlotsAhead(spec)
        time.sleep(0.5)
        ended = time.monotonic()
        waiting.give_back()
        assert time.monotonic() - ended < 3  # within a second of the 423's wait, not SLOT_WAIT_S
        assert _active(name) == 1
    assert _active(name) == 0
    assert not list(limits._notes(name))
    assert "Still waiting" not in caplog.text


def test_inside_alongside_a_phases_end_does_not_wait_for_its_slots_to_go_back(prefect_api: None) -> None:
    """A phase's slots go back from a thread while the run goes on (a scoring run compares meanwhile); the
    block's end waits for them. The proxy holds the release up for 5 s."""
    service = f"t-{uuid.uuid4().hex[:6]}"
    name = limits.limit_name(service)
    limits.ensure_service_limits(service, 2)
    gate = threading.Event()
    opens = threading.Timer(5, gate.set)
    with _busy_prefect_api("/decrement-with-lease", gate):
        opens.start()
        with alongside():
            with limits.hold(service, occupy=2):
                pass
            assert not gate.is_set() and _active(name) == 2  # the phase went on; its release is held up
        assert gate.is_set() and _active(name) == 0
