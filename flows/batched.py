"""Many items, few calls: the machinery the enrichment and embedding jobs share.

Per-item cache first (an item's key is its content with everything that shapes its answer), then
batches of the uncached items only, as one phase; each good answer is cached as it arrives (from a thread,
while the next batch is sent: 100 vectors' JSON took 14 ms of a call's slot); the
items of a batch that failed after its retries go through a second phase one item per call (the seed's
fallback); what still fails is an error per item, never a lost row.

A job supplies `call(batch, before_call=...) -> BatchAnswer` (a `tasks.calls.Call`: data, not a closure):
the answers by item id, the problems by item id, and the number of calls and tokens it took (`before_call`
is the rate limit, for calls after the first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from flows.phase import PhaseSpec, adapted, run_phase
from tasks.batched import BatchAnswer, PartialAnswer
from tasks.limits import RateLimit, rate_limit_for, scoped
from tasks.meter import metered
from tasks.report import stable_key
from tasks.resilience import Cache, RetryPolicy, Row, alongside, later, run_logger


@dataclass
class BatchedJob:
    name: str  # phase name in logs and progress ("enrich", "embed")
    service: str  # the global limits it shares ("llm", "embeddings")
    cache: Cache
    concurrency: int
    policy: RetryPolicy
    rpm: float = 0
    workspace: str = ""  # the workspace's slug (PhaseSpec.workspace)
    adaptive: bool = False  # PhaseSpec.adaptive


@dataclass
class BatchedResult:
    values: dict[str, Any] = field(default_factory=dict)  # item id -> answer (new or cached)
    errors: dict[str, str] = field(default_factory=dict)  # item id -> why it has no answer
    cached: set[str] = field(default_factory=set)  # ids answered from the cache
    batches: int = 0
    calls: int = 0
    tokens: int = 0
    adaptive: dict[str, int] = field(default_factory=dict)  # where an adaptive concurrency went (batches phase)


def content_key(item: dict[str, Any]) -> str:
    """An item's cache key: its text (the job's cache version holds everything else that shapes answers)."""
    return stable_key(item["text"])


def pending(
    job: BatchedJob, items: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(cached answers by item id, items still to send)."""
    keys = {item["id"]: key(item) for item in items}
    found = job.cache.ledger.get_many(job.cache.step, job.cache.version, set(keys.values()))
    cached = {i: found[k] for i, k in keys.items() if k in found}
    return cached, [item for item in items if item["id"] not in cached]


@dataclass
class BatchSend:
    """The phase's call for one batch, as data (a task runner may send it to another process): asks `call` for
    the batch's items not answered yet. Answers of an attempt that failed part-way are cached at once and
    `kept`: a retry asks only for the rest, and the batch's answer holds both."""

    call: Callable[..., BatchAnswer]  # call(items, before_call=...)
    cache: Cache
    key: Callable[[dict[str, Any]], str]
    rate_limit: RateLimit | None
    on_good: Callable[[dict[str, Any]], None] | None = None  # gets each call's good answers as they arrive
    kept: dict[str, Any] = field(default_factory=dict)

    def __call__(self, batch: list[dict[str, Any]]) -> BatchAnswer:
        todo = [item for item in batch if item["id"] not in self.kept]
        earlier = {item["id"]: self.kept[item["id"]] for item in batch if item["id"] in self.kept}
        if not todo:
            return {"good": earlier, "problems": {}, "tokens": 0}
        try:
            answer = self.call(todo, before_call=self.rate_limit)
        except PartialAnswer as partial:
            self._keep(todo, partial.good)
            raise partial.error from partial  # the retry policy judges the error itself
        self._keep(todo, answer["good"])
        return {**answer, "good": {**earlier, **answer["good"]}}

    def _keep(self, items: list[dict[str, Any]], good: dict[str, Any]) -> None:
        answered = {self.key(item): good[item["id"]] for item in items if item["id"] in good}
        later(self._cache, answered)  # off the call's slot inside `run_batched`: the next batch goes at once
        self.kept.update(good)
        if good and self.on_good is not None:
            self.on_good(good)

    def _cache(self, answered: dict[str, Any]) -> None:
        """Into the ledger; an answer it cannot take is still this run's (a later run asks for it again)."""
        try:
            self.cache.ledger.put_many(self.cache.step, self.cache.version, answered)
        except Exception as exc:
            run_logger().error(f"{len(answered)} answers could not be cached (a later run asks for them again): {exc}")


def run_batched(
    job: BatchedJob,
    cached: dict[str, Any],
    todo: list[dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    pack: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]]],
    call: Callable[..., BatchAnswer],
    on_good: Callable[[dict[str, Any]], None] | None = None,
) -> BatchedResult:
    """Answer every item (each has an "id"): `cached` and `todo` as `pending` split them; the items to do
    go in batches, or alone after their batch failed. `on_good` gets the new answers by id as they arrive
    (cached ones are in the result only)."""
    log = run_logger()
    result = BatchedResult(values=dict(cached), cached=set(cached))
    log.info(f"Cache hits: {len(cached)}/{len(cached) + len(todo)}")
    log.info(f"Rows to {job.name}: {len(todo)}")
    if not todo:
        return result
    rate_limit = rate_limit_for(scoped(job.service, job.workspace), job.rpm)  # run_phase creates it first
    send = BatchSend(call, job.cache, key, rate_limit, on_good)
    # every HTTP attempt of both phases (re-asks and retries included) is metered; answers are cached alongside
    with metered() as meter, alongside():
        _run_phases(job, result, pack(todo), send)
    result.calls = meter.calls
    result.adaptive = adapted(job.name)
    return result


def _run_phases(
    job: BatchedJob,
    result: BatchedResult,
    batches: list[list[dict[str, Any]]],
    send: BatchSend,
) -> None:
    """The batches as one phase, then the items of failed batches one per call."""
    log = run_logger()
    result.batches = len(batches)
    log.info(f"Processing {len(batches)} batches")
    spec = PhaseSpec(
        job.name, job.service, job.concurrency, job.policy, rpm=job.rpm, workspace=job.workspace, adaptive=job.adaptive
    )
    rows = [Row(stable_key([i["id"] for i in b]), n + 1, b) for n, b in enumerate(batches)]
    failed: list[dict[str, Any]] = []
    outcomes = run_phase(spec, rows, send)
    for row in rows:
        outcome = outcomes[row.key]
        if outcome.status == "ok":
            _take(result, outcome.value)
            log.info(f"✓ Batch {row.index}/{len(rows)}: {len(outcome.value['good'])}/{len(row.payload)} items")
        else:
            log.error(f"Batch {row.index}/{len(rows)} failed: {outcome.message}")
            failed += row.payload
    if failed:
        log.info(f"Falling back to individual processing for {len(failed)} items")
        one_spec = replace(spec, name=f"{job.name}-single")
        one_rows = [Row(f"single-{i['id']}", n + 1, [i]) for n, i in enumerate(failed)]
        one_outcomes = run_phase(one_spec, one_rows, send)
        for row in one_rows:
            outcome = one_outcomes[row.key]
            if outcome.status == "ok":
                _take(result, outcome.value)
            else:
                result.errors[row.payload[0]["id"]] = f"{outcome.error_kind}: {outcome.message}"


def run_all(
    job: BatchedJob,
    items: list[dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    pack: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]]],
    call: Callable[..., BatchAnswer],
) -> BatchedResult:
    """`pending`, then `run_batched`: for jobs with nothing to decide between the cache and the calls."""
    cached, todo = pending(job, items, key)
    return run_batched(job, cached, todo, key, pack, call)


def _take(result: BatchedResult, answer: BatchAnswer) -> None:
    result.tokens += answer["tokens"]
    result.values.update(answer["good"])
    result.errors.update({i: f"invalid answer: {p}" for i, p in answer["problems"].items()})
