"""Calls that survive flaky services: classified retries with backoff, jitter and Retry-After, a shared
per-process lane (concurrency), optional Prefect rate limits, the circuit breaker and the row ledger.

`run_rows` is the engine under every phase: it runs one chunk of rows concurrently and returns one
`RowOutcome` per row, never raising for a row's failure (failures are data).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, Field

from blocks.breaker import CircuitBreaker
from blocks.ledger import RowLedger
from tasks import stopping
from tasks.adaptive import Adaptive, slows_down
from tasks.errors import BatchflowsError, CallTimeout, NotFound, PermanentError, TransientError, Unauthorized, classify

Status = Literal["ok", "failed", "deferred"]


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter; Retry-After from the server wins when it asks for longer.

    Example:
        RetryPolicy(retries=2, base_delay_s=5)  # waits ~5 s, then ~10 s
    """

    retries: int = Field(2, ge=0, le=20, description="retries after the first attempt")
    base_delay_s: float = Field(5, ge=0, description="delay before the first retry")
    factor: float = Field(2, ge=1, description="each further delay is this many times the last")
    max_delay_s: float = Field(120, ge=0)
    jitter: float = Field(0.1, ge=0, le=1, description="delays vary by up to this fraction, up or down")

    def delay(self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = min(self.max_delay_s, self.base_delay_s * self.factor ** (attempt - 1))
        backoff *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(backoff, retry_after_s or 0.0)


@dataclass
class Row:
    """One unit of work: a stable key, its position, the payload the call takes, and the name log lines
    give it (a benchmark's id; its position when it has none)."""

    key: str
    index: int
    payload: Any
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or f"#{self.index}"


@dataclass
class RowOutcome:
    key: str
    status: Status
    value: Any = None
    error_kind: str | None = None
    message: str | None = None
    attempts: int = 0
    latency_s: float = 0.0
    cached: bool = False

    def failure_record(self, phase: str) -> dict[str, Any]:
        return {
            "row_key": self.key,
            "phase": phase,
            "error_kind": self.error_kind,
            "message": self.message,
            "attempts": self.attempts,
        }


@dataclass
class Lane:
    """What the calls to one service share inside this process: `concurrency` calls at once (held only around
    the call), or with `adaptive` the level the service's answers allow (tasks.adaptive)."""

    name: str
    concurrency: int
    rate_limit: Callable[[], None] | None = None  # waits for the service's rate limit, before each call
    adaptive: Adaptive | None = None
    in_flight: int = 0
    peak: int = 0
    _free: threading.Condition = field(default_factory=threading.Condition)

    def __enter__(self) -> Lane:
        with self._free:
            while True:
                allowed = self.adaptive.level if self.adaptive else self.concurrency
                paused = self.adaptive.paused_until - time.monotonic() if self.adaptive else 0.0
                if self.in_flight < allowed and paused <= 0:
                    break
                self._free.wait(timeout=paused if paused > 0 else 1.0)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        return self

    def __exit__(self, *_: object) -> None:
        with self._free:
            self.in_flight -= 1
            self._free.notify()  # one slot for one waiter: waking all the chunks' threads costs a phase ~2 s of CPU

    def called(self, sent_at: float, error: BatchflowsError | None, log: Any) -> None:
        """Tell an adaptive lane how a call sent at `sent_at` (time.monotonic) ended."""
        if self.adaptive is None:
            return
        if error is None:
            change = self.adaptive.succeeded()
        elif slows_down(error):
            change = self.adaptive.throttled(
                sent_at, error.retry_after_s if isinstance(error, TransientError) else None
            )
        else:
            return
        if change:
            log.info(f"{self.name}: {change}")
            with self._free:
                self._free.notify_all()


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The current flow or task run's logger, or the plain "batchflows" logger outside a run."""
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("batchflows")


def in_background(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """`function(*args, **kwargs)` in a thread with this context (the flow run's, so it can run a phase or log
    to the run), started now; the interpreter waits for it at exit."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bf-background")
    try:
        return pool.submit(contextvars.copy_context().run, partial(function, *args, **kwargs))
    finally:
        pool.shutdown(wait=False)


_ALONGSIDE: contextvars.ContextVar[tuple[ThreadPoolExecutor, list[Future[Any]]] | None] = contextvars.ContextVar(
    "batchflows_alongside", default=None
)


@contextlib.contextmanager
def alongside() -> Iterator[None]:
    """Inside, `later` hands its work to threads while the block goes on (a flow run's tasks inherit the
    block). The work is upkeep that what follows need not wait for, each a round trip or two to a busy
    server: a phase's slots given back, a run's artifacts sent, a Genie conversation deleted. At the end of
    a scoring run's phases each one held up the next step (bench trace, c=10). All of it is done when the
    block ends, which raises the first failure (unless the block raised)."""
    pending: list[Future[Any]] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="bf-alongside") as pool:  # its end waits for all
        token = _ALONGSIDE.set((pool, pending))
        try:
            yield
        finally:
            _ALONGSIDE.reset(token)
    failures = [exc for exc in (future.exception() for future in pending) if exc is not None]
    if failures:
        raise failures[0]


def later(function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """`function(*args, **kwargs)` from a thread of the enclosing `alongside()` block, with this context (a
    flow run's, so it can log to the run or publish to it); at once outside such a block."""
    found = _ALONGSIDE.get()
    if found is None:
        function(*args, **kwargs)
        return
    pool, pending = found
    pending.append(pool.submit(contextvars.copy_context().run, partial(function, *args, **kwargs)))


_LANES: dict[tuple[str, int, bool], Lane] = {}
_LANES_LOCK = threading.Lock()


def lane(name: str, concurrency: int, rate_limit: Callable[[], None] | None = None, adaptive_start: int = 0) -> Lane:
    """The process-wide lane for `name` at this concurrency (shared by every chunk and run in the process).
    With `adaptive_start` > 0, an adaptive lane whose level starts there (one per phase run: `fresh_lane`)."""
    with _LANES_LOCK:
        key = (name, concurrency, bool(adaptive_start))
        if key not in _LANES:
            level = Adaptive(ceiling=concurrency, level=adaptive_start) if adaptive_start else None
            _LANES[key] = Lane(name, concurrency, adaptive=level)
        found = _LANES[key]
        found.rate_limit = rate_limit
        return found


def fresh_lane(name: str, concurrency: int) -> None:
    """Forget this process's adaptive lane for `name`, so the next `lane` call starts at its `adaptive_start`."""
    with _LANES_LOCK:
        _LANES.pop((name, concurrency, True), None)


@dataclass
class Stop:
    """A phase's stop: once a call meets a permanent error of the service itself (credentials refused, the
    endpoint, space or warehouse not found), retrying or calling on cannot succeed, so the phase's other
    rows are not called but recorded as failed with that cause."""

    error: BatchflowsError | None = None
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a task in another process) as its error: its lock belongs to this process."""
        return Stop, (self.error,)

    def trip(self, error: BatchflowsError) -> bool:
        """Stop on `error` if it is a service's permanent refusal; True for the call that stopped it."""
        if not isinstance(error, Unauthorized | NotFound):
            return False
        with self._lock:
            if self.error is not None:
                return False
            self.error = error
            return True

    def outcome(self, row: Row, attempts: int, started: float) -> RowOutcome | None:
        """The failed outcome of a row that must not be called (this phase stopped, or the process is
        stopping on a signal), or None."""
        if self.error is not None:
            kind, message = self.error.kind, f"an earlier call of this phase was refused: {self.error}"
        elif (why := stopping.reason()) is not None:
            kind, message = "interrupted", f"the run was {why}"
        else:
            return None
        return RowOutcome(
            row.key,
            "failed",
            error_kind=kind,
            message=f"not called: {message}",
            attempts=attempts,
            latency_s=time.monotonic() - started,
        )


@dataclass
class Cache:
    """Where finished rows of one step are kept. A phase that does not `read` (a fresh run) calls every row
    again, and its values replace the older ones."""

    ledger: RowLedger
    step: str
    version: str
    read: bool = True


def run_rows(
    rows: Iterable[Row],
    call: Callable[[Any], Any],
    *,
    lane: Lane,
    policy: RetryPolicy,
    log: logging.Logger | logging.LoggerAdapter[Any],
    breaker: CircuitBreaker | None = None,
    cache: Cache | None = None,
    sleep: Callable[[float], None] = stopping.sleep,
    sequential: bool = False,
    on_done: Callable[[RowOutcome], None] | None = None,
    stop: Stop | None = None,
) -> list[RowOutcome]:
    """Run `call(row.payload)` for every row, `lane.concurrency` at a time (one at a time if `sequential`).
    `rows` may be an iterator that waits for rows to arrive (a `flows.phase.Feed`): each is called as it comes.

    A row whose call keeps failing comes back `failed`; a row not tried because the breaker was open
    comes back `deferred`. Successful values are written to `cache` as soon as they arrive; `on_done` is
    told of each outcome as soon as it is known. With a `stop`, a service's permanent refusal (401/403,
    404) fails the rows not yet called at once, without calling them.
    """
    attempts = Attempts(call, lane, policy, log, breaker, cache, stop or Stop())

    def one(row: Row) -> RowOutcome:
        outcome = attempts.run(row, sleep)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if sequential or (isinstance(rows, Sequence) and len(rows) <= 1):
        return [one(row) for row in rows]
    workers = min(lane.concurrency, len(rows)) if isinstance(rows, Sequence) else lane.concurrency
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bf-{lane.name}") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, row) for row in rows]
        return [f.result() for f in futures]


@dataclass
class Attempts:
    """How a phase's rows are attempted: the call and everything around it (lane, retry policy, log, breaker,
    ledger cache, stop). `run` retries a row to its end; `one` is a single attempt, for a caller that retries
    by other means (a Prefect task's retries)."""

    call: Callable[[Any], Any]
    lane: Lane
    policy: RetryPolicy
    log: logging.Logger | logging.LoggerAdapter[Any]
    breaker: CircuitBreaker | None = None
    cache: Cache | None = None
    stop: Stop = field(default_factory=Stop)

    def run(self, row: Row, sleep: Callable[[float], None] = stopping.sleep) -> RowOutcome:
        """The row's outcome after its attempts, sleeping the backoff between them."""
        attempt, started = 0, time.monotonic()
        while True:
            attempt += 1
            outcome, delay = self.one(row, attempt, started)
            if outcome is not None:
                return outcome
            sleep(delay)

    def one(self, row: Row, attempt: int, started: float) -> tuple[RowOutcome | None, float]:
        """Attempt number `attempt` (1-based): (the outcome, 0) when the row is settled (ok, failed, deferred by
        an open circuit, or stopped), or (None, seconds to wait) when a retry is due."""
        stop, breaker, lane, log = self.stop, self.breaker, self.lane, self.log
        if (stopped := stop.outcome(row, attempt - 1, started)) is not None:
            return stopped, 0.0
        if breaker is not None and breaker.current_state() == "OPEN":  # no rate slot spent on a row not sent
            return _deferred(row, attempt - 1), 0.0
        if lane.rate_limit is not None:
            lane.rate_limit()
        error: BatchflowsError | None = None
        with lane:
            if (stopped := stop.outcome(row, attempt - 1, started)) is not None:  # stopped while this row queued
                return stopped, 0.0
            # checked once the slot is ours: calls queued behind the one that opened the circuit must not go
            if breaker is not None and not breaker.allow():
                return _deferred(row, attempt - 1), 0.0
            t0 = time.monotonic()
            try:
                value = self.call(row.payload)
            except Exception as exc:
                error = classify(exc)
            else:  # written before the slot is given up: a process killed -9 leaves at most a slot's worth unwritten
                if self.cache is not None:
                    self.cache.ledger.put(self.cache.step, self.cache.version, row.key, value)
        elapsed = time.monotonic() - t0
        lane.called(t0, error, log)
        if error is None:
            if breaker is not None:
                breaker.record_success()
            log.debug(f"[{row.name}] ✅ Success in {elapsed:.1f}s (attempt {attempt})")
            return RowOutcome(row.key, "ok", value, attempts=attempt, latency_s=time.monotonic() - started), 0.0
        permanent = isinstance(error, PermanentError)
        if stop.trip(error):
            log.error(f"{lane.name}: stopped by {error.kind}: {error}; its rows not yet called are recorded as failed")
        if breaker is not None:
            breaker.record_success() if permanent else breaker.record_failure()
        last = permanent or attempt > self.policy.retries
        retry_after = error.retry_after_s if isinstance(error, TransientError) else None
        delay = 0.0 if last else self.policy.delay(attempt, retry_after)
        what = (
            f"⏱️ Timeout after {error.timeout_s:g}s" if isinstance(error, CallTimeout) else f"❌ {error.kind}: {error}"
        )
        then = "recorded as failed" if last else f"retrying in {delay:.3g}s"
        log.warning(f"[{row.name}] {what} (attempt {attempt}); {then}")
        if not last:
            return None, delay
        elapsed_all = time.monotonic() - started
        failed = RowOutcome(
            row.key, "failed", error_kind=error.kind, message=str(error), attempts=attempt, latency_s=elapsed_all
        )
        return failed, 0.0


def _deferred(row: Row, attempts: int) -> RowOutcome:
    return RowOutcome(
        row.key,
        "deferred",
        attempts=attempts,
        error_kind="circuit_open",
        message="circuit breaker open: left for the sequential fallback",
    )
