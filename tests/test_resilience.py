"""Retries, timeouts, the circuit breaker and batched validation, against the sandbox's faults."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from blocks.breaker import CircuitBreaker
from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from tasks.batched import ask_validated
from tasks.calls import chat, run_sql
from tasks.resilience import Cache, RetryPolicy, Row, lane, run_rows

CHAT = "databricks-meta-llama-3-3-70b-instruct"
log = logging.getLogger("test")


def _sql_call(sb, timeout=2.0):
    client = DatabricksWorkspace(host=sb.host, token=sb.token).client(timeout)
    return lambda sql: run_sql(client, "sandbox-warehouse", sql, timeout)


def _rows(n):
    return [Row(f"k{i}", i, f"SELECT {i} AS n") for i in range(n)]


def test_policy_delays_are_exponential_with_jitter():
    policy = RetryPolicy(retries=2, base_delay_s=5, jitter=0.1)
    firsts = [policy.delay(1) for _ in range(200)]
    seconds = [policy.delay(2) for _ in range(200)]
    assert min(firsts) >= 4.5 and max(firsts) <= 5.5 and len(set(firsts)) > 1
    assert min(seconds) >= 9.0 and max(seconds) <= 11.0
    assert policy.delay(1, retry_after_s=30) == 30


def test_transient_faults_are_retried_with_backoff_and_retry_after(sb):
    sb.set_faults("sql", script=["429", "500", "ok"], retry_after_s=7)
    slept: list[float] = []
    [outcome] = run_rows(
        _rows(1), _sql_call(sb), lane=lane("t-sql", 3), policy=RetryPolicy(base_delay_s=5), log=log, sleep=slept.append
    )
    assert outcome.status == "ok" and outcome.attempts == 3
    assert outcome.value["rows"] == [[0]]
    assert slept[0] == 7  # Retry-After beat the 5 s backoff
    assert 9 <= slept[1] <= 11
    assert sb.stats()["sql"]["calls"] == 3


@pytest.mark.parametrize("fault", ["503", "reset", "hang"])
def test_each_transport_fault_is_retried_once_then_succeeds(sb, fault):
    sb.set_faults("sql", script=[fault], hang_s=30)
    [outcome] = run_rows(
        _rows(1),
        _sql_call(sb, timeout=1.0),
        lane=lane("t-sql", 3),
        policy=RetryPolicy(base_delay_s=0.01),
        log=log,
        sleep=lambda s: None,
    )
    assert outcome.status == "ok" and outcome.attempts == 2
    assert sb.stats()["sql"]["calls"] == 2


def test_permanent_errors_fail_at_once(sb):
    client = DatabricksWorkspace(host=sb.host, token=sb.token).client(2)
    [outcome] = run_rows(
        [Row("x", 0, "hello")],
        lambda p: chat(client, "no-such-endpoint", p),
        lane=lane("t-llm", 2),
        policy=RetryPolicy(base_delay_s=0.01),
        log=log,
    )
    assert outcome.status == "failed" and outcome.attempts == 1
    assert outcome.error_kind == "not_found"
    assert "Endpoint with name 'no-such-endpoint' does not exist" in str(outcome.message)


def test_retries_exhausted_become_a_failure_record(sb):
    sb.set_faults("sql", rate_500=1.0)
    [outcome] = run_rows(
        _rows(1), _sql_call(sb), lane=lane("t-sql", 3), policy=RetryPolicy(retries=2, base_delay_s=0), log=log
    )
    assert outcome.status == "failed" and outcome.attempts == 3
    assert outcome.failure_record("sql") == {
        "row_key": "k0",
        "phase": "sql",
        "error_kind": "server_error",
        "message": outcome.message,
        "attempts": 3,
    }
    assert sb.stats()["sql"]["calls"] == 3


def test_lane_bounds_calls_in_flight_at_the_sandbox(sb):
    sb.set_faults("sql", latency_ms=100)
    outcomes = run_rows(_rows(20), _sql_call(sb), lane=lane("t-sql-4", 4), policy=RetryPolicy(), log=log)
    assert all(o.status == "ok" for o in outcomes)
    assert sb.stats()["sql"]["max_in_flight"] == 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(threshold=5, cooldown=60):
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)
    breaker._clock = FakeClock()
    breaker._persist = False
    return breaker


def test_breaker_opens_half_opens_and_closes():
    breaker = _breaker()
    for _ in range(4):
        breaker.record_failure()
    assert breaker.current_state() == "CLOSED"
    breaker.record_failure()
    assert breaker.current_state() == "OPEN" and not breaker.allow()
    breaker._clock.now += 60
    assert breaker.current_state() == "HALF_OPEN"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.current_state() == "OPEN"
    breaker._clock.now += 60
    assert breaker.allow()
    breaker.record_success()
    assert breaker.current_state() == "CLOSED"
    assert breaker.events == [
        "Circuit breaker: Too many failures (5) - OPENING circuit",
        "Circuit breaker: Attempting to recover (HALF_OPEN)",
        "Circuit breaker: Too many failures (6) - OPENING circuit",
        "Circuit breaker: Attempting to recover (HALF_OPEN)",
        "Circuit breaker: Service recovered (CLOSED)",
    ]


def test_breaker_state_is_persisted_in_its_block(prefect_api):
    name = f"breaker-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.load_or_create(name, failure_threshold=2, cooldown_s=600)
    breaker.record_failure()
    breaker.record_failure()
    breaker.flush()  # saved from a thread: the transition did not wait for it
    again = CircuitBreaker.load_or_create(name, failure_threshold=2, cooldown_s=600)
    assert again.state == "OPEN" and not again.allow()


def test_open_breaker_defers_the_rest(sb):
    sb.set_faults("sql", down=True)
    breaker = _breaker(threshold=3)
    outcomes = run_rows(
        _rows(10),
        _sql_call(sb),
        lane=lane("t-sql-1", 1),
        policy=RetryPolicy(retries=0),
        log=log,
        breaker=breaker,
        sequential=True,
    )
    assert [o.status for o in outcomes] == ["failed"] * 3 + ["deferred"] * 7
    assert sb.stats()["sql"]["calls"] == 3


def test_ledger_makes_reruns_call_nothing(sb, tmp_path):
    cache = Cache(RowLedger(path=str(tmp_path / "l.sqlite")), "sql", "v1")
    first = run_rows(_rows(6), _sql_call(sb), lane=lane("t-sql", 3), policy=RetryPolicy(), log=log, cache=cache)
    assert cache.ledger.get_many("sql", "v1", [r.key for r in _rows(6)]) == {o.key: o.value for o in first}
    assert cache.ledger.count("sql") == 6


def _asker(sb):
    client = DatabricksWorkspace(host=sb.host, token=sb.token).client(5)

    def ask(items):
        return chat(client, CHAT, json.dumps({"task": "judge", "items": items}))["content"]

    return ask


def _items(n):
    result = {"columns": ["n"], "rows": [[1]]}
    return [{"id": f"c{i}", "question": "q", "expected": result, "actual": result} for i in range(n)]


def _valid(element):
    return None if element.get("verdict") in ("correct", "incorrect") else f"bad verdict {element.get('verdict')!r}"


@pytest.mark.parametrize(("fault", "calls"), [("missing_id", 2), ("bad_enum", 2), ("extra_id", 1)])
def test_batched_reply_keeps_good_elements_and_reasks_bad_ones_alone(sb, fault, calls):
    sb.set_faults("chat", script=[fault])
    good, problems = ask_validated(_items(10), _asker(sb), _valid)
    assert len(good) == 10 and not problems
    assert calls == sb.stats()["chat"]["calls"]
    assert "sandbox-extra-id" not in good


def test_malformed_batch_is_split_in_halves_never_guessed(sb):
    sb.set_faults("chat", script=["malformed", "malformed"])
    good, problems = ask_validated(_items(10), _asker(sb), _valid)
    assert len(good) == 10 and not problems
    # whole batch broken -> halves; first half broken again -> its halves; second half fine
    assert sb.stats()["chat"]["calls"] == 5


def test_rows_deferred_by_an_open_circuit_take_no_rate_slot(sb):
    """A row the breaker will defer must not first wait for a rate slot (at 5 a minute, 12 s each for nothing)."""
    sb.set_faults("sql", down=True)
    slots = []
    limited = lane("t-sql-rate", 1, rate_limit=lambda: slots.append(1))
    outcomes = run_rows(
        _rows(10), _sql_call(sb), lane=limited, policy=RetryPolicy(retries=0), log=log, breaker=_breaker(threshold=2)
    )
    assert [o.status for o in outcomes] == ["failed"] * 2 + ["deferred"] * 8
    assert len(slots) == 2  # one per call made; none for the eight rows the open circuit deferred


def test_rows_from_a_feed_are_called_as_they_arrive_once_per_key():
    import threading

    from flows.phase import Feed

    feed = Feed()
    called: list[str] = []
    b_called = threading.Event()

    def call(payload: str) -> str:
        called.append(payload)
        if payload == "b":
            b_called.set()
        return payload.upper()

    outcomes: list = []
    log = logging.getLogger("test-feed")
    worker = threading.Thread(
        target=lambda: outcomes.extend(
            run_rows(feed, call, lane=lane(f"feed-{uuid.uuid4()}", 2), policy=RetryPolicy(retries=0), log=log)
        )
    )
    worker.start()
    feed.put("k1", "a")
    feed.put("k1", "a again")  # the key is in: not called twice
    feed.put("k2", "b")
    assert b_called.wait(5)  # called while the feed is still open
    feed.close()
    feed.close()
    worker.join(10)
    assert sorted(called) == ["a", "b"] and [o.value for o in outcomes] == ["A", "B"]
    assert [(r.key, r.index) for r in feed.rows] == [("k1", 0), ("k2", 1)]
    feed.put("k2", "b")  # a key already in needs no call: nothing, also once the feed is closed
    with pytest.raises(RuntimeError, match="closed feed"):
        feed.put("k3", "c")
