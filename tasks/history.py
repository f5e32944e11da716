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

Migrations: `MIGRATIONS[k]` holds the statements that take the schema from version k to k + 1; opening a
store applies the missing ones in one transaction each and records the version in `batchflows_meta`. A
change to the schema is a new entry at the end, never an edit of an old one.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
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
        "CREATE TABLE batchflows_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE space_versions (
            workspace VARCHAR(512) NOT NULL, space_id VARCHAR(128) NOT NULL, version INTEGER NOT NULL,
            etag VARCHAR(128), config_hash VARCHAR(64), config TEXT, diff TEXT, source VARCHAR(32) NOT NULL,
            run_id VARCHAR(64), created_at VARCHAR(32) NOT NULL, score DOUBLE PRECISION,
            PRIMARY KEY (workspace, space_id, version))""",
        """CREATE TABLE score_runs (
            run_id VARCHAR(64) PRIMARY KEY, workspace VARCHAR(512) NOT NULL, space_id VARCHAR(128) NOT NULL,
            etag VARCHAR(128), version INTEGER, created_at VARCHAR(32) NOT NULL, score DOUBLE PRECISION NOT NULL,
            total INTEGER NOT NULL, correct INTEGER NOT NULL, verdicts TEXT NOT NULL, figures TEXT NOT NULL,
            breaker_events TEXT NOT NULL, settings TEXT NOT NULL, report TEXT)""",
        "CREATE INDEX score_runs_space ON score_runs (workspace, space_id, created_at)",
        """CREATE TABLE score_rows (
            run_id VARCHAR(64) NOT NULL, benchmark_id VARCHAR(256) NOT NULL, verdict VARCHAR(32) NOT NULL,
            stage VARCHAR(32), reason TEXT, genie_latency_s DOUBLE PRECISION, attempts INTEGER,
            cached BOOLEAN, flaky BOOLEAN NOT NULL, PRIMARY KEY (run_id, benchmark_id))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
DECIDED = ("correct", "incorrect")  # verdicts on the answer; failures (genie_error, ...) say nothing of it
JSON_COLUMNS = ("verdicts", "figures", "breaker_events", "settings")


def default_url(ledger_path: str | None = None) -> str:
    """BATCHFLOWS_HISTORY_URL, else a SQLite file beside the ledger."""
    if os.environ.get("BATCHFLOWS_HISTORY_URL"):
        return os.environ["BATCHFLOWS_HISTORY_URL"]
    from blocks.ledger import default_home

    folder = Path(ledger_path).parent if ledger_path else default_home()
    return f"sqlite:///{folder / 'history.sqlite'}"


def workspace_key(host: str) -> str:
    """How a workspace is named in the history: its URL; any sandbox on this machine is "local-sandbox"
    (the CLI's embedded sandbox takes a new port each run, with the same spaces)."""
    host = host.rstrip("/")
    if urlparse(host).hostname in ("127.0.0.1", "localhost", "::1"):
        return "local-sandbox"
    return host


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


_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def _engine(url: str) -> Engine:
    with _LOCK:
        if url not in _ENGINES:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            url = url.replace("postgresql+asyncpg://", "postgresql+psycopg://")  # Prefect's URL works as well
            engine = sa.create_engine(url, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                sa.event.listen(engine, "connect", _sqlite_pragmas)
            _ENGINES[url] = engine
        return _ENGINES[url]


def _sqlite_pragmas(conn: Any, _: Any) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")


class HistoryStore:
    """Scoring runs and space versions in the database at `url` (migrated on first use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        self._migrate()

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            have = sa.inspect(conn).has_table("batchflows_meta")
            current = 0
            if have:
                row = conn.execute(sa.text("SELECT value FROM batchflows_meta WHERE key = 'schema_version'")).first()
                current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"history at {self.url} has schema version {current}, newer than this batchflows knows "
                    f"({SCHEMA_VERSION}); upgrade batchflows"
                )
        for k in range(current, SCHEMA_VERSION):
            with self.engine.begin() as conn:
                for statement in MIGRATIONS[k]:
                    conn.execute(sa.text(statement))
                conn.execute(sa.text("DELETE FROM batchflows_meta WHERE key = 'schema_version'"))
                conn.execute(
                    sa.text("INSERT INTO batchflows_meta (key, value) VALUES ('schema_version', :v)"), {"v": str(k + 1)}
                )

    def workspaces(self, space_id: str) -> list[str]:
        """The workspaces whose history has a space of this id."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT workspace FROM space_versions WHERE space_id = :s UNION "
                    "SELECT workspace FROM score_runs WHERE space_id = :s"
                ),
                {"s": space_id},
            ).all()
        return sorted(r[0] for r in rows)

    # --- versions ---

    def versions(self, workspace: str, space_id: str) -> list[Version]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT version, etag, config, diff, source, run_id, created_at, score FROM space_versions "
                    "WHERE workspace = :w AND space_id = :s ORDER BY version"
                ),
                {"w": workspace, "s": space_id},
            ).all()
        return [Version(r[0], r[1], json.loads(r[2]) if r[2] else None, r[3] or "", *r[4:]) for r in rows]

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
        """The version number of this configuration: the latest one when the configuration (or, with no
        configuration readable, the etag) is unchanged, else a new version with its diff."""
        digest = _digest(config) if config is not None else None
        with self.engine.begin() as conn:
            latest = conn.execute(
                sa.text(
                    "SELECT version, etag, config_hash, config FROM space_versions "
                    "WHERE workspace = :w AND space_id = :s ORDER BY version DESC LIMIT 1"
                ),
                {"w": workspace, "s": space_id},
            ).first()
            if latest and source == "score" and (latest[2] == digest if digest else latest[1] == etag):
                return int(latest[0])
            number = int(latest[0]) + 1 if latest else 1
            previous = json.loads(latest[3]) if latest and latest[3] else None
            conn.execute(
                sa.text(
                    "INSERT INTO space_versions (workspace, space_id, version, etag, config_hash, config, diff, "
                    "source, run_id, created_at) VALUES (:w, :s, :v, :e, :h, :c, :d, :src, :r, :t)"
                ),
                {
                    "w": workspace,
                    "s": space_id,
                    "v": number,
                    "e": etag,
                    "h": digest,
                    "c": json.dumps(config, ensure_ascii=False, sort_keys=True) if config is not None else None,
                    "d": config_diff(previous, config) if latest else "",
                    "src": source,
                    "r": run_id,
                    "t": _now(),
                },
            )
        return number

    def set_version_score(self, workspace: str, space_id: str, version: int, score: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE space_versions SET score = :x WHERE workspace = :w AND space_id = :s AND version = :v"),
                {"x": score, "w": workspace, "s": space_id, "v": version},
            )

    # --- runs ---

    def recent_verdicts(
        self, workspace: str, space_id: str, limit: int
    ) -> list[tuple[str, int | None, dict[str, str]]]:
        """The last `limit` runs of a space, newest first: (run id, version, {benchmark: verdict})."""
        with self.engine.connect() as conn:
            runs = conn.execute(
                sa.text(
                    "SELECT run_id, version FROM score_runs WHERE workspace = :w AND space_id = :s "
                    "ORDER BY created_at DESC LIMIT :n"
                ),
                {"w": workspace, "s": space_id, "n": limit},
            ).all()
            ids = [r[0] for r in runs]
            verdicts: dict[str, dict[str, str]] = {i: {} for i in ids}
            if ids:
                rows = conn.execute(
                    sa.text("SELECT run_id, benchmark_id, verdict FROM score_rows WHERE run_id IN :ids").bindparams(
                        sa.bindparam("ids", expanding=True)
                    ),
                    {"ids": ids},
                ).all()
                for run_id, benchmark, verdict in rows:
                    verdicts[run_id][benchmark] = verdict
        return [(r[0], r[1], verdicts[r[0]]) for r in runs]

    def flaky(self, workspace: str, space_id: str, version: int | None, now: dict[str, str], window: int) -> set[str]:
        """Benchmarks whose verdict changed at least twice over the last `window` runs (this one included)
        of the same space version: noise of Genie's, not an effect of the configuration."""
        history = [now]
        for _, run_version, verdicts in self.recent_verdicts(workspace, space_id, window - 1):
            if run_version != version:
                break
            history.append(verdicts)
        flaky = set()
        for benchmark in now:
            seen = [h[benchmark] for h in reversed(history) if h.get(benchmark) in DECIDED]
            if sum(1 for a, b in itertools.pairwise(seen) if a != b) >= 2:
                flaky.add(benchmark)
        return flaky

    def append_run(self, run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """One scoring run and its per-benchmark rows, in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO score_runs (run_id, workspace, space_id, etag, version, created_at, score, total, "
                    "correct, verdicts, figures, breaker_events, settings, report) VALUES (:run_id, :workspace, "
                    ":space_id, :etag, :version, :created_at, :score, :total, :correct, :verdicts, :figures, "
                    ":breaker_events, :settings, :report)"
                ),
                {
                    **run,
                    "created_at": run.get("created_at") or _now(),
                    **{
                        k: json.dumps(run[k], default=str)
                        for k in ("verdicts", "figures", "breaker_events", "settings")
                    },
                },
            )
            if rows:
                conn.execute(
                    sa.text(
                        "INSERT INTO score_rows (run_id, benchmark_id, verdict, stage, reason, genie_latency_s, "
                        "attempts, cached, flaky) VALUES (:run_id, :benchmark_id, :verdict, :stage, :reason, "
                        ":genie_latency_s, :attempts, :cached, :flaky)"
                    ),
                    [{**r, "run_id": run["run_id"], "reason": str(r.get("reason") or "")[:1000]} for r in rows],
                )

    def runs(self, workspace: str | None, space_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The last `limit` runs of a space, oldest first, with their verdicts by benchmark."""
        where = "space_id = :s" + (" AND workspace = :w" if workspace else "")
        with self.engine.connect() as conn:
            runs = conn.execute(
                sa.text(
                    "SELECT run_id, workspace, etag, version, created_at, score, total, correct, figures, "
                    f"breaker_events, report FROM score_runs WHERE {where} ORDER BY created_at DESC LIMIT :n"
                ),
                {"s": space_id, "w": workspace, "n": limit},
            ).all()
            ids = [r[0] for r in runs]
            rows: dict[str, dict[str, tuple[str, bool]]] = {i: {} for i in ids}
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                for run_id, benchmark, verdict, flaky in conn.execute(
                    sa.text(
                        "SELECT run_id, benchmark_id, verdict, flaky FROM score_rows WHERE run_id IN :ids"
                    ).bindparams(sa.bindparam("ids", expanding=True)),
                    {"ids": part},
                ):
                    rows[run_id][benchmark] = (verdict, bool(flaky))
        keys = ("run_id", "workspace", "etag", "version", "created_at", "score", "total", "correct")
        out = []
        for r in reversed(runs):
            run = dict(zip(keys, r[:8], strict=True))
            run.update(figures=json.loads(r[8]), breaker_events=json.loads(r[9]), report=r[10])
            run["verdicts"] = {b: v for b, (v, _) in rows[r[0]].items()}
            run["flaky"] = sorted(b for b, (_, f) in rows[r[0]].items() if f)
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
