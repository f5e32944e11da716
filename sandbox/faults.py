"""Fault injection and request accounting for the sandbox workspace.

Each endpoint group (genie, sql, chat, embeddings) has a `FaultSpec`. Transport faults (429, 5xx,
connection reset, hang) are applied by `FaultMiddleware` to a group's *primary* requests (a Genie
question, a statement submission, an endpoint invocation); content faults (malformed JSON, missing or
extra ids, bad enum values) are applied by the chat model. `Ledger` counts every request and the
intervals during which each call was in flight, so tests can assert exact call numbers and peaks.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

GROUPS = ("genie", "genie_poll", "sql", "chat", "embeddings")
UNKNOWN_ENDPOINT = "unknown_endpoint"  # invocations of endpoints the sandbox does not serve: counted, never faulted
TRANSPORT_FAULTS = ("429", "500", "502", "503", "reset", "hang")
CONTENT_FAULTS = ("malformed", "missing_id", "extra_id", "bad_enum", "empty", "genie_failed")
FaultKind = Literal[
    "ok",
    "429",
    "500",
    "502",
    "503",
    "reset",
    "hang",
    "malformed",
    "missing_id",
    "extra_id",
    "bad_enum",
    "empty",
    "genie_failed",
]

_PRIMARY = [
    ("POST", re.compile(r"^/api/2\.0/genie/spaces/[^/]+/start-conversation$"), "genie"),
    ("POST", re.compile(r"^/api/2\.0/genie/spaces/[^/]+/conversations/[^/]+/messages$"), "genie"),
    ("POST", re.compile(r"^/api/2\.0/sql/statements/?$"), "sql"),
    ("POST", re.compile(r"^/serving-endpoints/[^/]+/invocations$"), "invocations"),
    # polls of a Genie message: their own group, so tests can fault a poll without touching questions
    ("GET", re.compile(r"^/api/2\.0/genie/spaces/[^/]+/conversations/[^/]+/messages/[^/]+$"), "genie_poll"),
]


class FaultSpec(BaseModel):
    """Faults and latency for one endpoint group. Rates are probabilities per primary request."""

    latency_ms: float = Field(0, ge=0, description="mean service time of a call, the endpoint's own work included")
    latency_jitter_ms: float = Field(0, ge=0, description="uniform +/- jitter around latency_ms")
    rate_429: float = Field(0, ge=0, le=1)
    retry_after_s: float = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    rate_500: float = Field(0, ge=0, le=1)
    rate_503: float = Field(0, ge=0, le=1)
    rate_reset: float = Field(0, ge=0, le=1)
    rate_hang: float = Field(0, ge=0, le=1)
    hang_s: float = Field(3600, ge=0, description="how long a hung request stays silent")
    rate_malformed: float = Field(0, ge=0, le=1)
    rate_missing_id: float = Field(0, ge=0, le=1)
    rate_extra_id: float = Field(0, ge=0, le=1)
    rate_bad_enum: float = Field(0, ge=0, le=1)
    rate_empty: float = Field(0, ge=0, le=1, description="the reply's first element with every text blanked")
    rate_genie_failed: float = Field(0, ge=0, le=1)
    down: bool = Field(False, description="answer every primary request with 503")
    capacity_concurrent: int = Field(
        0, ge=0, description="hidden capacity: a call beyond this many in flight is answered 429 (0: no limit)"
    )
    capacity_rpm: float = Field(
        0,
        ge=0,
        description="hidden rate: a call beyond this many in the last 60 s is answered 429, with Retry-After "
        "saying when the next one will be taken (0: no limit)",
    )
    tasks: list[str] = Field(
        default_factory=list, description="chat only: the payload tasks content faults apply to (empty: all)"
    )
    script: list[FaultKind] = Field(
        default_factory=list, description="faults for the next primary requests, in order, before rates apply"
    )

    def latency_s(self, rng: random.Random) -> float:
        jitter = rng.uniform(-self.latency_jitter_ms, self.latency_jitter_ms) if self.latency_jitter_ms else 0
        return max(0.0, self.latency_ms + jitter) / 1000


class OverCapacity(Exception):
    """A call beyond a group's hidden capacity: answered 429 with Retry-After `wait_s`."""

    def __init__(self, wait_s: float, why: str) -> None:
        super().__init__(why)
        self.wait_s = wait_s


@dataclass
class _Group:
    spec: FaultSpec = field(default_factory=FaultSpec)
    script: deque[str] = field(default_factory=deque)
    pending: deque[str] = field(default_factory=deque)
    calls: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    intervals: list[list[float]] = field(default_factory=list)
    admitted: deque[float] = field(default_factory=deque)  # start times of calls within capacity_rpm's window


class Ledger:
    """Thread-safe fault decisions, counters, in-flight intervals and a request log."""

    def __init__(self, seed: int = 0, faults: dict[str, FaultSpec] | None = None) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self._groups = {g: _Group() for g in (*GROUPS, UNKNOWN_ENDPOINT)}
        self.log: list[dict[str, Any]] = []
        for group, spec in (faults or {}).items():
            self.set_spec(group, spec)

    def set_spec(self, group: str, spec: FaultSpec) -> None:
        with self._lock:
            g = self._groups[group]
            g.spec = spec
            g.script, g.pending = deque(spec.script), deque()

    def spec(self, group: str) -> FaultSpec:
        return self._groups[group].spec

    def admit(self, group: str) -> None:
        """Count a new call of `group`, unless it is beyond the group's hidden capacity (`capacity_concurrent`
        calls in flight, `capacity_rpm` calls in the last 60 s): then `OverCapacity` says how long to wait,
        as a real service's 429 does once its pool or quota is full. A handler admits a call and opens its
        in-flight interval with no await in between, so no other call slips in."""
        with self._lock:
            g, now = self._groups[group], time.time()
            spec = g.spec
            if spec.capacity_concurrent:
                in_flight = _in_flight(g.intervals, now)
                if in_flight >= spec.capacity_concurrent:
                    raise OverCapacity(spec.retry_after_s, f"{in_flight} calls in flight, the most it takes")
            if spec.capacity_rpm:
                while g.admitted and g.admitted[0] <= now - 60:
                    g.admitted.popleft()
                if len(g.admitted) >= spec.capacity_rpm:
                    wait = float(math.ceil(g.admitted[0] + 60 - now))  # whole seconds, as Databricks sends them
                    raise OverCapacity(wait, f"{len(g.admitted)} calls in the last minute, the most it takes")
                g.admitted.append(now)

    def draw(self, group: str, kinds: tuple[str, ...]) -> str:
        """Pick the fault (or "ok") for the next request of `group` among `kinds`."""
        with self._lock:
            g = self._groups[group]
            if g.spec.down and "503" in kinds:
                return "503"
            if g.pending and g.pending[0] in kinds:
                return g.pending.popleft()
            if g.script:
                kind = g.script.popleft()
                if kind == "ok" or kind in kinds:
                    return kind
                g.pending.append(kind)  # a content fault: the same request's handler draws it next
                return "ok"
            roll = self._rng.random()
            for kind in kinds:
                rate = getattr(g.spec, f"rate_{kind}", 0.0)
                if roll < rate:
                    return kind
                roll -= rate
            return "ok"

    def rng(self) -> random.Random:
        with self._lock:
            return random.Random(self._rng.random())

    def record(self, group: str, path: str, status: int, fault: str, **detail: Any) -> None:
        with self._lock:
            g = self._groups[group]
            g.calls += 1
            if fault != "ok":
                g.faults[fault] += 1
            self.log.append(
                {"t": time.time(), "group": group, "path": path, "status": status, "fault": fault, **detail}
            )

    def open_interval(self, group: str, start: float, end: float = float("inf")) -> list[float]:
        interval = [start, end]
        with self._lock:
            self._groups[group].intervals.append(interval)
        return interval

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            return {
                name: {
                    "calls": g.calls,
                    "faults": dict(g.faults),
                    "max_in_flight": _max_overlap(g.intervals),
                    "in_flight": _in_flight(g.intervals, now),
                }
                for name, g in self._groups.items()
            }

    def reset(self) -> None:
        with self._lock:
            for g in self._groups.values():
                g.calls, g.faults, g.intervals, g.admitted = 0, Counter(), [], deque()
                g.script, g.pending = deque(g.spec.script), deque()
            self.log.clear()
            self._rng = random.Random(self._seed)


def _in_flight(intervals: list[list[float]], now: float) -> int:
    return sum(1 for start, end in intervals if start <= now < end)


def _max_overlap(intervals: list[list[float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def primary_group(method: str, path: str) -> str | None:
    for verb, pattern, group in _PRIMARY:
        if verb == method and pattern.match(path):
            return group
    return None


class FaultMiddleware:
    """Pure ASGI wrapper: injects transport faults into primary requests before the app sees them."""

    def __init__(self, app: Any, ledger: Ledger, group_of_endpoint: Any) -> None:
        self.app = app
        self.ledger = ledger
        self.group_of_endpoint = group_of_endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["sandbox_arrived"] = time.time()  # a call's latency counts from here
        path = scope["path"]
        group = primary_group(scope["method"], path)
        if group == "invocations":
            group = self.group_of_endpoint(path.split("/")[2])
            if group is None:  # the app refuses it (404); counted as a call all the same
                scope.setdefault("state", {})["sandbox_group"] = UNKNOWN_ENDPOINT
                await self.app(scope, receive, send)
                return
        if group is None:
            await self.app(scope, receive, send)
            return
        fault = self.ledger.draw(group, TRANSPORT_FAULTS)
        if fault == "ok":
            scope.setdefault("state", {})["sandbox_group"] = group
            await self.app(scope, receive, send)
            return
        self.ledger.record(group, path, 0 if fault in ("reset", "hang") else int(fault), fault)
        if fault == "hang":
            interval = self.ledger.open_interval(group, time.time())
            try:
                await asyncio.sleep(self.ledger.spec(group).hang_s)
            except asyncio.CancelledError:  # server shutting down: drop the connection quietly
                return
            finally:
                interval[1] = time.time()
            fault = "reset"
        if fault == "reset":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                transport.abort()
                return
            raise ConnectionResetError("sandbox injected a connection reset")
        await _send_error(send, int(fault), self.ledger.spec(group).retry_after_s)


async def _send_error(send: Any, status: int, retry_after: float) -> None:
    if status == 502:  # a load balancer's answer, not the API's: HTML, no error code
        page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        headers = [(b"content-type", b"text/html"), (b"content-length", str(len(page)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": page})
        return
    codes = {
        429: ("REQUEST_LIMIT_EXCEEDED", "Too many requests. Please wait and retry."),
        500: ("INTERNAL_ERROR", "Internal error. Please try again later."),
        503: ("TEMPORARILY_UNAVAILABLE", "The service is temporarily unavailable."),
    }
    code, message = codes[status]
    body = f'{{"error_code": "{code}", "message": "{message}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (429, 503):
        headers.append((b"retry-after", str(max(0, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
