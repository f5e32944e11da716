"""Score history and space versions: every scoring run's verdicts and figures, every configuration a space
had, in one SQL database next to the row ledger.

Where it lives: `history_url` of the RowLedger block (or BATCHFLOWS_HISTORY_URL); by default a SQLite file
beside the ledger (`~/.batchflows/history.sqlite`). Teams point it at their PostgreSQL
(`postgresql+psycopg://user:password@host/db`, the server Prefect uses will do), so every worker sees
one history.

Tables (keys: workspace host, space id, run id):
- `score_runs`: one row per scoring run: space etag and version, score, verdict counts, phase figures
  (calls, Genie latency p50/p95, retries, cache hits), circuit-breaker transitions, settings, report path.
- `score_rows`: one row per benchmark and run: verdict, stage, reason, latency, attempts, cached, flaky.
- `space_versions`: every configuration seen at scoring time or written by improve or rollback, numbered
  per space, with its diff against the previous version and the score it earned.

Or a schema of a SQL warehouse on request (`databricks://WAREHOUSE_ID/catalog.schema`): Delta tables
written and read through the Statement Execution API with parameter markers.

Migrations: `MIGRATIONS[k]` holds the statements that take the schema from version k to k + 1 (`{p}`
stands for the table-name prefix; VARCHAR/TEXT/DOUBLE PRECISION and primary keys are rewritten for a
warehouse, indexes skipped there); opening a store applies the missing ones, in one transaction each
where the database has them, and records the version in `batchflows_meta`. A change to the schema is a
new entry at the end, never an edit of an old one.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import sqlalchemy as sa
from sqlalchemy.engine import Engine

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE {p}space_versions (
            workspace VARCHAR(512) NOT NULL, space_id VARCHAR(128) NOT NULL, version INTEGER NOT NULL,
            etag VARCHAR(128), config_hash VARCHAR(64), config TEXT, diff TEXT, source VARCHAR(32) NOT NULL,
            run_id VARCHAR(64), created_at VARCHAR(32) NOT NULL, score DOUBLE PRECISION,
            PRIMARY KEY (workspace, space_id, version))""",
        """CREATE TABLE {p}score_runs (
            run_id VARCHAR(64) NOT NULL, workspace VARCHAR(512) NOT NULL, space_id VARCHAR(128) NOT NULL,
            etag VARCHAR(128), version INTEGER, created_at VARCHAR(32) NOT NULL, score DOUBLE PRECISION NOT NULL,
            total INTEGER NOT NULL, correct INTEGER NOT NULL, verdicts TEXT NOT NULL, figures TEXT NOT NULL,
            breaker_events TEXT NOT NULL, settings TEXT NOT NULL, report TEXT, PRIMARY KEY (run_id))""",
        "CREATE INDEX score_runs_space ON {p}score_runs (workspace, space_id, created_at)",
        """CREATE TABLE {p}score_rows (
            run_id VARCHAR(64) NOT NULL, benchmark_id VARCHAR(256) NOT NULL, verdict VARCHAR(32) NOT NULL,
            stage VARCHAR(32), reason TEXT, genie_latency_s DOUBLE PRECISION, attempts INTEGER,
            cached BOOLEAN, flaky BOOLEAN NOT NULL, PRIMARY KEY (run_id, benchmark_id))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
DECIDED = ("correct", "incorrect")  # verdicts on the answer; failures (genie_error, ...) say nothing of it
JSON_COLUMNS = ("verdicts", "figures", "breaker_events", "settings")
ROWS_PER_INSERT = 20  # rows of one multi-row INSERT on a warehouse (9 parameters a row)


def default_url(ledger_path: str | None = None) -> str:
    """BATCHFLOWS_HISTORY_URL, else a SQLite file beside the ledger."""
    if os.environ.get("BATCHFLOWS_HISTORY_URL"):
        return os.environ["BATCHFLOWS_HISTORY_URL"]
    from blocks.ledger import default_home

    folder = Path(ledger_path).parent if ledger_path else default_home()
    return f"sqlite:///{folder / 'history.sqlite'}"


@dataclass(frozen=True)
class Version:
    version: int
    etag: str | None
    config: dict[str, Any] | None
    diff: str
    source: str
    run_id: str | None
    created_at: str
    score: float | None


class HistoryError(RuntimeError):
    """The history database refused a statement, or is newer than this batchflows."""


Params = dict[str, Any]


class _Database:
    """Where the statements go: a SQLAlchemy engine, or a Databricks SQL warehouse."""

    name: str
    prefix: str = ""  # put before table names

    def query(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def execute(self, statements: list[tuple[str, Params | list[Params]]]) -> None:
        """Run the statements (one transaction where the database has them)."""
        raise NotImplementedError

    def ddl(self, statement: str) -> str | None:
        """A migration statement in this database's dialect (None: not for this database)."""
        return statement.format(p=self.prefix)


_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


class _SqlAlchemy(_Database):
    def __init__(self, url: str) -> None:
        with _LOCK:
            if url not in _ENGINES:
                if url.startswith("sqlite:///"):
                    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                real = url.replace("postgresql+asyncpg://", "postgresql+psycopg://")  # Prefect's URL works too
                engine = sa.create_engine(real, pool_pre_ping=True)
                if engine.dialect.name == "sqlite":
                    sa.event.listen(engine, "connect", _sqlite_pragmas)
                _ENGINES[url] = engine
            self.engine = _ENGINES[url]
        self.name = self.engine.dialect.name

    def query(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params or {})]

    def execute(self, statements: list[tuple[str, Params | list[Params]]]) -> None:
        with self.engine.begin() as conn:
            for sql, params in statements:
                conn.execute(sa.text(sql), params)


def _sqlite_pragmas(conn: Any, _: Any) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")


class _Warehouse(_Database):
    """Tables in a schema of a Databricks SQL warehouse (Delta tables), through the Statement Execution
    API with named parameter markers. Statements apply one at a time (no transaction); a run's rows go in
    after its run row, so a reader never sees rows without their run."""

    name = "databricks"

    def __init__(self, client: Any, warehouse_id: str, schema: str, timeout_s: float = 120) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", schema):
            raise HistoryError(f"history schema {schema!r} must be catalog.schema (letters, digits, underscores)")
        self.client, self.warehouse_id, self.timeout_s = client, warehouse_id, timeout_s
        self.prefix = f"{schema}."

    def query(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        from tasks.calls import run_sql

        result = run_sql(self.client, self.warehouse_id, sql, self.timeout_s, row_limit=1_000_000, parameters=params)
        if "error" in result:
            raise HistoryError(f"history on warehouse {self.warehouse_id}: {result['error']}")
        if result.get("truncated"):
            raise HistoryError(f"history on warehouse {self.warehouse_id}: result over the inline limit; ask less")
        return [tuple(row) for row in result["rows"]]

    def execute(self, statements: list[tuple[str, Params | list[Params]]]) -> None:
        for sql, params in statements:
            for one in params if isinstance(params, list) else [params]:
                self.query(sql, one)

    def ddl(self, statement: str) -> str | None:
        if statement.lstrip().upper().startswith("CREATE INDEX"):
            return None  # Delta tables have no indexes (data skipping and clustering instead)
        text = statement.format(p=self.prefix)
        text = re.sub(r"VARCHAR\(\d+\)|\bTEXT\b", "STRING", text)
        text = text.replace("DOUBLE PRECISION", "DOUBLE")
        return re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", text)  # informational only, and Unity Catalog only


def _open(url: str, client: Any | None) -> _Database:
    if url.startswith("databricks://"):
        parsed = urlparse(url)
        if client is None:
            raise HistoryError(f"history at {url} needs a workspace (a workspace block or databricks-sdk's settings)")
        return _Warehouse(client, parsed.netloc, parsed.path.strip("/"))
    return _SqlAlchemy(url)


def _in(name: str, values: list[Any]) -> tuple[str, Params]:
    """An IN list of named parameters: ("(:name0, :name1)", {"name0": ..., "name1": ...})."""
    params = {f"{name}{i}": v for i, v in enumerate(values)}
    return "(" + ", ".join(f":{k}" for k in params) + ")", params


class HistoryStore:
    """Scoring runs and space versions in the database at `url`, migrated on first use.

    `url` is a SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...) or `databricks://WAREHOUSE_ID/
    catalog.schema` for tables on a SQL warehouse (then `client` is the WorkspaceClient to use).
    """

    def __init__(self, url: str, client: Any | None = None) -> None:
        self.url = url
        self.db = _open(url, client)
        self._migrate()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (not for a warehouse)."""
        if not isinstance(self.db, _SqlAlchemy):
            raise HistoryError(f"history at {self.url} is not a SQLAlchemy database")
        return self.db.engine

    def _t(self, table: str) -> str:
        return self.db.prefix + table

    def _migrate(self) -> None:
        meta = self._t("batchflows_meta")
        bootstrap = self.db.ddl(
            "CREATE TABLE IF NOT EXISTS {p}batchflows_meta (key VARCHAR(64) NOT NULL, value TEXT NOT NULL)"
        )
        self.db.execute([(str(bootstrap), {})])
        found = self.db.query(f"SELECT value FROM {meta} WHERE key = 'schema_version'")
        current = int(found[0][0]) if found else 0
        if current > SCHEMA_VERSION:
            raise HistoryError(
                f"history at {self.url} has schema version {current}, newer than this batchflows knows "
                f"({SCHEMA_VERSION}); upgrade batchflows"
            )
        for k in range(current, SCHEMA_VERSION):
            steps: list[tuple[str, Params | list[Params]]] = [
                (sql, {}) for sql in (self.db.ddl(st) for st in MIGRATIONS[k]) if sql
            ]
            steps += [
                (f"DELETE FROM {meta} WHERE key = 'schema_version'", {}),
                (f"INSERT INTO {meta} (key, value) VALUES ('schema_version', :v)", {"v": str(k + 1)}),
            ]
            self.db.execute(steps)

    def workspaces(self, space_id: str) -> list[str]:
        """The workspaces whose history has a space of this id."""
        rows = self.db.query(
            f"SELECT workspace FROM {self._t('space_versions')} WHERE space_id = :s UNION "
            f"SELECT workspace FROM {self._t('score_runs')} WHERE space_id = :s",
            {"s": space_id},
        )
        return sorted(r[0] for r in rows)

    # --- versions ---

    def versions(self, workspace: str, space_id: str) -> list[Version]:
        rows = self.db.query(
            "SELECT version, etag, config, diff, source, run_id, created_at, score FROM "
            f"{self._t('space_versions')} WHERE workspace = :w AND space_id = :s ORDER BY version",
            {"w": workspace, "s": space_id},
        )
        return [
            Version(
                int(r[0]),
                r[1],
                json.loads(r[2]) if r[2] else None,
                r[3] or "",
                r[4],
                r[5],
                r[6],
                None if r[7] is None else float(r[7]),
            )
            for r in rows
        ]

    def version(self, workspace: str, space_id: str, number: int) -> Version | None:
        return next((v for v in self.versions(workspace, space_id) if v.version == number), None)

    def record_version(
        self,
        workspace: str,
        space_id: str,
        etag: str | None,
        config: dict[str, Any] | None,
        source: str,
        run_id: str | None,
    ) -> int:
        """The version number of this configuration: the latest one when a scoring run sees the configuration
        (or, with no configuration readable, the etag) unchanged, else a new version with its diff."""
        digest = _digest(config) if config is not None else None
        latest = self.db.query(
            f"SELECT version, etag, config_hash, config FROM {self._t('space_versions')} "
            "WHERE workspace = :w AND space_id = :s ORDER BY version DESC LIMIT 1",
            {"w": workspace, "s": space_id},
        )
        last = latest[0] if latest else None
        if last and source == "score" and (last[2] == digest if digest else last[1] == etag):
            return int(last[0])
        number = int(last[0]) + 1 if last else 1
        previous = json.loads(last[3]) if last and last[3] else None
        self.db.execute(
            [
                (
                    f"INSERT INTO {self._t('space_versions')} (workspace, space_id, version, etag, config_hash, "
                    "config, diff, source, run_id, created_at) VALUES (:w, :s, :v, :e, :h, :c, :d, :src, :r, :t)",
                    {
                        "w": workspace,
                        "s": space_id,
                        "v": number,
                        "e": etag,
                        "h": digest,
                        "c": json.dumps(config, ensure_ascii=False, sort_keys=True) if config is not None else None,
                        "d": config_diff(previous, config) if last else "",
                        "src": source,
                        "r": run_id,
                        "t": _now(),
                    },
                )
            ]
        )
        return number

    def set_version_score(self, workspace: str, space_id: str, version: int, score: float) -> None:
        self.db.execute(
            [
                (
                    f"UPDATE {self._t('space_versions')} SET score = :x "
                    "WHERE workspace = :w AND space_id = :s AND version = :v",
                    {"x": score, "w": workspace, "s": space_id, "v": version},
                )
            ]
        )

    # --- runs ---

    def _verdicts(self, run_ids: list[str]) -> dict[str, dict[str, tuple[str, bool]]]:
        found: dict[str, dict[str, tuple[str, bool]]] = {i: {} for i in run_ids}
        for start in range(0, len(run_ids), 200):
            marks, params = _in("r", run_ids[start : start + 200])
            rows = self.db.query(
                f"SELECT run_id, benchmark_id, verdict, flaky FROM {self._t('score_rows')} WHERE run_id IN {marks}",
                params,
            )
            for run_id, benchmark, verdict, flaky in rows:
                found[run_id][benchmark] = (verdict, bool(flaky))
        return found

    def _recent(self, workspace: str | None, space_id: str, limit: int, columns: str) -> list[tuple[Any, ...]]:
        where = "space_id = :s" + (" AND workspace = :w" if workspace else "")
        return self.db.query(
            f"SELECT {columns} FROM {self._t('score_runs')} WHERE {where} ORDER BY created_at DESC LIMIT {int(limit)}",
            {"s": space_id, **({"w": workspace} if workspace else {})},
        )

    def flaky(self, workspace: str, space_id: str, version: int | None, now: dict[str, str], window: int) -> set[str]:
        """Benchmarks whose verdict changed at least twice over the last `window` runs (this one included)
        of the same space version: noise of Genie's, not an effect of the configuration."""
        runs = self._recent(workspace, space_id, window - 1, "run_id, version")
        same = []
        for run_id, run_version in runs:
            if run_version != version:
                break
            same.append(run_id)
        verdicts = self._verdicts(same)
        history = [now] + [{b: v for b, (v, _) in verdicts[r].items()} for r in same]
        flaky = set()
        for benchmark in now:
            seen = [h[benchmark] for h in reversed(history) if h.get(benchmark) in DECIDED]
            if sum(1 for a, b in itertools.pairwise(seen) if a != b) >= 2:
                flaky.add(benchmark)
        return flaky

    def append_run(self, run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """One scoring run and its per-benchmark rows (one transaction where the database has them)."""
        values = {
            **run,
            "created_at": run.get("created_at") or _now(),
            **{k: json.dumps(run[k], default=str) for k in JSON_COLUMNS},
        }
        statements: list[tuple[str, Params | list[Params]]] = [
            (
                f"INSERT INTO {self._t('score_runs')} (run_id, workspace, space_id, etag, version, created_at, score, "
                "total, correct, verdicts, figures, breaker_events, settings, report) VALUES (:run_id, :workspace, "
                ":space_id, :etag, :version, :created_at, :score, :total, :correct, :verdicts, :figures, "
                ":breaker_events, :settings, :report)",
                values,
            )
        ]
        columns = ("benchmark_id", "verdict", "stage", "reason", "genie_latency_s", "attempts", "cached", "flaky")
        full = [{**r, "reason": str(r.get("reason") or "")[:1000]} for r in rows]
        for start in range(0, len(full), ROWS_PER_INSERT):
            part = full[start : start + ROWS_PER_INSERT]
            marks = ", ".join("(:run_id, " + ", ".join(f":{c}{i}" for c in columns) + ")" for i in range(len(part)))
            params = {"run_id": run["run_id"], **{f"{c}{i}": r.get(c) for i, r in enumerate(part) for c in columns}}
            statements.append(
                (f"INSERT INTO {self._t('score_rows')} (run_id, {', '.join(columns)}) VALUES {marks}", params)
            )
        self.db.execute(statements)

    def runs(self, workspace: str | None, space_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The last `limit` runs of a space, oldest first, with their verdicts by benchmark."""
        found = self._recent(
            workspace,
            space_id,
            limit,
            "run_id, workspace, etag, version, created_at, score, total, correct, figures, breaker_events, report",
        )
        verdicts = self._verdicts([r[0] for r in found])
        keys = ("run_id", "workspace", "etag", "version", "created_at", "score", "total", "correct")
        out = []
        for r in reversed(found):
            run = dict(zip(keys, r[:8], strict=True))
            run["score"] = float(run["score"])
            run.update(figures=json.loads(r[8]), breaker_events=json.loads(r[9]), report=r[10])
            run["verdicts"] = {b: v for b, (v, _) in verdicts[r[0]].items()}
            run["flaky"] = sorted(b for b, (_, f) in verdicts[r[0]].items() if f)
            out.append(run)
        return out


def config_diff(before: dict[str, Any] | None, after: dict[str, Any] | None, limit: int = 20000) -> str:
    """A unified diff of two configurations as sorted, indented JSON (cut at `limit` characters)."""

    def lines(config: dict[str, Any] | None) -> list[str]:
        return json.dumps(config, indent=1, sort_keys=True, ensure_ascii=False).splitlines() if config else []

    text = "\n".join(difflib.unified_diff(lines(before), lines(after), "before", "after", lineterm="", n=1))
    return text if len(text) <= limit else text[:limit] + "\n... (diff cut)"


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
