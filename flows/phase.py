"""Running one phase of a job: cached rows first, then chunks of the rest as mapped Prefect tasks that
share one lane, then the sequential fallback for whatever the circuit breaker stopped.

A job's phase is a few lines: build `Row`s and a `call`, then `run_phase(...)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from prefect import flow, tags, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from blocks.breaker import CircuitBreaker
from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from tasks import meter, progress, stopping
from tasks.adaptive import learned_start, remember
from tasks.inputs import InputError
from tasks.limits import RateLimit, ensure_service_limits, hold, scoped
from tasks.resilience import (
    Attempts,
    Cache,
    RetryPolicy,
    Row,
    RowOutcome,
    Stop,
    fresh_lane,
    in_background,
    lane,
    run_logger,
    run_rows,
)

TAGS = ("batchflows",)  # on every run of ours, subflows and runs started from a terminal included


class RowsFailed(Exception):
    """Every row of a run failed: the run ends Failed, and `summary` is its report, failures included."""

    def __init__(self, message: str, summary: Any) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return RowsFailed, (str(self), self.summary)


def rows_state(data: Any, total: int, failures: Iterable[str], done: str, extra: str = "") -> State:
    """A run's or chunk's final state, saying what failed by kind: "28/32 judged, 4 failed: genie_error 3,
    sql_error 1". Failed when every row failed (its data a RowsFailed carrying `data`), else Completed."""
    kinds = Counter(failures)
    failed = sum(kinds.values())
    message = f"{total - failed}/{total} {done}"
    if failed:
        message += f", {failed} failed: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
    message += extra
    if total and failed >= total:
        return Failed(message=message, data=RowsFailed(message, data))
    return Completed(message=message, data=data)


@contextlib.contextmanager
def no_idle_heartbeats() -> Iterator[None]:
    """Flow runs started inside send no Prefect heartbeats, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set.

    Prefect 3.8 sends a flow run's heartbeats from a thread that sleeps in 1 s steps, and each flow run and
    subflow joins that thread on exit: up to 1 s per flow run (a flow that does nothing took 1.05 s with it,
    0.065 s without, on a warm server). Heartbeats only serve an automation that marks runs whose heartbeats
    stop as crashed; a run from a terminal has its user watching. Deployments' runs keep Prefect's setting.
    """
    if any(os.environ.get(f"PREFECT_{k}_HEARTBEAT_FREQUENCY") for k in ("FLOWS", "RUNNER")):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def summary_of(state: State) -> Any:
    """What a job run returned, also when every row failed (its report); any other failure is raised."""
    value = state.result(raise_on_failure=False)
    if isinstance(value, RowsFailed):
        return value.summary
    if isinstance(value, BaseException):
        raise value
    return value


def run_name(job: str, *keys: str) -> Callable[[], str]:
    """A flow run name that says what ran and when: `score-retail-2026-11-24T22:36` (its parameters `keys`)."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        parts = [job, *(str(parameters[k]) for k in keys if parameters.get(k))]
        return "-".join([*parts, datetime.now().strftime("%Y-%m-%dT%H:%M")])

    return name


@dataclass
class PhaseSpec:
    """How one phase calls its service."""

    name: str
    service: str
    concurrency: int
    policy: RetryPolicy
    rpm: float = 0
    breaker: CircuitBreaker | None = None
    cache: Cache | None = None
    fallback_delay_s: float = 1.0
    fallback_max_wait_s: float = 180.0
    sequential: bool = False
    task_per_row: bool = False  # one Prefect task per row, named by it: for few, slow calls (Genie questions)
    adaptive: bool = False  # find the concurrency the service takes, up to `concurrency` (tasks.adaptive)
    adaptive_start: int = 0  # set by run_phase: the level this run starts at
    workspace: str = ""  # the workspace's slug: each workspace's service has its own limits
    stop: Stop = field(default_factory=Stop)  # run_phase gives each run its own
    on_done: Callable[[RowOutcome], None] | None = None  # told of each called row's outcome as it is known

    @property
    def limits(self) -> str:
        """The name the service's global limits and process lane go by."""
        return scoped(self.service, self.workspace)

    @property
    def at_once(self) -> int:
        """Calls in flight at most, and the service's slots a run of the phase holds: 1 when sequential."""
        return 1 if self.sequential else self.concurrency


class Feed:
    """The rows of a phase that starts before all of them are known: `run_phase` calls each one as it is put,
    and returns once the feed is closed and every row has its outcome. A key put twice is called once.

    An open feed lives in one process: its phase's task must run in a thread of the flow's process
    (`in_threads()`). A closed feed is a list of rows, and its phase runs as any other.
    """

    def __init__(self) -> None:
        self.rows: list[Row] = []  # every row put, in order
        self._keys: set[str] = set()
        self._queue: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    def put(self, key: str, payload: Any, label: str = "") -> None:
        """Add a row (nothing if its key is already in, also once the feed is closed).

        Raises:
            RuntimeError: a new row in a closed feed: it would never be called.
        """
        with self._lock:
            if key in self._keys:
                return
            if self._closed:
                raise RuntimeError(f"row {label or key} put in a closed feed: it would never be called")
            self._keys.add(key)
            row = Row(key, len(self.rows), payload, label)
            self.rows.append(row)
            self._queue.put(row)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more rows: the phase ends when the rows put so far are done. Closing twice does nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)

    def __iter__(self) -> Iterator[Row]:
        """The rows as they are put, until the feed is closed (for the one phase that takes them)."""
        while (row := self._queue.get()) is not None:
            yield row


def in_threads() -> bool:
    """Whether this flow run's tasks run in threads of its process (so they can take an open `Feed`)."""
    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner)


@dataclass
class TaskResult:
    """What a phase's task hands back: its rows' outcomes, and the calls they made when it ran in another
    process (a process-based task runner), whose meters the flow's process cannot see."""

    outcomes: list[RowOutcome]
    pid: int = field(default_factory=os.getpid)
    calls: dict[str, int] = field(default_factory=dict)

    def taken(self) -> list[RowOutcome]:
        """The outcomes, counting the calls made in another process on this one's meters."""
        if self.pid != os.getpid():
            meter.add(self.calls)
        return self.outcomes


@task(task_run_name="{phase}-rows-{first}", cache_policy=NO_CACHE, persist_result=False)
def run_chunk(
    rows: Iterable[Row],
    call: Callable[[Any], Any],
    phase: str,
    first: int,
    spec: PhaseSpec,
    rate_limit: RateLimit | None,
) -> State:
    """One chunk of a phase: its rows' calls, concurrently, through the phase's shared lane. Its state says
    how many rows failed and why (Failed when all did); its data is every row's outcome. `rows` may come
    from a `Feed`: the task takes them as they arrive."""
    with meter.metered() as calls:
        outcomes = run_rows(
            rows,
            call,
            lane=lane(spec.limits, spec.at_once, rate_limit, spec.adaptive_start),
            policy=spec.policy,
            log=run_logger(),
            breaker=spec.breaker,
            cache=spec.cache,
            sequential=spec.sequential,
            on_done=_progress_of(spec),
            stop=spec.stop,
        )
    deferred = sum(1 for o in outcomes if o.status == "deferred")
    return rows_state(
        TaskResult(outcomes, calls=dict(calls.by_kind)),
        len(outcomes) - deferred,
        (o.error_kind or "error" for o in outcomes if o.status == "failed"),
        "succeeded",
        f"; {deferred} left for the sequential fallback" if deferred else "",
    )


_ATTEMPT_CALLS: dict[str, Counter[str]] = {}  # a row task's calls, by task run, over its attempts


class RetryRow(Exception):
    """Raised by a row's task to have Prefect run it again (after the backoff the task already waited)."""


@task(task_run_name="{phase}-{label}", cache_policy=NO_CACHE, persist_result=False)
def run_row(
    row: Row,
    call: Callable[[Any], Any],
    phase: str,
    label: str,
    spec: PhaseSpec,
    rate_limit: RateLimit | None,
    cached: RowOutcome | None = None,
) -> State:
    """One row as its own Prefect task: an attempt per task run, so Prefect's retries show each one in the UI.

    A transient failure waits the policy's backoff (jitter, Retry-After) and raises `RetryRow`; the task's
    `retries` (the policy's) run it again. The last failure, or a permanent one, ends the task Failed with the
    row's failed outcome as its data: a failure is data, never lost. A row from an earlier run is Cached.
    """
    if cached is not None:
        return Completed(name="Cached", message="answered in an earlier run (row ledger)", data=TaskResult([cached]))
    from prefect.runtime import task_run

    attempt = task_run.run_count
    attempts = Attempts(
        call,
        lane(spec.limits, spec.concurrency, rate_limit, spec.adaptive_start),
        spec.policy,
        run_logger(),
        spec.breaker,
        spec.cache,
        spec.stop,
    )
    made = _ATTEMPT_CALLS.setdefault(str(task_run.id), Counter())  # Prefect retries a task in its process
    with meter.metered() as calls:
        outcome, delay = attempts.one(row, attempt, time.monotonic())
    made.update(calls.by_kind)
    if outcome is None:
        stopping.sleep(delay)
        raise RetryRow(f"{label}: attempt {attempt} failed; Prefect retries it after {delay:.3g}s of backoff")
    _progress_of(spec)(outcome)
    result = TaskResult([outcome], calls=dict(_ATTEMPT_CALLS.pop(str(task_run.id))))
    if outcome.status == "failed":
        return Failed(message=f"{outcome.error_kind}: {outcome.message}", data=result)
    if outcome.status == "deferred":
        return Completed(message="circuit open: left for the sequential fallback", data=result)
    return Completed(message=f"answered (attempt {attempt})", data=result)


def _progress_of(spec: PhaseSpec) -> Callable[[RowOutcome], None]:
    def report(outcome: RowOutcome) -> None:
        if outcome.status != "deferred":  # deferred rows are reported when the fallback settles them
            progress.advanced(spec.name, failed=outcome.status == "failed")
            if spec.on_done is not None:
                spec.on_done(outcome)

    return report


def load_blocks(workspace_block: str | None, ledger_block: str | None) -> tuple[DatabricksWorkspace, RowLedger]:
    """The saved blocks by name, or the defaults (databricks-sdk env/profile; ~/.batchflows ledger).

    Raises:
        InputError: no block of that name on this Prefect server.
    """
    # both at once: each is a round trip to the Prefect server (~10 ms when it is busy)
    ledger_loaded = in_background(RowLedger.load, ledger_block) if ledger_block else None
    try:
        workspace = DatabricksWorkspace.load(workspace_block) if workspace_block else DatabricksWorkspace()
        ledger = ledger_loaded.result() if ledger_loaded else RowLedger()
    except ValueError as exc:
        raise InputError(f"{exc} on the Prefect server {PREFECT_API_URL.value() or '(ephemeral)'}") from exc
    return workspace, ledger  # type: ignore[return-value]


def chunk_rows(rows: Sequence[Row], concurrency: int, max_chunks: int = 8) -> list[list[Row]]:
    """Few, large chunks: each keeps the lane full on its own; several overlap so boundaries cost nothing."""
    if not rows:
        return []
    size = max(concurrency * 4, math.ceil(len(rows) / max_chunks))
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


def run_phase(
    spec: PhaseSpec, rows: Sequence[Row] | Feed, call: Callable[[Any], Any], ahead: SlotsAhead | None = None
) -> dict[str, RowOutcome]:
    """Every row's outcome by key: cached, ok, failed (after retries and fallback), never lost. `ahead`: the
    phase's slots, taken while the flow did other work (not for an open feed, which takes them as rows come)."""
    _ADAPTED.pop(_this_run(spec.name), None)
    if isinstance(rows, Feed):
        if not rows.closed:
            if ahead is not None:
                raise ValueError(f"{spec.name}: an open feed's phase takes its slots as its rows come, not ahead")
            return _run_feed(spec, rows, call)
        rows = rows.rows
    log = run_logger()
    outcomes = _from_cache(spec, [r.key for r in rows])
    pending = [r for r in rows if r.key not in outcomes]
    progress.started(spec.name, len(rows))
    if outcomes:
        progress.advanced(spec.name, len(outcomes))
        log.info(f"{spec.name}: {len(outcomes)}/{len(rows)} rows from cache, {len(pending)} to call")
    if spec.task_per_row and not spec.sequential:
        return _run_per_row(spec, rows, outcomes, call, ahead)
    if not pending:
        if ahead is not None:
            ahead.give_back()
        return outcomes
    spec, rate_limit, slots = _slots(spec, ahead)
    chunks = [pending] if spec.sequential else chunk_rows(pending, spec.concurrency)
    with slots, _learning(spec, rate_limit):
        futures = run_chunk.map(  # quoted: Prefect would walk every row's payload looking for futures
            quote(chunks),
            quote(unmapped(call)),
            unmapped(spec.name),
            [c[0].index for c in chunks],
            quote(unmapped(spec)),
            unmapped(rate_limit),
        )
        for future in futures:
            future.wait()
        results = [outcome for future in futures for outcome in summary_of(future.state).taken()]
    outcomes.update((o.key, o) for o in results)
    return _fallback(spec, pending, outcomes, call, rate_limit)


class _Bursts:
    """A feed's phase holds its slots while it has rows in flight, not between bursts: a score run's SQL
    comes with Genie's answers, minutes apart at Genie's few questions a minute, and slots held all that time
    would keep other runs' SQL phases waiting (and, after SLOT_WAIT_S, failing) for nothing. The slots are
    kept BATCHFLOWS_SLOT_LINGER_S (2 s) after a burst, for a next one that comes at once (a round of answers)."""

    def __init__(self, limits: str, occupy: int) -> None:
        self.limits, self.occupy = limits, occupy
        self.linger_s = float(os.environ.get("BATCHFLOWS_SLOT_LINGER_S", 2))
        self.bursts = 0
        self._lock = threading.RLock()
        self._in_flight = 0
        self._started = 0  # rows started: an idle moment whose count has moved on is over
        self._held: contextlib.ExitStack | None = None

    def started(self) -> None:
        """A row is about to be called: its slots first, if no row holds them."""
        with self._lock:
            self._in_flight += 1
            self._started += 1
            if self._held is None:
                held = contextlib.ExitStack()
                held.enter_context(hold(self.limits, occupy=self.occupy))
                self._held, self.bursts = held, self.bursts + 1

    def ended(self) -> None:
        """A row's call is over: when none is in flight, the slots go back after the linger, unless rows
        started meanwhile. The release runs with this context (the Prefect API in use may be a setting)."""
        with self._lock:
            self._in_flight -= 1
            if self._in_flight > 0:
                return
            idle = threading.Timer(self.linger_s, contextvars.copy_context().run, (self._still_idle, self._started))
            idle.daemon = True
            idle.start()

    def _still_idle(self, started: int) -> None:
        with self._lock:
            if self._in_flight == 0 and self._started == started:
                self.close()

    def close(self) -> None:
        """Give the slots back (the phase's end; rows the breaker deferred never end here)."""
        with self._lock:
            if self._held is not None:
                held, self._held = self._held, None
                held.close()


def _run_feed(spec: PhaseSpec, feed: Feed, call: Callable[[Any], Any]) -> dict[str, RowOutcome]:
    """`run_phase` for rows that arrive while it runs: one task takes them as they come, each through the
    ledger cache first, at the phase's concurrency, holding the phase's slots while rows are in flight. The
    phase starts (its limits, its task) with its first row: until then it takes nothing from the phases that
    feed it."""
    outcomes: dict[str, RowOutcome] = {}
    progress.started(spec.name, 0)
    arriving = iter(feed)
    first = next(arriving, None)
    if first is None:
        return outcomes
    spec, rate_limit = _limited(spec)
    bursts = _Bursts(spec.limits, spec.at_once)
    told = spec.on_done

    def ended(outcome: RowOutcome) -> None:
        bursts.ended()
        if told is not None:
            told(outcome)

    def uncalled() -> Iterator[Row]:
        for row in itertools.chain([first], arriving):
            progress.resized(spec.name, len(feed.rows))
            if cached := _from_cache(spec, [row.key]):
                outcomes.update(cached)
                progress.advanced(spec.name)
                continue
            bursts.started()
            yield row

    task: tuple[Any, ...] = (
        quote(uncalled()),
        quote(call),
        spec.name,
        0,
        quote(replace(spec, on_done=ended)),
        rate_limit,
    )
    try:
        with _learning(spec, rate_limit):
            future = run_chunk.submit(*task)  # quoted: a generator; Prefect would walk rows
            future.wait()
            results = summary_of(future.state).taken()
    finally:
        bursts.close()
    run_logger().info(
        f"{spec.name}: {len(feed.rows)} rows as they came, {len(outcomes)} from cache; slots held {bursts.bursts} "
        "time(s), while rows were in flight"
    )
    outcomes.update((o.key, o) for o in results)
    pending = [r for r in feed.rows if not outcomes[r.key].cached]
    return _fallback(spec, pending, outcomes, call, rate_limit)


def _from_cache(spec: PhaseSpec, keys: list[str]) -> dict[str, RowOutcome]:
    """The rows an earlier run answered (the ledger), as cached outcomes; none if the phase reads no cache."""
    if spec.cache is None or not spec.cache.read:
        return {}
    found = spec.cache.ledger.get_many(spec.cache.step, spec.cache.version, keys)
    return {k: RowOutcome(k, "ok", v, cached=True) for k, v in found.items()}


class SlotsAhead:
    """A phase's limits set up, and its slots taken, from now on in a thread while the flow does other work;
    `run_phase(spec, ..., ahead=)` then finds them taken. A scoring run loads its circuit breaker meanwhile:
    its first question went out 10-15 ms later without it, and 25-60 ms later when the busy Prefect server
    refused the slot request once (bench trace, c=10).

    Only the spec's limits matter here (`_limits_of`): its breaker, cache and the rest may come later. The
    block's end gives back slots no phase took, and ends a wait for them.
    """

    def __init__(self, spec: PhaseSpec) -> None:
        self.spec = spec
        self._cancel = threading.Event()
        self._held = contextlib.ExitStack()
        self._ready = in_background(self._take)

    def _take(self) -> tuple[PhaseSpec, RateLimit | None]:
        limited, rate_limit = _limited(self.spec)
        self._held.enter_context(hold(limited.limits, occupy=limited.at_once, cancel=self._cancel))
        return limited, rate_limit

    def taken(self, spec: PhaseSpec) -> tuple[PhaseSpec, RateLimit | None, contextlib.ExitStack]:
        """`spec` within its limits (as `_limited` makes it), its rate limit, and the held slots: the caller's
        to give back."""
        if _limits_of(spec) != _limits_of(self.spec):
            raise ValueError(
                f"phase {spec.name}: its limits {_limits_of(spec)} are not those its slots were taken ahead for "
                f"{_limits_of(self.spec)}"
            )
        limited, rate_limit = self._ready.result()
        within = replace(
            spec, stop=limited.stop, concurrency=limited.concurrency, adaptive_start=limited.adaptive_start
        )
        return within, rate_limit, self._held.pop_all()

    def __enter__(self) -> SlotsAhead:
        return self

    def __exit__(self, *_: object) -> None:
        self.give_back()

    def give_back(self) -> None:
        """The slots back, if no phase took them (a wait for them ends)."""
        self._cancel.set()
        with contextlib.suppress(Exception):  # no phase took them: why they could not be had is moot
            self._ready.result()
        self._held.close()


def _limits_of(spec: PhaseSpec) -> tuple[Any, ...]:
    return (spec.limits, spec.concurrency, spec.rpm, spec.adaptive, spec.sequential)


def _slots(
    spec: PhaseSpec, ahead: SlotsAhead | None
) -> tuple[PhaseSpec, RateLimit | None, contextlib.AbstractContextManager[Any]]:
    """The spec a run of the phase calls with (`_limited`), its rate limit, and its slots: taken ahead, or a
    `hold` to take them in."""
    if ahead is not None:
        return ahead.taken(spec)
    spec, rate_limit = _limited(spec)
    return spec, rate_limit, hold(spec.limits, occupy=spec.at_once)


def _limited(spec: PhaseSpec) -> tuple[PhaseSpec, RateLimit | None]:
    """The spec this run of the phase calls with (its own stop, its concurrency within the service's shared
    limit, an adaptive start), and the rate limit its calls wait on."""
    allowed, rate_limit = ensure_service_limits(spec.limits, spec.concurrency, spec.rpm)
    return _adapting(replace(spec, stop=Stop(), concurrency=min(spec.concurrency, allowed))), rate_limit


_ADAPTED: dict[tuple[str, str], dict[str, int]] = {}  # by flow run and phase: where its adaptive concurrency went


def _this_run(phase: str) -> tuple[str, str]:
    context = FlowRunContext.get()
    return (str(context.flow_run.id) if context and context.flow_run else "", phase)


def adapted(phase: str) -> dict[str, int]:
    """Where the adaptive concurrency of phase `phase` of this flow run went (start, level, lowest, highest,
    cuts); {} for a fixed one. By flow run: two runs of a job in one process keep their own."""
    return _ADAPTED.get(_this_run(phase), {})


def _adapting(spec: PhaseSpec) -> PhaseSpec:
    """An adaptive phase starts where the last run of its service and workspace ended (tasks.adaptive)."""
    if not spec.adaptive or spec.sequential:
        return spec
    start = learned_start(spec.limits, spec.concurrency)
    fresh_lane(spec.limits, spec.concurrency)
    run_logger().info(f"{spec.name}: adaptive concurrency starts at {start} (at most {spec.concurrency})")
    return replace(spec, adaptive_start=start)


@contextlib.contextmanager
def _learning(spec: PhaseSpec, rate_limit: RateLimit | None) -> Iterator[None]:
    """After an adaptive phase: log where its level went and keep it as the next run's start."""
    try:
        yield
    finally:
        if spec.adaptive_start:
            level = lane(spec.limits, spec.concurrency, rate_limit, spec.adaptive_start).adaptive
            if level is not None:
                _ADAPTED[_this_run(spec.name)] = {"start": spec.adaptive_start, **level.summary()}
                remember(spec.limits, level.level)
                run_logger().info(
                    f"{spec.name}: adaptive concurrency went from {spec.adaptive_start} to {level.level} (lowest "
                    f"{level.lowest}, highest {level.highest}, {level.cuts} cut(s) on 429/503); the next run "
                    f"starts at {level.level}"
                )


def _run_per_row(
    spec: PhaseSpec,
    rows: Sequence[Row],
    cached: dict[str, RowOutcome],
    call: Callable[[Any], Any],
    ahead: SlotsAhead | None,
) -> dict[str, RowOutcome]:
    """`run_phase` with a Prefect task per row (cached rows too, shown Cached), then the fallback."""
    spec, rate_limit, slots = _slots(spec, ahead)
    outcomes = dict(cached)
    with slots, _learning(spec, rate_limit):
        futures = run_row.with_options(retries=spec.policy.retries).map(  # quoted as in run_phase
            quote(list(rows)),
            quote(unmapped(call)),
            unmapped(spec.name),
            [row.name for row in rows],
            quote(unmapped(spec)),
            unmapped(rate_limit),
            quote([cached.get(row.key) for row in rows]),
        )
        for future in futures:
            future.wait()
        outcomes.update((o.key, o) for f in futures for o in summary_of(f.state).taken())
    return _fallback(spec, rows, outcomes, call, rate_limit)


def _fallback(
    spec: PhaseSpec,
    rows: Sequence[Row],
    outcomes: dict[str, RowOutcome],
    call: Callable[[Any], Any],
    rate_limit: RateLimit | None,
) -> dict[str, RowOutcome]:
    """The outcomes, with the rows the breaker deferred settled by the sequential fallback subflow; the
    breaker's last state saved."""
    deferred = [r for r in rows if outcomes[r.key].status == "deferred"]
    if deferred:
        run_logger().warning(f"Circuit breaker OPEN - falling back to sequential mode for {len(deferred)} rows")
        with tags(*TAGS):
            outcomes.update(sequential_fallback(spec, deferred, call, rate_limit))
    if spec.breaker is not None:
        spec.breaker.flush()
    return outcomes


@flow(name="sequential-fallback", flow_run_name="{spec.name}-fallback", validate_parameters=False, persist_result=False)
def sequential_fallback(
    spec: PhaseSpec, rows: list[Row], call: Callable[[Any], Any], rate_limit: RateLimit | None
) -> dict[str, RowOutcome]:
    """What the breaker stopped, one row at a time with a pause between rows, waiting for the circuit to
    allow a probe (HALF_OPEN) for at most `fallback_max_wait_s` in all. What still fails is recorded."""
    log = run_logger()
    log.info("Executing in SEQUENTIAL fallback mode")
    single = lane(f"{spec.limits}-fallback", 1, rate_limit)
    outcomes: dict[str, RowOutcome] = {}
    waited, i = 0.0, 0
    with hold(spec.limits, occupy=1):
        while i < len(rows):
            row = rows[i]
            outcome = run_rows(
                [row],
                call,
                lane=single,
                policy=spec.policy,
                log=log,
                breaker=spec.breaker,
                cache=spec.cache,
                on_done=_progress_of(spec),
                stop=spec.stop,
            )[0]
            if outcome.status != "deferred":
                outcomes[row.key] = outcome
                i += 1
                if i < len(rows):
                    stopping.sleep(spec.fallback_delay_s)
                continue
            wait = spec.breaker.seconds_until_probe() if spec.breaker else 0.0
            if waited + wait > spec.fallback_max_wait_s or stopping.reason():
                why = stopping.reason()
                log.error(
                    f"{f'Run {why}' if why else f'Circuit still OPEN after waiting {waited:.0f}s'}: "
                    f"{len(rows) - i} rows recorded as failed"
                )
                progress.advanced(spec.name, len(rows) - i, failed=True)
                for rest in rows[i:]:
                    outcomes[rest.key] = RowOutcome(
                        rest.key,
                        "failed",
                        error_kind="interrupted" if why else "circuit_open",
                        message=f"not called: the run was {why}"
                        if why
                        else "service unavailable: circuit breaker stayed open",
                        attempts=0,
                    )
                break
            stopping.sleep(max(wait, 0.05))
            waited += max(wait, 0.05)
    return outcomes
