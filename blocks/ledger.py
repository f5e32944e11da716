"""The row ledger: finished rows, kept per (step, version, row key), shared by every run on a machine.

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
from typing import TYPE_CHECKING, Any

from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from tasks.history import HistoryStore


def default_home() -> Path:
    return Path(os.environ.get("BATCHFLOWS_HOME", Path.home() / ".batchflows"))


class RowLedger(Block):
    """Per-row results of finished calls in a SQLite file (WAL mode, safe across processes)."""

    _block_type_name = "batchflows row ledger"
    _block_type_slug = "batchflows-row-ledger"
    _description = "Where batchflows keeps finished rows so reruns repeat no finished call."

    path: str = Field(
        default_factory=lambda: str(default_home() / "ledger.sqlite"),
        description="SQLite file holding finished rows; shared by all runs using this block",
    )

    history_url: str | None = Field(
        None,
        description="where the score history lives: a SQLAlchemy URL (e.g. postgresql+psycopg://user:password@"
        "host/db) or databricks://WAREHOUSE_ID/catalog.schema for tables on a SQL warehouse; default: "
        "history.sqlite beside the ledger file",
    )

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _conn: sqlite3.Connection | None = PrivateAttr(None)

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
        payload = json.dumps(value, ensure_ascii=False, default=str)
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO rows (step, version, key, value) VALUES (?, ?, ?, ?)",
                (step, version, key, payload),
            )

    def count(self, step: str | None = None) -> int:
        with self._lock:
            sql, args = (
                ("SELECT COUNT(*) FROM rows WHERE step=?", [step]) if step else ("SELECT COUNT(*) FROM rows", [])
            )
            return int(self._connection().execute(sql, args).fetchone()[0])


def history_store(ledger: RowLedger, client: Any = None) -> HistoryStore:
    """The score history that lives next to `ledger` (`client`: the WorkspaceClient, for a history kept on a
    SQL warehouse)."""
    from tasks.history import HistoryStore, default_url

    return HistoryStore(ledger.history_url or default_url(ledger.path), client)
