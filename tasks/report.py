"""Reports: a DataFrame per job written as Parquet and CSV, plus Prefect table and markdown artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.resilience import later


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


def publish(key: str, table: list[dict[str, Any]], markdown: str) -> None:
    """Table and markdown artifacts for the current run (no-op outside a Prefect run); inside
    `tasks.resilience.alongside()` they are sent from its threads, with this run's context."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if _in_a_run():
        later(create_table_artifact, key=f"{key}-rows", table=table, description=f"{key}: one row per item")
        later(create_markdown_artifact, key=f"{key}-summary", markdown=markdown, description=f"{key}: summary")


def publish_markdown(key: str, markdown: str) -> None:
    """A markdown artifact for the current run (no-op outside a Prefect run; sent as `publish` sends)."""
    from prefect.artifacts import create_markdown_artifact

    if _in_a_run():
        later(create_markdown_artifact, key=key, markdown=markdown, description=key.replace("-", " "))


def _in_a_run() -> bool:
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:
        return False
    return True
