"""Prefect global concurrency and rate limits, created active before use (a missing or inactive limit
limits nothing, with only a warning), and held per phase, not per call.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse, MinimalConcurrencyLimitResponse
from prefect.events import Event, emit_event
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

from blocks.ledger import default_home
from tasks import stopping
from tasks.local_server import private_api_url
from tasks.prefect_client import BUSY, busy_pause, quick_retry_settings
from tasks.resilience import later, run_logger

T = TypeVar("T")

PREFIX = "batchflows"
LEASE_S = 60
RENEW_S = LEASE_S / 3  # a lease is renewed this often while its phase runs
RATE_RETRIES = 20  # a slot's request answered 502/503/504 this often in a row: `PrefectBusy` (see `_patiently`)
SLOT_AGAIN_AFTER_S = tuple(busy_pause(n) for n in range(1, RATE_RETRIES + 1))
SLOT_CHECK_S = 30  # a phase waiting for slots looks for dead holders, and says why it waits, this often
SLOT_WAIT_S = float(os.environ.get("BATCHFLOWS_SLOT_WAIT_S", 900))  # then gives up with the reason
BUSY_PATIENCE_S = 60.0  # a slot request or release a busy Prefect server refuses is asked again this long


class SlotWaitError(RuntimeError):
    """A phase could not get its service's slots within SLOT_WAIT_S; the message says who holds them."""


def limit_name(service: str) -> str:
    """`service` is a service of one workspace, e.g. "genie-local-sandbox" (see `scoped`)."""
    return f"{PREFIX}-{service}"


def rate_limit_name(service: str) -> str:
    return f"{PREFIX}-{service}-rpm"


def scoped(service: str, workspace: str) -> str:
    """The name of `service` of one workspace (`blocks.workspace.workspace_slug`): its limits are its own."""
    return f"{service}-{workspace}" if workspace else service


def ensure_limit(name: str, limit: int, slot_decay_per_second: float = 0.0, change: bool = False) -> tuple[int, float]:
    """Create the global limit `name` (active, with this limit and decay) if missing; returns the (limit, decay)
    in force.

    A limit that exists already is shared by every run and may have been set on purpose (`batchflows limits
    --set`, the UI's Concurrency page): a run that wants another value says so and uses the existing one,
    unless `change`. An inactive limit limits nothing, so it is switched on.
    """
    wanted = {"limit": limit, "active": True, "slot_decay_per_second": slot_decay_per_second}
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, **wanted))
                return limit, slot_decay_per_second
            except ObjectAlreadyExists:  # another run created it a moment ago: that one is shared
                existing = client.read_global_concurrency_limit_by_name(name)
        if change:
            update = wanted
        else:
            update = {"active": True} if not existing.active else {}
            have = (existing.limit, existing.slot_decay_per_second)
            if not math.isclose(have[1], slot_decay_per_second) or have[0] != limit:
                run_logger().warning(
                    f"{name}, shared by every run, stays at {_describe(*have)}; this run's settings ask for "
                    f"{_describe(limit, slot_decay_per_second)} (change the limit with `batchflows limits --set "
                    f"{name}=VALUE` or on the Prefect UI's Concurrency page)"
                )
            limit, slot_decay_per_second = have
        if update:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**update))
    return limit, slot_decay_per_second


def _describe(limit: int, decay: float) -> str:
    return f"{decay * 60:g} calls a minute" if decay else f"{limit} at once"


@dataclass(frozen=True)
class RateLimit:
    """A global requests-per-minute limit; calling it waits for one request's slot."""

    name: str
    per_minute: float

    def __call__(self) -> None:
        take_rate_slot(self.name, 60 / self.per_minute)


def rate_limit_for(service: str, rpm: float) -> RateLimit | None:
    """The service's requests-per-minute limit as `ensure_service_limits` sets it up (no API call)."""
    return RateLimit(rate_limit_name(service), rpm) if rpm > 0 else None


def ensure_service_limits(service: str, concurrency_limit: int, rpm: float = 0) -> tuple[int, RateLimit | None]:
    """The service's concurrency limit and, if `rpm` > 0, its requests-per-minute limit, created if missing
    (see `ensure_limit`: existing ones are kept). Returns (the concurrency limit in force, the rate limit in
    force or None)."""
    concurrency_limit, _ = ensure_limit(limit_name(service), concurrency_limit)
    freed = reclaim(limit_name(service))
    if freed:
        run_logger().warning(f"Gave back {freed} slot(s) of {limit_name(service)} left taken by runs that died")
    if rpm <= 0:
        return concurrency_limit, None
    # one slot that decays at rpm/60 per second: at most `rpm` calls start in any 60 s window
    _, decay = ensure_limit(rate_limit_name(service), 1, rpm / 60)
    return concurrency_limit, rate_limit_for(service, decay * 60)


@contextlib.contextmanager
def hold(service: str, occupy: int, cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold `occupy` slots of the service's global limit for the duration of a phase.

    The slots are leased for Prefect's minimum of 60 s, with this flow run recorded as the lease's holder,
    and renewed while the phase runs. A process killed with -9 cannot release them: the
    server takes them back when the lease lapses (about 75 s with `prefect server`; never with the ephemeral
    API, which runs no repossessor). So each holder leaves a note in BATCHFLOWS_HOME, written before it asks
    for the slots, and the next run on this machine gives back the slots of dead processes at once
    (`reclaim`).

    A server restart drops every lease (Prefect keeps them in memory) but not the slots they counted, and
    Prefect's release of an unknown lease does nothing: the slots would stay taken for good. So a lease the
    server no longer knows at release is given back by count. A wait for slots checks for dead holders
    every SLOT_CHECK_S, logs who holds the slots, and after SLOT_WAIT_S raises `SlotWaitError` saying so.
    A wait ends without slots when the process is stopping or `cancel` is set (within a second).

    Inside `tasks.resilience.alongside()` the slots go back from a thread, and what follows the block goes on
    at once. A release the server refuses for BUSY_PATIENCE_S is logged, not raised (the phase's rows are
    done), and its note is left for `reclaim`: the next run that waits for the slots gives them back.

    Only public Prefect client calls are used (increment-with-lease, renew, release), so the note can be
    written before the slots are taken: a process killed in between leaves a note, never untracked slots.
    """
    name = limit_name(service)
    note = _lease_dir() / f"{uuid.uuid4()}.json"
    info: dict[str, Any] = {"pid": os.getpid(), "api": _api_url(), "limit": name, "occupy": occupy}
    note.write_text(json.dumps(info))
    try:
        granted = _acquire(name, occupy, cancel)
    except BaseException:
        note.unlink(missing_ok=True)
        raise
    if granted is None:  # stopping, or cancelled: the rows make no call, so they need no slot
        note.unlink(missing_ok=True)
        yield
        return
    lease_id, limit = granted.lease_id, granted.limits[0]
    info["lease_id"] = str(lease_id)
    note.write_text(json.dumps(info))
    acquired = _emit("acquired", limit, occupy)
    started = time.monotonic()
    renewing = threading.Event()
    renewer = threading.Thread(  # with this thread's context: the Prefect API in use may be a context setting
        target=contextvars.copy_context().run, args=(_renew, lease_id, renewing), name=f"lease-{name}", daemon=True
    )
    renewer.start()

    def give_back() -> None:
        renewer.join()
        try:
            _release(lease_id, name, occupy, time.monotonic() - started)
        except Exception as exc:  # the phase's rows are done: its slots are left to the next run that waits
            note.write_text(json.dumps(info | {"pid": 0}))  # no live holder: `reclaim` releases it
            run_logger().warning(
                f"Could not give back {occupy} slot(s) of {name} in {BUSY_PATIENCE_S:.0f} s ({exc}): the next "
                "run that waits for them gives them back"
            )
            return
        note.unlink(missing_ok=True)
        _emit("released", limit, occupy, follows=acquired)

    try:
        yield
    finally:
        renewing.set()
        later(give_back)


def _emit(
    phase: str, limit: MinimalConcurrencyLimitResponse, occupy: int, follows: Event | None = None
) -> Event | None:
    """The event Prefect's own `concurrency()` emits when slots are acquired or released (same name and
    resource), so the UI's event feed and Automations see batchflows' slots like any other."""
    resource = {
        "prefect.resource.id": f"prefect.concurrency-limit.{limit.id}",
        "prefect.resource.name": limit.name,
        "slots-acquired": str(occupy),
        "limit": str(limit.limit),
    }
    return emit_event(f"prefect.concurrency-limit.{phase}", resource=resource, follows=follows)


def _acquire(name: str, occupy: int, cancel: threading.Event | None = None) -> ConcurrencyLimitWithLeaseResponse | None:
    """The lease on `occupy` slots of limit `name` (and the limit), waiting at most SLOT_WAIT_S (see `hold`);
    None if the process is stopping or `cancel` is set."""
    waited = 0.0
    holder = _holder()
    client = _fast_client()

    def going_on() -> bool:
        return stopping.reason() is None and not (cancel is not None and cancel.is_set())

    while going_on():
        asked = time.monotonic()
        while going_on() and time.monotonic() - asked < SLOT_CHECK_S:
            try:
                response = _patiently(
                    lambda: client.increment_concurrency_slots_with_lease(
                        names=[name], slots=occupy, mode="concurrency", lease_duration=LEASE_S, holder=holder
                    ),
                    going_on=going_on,
                )
            except PrefectBusy:
                if going_on():
                    raise
                break  # stopping or cancelled while the server was busy: no slots needed
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                stopping.sleep(min(float(exc.response.headers.get("Retry-After", 1)), 1.0))
                continue
            granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            if not granted.limits:
                raise SlotWaitError(f"there is no active global concurrency limit {name}")
            return granted
        if not going_on():
            break
        waited += time.monotonic() - asked
        freed = reclaim(name)
        limit = client.read_global_concurrency_limit_by_name(name)
        held = sum(int(info.get("occupy", 0)) for _, info in _notes(name) if "lease_id" in info)
        why = (
            f"{limit.active_slots} of {name}'s {limit.limit} slots are taken, {held} of them by live runs on "
            f"this machine{f'; gave back {freed} of dead runs' if freed else ''}"
        )
        if waited >= SLOT_WAIT_S:
            raise SlotWaitError(
                f"waited {waited:.0f} s for {occupy} slot(s): {why}. If no run holds the others (a Prefect "
                f"server restart can strand them), free them with `batchflows limits --reset {name}`"
            )
        run_logger().warning(f"Still waiting for {occupy} slot(s) after {waited:.0f} s: {why}")
    return None


def _holder() -> ConcurrencyLeaseHolder | None:
    """The flow run holding the slots, for the UI (None outside a flow run)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None


def _renew(lease_id: UUID, done: threading.Event) -> None:
    """Renew the lease every RENEW_S until `done` (a failed renewal is tried again next time: the lease lapses
    only after LEASE_S without one)."""
    with get_client(sync_client=True) as client:
        while not done.wait(RENEW_S):
            try:
                client.renew_concurrency_lease(lease_id, LEASE_S)
            except httpx.HTTPError as exc:
                run_logger().warning(f"Could not renew the lease on slots ({exc}); trying again")


def _release(lease_id: UUID, name: str, occupy: int, held_s: float) -> None:
    """Give the lease's slots back, asked again while the server is busy or out of reach (`_patiently`):
    slots not given back stay taken until their lease lapses, and for good on a server that runs no lease
    repossessor (the ephemeral API, Prefect's test harness). A full test run met a Prefect server on SQLite
    that refused a release for longer than the ~0.9 s of a `_fast_client`'s quick retries; the next phase then
    waited 900 s for slots nobody held."""
    _patiently(lambda: _release_once(lease_id, name, occupy, held_s), PrefectBusy, httpx.TransportError)


def _patiently(request: Callable[[], T], *again_on: type[Exception], going_on: Callable[[], bool] = lambda: True) -> T:
    """`request()`, asked again on `again_on` errors (a Prefect server still busy after a `_fast_client`'s
    quick retries, by default), after 0.1 s doubling to 2 s, for BUSY_PATIENCE_S or while `going_on()`; then
    the error is raised. A release goes on also while the process stops: it must still go out."""
    errors = again_on or (PrefectBusy,)
    deadline, pause = time.monotonic() + BUSY_PATIENCE_S, 0.1
    while True:
        try:
            return request()
        except errors:
            if time.monotonic() >= deadline or not going_on():
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _release_once(lease_id: UUID, name: str, occupy: int, held_s: float) -> None:
    client = _fast_client()
    try:
        client.renew_concurrency_lease(lease_id, LEASE_S)  # does the server still know it?
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code not in (404, 410):
            raise
        run_logger().warning(f"The Prefect server lost the lease on {occupy} slot(s) of {name}: given back")
        client.release_concurrency_slots(names=[name], slots=occupy, occupancy_seconds=held_s)
        return
    client.release_concurrency_slots_with_lease(lease_id)


class PrefectBusy(Exception):
    """The Prefect API answered 502, 503 or 504 to a request of a `_fast_client`."""


_FAST_CLIENTS: dict[tuple[Any, ...], SyncPrefectClient] = {}
_FAST_LOCK = threading.Lock()
_OPEN = contextlib.ExitStack()  # the cached clients, closed when the process exits
atexit.register(_OPEN.close)


def _fast_client() -> SyncPrefectClient:
    """A Prefect client for slot requests, one per process and API, opened once (a new one costs ~17 ms, and a
    phase asks for its slots and gives them back).

    A phase waits on its slots, and a Prefect server on SQLite answers 503 while its database is locked.
    Prefect's client retries that after a backoff of 2 s and more, and with PREFECT_CLIENT_MAX_RETRIES=0 it
    still sleeps that backoff before it returns the last answer (prefect 3.8 `_send_with_retry`): about one
    scoring run in six at concurrency 10 waited 2 s more (bench/score_scaling.py). So its transport asks again
    after `busy_pause` (5 ms, doubling to 50 ms; RATE_RETRIES times, ~0.9 s in all), and a response hook
    (public httpx and `get_client` settings) raises `PrefectBusy` on what is still refused, before Prefect's
    loop can sleep. `_patiently` then asks again, slower, for up to BUSY_PATIENCE_S.
    """
    key = (os.getpid(), PREFECT_API_URL.value(), PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value())
    with _FAST_LOCK:
        if key not in _FAST_CLIENTS:
            settings = quick_retry_settings(SLOT_AGAIN_AFTER_S) | {"event_hooks": {"response": [_raise_if_busy]}}
            _FAST_CLIENTS[key] = _OPEN.enter_context(get_client(sync_client=True, httpx_settings=settings))
        return _FAST_CLIENTS[key]


def _raise_if_busy(response: httpx.Response) -> None:
    if response.status_code in BUSY:
        raise PrefectBusy(f"the Prefect API answered {response.status_code} to {response.request.url.path}")


def drop_limits() -> list[str]:
    """Delete every batchflows limit of the current Prefect API (a clean slate: each is created again by the
    next run that needs it, from that run's settings). For benchmarks and tests that compare settings."""
    with get_client(sync_client=True) as client:
        names = [g.name for g in client.read_global_concurrency_limits(limit=200) if g.name.startswith(PREFIX)]
        for name in names:
            client.delete_global_concurrency_limit_by_name(name)
    return names


def reset_limit(name: str) -> int:
    """Set limit `name`'s taken slots to 0 (for slots no run holds); returns how many were taken."""
    with get_client(sync_client=True) as client:
        taken = client.read_global_concurrency_limit_by_name(name).active_slots
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    return int(taken)


def reclaim(name: str) -> int:
    """Give back the slots of limit `name` that no live run holds; returns how many came back.

    Leases of batchflows processes of this machine that died, and those a live run could not give back (its
    note then names no process: `hold`), are released at once. With the ephemeral
    API (no PREFECT_API_URL) leases live only in the memory of each process's own API server, so a dead
    process's slots would stay taken in the shared database for good: there every holder is on this
    machine and has a note, so the slots beyond the live notes' total are released by count.
    """
    freed, held = 0, 0
    shared_server = _api_url() != "ephemeral"
    with get_client(sync_client=True) as client:
        for note, info in _notes(name):
            if _alive(int(info.get("pid", 0))):
                held += int(info.get("occupy", 0))  # a holder still asking counts too: never free too many
                continue
            if shared_server and "lease_id" in info:  # the server knows the lease: release it (unless it lapsed)
                try:
                    client.release_concurrency_slots_with_lease(UUID(info["lease_id"]))
                except httpx.HTTPError:
                    continue  # the note stays for the next look
                freed += int(info.get("occupy", 0))
            note.unlink(missing_ok=True)
        if shared_server:
            return freed
        active = client.read_global_concurrency_limit_by_name(name).active_slots
        if active > held:
            client.release_concurrency_slots(names=[name], slots=active - held, occupancy_seconds=1)  # (must be > 0)
            freed += active - held
    return freed


def _notes(name: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for note in _lease_dir().glob("*.json"):
        try:
            info = json.loads(note.read_text())
        except (OSError, ValueError):
            continue
        if info.get("api") == _api_url() and info.get("limit") == name:
            yield note, info


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lease_dir() -> Path:
    path = default_home() / "leases"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _api_url() -> str:
    """The API whose slots a note is about; "ephemeral" for a server only this machine's runs use."""
    url = PREFECT_API_URL.value()
    return "ephemeral" if not url or url == private_api_url() else str(url)


_RATE_LOCKS: dict[str, threading.Lock] = {}
_RATE_LOCKS_LOCK = threading.Lock()
_RATE_NEXT: dict[str, float] = {}  # per limit: when the slot this process took last has decayed


def take_rate_slot(name: str, spacing_s: float = 1.0) -> None:
    """Wait for one slot of the global rate limit `name` (a limit of 1 whose slot decays in `spacing_s`).

    Prefect's own `rate_limit()` sleeps for the server's Retry-After, which grows with every waiting
    caller (slots + denied slots, times the decay interval, with jitter): four threads waiting on a
    15-per-minute limit slept ~16 s each, and 8 calls took 47 s instead of 30. Here one thread per
    process asks the server, the others queue on a local lock. The slot this process took last cannot
    be free before it has decayed (`spacing_s` after the request that took it), so nothing is asked until
    then. A denied request is asked again at once twice (the server's clock may be a few ms behind), then
    every tenth of the spacing, at least 50 ms apart (or after the server's Retry-After if shorter): another
    process holds the slot, and a waiting process polling faster only loads the server. So a run alone takes
    a slot every `spacing_s` plus a few ms, the server alone decides across processes, and a single run asks
    about once per slot. A 503 (a Prefect server on SQLite answers it when its database is locked) is asked
    again within milliseconds, not after the Prefect client's own ~2 s backoff (`_fast_client`): every call
    of the phase waits on this one.
    """
    with _RATE_LOCKS_LOCK:
        lock = _RATE_LOCKS.setdefault(name, threading.Lock())
    poll = max(0.05, spacing_s / 10)
    client = _fast_client()
    with lock:
        stopping.sleep(_RATE_NEXT.get(name, 0.0) - time.monotonic())
        denied = 0
        while stopping.reason() is None:  # stopping: no slot needed, the caller makes no call
            sent = time.monotonic()
            try:
                _patiently(
                    lambda: client.increment_concurrency_slots(names=[name], slots=1, mode="rate_limit"),
                    going_on=lambda: stopping.reason() is None,
                )
            except PrefectBusy:
                if stopping.reason() is None:
                    raise
                return  # stopping while the server was busy: the caller makes no call
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                denied += 1
                wait = 0.005 if denied <= 2 else min(poll, float(exc.response.headers.get("Retry-After", poll)))
                time.sleep(wait)
                continue
            _RATE_NEXT[name] = sent + spacing_s
            return
