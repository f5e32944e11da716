"""Adaptive concurrency: find how many calls a service takes at once instead of guessing.

Additive increase, multiplicative decrease (as TCP's congestion control): every `level` calls that succeed
in a row raise the level by one, up to the configured ceiling (which the shared global limit caps in turn);
a call the service refuses for load (429, or 503 with Retry-After) cuts it by a quarter, at most once per
round of calls in flight (refusals of calls sent before the last cut are the same congestion); a quota's
long Retry-After pauses every new call until it has passed. Back at the level that was refused, it probes
PROBE_SLOWER times less often. The level reached is kept per service and workspace (a Prefect
Variable) and is the next run's start.

    level = Adaptive(ceiling=20, level=learned_start("llm-local-sandbox", 20))
    level.succeeded()  # or level.throttled(sent_at, retry_after_s): each call's end moves level.level
    remember("llm-local-sandbox", level.level)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prefect.variables import Variable

from tasks.errors import BatchflowsError, RateLimited, ServerError

DECREASE = 0.75  # the level kept after a refusal (TCP halves; a gentler cut keeps ~0.9 of a hidden capacity)
PROBE_SLOWER = 4  # successes needed to try again the level that was refused last, in rounds of calls
PAUSE_AFTER_S = 2.0  # a Retry-After this long is a quota's, not a full pool's: every new call waits it out


def slows_down(error: BatchflowsError) -> bool:
    """A refusal for load: 429, or a 503 that says when to come back."""
    return isinstance(error, RateLimited) or (isinstance(error, ServerError) and error.retry_after_s is not None)


@dataclass
class Adaptive:
    """The concurrency level of one service's lane, moved by the calls' outcomes (thread-safe)."""

    ceiling: int
    level: int
    floor: int = 1
    paused_until: float = 0.0  # time.monotonic(): no new call before (the service's Retry-After)
    lowest: int = 0
    highest: int = 0
    cuts: int = 0
    _streak: int = 0
    _last_cut: float = -1.0
    _refused_at: int = 0  # the level that was refused last
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.level = max(self.floor, min(self.level, self.ceiling))
        self.lowest = self.highest = self.level

    def succeeded(self) -> str | None:
        """One call succeeded; a message when the level rose."""
        with self._lock:
            self._streak += 1
            needed = self.level * (PROBE_SLOWER if self.level + 1 >= self._refused_at > 0 else 1)
            if self._streak < needed or self.level >= self.ceiling:
                return None
            self._streak = 0
            self.level += 1
            self.highest = max(self.highest, self.level)
            return f"concurrency {self.level - 1} → {self.level} ({self.level - 1} calls in a row succeeded)"

    def throttled(self, sent_at: float, retry_after_s: float | None) -> str | None:
        """A call sent at `sent_at` (time.monotonic) was refused for load; a message when the level fell.

        The level is cut by a quarter (at least one). A long wait (a quota's: `PAUSE_AFTER_S` or more) or a
        refusal at the lowest level pauses every new call until the service's Retry-After has passed: no
        call could succeed before it. A short one is a full pool's: fewer calls at once are the fix, and the
        refused call alone waits its Retry-After (the retry policy)."""
        now = time.monotonic()
        with self._lock:
            self._streak = 0
            if retry_after_s and (retry_after_s >= PAUSE_AFTER_S or self.level <= self.floor):
                self.paused_until = max(self.paused_until, now + retry_after_s)
            if sent_at < self._last_cut:  # sent before the last cut: the same congestion, counted once
                return None
            self._last_cut, self._refused_at = now, self.level
            old, self.level = self.level, max(self.floor, min(self.level - 1, int(self.level * DECREASE)))
            self.cuts += 1
            self.lowest = min(self.lowest, self.level)
            paused = f", pausing {retry_after_s:g}s as asked" if self.paused_until > now else ""
            return f"concurrency {old} → {self.level} (the service refused a call for load{paused})"

    def summary(self) -> dict[str, int]:
        return {"level": self.level, "lowest": self.lowest, "highest": self.highest, "cuts": self.cuts}


def variable_name(limits: str) -> str:
    """The Prefect Variable holding the level learned for a service of a workspace (`PhaseSpec.limits`)."""
    return f"batchflows-adaptive-{limits}".replace(".", "-")[:255]


def learned_start(limits: str, ceiling: int) -> int:
    """The level the last adaptive run of this service and workspace reached (the ceiling the first time)."""
    value = Variable.get(variable_name(limits), default=None)
    try:
        return max(1, min(int(value), ceiling)) if value is not None else ceiling
    except (TypeError, ValueError):
        return ceiling


def remember(limits: str, level: int) -> None:
    Variable.set(variable_name(limits), level, overwrite=True)
