"""Reports: a DataFrame per job written as Parquet and CSV, plus Prefect table and markdown artifacts."""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd


def stable_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts: the identity of a row for a given step."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def write_frame(frame: pd.DataFrame, directory: Path, stem: str) -> dict[str, str]:
    """Write `frame` as Parquet and CSV under `directory`; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    parquet, csv = directory / f"{stem}.parquet", directory / f"{stem}.csv"
    frame.to_parquet(parquet, index=False)
    frame.to_csv(csv, index=False)
    return {"parquet": str(parquet), "csv": str(csv)}


@contextmanager
def published_alongside() -> Iterator[None]:
    """Artifacts published inside are sent from threads while the run goes on (each is a round trip to the
    Prefect server, ~8 ms when it is busy), and are all in when the block ends, which raises the first failure.
    The scoring flow writes its files meanwhile: its report is ready sooner."""
    pending: list[Future[Any]] = []
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="bf-artifacts") as pool:
        token = _ALONGSIDE.set((pool, pending))
        try:
            yield
        finally:
            _ALONGSIDE.reset(token)
    for future in pending:  # the pool's end waited for them all
        future.result()


_ALONGSIDE: ContextVar[tuple[ThreadPoolExecutor, list[Future[Any]]] | None] = ContextVar(
    "batchflows_artifacts_alongside", default=None
)


def publish(key: str, table: list[dict[str, Any]], markdown: str) -> None:
    """Table and markdown artifacts for the current run (no-op outside a Prefect run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if _in_a_run():
        _send(create_table_artifact, key=f"{key}-rows", table=table, description=f"{key}: one row per item")
        _send(create_markdown_artifact, key=f"{key}-summary", markdown=markdown, description=f"{key}: summary")


def publish_markdown(key: str, markdown: str) -> None:
    """A markdown artifact for the current run (no-op outside a Prefect run)."""
    from prefect.artifacts import create_markdown_artifact

    if _in_a_run():
        _send(create_markdown_artifact, key=key, markdown=markdown, description=key.replace("-", " "))


def _in_a_run() -> bool:
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:
        return False
    return True


def _send(create: Callable[..., Any], **artifact: Any) -> None:
    """Create an artifact now, or from a thread inside `published_alongside` (with this run's context)."""
    alongside = _ALONGSIDE.get()
    if alongside is None:
        create(**artifact)
        return
    pool, pending = alongside
    pending.append(pool.submit(contextvars.copy_context().run, partial(create, **artifact)))
