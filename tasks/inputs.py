"""Reading the rows a job works on: a file (CSV, JSONL, JSON, Parquet) or a warehouse query."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.calls import run_sql


class InputError(ValueError):
    """An input of a job is wrong: rows that cannot be read (file, query or columns), a setting, or a workspace
    object it names. The message says which and why."""


class _InputErrorsInOneLine(logging.Filter):
    """A flow run stopped by an `InputError` logs it in one line. Prefect's engine logs whatever a flow raises
    with its traceback: for a wrong column or file, ~20 lines of our code's insides on the terminal and in the
    UI, around the one line that says what to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


for _runs in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_runs).addFilter(_InputErrorsInOneLine())


def read_rows(path: str) -> pd.DataFrame:
    """Rows from CSV, JSONL (or JSON array) or Parquet, every column kept as read."""
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(file, dtype=str, keep_default_na=False)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(file, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(file, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(file)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read rows from {path}: {exc}") from exc
    raise InputError(f"{path}: unknown file type {suffix or '(none)'}; use .csv, .jsonl, .json or .parquet")


QUERY_ROW_CAP = 1_000_000  # rows one input query may bring (read chunk by chunk, or through external links)


def read_input(
    client: Any, input_path: str | None, query: str | None, warehouse_id: str | None, timeout_s: float
) -> pd.DataFrame:
    """Rows from a file or from a warehouse query (every chunk of its result; refused over QUERY_ROW_CAP)."""
    if bool(input_path) == bool(query):
        raise InputError("give exactly one of an input file or a SQL query")
    if input_path:
        return _checked(read_rows(input_path), input_path)
    if not warehouse_id:
        raise InputError("a SQL query needs a warehouse id")
    result = run_sql(client, warehouse_id, str(query), max(timeout_s * 4, 300), row_limit=QUERY_ROW_CAP)
    if "error" in result:
        raise InputError(f"the input query failed: {result['error']}")
    if result["truncated"]:
        raise InputError(
            f"the input query returned more than {QUERY_ROW_CAP:,} rows, the limit of one run; "
            "export the rows to a file (or narrow the query) so none is silently left out"
        )
    return _checked(pd.DataFrame(result["rows"], columns=result["columns"]), "the query")


def _checked(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    if frame.empty:
        raise InputError(f"{source} has no rows")
    return frame
