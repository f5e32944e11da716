"""SQL statement execution on DuckDB, shaped like the Databricks Statement Execution API."""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import duckdb
import sqlglot
from sqlglot import exp

from sandbox import domain
from sandbox.userdata import load_tables

WRITE_ROOTS = tuple(
    getattr(exp, name)
    for name in (
        "Insert",
        "Update",
        "Delete",
        "Create",
        "Drop",
        "Alter",
        "Merge",
        "TruncateTable",
        "Copy",
        "Grant",
        "Command",
    )
    if hasattr(exp, name)
)
ROW_CAP = 5000  # Genie's query-result cap; statements use their own row_limit

_TYPE_NAMES = {
    "BIGINT": "LONG",
    "DECIMAL": "DECIMAL",
    "INTEGER": "INT",
    "SMALLINT": "SHORT",
    "TINYINT": "BYTE",
    "HUGEINT": "DECIMAL",
    "DOUBLE": "DOUBLE",
    "FLOAT": "FLOAT",
    "VARCHAR": "STRING",
    "BOOLEAN": "BOOLEAN",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP",
}


class StatementError(Exception):
    """A statement the warehouse refuses or fails to run; becomes a FAILED status."""

    def __init__(self, message: str, error_code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.error_code = error_code


@dataclass
class Statement:
    statement_id: str
    submitted: float
    ready_at: float
    result: dict[str, Any] | None = None
    error: StatementError | None = None
    canceled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def state(self, now: float) -> str:
        if self.canceled:
            return "CANCELED"
        if now < self.ready_at:
            return "PENDING" if now < self.submitted + (self.ready_at - self.submitted) / 4 else "RUNNING"
        return "FAILED" if self.error else "SUCCEEDED"

    def as_response(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        body: dict[str, Any] = {"statement_id": self.statement_id, "status": {"state": state}}
        if state == "FAILED" and self.error:
            body["status"]["error"] = {"error_code": self.error.error_code, "message": str(self.error)}
        if state == "SUCCEEDED" and self.result:
            body.update(self.result)
        return body


_SYSTEM = re.compile(r"\bsystem\s*\.\s*information_schema\b", re.IGNORECASE)


class Warehouse:
    """One in-memory DuckDB database with the sample tables (or a user's), queried from many threads."""

    def __init__(self, seed: int = 7, allow_writes: bool = False, data: str | None = None) -> None:
        self._conn = duckdb.connect()
        domain.load_into(self._conn, seed)
        self.allow_writes = allow_writes
        self.warehouse_ids = {"sandbox-warehouse"}
        self.default_namespace = f"{domain.CATALOG}.{domain.SCHEMA}"
        self.user_tables: list[str] = []
        self.load_problems: list[str] = []
        if data:
            self.default_namespace, self.user_tables, self.load_problems = load_tables(self._conn, data)
        # statements must not read the host's files (read_text('/etc/passwd'), read_csv, COPY ... FROM),
        # nor turn that back on
        self._conn.execute("SET enable_external_access = false")
        self._conn.execute("SET lock_configuration = true")
        self._statements: dict[str, Statement] = {}
        self._lock = threading.Lock()

    def check_read_only(self, sql: str) -> None:
        try:
            trees = [t for t in sqlglot.parse(sql, read="databricks") if t is not None]
        except sqlglot.errors.ParseError as exc:
            raise StatementError(f"[PARSE_SYNTAX_ERROR] Syntax error: {exc}") from exc
        if len(trees) != 1:
            raise StatementError(f"[PARSE_SYNTAX_ERROR] Expected one statement, got {len(trees)}")
        if isinstance(trees[0], WRITE_ROOTS):
            kind = trees[0].key.upper()
            raise StatementError(
                f"[READ_ONLY] The sandbox warehouse is read-only: {kind} statements are not allowed",
                "PERMISSION_DENIED",
            )

    def run(
        self, sql: str, row_limit: int | None = None, parameters: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Run `sql` and return the manifest and inline JSON_ARRAY result of a finished statement."""
        if not self.allow_writes:
            self.check_read_only(sql)
        if parameters is not None:
            sql = bind_parameters(sql, parameters)
        cursor = self._conn.cursor()
        try:
            cursor.execute(f"USE {self.default_namespace}")
            relation = cursor.execute(_SYSTEM.sub(domain.INFO, sql))
            columns = [(d[0], str(d[1])) for d in relation.description or []]
            fetch = row_limit + 1 if row_limit else None
            rows = relation.fetchmany(fetch) if fetch else relation.fetchall()
        except duckdb.ParserException as exc:
            raise StatementError(f"[PARSE_SYNTAX_ERROR] {exc}") from exc
        except duckdb.Error as exc:
            raise StatementError(f"[{type(exc).__name__.upper()}] {exc}") from exc
        finally:
            cursor.close()
        truncated = bool(row_limit and len(rows) > row_limit)
        rows = rows[:row_limit] if row_limit else rows
        data = [[None if v is None else _text(v) for v in row] for row in rows]
        schema_columns = [
            {
                "name": name,
                "type_name": _TYPE_NAMES.get(dtype.split("(")[0], "STRING"),
                "type_text": dtype,
                "position": i,
            }
            for i, (name, dtype) in enumerate(columns)
        ]
        return {
            "manifest": {
                "format": "JSON_ARRAY",
                "schema": {"column_count": len(columns), "columns": schema_columns},
                "total_row_count": len(data),
                "total_chunk_count": 1,
                "truncated": truncated,
                "chunks": [{"chunk_index": 0, "row_offset": 0, "row_count": len(data)}],
            },
            "result": {"chunk_index": 0, "row_offset": 0, "row_count": len(data), "data_array": data},
        }

    def submit(
        self, sql: str, latency_s: float, row_limit: int | None, parameters: list[dict[str, Any]] | None = None
    ) -> Statement:
        now = time.time()
        stmt = Statement(uuid.uuid4().hex, now, now + latency_s)
        try:
            stmt.result = self.run(sql, row_limit, parameters)
        except StatementError as exc:
            stmt.error = exc
        with self._lock:
            self._statements[stmt.statement_id] = stmt
        return stmt

    def get(self, statement_id: str) -> Statement | None:
        with self._lock:
            return self._statements.get(statement_id)


_NUMERIC = {"TINYINT", "SMALLINT", "INT", "INTEGER", "BIGINT", "LONG", "FLOAT", "DOUBLE", "DECIMAL"}


def bind_parameters(sql: str, parameters: list[dict[str, Any]]) -> str:
    """`sql` with its named parameter markers (:name) replaced by the typed values, as the Statement
    Execution API binds them: each {"name", "value" (text, or absent for NULL), "type" (default STRING)}.

    Raises:
        StatementError: a marker without a value (UNBOUND_SQL_PARAMETER) or a value its type cannot hold.
    """
    values: dict[str, exp.Expression] = {}
    for p in parameters:
        name, value, kind = p.get("name"), p.get("value"), str(p.get("type") or "STRING").upper()
        if not name:
            raise StatementError("[INVALID_PARAMETER_VALUE] every parameter needs a name")
        base = kind.split("(")[0]
        try:
            if value is None:
                literal: exp.Expression = exp.Null()
            elif base in _NUMERIC:
                float(value)
                literal = exp.Literal.number(value)
            elif base == "BOOLEAN":
                literal = exp.Boolean(this={"true": True, "false": False}[str(value).lower()])
            elif base in ("DATE", "TIMESTAMP", "TIMESTAMP_NTZ"):
                literal = exp.Cast(this=exp.Literal.string(value), to=exp.DataType.build(base.replace("_NTZ", "")))
            else:
                literal = exp.Literal.string(value)
        except (ValueError, KeyError) as exc:
            raise StatementError(f"[INVALID_PARAMETER_VALUE] parameter {name}: {value!r} is not a {kind}") from exc
        values[name] = literal
    try:
        tree = sqlglot.parse_one(sql, read="databricks")
    except sqlglot.errors.ParseError as exc:
        raise StatementError(f"[PARSE_SYNTAX_ERROR] Syntax error: {exc}") from exc
    for marker in list(tree.find_all(exp.Placeholder)):
        if marker.name not in values:
            raise StatementError(f"[UNBOUND_SQL_PARAMETER] Found the unbound parameter: {marker.name}")
        marker.replace(values[marker.name].copy())
    return tree.sql(dialect="duckdb")


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
