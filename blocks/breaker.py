"""A circuit breaker kept in a Prefect Block, so its state outlives a run and is shared by workers."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any, Literal

from prefect.blocks.core import Block
from prefect.events import emit_event
from pydantic import Field, PrivateAttr

State = Literal["CLOSED", "OPEN", "HALF_OPEN"]
log = logging.getLogger("batchflows.breaker")


def breaker_name(service: str, workspace: str) -> str:
    """The breaker block of one service of one workspace (`workspace_slug`): `genie-breaker-local-sandbox`."""
    return f"{service}-breaker-{workspace}"


class CircuitBreaker(Block):
    """CLOSED → OPEN after `failure_threshold` consecutive failures → HALF_OPEN after `cooldown_s` →
    CLOSED on the next success (OPEN again on a failure).

    Thread-safe within a process. Each transition is saved to the Prefect API (when the block has a
    name), so the next run starts from the last state and the UI shows it; editing `state` to CLOSED
    in the UI resets it. The save runs in a thread, the latest state first: a call that moves the
    breaker does not wait on the Prefect API, whose client waits 2 s and more before asking a busy
    (SQLite: "database is locked") server again, longer than a short cooldown. `flush` waits for it.

    Example:
        breaker = CircuitBreaker.load_or_create("genie", failure_threshold=5)
        if breaker.allow():
            ...  # call, then breaker.record_success() or breaker.record_failure()
    """

    _block_type_name = "batchflows circuit breaker"
    _block_type_slug = "batchflows-circuit-breaker"
    _description = "Stops a job from hammering a failing service; open sends the rest to a sequential fallback."

    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: float = Field(
        60, ge=0, title="Cooldown (s)", description="seconds OPEN before a probe is allowed (HALF_OPEN)"
    )
    state: State = Field("CLOSED", description="CLOSED, OPEN or HALF_OPEN; set CLOSED to reset")
    consecutive_failures: int = Field(0, ge=0)
    opened_at: float | None = Field(None, description="epoch seconds when the circuit last opened")
    transitions: int = Field(0, ge=0, description="how many state changes this breaker has seen")

    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _probe_in_flight: bool = PrivateAttr(False)
    _events: list[str] = PrivateAttr(default_factory=list)
    _clock: Any = PrivateAttr(default=time.time)
    _persist: bool = PrivateAttr(True)
    _save_name: str | None = PrivateAttr(None)
    _saver: threading.Thread | None = PrivateAttr(None)
    _unsaved: bool = PrivateAttr(False)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a task in another process) as its settings, state and block name: the copy saves
        its transitions to the same block; its lock and events are its own process's."""
        return _restore, (type(self), self.model_dump(), self._save_name, self._persist)

    @classmethod
    def load_or_create(
        cls,
        name: str,
        failure_threshold: int | None = None,
        cooldown_s: float | None = None,
        persist: bool = True,
        new: tuple[int, float] = (5, 60),
    ) -> CircuitBreaker:
        """The saved breaker `name`, or a new CLOSED one saved under it with the threshold and cooldown `new`.

        The saved block's threshold and cooldown are the configuration (edit them in the UI); a run changes
        them only by passing `failure_threshold` or `cooldown_s`. A breaker set CLOSED by hand (the UI) while
        its failure count had reached the threshold starts again from 0 failures.
        """
        breaker: CircuitBreaker
        try:
            breaker = cls.load(name) if persist else cls()  # type: ignore[assignment]
            created = not persist
        except ValueError:
            breaker, created = cls(), True
        saved = None if created else breaker.model_dump()
        if created:
            breaker.failure_threshold, breaker.cooldown_s = new
        breaker.failure_threshold = failure_threshold or breaker.failure_threshold
        breaker.cooldown_s = breaker.cooldown_s if cooldown_s is None else cooldown_s
        if breaker.state == "CLOSED" and breaker.consecutive_failures >= breaker.failure_threshold:
            log.info(
                "Circuit breaker %s: reset by hand to CLOSED; failure count %s → 0", name, breaker.consecutive_failures
            )
            breaker.consecutive_failures, breaker.opened_at = 0, None
        breaker._persist, breaker._save_name = persist, name
        if persist and breaker.model_dump() != saved:  # saving an unchanged block costs a run ~50 ms
            breaker.save(name, overwrite=True)
        return breaker

    @property
    def events(self) -> list[str]:
        """Transitions seen by this process, in the seeds' log wording."""
        return list(self._events)

    def current_state(self) -> State:
        with self._lock:
            if self.state == "OPEN" and self._cooled_down():
                self._transition("HALF_OPEN", "Circuit breaker: Attempting to recover (HALF_OPEN)")
            return self.state

    def allow(self) -> bool:
        """Whether a call may go now. In HALF_OPEN only one probe at a time is allowed."""
        with self._lock:
            state = self.current_state()
            if state == "CLOSED":
                return True
            if state == "HALF_OPEN" and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            return False

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self.state != "OPEN" or self.opened_at is None:
                return 0.0
            return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def record_success(self) -> None:
        """A call succeeded. While OPEN, late answers of calls begun before it opened change nothing."""
        with self._lock:
            if self.state == "OPEN":
                return
            self._probe_in_flight = False
            self.consecutive_failures = 0
            if self.state == "HALF_OPEN":
                self._transition("CLOSED", "Circuit breaker: Service recovered (CLOSED)")

    def record_failure(self) -> None:
        with self._lock:
            if self.state == "OPEN":
                return
            self._probe_in_flight = False
            self.consecutive_failures += 1
            if self.state == "HALF_OPEN" or (
                self.state == "CLOSED" and self.consecutive_failures >= self.failure_threshold
            ):
                self.opened_at = self._clock()
                self._transition(
                    "OPEN", f"Circuit breaker: Too many failures ({self.consecutive_failures}) - OPENING circuit"
                )

    def _cooled_down(self) -> bool:
        return self.opened_at is not None and self._clock() >= self.opened_at + self.cooldown_s

    def _transition(self, state: State, message: str) -> None:
        self.state = state
        self.transitions += 1
        self._events.append(message)
        (log.error if state == "OPEN" else log.info)(message)
        if self._save_name:  # a Prefect event per transition, for an Automation to page someone on
            try:
                emit_event(
                    event=f"batchflows.circuit-breaker.{state.lower().replace('_', '-')}",
                    resource={"prefect.resource.id": f"batchflows.circuit-breaker.{self._save_name}"},
                    payload={"message": message, "consecutive_failures": self.consecutive_failures},
                )
            except Exception as exc:  # an event lost must not stop the calls
                log.warning("Circuit breaker: could not emit the %s event: %s", state, exc)
        if self._persist and self._save_name:
            self._unsaved = True
            if self._saver is None:
                # with this thread's context: the Prefect API in use may be a context setting
                self._saver = threading.Thread(
                    target=contextvars.copy_context().run, args=(self._save_unsaved,), name="breaker-save"
                )
                self._saver.start()

    def _save_unsaved(self) -> None:
        """Save the breaker's latest state until none is left unsaved (the interpreter waits for it at exit)."""
        while True:
            with self._lock:
                if not self._unsaved or not self._save_name:
                    self._saver = None
                    return
                self._unsaved = False
                latest = type(self).model_validate(self.model_dump())
            try:
                latest.save(self._save_name, overwrite=True)
            except Exception as exc:  # the breaker must keep working when the API hiccups
                log.warning("Circuit breaker: could not persist state %s: %s", latest.state, exc)

    def flush(self, timeout: float = 60) -> None:
        """Wait (at most `timeout` s) until the last transition is saved to the Prefect API."""
        saver = self._saver
        if saver is not None:
            saver.join(timeout)


def _restore(cls: type[CircuitBreaker], fields: dict[str, Any], save_name: str | None, persist: bool) -> CircuitBreaker:
    breaker = cls.model_validate(fields)
    breaker._save_name, breaker._persist = save_name, persist
    return breaker
