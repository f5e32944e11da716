"""A graceful stop for the whole process: after SIGINT or SIGTERM no new call starts, calls in flight finish
(or reach their own timeout), and every row not called is recorded as failed ("interrupted"), so the job
still writes its report and failure records, and releases its slots, before the command exits non-zero.

The CLI installs the handlers (`graceful_signals`); the engine asks `reason()` before each call and
sleeps with `sleep`, which wakes at once when a stop is requested.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_STOP = threading.Event()
_WHY: list[str] = []


def request(why: str) -> None:
    """Stop starting calls, for `why` (e.g. "interrupted by SIGTERM")."""
    if not _STOP.is_set():
        _WHY.append(why)
        _STOP.set()


def reason() -> str | None:
    """Why the process is stopping, or None while it is not."""
    return _WHY[0] if _STOP.is_set() else None


def sleep(seconds: float) -> None:
    """time.sleep that returns early once a stop is requested."""
    _STOP.wait(max(0.0, seconds))


def clear() -> None:
    """Forget a stop (the next command in the same process, or a test)."""
    _STOP.clear()
    _WHY.clear()


@contextlib.contextmanager
def graceful_signals(on_first: Any = None) -> Iterator[None]:
    """Inside the block, the first SIGINT or SIGTERM requests a graceful stop (`on_first(signal name)` is told);
    a second one interrupts at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if _STOP.is_set():
            raise KeyboardInterrupt(f"second {name}: quitting without waiting")
        request(f"interrupted by {name}")
        if on_first is not None:
            on_first(name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_code() -> int | None:
    """The conventional exit status for the signal that stopped the process (130 SIGINT, 143 SIGTERM)."""
    why = reason()
    if why is None:
        return None
    return 128 + (signal.SIGTERM if why.endswith("SIGTERM") else signal.SIGINT) if sys.platform != "win32" else 1
