"""Progress of phases, for whoever displays it (the CLI's rich bars). Listeners live in this process; a
flow run elsewhere (a worker) simply has none, and its progress is in its logs.

    with progress.listening(MyListener()):
        score(...)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol


class Listener(Protocol):
    def started(self, phase: str, total: int) -> None: ...

    def advanced(self, phase: str, done: int, failed: bool) -> None: ...

    def resized(self, phase: str, total: int) -> None: ...


_LISTENERS: list[Listener] = []
_LOCK = threading.Lock()


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    with _LOCK:
        _LISTENERS.append(listener)
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)


def started(phase: str, total: int) -> None:
    for listener in list(_LISTENERS):
        listener.started(phase, total)


def advanced(phase: str, done: int = 1, failed: bool = False) -> None:
    for listener in list(_LISTENERS):
        listener.advanced(phase, done, failed)


def resized(phase: str, total: int) -> None:
    """The phase's rows number `total` now (a phase whose rows arrive while it runs)."""
    for listener in list(_LISTENERS):
        listener.resized(phase, total)
