"""The row ledger: finished rows, kept per (step, version, row key), shared by every run on a machine (a
SQLite file) or by a team's workers on any machine (the team's PostgreSQL, the database Prefect uses).

It is what makes reruns cheap: a row whose result is in the ledger is never sent again, whether the
earlier run completed, failed part-way, was cancelled or was killed. Each row is written the moment
it finishes, so a kill -9 loses at most the calls in flight.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from tasks.history import HistoryStore


def default_home() -> Path:
    return Path(os.environ.get("BATCHFLOWS_HOME", Path.home() / ".batchflows"))


class RowLedger(Block):
    """Per-row results of finished calls in a SQLite file (WAL mode, safe across processes), or in the
    database at `url` (PostgreSQL: shared by workers on several machines)."""

    _block_type_name = "batchflows row ledger"
    _block_type_slug = "batchflows-row-ledger"
    _description = "Where batchflows keeps finished rows so reruns repeat no finished call."

    path: str = Field(
        default_factory=lambda: str(default_home() / "ledger.sqlite"),
        description="SQLite file holding finished rows; shared by all runs using this block",
    )

    url: str | None = Field(
        None,
        description="the team's database instead of the SQLite file, so workers on several machines share "
        "finished rows: a SQLAlchemy URL such as postgresql+psycopg://user:password@host/db (Prefect's own "
        "postgresql+asyncpg:// URL works too)",
    )

    history_url: str | None = Field(
        None,
        description="where the score history lives: a SQLAlchemy URL (e.g. postgresql+psycopg://user:password@"
        "host/db) or databricks://WAREHOUSE_ID/catalog.schema for tables on a SQL warehouse; default: "
        "history.sqlite beside the ledger file",
    )

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _conn: sqlite3.Connection | None = PrivateAttr(None)
    _shared: _SharedRows | None = PrivateAttr(None)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a task in another process) as its settings: its connection and lock are this
        process's own, so the copy opens its own."""
        return type(self).model_validate, (self.model_dump(),)

    def _rows(self) -> _SharedRows | None:
        """The shared database's rows when `url` is set (else the SQLite file is used)."""
        if self.url and self._shared is None:
            self._shared = _SharedRows(self.url)
        return self._shared

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rows (step TEXT, version TEXT, key TEXT, value TEXT, "
                "PRIMARY KEY (step, version, key))"
            )
            self._conn = conn
        return self._conn

    def get_many(self, step: str, version: str, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those `keys` that are in the ledger."""
        keys = list(keys)
        if (shared := self._rows()) is not None:
            return shared.get_many(step, version, keys)
        found: dict[str, Any] = {}
        with self._lock:
            conn = self._connection()
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = conn.execute(
                    f"SELECT key, value FROM rows WHERE step=? AND version=? AND key IN ({marks})",
                    [step, version, *batch],
                ).fetchall()
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put(self, step: str, version: str, key: str, value: Any) -> None:
        self.put_many(step, version, {key: value})

    def put_many(self, step: str, version: str, values: dict[str, Any]) -> None:
        """Store `values` by key in one transaction: all of them or, on an error, none."""
        payloads = [(k, json.dumps(v, ensure_ascii=False, default=str)) for k, v in values.items()]
        if not payloads:
            return
        if (shared := self._rows()) is not None:
            shared.put_many(step, version, payloads)
            return
        with self._lock:
            conn = self._connection()
            with conn:  # sqlite3 opens the transaction and commits it, or rolls it back on an error
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT OR REPLACE INTO rows (step, version, key, value) VALUES (?, ?, ?, ?)",
                    [(step, version, k, p) for k, p in payloads],
                )

    def count(self, step: str | None = None) -> int:
        if (shared := self._rows()) is not None:
            return shared.count(step)
        with self._lock:
            sql, args = (
                ("SELECT COUNT(*) FROM rows WHERE step=?", [step]) if step else ("SELECT COUNT(*) FROM rows", [])
            )
            return int(self._connection().execute(sql, args).fetchone()[0])


class _SharedRows:
    """The ledger's rows in a SQLAlchemy database (table batchflows_rows), one engine per URL per process."""

    _engines: ClassVar[dict[str, Any]] = {}
    _engines_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        with self._engines_lock:
            if url not in self._engines:
                engine = sa.create_engine(
                    url.replace("postgresql+asyncpg://", "postgresql+psycopg://"), pool_pre_ping=True
                )
                with engine.begin() as conn:
                    conn.execute(
                        sa.text(
                            "CREATE TABLE IF NOT EXISTS batchflows_rows (step TEXT NOT NULL, version TEXT NOT NULL, "
                            "key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (step, version, key))"
                        )
                    )
                self._engines[url] = engine
            self.engine = self._engines[url]

    def get_many(self, step: str, version: str, keys: list[str]) -> dict[str, Any]:
        import sqlalchemy as sa

        query = sa.text(
            "SELECT key, value FROM batchflows_rows WHERE step = :step AND version = :version AND key IN :keys"
        ).bindparams(sa.bindparam("keys", expanding=True))
        found: dict[str, Any] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(keys), 500):
                rows = conn.execute(query, {"step": step, "version": version, "keys": keys[start : start + 500]})
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_many(self, step: str, version: str, payloads: list[tuple[str, str]]) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO batchflows_rows (step, version, key, value) VALUES (:step, :version, :key, :value) "
                    "ON CONFLICT (step, version, key) DO UPDATE SET value = excluded.value"
                ),
                [{"step": step, "version": version, "key": k, "value": p} for k, p in payloads],
            )

    def count(self, step: str | None) -> int:
        import sqlalchemy as sa

        sql = "SELECT COUNT(*) FROM batchflows_rows" + (" WHERE step = :step" if step else "")
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(sql), {"step": step} if step else {}).scalar_one())


def history_store(ledger: RowLedger, client: Any = None) -> HistoryStore:
    """The score history that lives next to `ledger` (`client`: the WorkspaceClient, for a history kept on a
    SQL warehouse)."""
    from tasks.history import HistoryStore, default_url

    return HistoryStore(ledger.history_url or ledger.url or default_url(ledger.path), client)
