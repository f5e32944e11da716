"""SQL statement execution on DuckDB, shaped like the Databricks Statement Execution API."""

from __future__ import annotations

import hashlib
import json
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


INLINE_LIMIT_BYTES = 25 * 2**20  # 26,214,400: the Statement Execution API's INLINE cap
INLINE_LIMIT_MESSAGE = (
    "Inline byte limit exceeded. Statements executed with disposition=INLINE can have a result size of at most "
    "{limit} bytes. Please execute the statement with disposition=EXTERNAL_LINKS if you want to download the "
    "full result."
)


@dataclass
class Statement:
    statement_id: str
    submitted: float
    ready_at: float
    result: dict[str, Any] | None = None
    error: StatementError | None = None
    canceled: bool = False
    disposition: str = "INLINE"
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (row_offset, row_count)
    link_secret: str = field(default_factory=lambda: uuid.uuid4().hex)
    link_ttl_s: float = 900.0
    queued_until: float = 0.0  # a cold warehouse: PENDING until then

    def state(self, now: float) -> str:
        if self.canceled:
            return "CANCELED"
        if now < self.queued_until:
            return "PENDING"
        if now < self.ready_at:
            return "PENDING" if now < self.submitted + (self.ready_at - self.submitted) / 4 else "RUNNING"
        return "FAILED" if self.error else "SUCCEEDED"

    def as_response(self, now: float, base_url: str) -> dict[str, Any]:
        state = self.state(now)
        body: dict[str, Any] = {"statement_id": self.statement_id, "status": {"state": state}}
        if state == "FAILED" and self.error:
            body["status"]["error"] = {"error_code": self.error.error_code, "message": str(self.error)}
        if state == "SUCCEEDED" and self.result:
            body["manifest"] = self.manifest()
            body["result"] = self.chunk(0, base_url)
        return body

    def manifest(self) -> dict[str, Any]:
        assert self.result is not None
        return {
            "format": "JSON_ARRAY",
            "schema": self.result["schema"],
            "total_row_count": len(self.result["rows"]),
            "total_chunk_count": len(self.chunks),
            "total_byte_count": self.result["bytes"],
            "truncated": self.result["truncated"],
            "chunks": [
                {"chunk_index": i, "row_offset": offset, "row_count": count}
                for i, (offset, count) in enumerate(self.chunks)
            ],
        }

    def chunk(self, index: int, base_url: str) -> dict[str, Any]:
        """Chunk `index` as the API returns it: rows inline, or a link to them (EXTERNAL_LINKS)."""
        assert self.result is not None
        offset, count = self.chunks[index]
        body: dict[str, Any] = {"chunk_index": index, "row_offset": offset, "row_count": count}
        if index + 1 < len(self.chunks):
            body["next_chunk_index"] = index + 1
            body["next_chunk_internal_link"] = f"/api/2.0/sql/statements/{self.statement_id}/result/chunks/{index + 1}"
        if self.disposition == "INLINE":
            body["data_array"] = self.result["rows"][offset : offset + count]
            return body
        expires = time.time() + self.link_ttl_s
        link = {
            **body,
            "external_link": f"{base_url}/sandbox/external/{self.statement_id}/{index}"
            f"?expires={int(expires)}&signature={self.signature(index, int(expires))}",
            "expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
            "byte_count": len(json.dumps(self.result["rows"][offset : offset + count])),
        }
        return {"external_links": [link]}

    def signature(self, index: int, expires: int) -> str:
        return hashlib.sha256(f"{self.link_secret}:{index}:{expires}".encode()).hexdigest()[:32]


def split_chunks(rows: list[list[Any]], chunk_bytes: int) -> list[tuple[int, int]]:
    """(row_offset, row_count) of consecutive chunks of about `chunk_bytes` of JSON each (one at least)."""
    chunks: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, row in enumerate(rows):
        size += len(json.dumps(row)) + 1
        if size >= chunk_bytes:
            chunks.append((start, i + 1 - start))
            start, size = i + 1, 0
    if start < len(rows) or not chunks:
        chunks.append((start, len(rows) - start))
    return chunks


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
        self.cold_start_s = 0.0
        self.warm_at: float | None = 0.0  # running since the start; None: stopped

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

    def stop(self, cold_start_s: float) -> None:
        """Stop the warehouse: the next statement or Genie question starts it, and it serves after
        `cold_start_s` (statements PENDING, Genie messages PENDING_WAREHOUSE meanwhile)."""
        with self._lock:
            self.cold_start_s, self.warm_at = cold_start_s, None

    def warm_at_time(self, now: float) -> float:
        """When the warehouse serves, starting it now if it is stopped."""
        with self._lock:
            if self.warm_at is None:
                self.warm_at = now + self.cold_start_s
            return self.warm_at

    def state(self, now: float) -> str:
        with self._lock:
            if self.warm_at is None:
                return "STOPPED"
            return "STARTING" if now < self.warm_at else "RUNNING"

    def run(
        self, sql: str, row_limit: int | None = None, parameters: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Run Databricks SQL `sql` (transpiled to DuckDB's dialect) and return its result:
        {"schema", "rows" (JSON_ARRAY text cells), "truncated", "bytes"}."""
        if not self.allow_writes:
            self.check_read_only(sql)
        sql = bind_parameters(sql, parameters or [])
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
                "type_name": "ARRAY" if dtype.endswith("[]") else _TYPE_NAMES.get(dtype.split("(")[0], "STRING"),
                "type_text": _type_text(dtype),
                "position": i,
                **_precision(dtype),
            }
            for i, (name, dtype) in enumerate(columns)
        ]
        return {
            "schema": {"column_count": len(columns), "columns": schema_columns},
            "rows": data,
            "truncated": truncated,
            "bytes": len(json.dumps(data)),
        }

    def submit(
        self,
        sql: str,
        latency_s: float,
        row_limit: int | None,
        parameters: list[dict[str, Any]] | None = None,
        disposition: str = "INLINE",
        contracts: Any = None,
    ) -> Statement:
        now = time.time()
        start = max(now, self.warm_at_time(now))
        stmt = Statement(uuid.uuid4().hex, now, start + latency_s, disposition=disposition, queued_until=start)
        chunk_bytes = contracts.chunk_bytes if contracts else 2**20
        inline_limit = contracts.inline_limit_bytes if contracts else INLINE_LIMIT_BYTES
        if contracts:
            stmt.link_ttl_s = contracts.link_ttl_s
        try:
            stmt.result = self.run(sql, row_limit, parameters)
            if disposition == "INLINE" and stmt.result["bytes"] > inline_limit:
                stmt.result = None
                raise StatementError(INLINE_LIMIT_MESSAGE.format(limit=inline_limit))
            stmt.chunks = split_chunks(stmt.result["rows"], chunk_bytes if disposition == "INLINE" else 16 * 2**20)
        except StatementError as exc:
            stmt.error = exc
        with self._lock:
            self._statements[stmt.statement_id] = stmt
        return stmt

    def get(self, statement_id: str) -> Statement | None:
        with self._lock:
            return self._statements.get(statement_id)


def _type_text(dtype: str) -> str:
    base = dtype.split("(")[0]
    names = {"VARCHAR": "STRING", "INTEGER": "INT", "HUGEINT": "DECIMAL(38,0)", "TIMESTAMP WITH TIME ZONE": "TIMESTAMP"}
    return names.get(base, dtype)


def _precision(dtype: str) -> dict[str, int]:
    match = re.fullmatch(r"DECIMAL\((\d+),\s*(\d+)\)", dtype)
    if match:
        return {"type_precision": int(match.group(1)), "type_scale": int(match.group(2))}
    return {"type_precision": 38, "type_scale": 0} if dtype == "HUGEINT" else {}


_NUMERIC = {"TINYINT", "SMALLINT", "INT", "INTEGER", "BIGINT", "LONG", "FLOAT", "DOUBLE", "DECIMAL"}


def bind_parameters(sql: str, parameters: list[dict[str, Any]]) -> str:
    """Databricks SQL `sql` written in DuckDB's dialect, its named parameter markers (:name) replaced by the
    typed values as the Statement Execution API binds them: each {"name", "value" (text, or absent for
    NULL), "type" (default STRING)}. Valid Databricks SQL fails only where DuckDB lacks the feature.

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
    if tree is None:
        raise StatementError("[PARSE_SYNTAX_ERROR] Syntax error: empty statement")
    for marker in list(tree.find_all(exp.Placeholder)):
        if marker.name not in values:
            raise StatementError(f"[UNBOUND_SQL_PARAMETER] Found the unbound parameter: {marker.name}")
        marker.replace(values[marker.name].copy())
    return tree.sql(dialect="duckdb")


def _text(value: Any) -> str:
    if isinstance(value, list | dict):  # ARRAY, MAP and STRUCT cells are JSON text, as Databricks sends them
        return json.dumps(value, default=str)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
