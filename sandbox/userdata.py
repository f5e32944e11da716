"""A user's own tables in the sandbox warehouse, and recorded Genie answers, for offline rehearsal.

Tables: a folder of Parquet or CSV files (one table per file, named after the file; files in nested
folders go to a schema named after the folder) loaded into catalog `workspace`, schema `default` for
top-level files; or a DuckDB database file attached read-only as catalog `workspace`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb

from sandbox.genie import normalise_question

CATALOG = "workspace"
ROOT_SCHEMA = "default"
_NAME = re.compile(r"[^0-9A-Za-z_]+")


class UserDataError(ValueError):
    """Data or answers that cannot be used at all (missing path, nothing loadable)."""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_name(path: Path) -> str:
    return _NAME.sub("_", path.stem).strip("_").lower() or "t"


def load_tables(conn: duckdb.DuckDBPyConnection, path: str) -> tuple[str, list[str], list[str]]:
    """Load the user's tables into `conn`.

    Returns (default namespace for unqualified names, loaded table names, problems by file). A file that
    cannot be read is reported and the others still load.
    """
    root = Path(path)
    if not root.exists():
        raise UserDataError(f"--data {path}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() not in (".duckdb", ".db"):
            raise UserDataError(f"--data {path}: give a folder of Parquet/CSV files or a DuckDB database file")
        try:
            conn.execute(f"ATTACH {_literal(str(root))} AS {CATALOG} (READ_ONLY)")
        except duckdb.Error as exc:
            raise UserDataError(f"--data {path}: not a readable DuckDB database ({exc})") from exc
        tables = conn.execute(
            "SELECT schema_name || '.' || table_name FROM duckdb_tables() WHERE database_name = ? ORDER BY 1",
            [CATALOG],
        ).fetchall()
        return f"{CATALOG}.main", [t[0] for t in tables], []
    conn.execute(f"ATTACH ':memory:' AS {CATALOG}")
    loaded: list[str] = []
    problems: list[str] = []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".parquet", ".csv"))
    if not files:
        raise UserDataError(f"--data {path}: no .parquet or .csv files in the folder")
    for file in files:
        relative = file.relative_to(root)
        schema = ROOT_SCHEMA if len(relative.parts) == 1 else _table_name(Path(relative.parts[-2]))
        table = _table_name(file)
        reader = "read_parquet" if file.suffix.lower() == ".parquet" else "read_csv_auto"
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {CATALOG}.{_ident(schema)}")
            conn.execute(
                f"CREATE TABLE {CATALOG}.{_ident(schema)}.{_ident(table)} AS "
                f"SELECT * FROM {reader}({_literal(str(file))})"
            )
        except duckdb.Error as exc:
            problems.append(f"{relative}: {str(exc).splitlines()[0]}")
            continue
        loaded.append(f"{schema}.{table}")
    if not loaded:
        raise UserDataError(f"--data {path}: no file could be loaded: " + "; ".join(problems))
    return f"{CATALOG}.{_ident(ROOT_SCHEMA)}", loaded, problems


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def load_answers(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Recorded Genie answers from JSONL: {"question", "sql" | "text", "delay_ms"?, "error"?, "parameters"?}
    per line; `parameters` are the query attachment's [{"keyword", "sql_type", "value"}] for :keyword markers.

    Returns (answers, problems by line); a bad line is reported and the others are kept.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserDataError(f"--genie-answers {path}: cannot read it ({exc})") from exc
    answers: list[dict[str, Any]] = []
    problems: list[str] = []
    first: dict[str, tuple[int, dict[str, Any]]] = {}  # normalised question -> (line, answer)
    conflicts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {number}: not JSON ({exc})")
            continue
        if not isinstance(record, dict) or not str(record.get("question", "")).strip():
            problems.append(f"line {number}: needs a non-empty 'question'")
        elif not (record.get("sql") or record.get("text") is not None or record.get("error")):
            problems.append(f"line {number}: needs 'sql', 'text' or 'error'")
        elif "parameters" in record and not (
            isinstance(record["parameters"], list)
            and all(isinstance(p, dict) and str(p.get("keyword", "")).strip() for p in record["parameters"])
        ):
            problems.append(f"line {number}: 'parameters' must be a list of {{keyword, sql_type, value}}")
        elif "delay_ms" in record and not (isinstance(record["delay_ms"], int | float) and record["delay_ms"] >= 0):
            problems.append(f"line {number}: 'delay_ms' must be a number >= 0")
        else:
            key = normalise_question(str(record["question"]))
            if key not in first:
                first[key] = (number, record)
                answers.append(record)
            elif _answer(first[key][1]) != _answer(record):
                conflicts.append(f"line {number} answers the question of line {first[key][0]} differently")
            else:
                problems.append(f"line {number}: repeats line {first[key][0]} (same answer; kept once)")
    if conflicts:
        raise UserDataError(
            f"--genie-answers {path}: a question can have one recorded answer: " + "; ".join(conflicts[:20])
        )
    return answers, problems


def _answer(record: dict[str, Any]) -> tuple[Any, ...]:
    return (str(record.get("sql") or "").strip(), record.get("text"), record.get("error"))
