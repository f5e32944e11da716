"""Running one phase of a job: cached rows first, then chunks of the rest as mapped Prefect tasks that
share one lane, then the sequential fallback for whatever the circuit breaker stopped.

A job's phase is a few lines: build `Row`s and a `call`, then `run_phase(...)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL

from blocks.breaker import CircuitBreaker
from blocks.ledger import RowLedger
from blocks.workspace import DatabricksWorkspace
from tasks import progress, stopping
from tasks.inputs import InputError
from tasks.limits import RateLimit, ensure_service_limits, hold
from tasks.resilience import Cache, RetryPolicy, Row, RowOutcome, Stop, lane, run_logger, run_rows


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
    stop: Stop = field(default_factory=Stop)  # run_phase gives each run its own


@task(task_run_name="{phase}-rows-{first}", cache_policy=NO_CACHE, persist_result=False)
def run_chunk(
    rows: list[Row], call: Callable[[Any], Any], phase: str, first: int, spec: PhaseSpec, rate_limit: RateLimit | None
) -> list[RowOutcome]:
    """One chunk of a phase: its rows' calls, concurrently, through the phase's shared lane."""
    concurrency = 1 if spec.sequential else spec.concurrency
    return run_rows(
        rows,
        call,
        lane=lane(spec.service, concurrency, rate_limit),
        policy=spec.policy,
        log=run_logger(),
        breaker=spec.breaker,
        cache=spec.cache,
        sequential=spec.sequential,
        on_done=_progress_of(spec.name),
        stop=spec.stop,
    )


def _progress_of(phase: str) -> Callable[[RowOutcome], None]:
    def report(outcome: RowOutcome) -> None:
        if outcome.status != "deferred":  # deferred rows are reported when the fallback settles them
            progress.advanced(phase, failed=outcome.status == "failed")

    return report


def load_blocks(workspace_block: str | None, ledger_block: str | None) -> tuple[DatabricksWorkspace, RowLedger]:
    """The saved blocks by name, or the defaults (databricks-sdk env/profile; ~/.batchflows ledger).

    Raises:
        InputError: no block of that name on this Prefect server.
    """
    try:
        workspace = DatabricksWorkspace.load(workspace_block) if workspace_block else DatabricksWorkspace()
        ledger = RowLedger.load(ledger_block) if ledger_block else RowLedger()
    except ValueError as exc:
        raise InputError(f"{exc} on the Prefect server {PREFECT_API_URL.value() or '(ephemeral)'}") from exc
    return workspace, ledger  # type: ignore[return-value]


def chunk_rows(rows: Sequence[Row], concurrency: int, max_chunks: int = 8) -> list[list[Row]]:
    """Few, large chunks: each keeps the lane full on its own; several overlap so boundaries cost nothing."""
    if not rows:
        return []
    size = max(concurrency * 4, math.ceil(len(rows) / max_chunks))
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


def run_phase(spec: PhaseSpec, rows: Sequence[Row], call: Callable[[Any], Any]) -> dict[str, RowOutcome]:
    """Every row's outcome by key: cached, ok, failed (after retries and fallback), never lost."""
    log = run_logger()
    outcomes: dict[str, RowOutcome] = {}
    if spec.cache is not None:
        cached = spec.cache.ledger.get_many(spec.cache.step, spec.cache.version, [r.key for r in rows])
        outcomes = {k: RowOutcome(k, "ok", v, cached=True) for k, v in cached.items()}
    pending = [r for r in rows if r.key not in outcomes]
    progress.started(spec.name, len(rows))
    if outcomes:
        progress.advanced(spec.name, len(outcomes))
        log.info(f"{spec.name}: {len(outcomes)}/{len(rows)} rows from cache, {len(pending)} to call")
    if not pending:
        return outcomes
    spec = replace(spec, stop=Stop())
    concurrency = 1 if spec.sequential else spec.concurrency
    rate_limit = ensure_service_limits(spec.service, spec.concurrency, spec.rpm)
    chunks = [pending] if spec.sequential else chunk_rows(pending, concurrency)
    with hold(spec.service, occupy=concurrency):
        futures = run_chunk.map(
            chunks,
            unmapped(call),
            unmapped(spec.name),
            [c[0].index for c in chunks],
            unmapped(spec),
            unmapped(rate_limit),
        )
        results = [outcome for future in futures for outcome in future.result()]
    outcomes.update((o.key, o) for o in results)
    deferred = [r for r in pending if outcomes[r.key].status == "deferred"]
    if deferred:
        log.warning(f"Circuit breaker OPEN - falling back to sequential mode for {len(deferred)} rows")
        outcomes.update(sequential_fallback(spec, deferred, call, rate_limit))
    return outcomes


@flow(name="sequential-fallback", flow_run_name="{spec.name}-fallback", validate_parameters=False, persist_result=False)
def sequential_fallback(
    spec: PhaseSpec, rows: list[Row], call: Callable[[Any], Any], rate_limit: RateLimit | None
) -> dict[str, RowOutcome]:
    """What the breaker stopped, one row at a time with a pause between rows, waiting for the circuit to
    allow a probe (HALF_OPEN) for at most `fallback_max_wait_s` in all. What still fails is recorded."""
    log = run_logger()
    log.info("Executing in SEQUENTIAL fallback mode")
    single = lane(f"{spec.service}-fallback", 1, rate_limit)
    outcomes: dict[str, RowOutcome] = {}
    waited, i = 0.0, 0
    with hold(spec.service, occupy=1):
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
                on_done=_progress_of(spec.name),
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
