"""Call accounting from one place: every billable call counts itself where it is made, attempt by attempt.

The calls are Genie questions, statement submissions and endpoint invocations (tasks.calls, tasks.embed);
databricks-sdk makes no attempt of its own (blocks.workspace suppresses its retry loop), so one count per
attempt is what reaches the workspace: re-asks inside a batch, retries, calls of rows whose outcome was
later replaced (a breaker's fallback), refused and failed attempts. A phase reads its own count:

    with metered() as meter:
        run_phase(...)
    meter.calls  # questions asked, statements submitted, endpoints invoked

Meters nest (a job's meter sees its phases' calls) and follow the context into worker threads
(`contextvars.copy_context`, which Prefect's thread pool and `run_rows` both use).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

Kind = Literal["genie", "sql", "invocations"]


class Meter:
    """Call attempts counted while this meter (or a meter nested in it) was current."""

    def __init__(self, parent: Meter | None = None) -> None:
        self.parent = parent
        self.by_kind: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """Billable calls: Genie questions, statement submissions and endpoint invocations."""
        return sum(self.by_kind.values())

    def _add(self, counts: dict[str, int]) -> None:
        with self._lock:
            self.by_kind.update(counts)


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


def count(kind: Kind) -> None:
    """Count one attempt of a billable call on every current meter; called just before the request."""
    add({kind: 1})


def add(counts: dict[str, int]) -> None:
    """Count calls made elsewhere (by a task in another process: its meters are not this process's) on
    every current meter."""
    meter = _CURRENT.get()
    while meter is not None:
        meter._add(counts)
        meter = meter.parent
