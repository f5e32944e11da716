"""Call accounting from one place: the HTTP transport of every workspace client counts each attempt.

Counting where the request leaves the process sees what per-row bookkeeping cannot: re-asks inside a batch,
retries, calls of rows whose outcome was later replaced (a breaker's fallback), refused and failed
attempts. A phase reads its own count:

    with metered() as meter:
        run_phase(...)
    meter.calls  # questions asked, statements submitted, endpoints invoked

Meters nest (a job's meter sees its phases' calls) and follow the context into worker threads
(`contextvars.copy_context`, which Prefect's thread pool and `run_rows` both use).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from urllib.parse import urlsplit

# the requests that are billable calls: the rest (polls, result reads, metadata) are counted as requests
_CALLS = (
    ("genie", "POST", re.compile(r"/api/2\.0/genie/spaces/[^/]+/(start-conversation|conversations/[^/]+/messages)$")),
    ("sql", "POST", re.compile(r"/api/2\.0/sql/statements/?$")),
    ("invocations", "POST", re.compile(r"/serving-endpoints/[^/]+/invocations$")),
)


class Meter:
    """HTTP attempts counted while this meter (or a meter nested in it) was current."""

    def __init__(self, parent: Meter | None = None) -> None:
        self.parent = parent
        self.by_kind: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """Billable calls: Genie questions, statement submissions and endpoint invocations."""
        return sum(self.by_kind.values())

    def _add(self, kind: str | None) -> None:
        with self._lock:
            self.requests += 1
            if kind is not None:
                self.by_kind[kind] += 1


_CURRENT: ContextVar[Meter | None] = ContextVar("batchflows_meter", default=None)


@contextlib.contextmanager
def metered() -> Iterator[Meter]:
    """A meter for the calls made inside the block, in this context and the threads it starts."""
    meter = Meter(_CURRENT.get())
    token = _CURRENT.set(meter)
    try:
        yield meter
    finally:
        _CURRENT.reset(token)


def count(method: str, url: str) -> None:
    """Count one HTTP attempt on every current meter (called by the workspace clients' transport)."""
    path = urlsplit(url).path
    kind = next((k for k, m, pattern in _CALLS if m == method and pattern.search(path)), None)
    meter = _CURRENT.get()
    while meter is not None:
        meter._add(kind)
        meter = meter.parent
