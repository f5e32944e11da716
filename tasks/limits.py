"""Prefect global concurrency and rate limits, created active before use (a missing or inactive limit
limits nothing, with only a warning), and held per phase, not per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

PREFIX = "batchflows"
LEASE_S = 60


def limit_name(service: str) -> str:
    return f"{PREFIX}-{service}"


def rate_limit_name(service: str) -> str:
    return f"{PREFIX}-{service}-rpm"


def ensure_limit(name: str, limit: int, slot_decay_per_second: float | None = None) -> None:
    """Create the global limit `name`, or update it to this limit, active, with this decay."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=name, limit=limit, active=True, slot_decay_per_second=slot_decay_per_second or 0.0
                )
            )
            return
        if (existing.limit, existing.active, existing.slot_decay_per_second) != (
            limit,
            True,
            slot_decay_per_second or 0.0,
        ):
            client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(
                    limit=limit, active=True, slot_decay_per_second=slot_decay_per_second or 0.0
                ),
            )


def ensure_service_limits(service: str, concurrency_limit: int, rpm: float = 0) -> str | None:
    """Create the service's concurrency limit and, if `rpm` > 0, its requests-per-minute limit.

    Returns the rate limit's name (or None when there is none).
    """
    ensure_limit(limit_name(service), concurrency_limit)
    if rpm <= 0:
        return None
    # one slot that decays at rpm/60 per second: at most `rpm` calls start in any 60 s window
    ensure_limit(rate_limit_name(service), 1, rpm / 60)
    return rate_limit_name(service)


@contextlib.contextmanager
def hold(service: str, occupy: int) -> Iterator[None]:
    """Hold `occupy` slots of the service's global limit for the duration of a phase.

    The slots are leased for Prefect's minimum of 60 s and renewed while the phase runs, so a run killed
    with -9 gives its slots back within about 75 s (lease + the server's 15 s repossessor loop).
    """
    with concurrency(limit_name(service), occupy=occupy, strict=True, lease_duration=LEASE_S):
        yield
