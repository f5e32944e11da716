"""The Databricks workspace connection: a Prefect Block that builds databricks-sdk clients."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import urlparse

from databricks.sdk import WorkspaceClient
from databricks.sdk.clock import Clock, RealClock
from databricks.sdk.config import Config
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

_CLIENTS: dict[tuple[Any, ...], WorkspaceClient] = {}
_CLIENTS_LOCK = threading.Lock()
POOL_SIZE = 128  # connections kept per host: above any concurrency a phase runs at
EMBEDDED_SANDBOX_BLOCK = "sandbox"  # the block `--sandbox` commands save for the sandbox they start


def workspace_key(host: str) -> str:
    """How a workspace is named (score history, limits, breakers): its URL; any sandbox on this machine is
    "local-sandbox" (the CLI's embedded sandbox takes a new port each run, with the same spaces)."""
    host = host.rstrip("/")
    if urlparse(host).hostname in ("127.0.0.1", "localhost", "::1"):
        return "local-sandbox"
    return host


def workspace_slug(host: str | None) -> str:
    """`workspace_key` as part of a name (limits, breakers): `adb-123-azuredatabricks-net`, `local-sandbox`."""
    key = workspace_key(host or "")
    where = urlparse(key).hostname or key if "://" in key else key
    return re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-") or "default"


class SdkRetrySuppressed(Exception):
    """Raised instead of the SDK's own retry sleep; the original error is its __context__."""


class _NoRetryClock(Clock):
    """databricks-sdk retries 429/503, timeouts and resets by itself, for up to 5 minutes.

    batchflows owns retries (classified, logged, with jitter and shared limits), so the SDK's loop must
    not run a second one: its first retry sleep raises instead, carrying the original error.
    """

    _real = RealClock()

    def time(self) -> float:
        return self._real.time()

    def sleep(self, seconds: float) -> None:
        raise SdkRetrySuppressed(f"databricks-sdk wanted to retry after {seconds:.1f}s")


class DatabricksWorkspace(Block):
    """Where batchflows sends its calls: a Databricks workspace, or the local sandbox.

    Empty fields fall back to databricks-sdk's usual resolution (DATABRICKS_HOST, DATABRICKS_TOKEN,
    ~/.databrickscfg profiles).
    """

    _block_type_name = "batchflows Databricks workspace"
    _block_type_slug = "batchflows-databricks-workspace"
    _description = "Connection to a Databricks workspace (or the batchflows sandbox) used by every job."
    _code_example = 'ws = DatabricksWorkspace.load("default")\nclient = ws.client(timeout_s=60)'

    host: str | None = Field(None, description="Workspace URL, e.g. https://adb-123.azuredatabricks.net")
    token: SecretStr | None = Field(None, description="Personal access token; never logged")
    profile: str | None = Field(None, description="A ~/.databrickscfg profile to use instead of host/token")

    def client(self, timeout_s: float = 60) -> WorkspaceClient:
        """A WorkspaceClient whose every HTTP request gives up after `timeout_s` and never retries.

        Clients are built once per (connection, timeout) and shared by all threads of the process:
        building one asks the workspace for its configuration.
        """
        key = (self.host, self.token.get_secret_value() if self.token else None, self.profile, timeout_s)
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                _CLIENTS[key] = self._build(timeout_s)
            return _CLIENTS[key]

    def _build(self, timeout_s: float) -> WorkspaceClient:
        kwargs: dict[str, Any] = {
            "http_timeout_seconds": timeout_s,
            # batchflows retries API calls itself (the clock below), so this budget is only the SDK's host-metadata
            # probe's at client creation: a best-effort read that would otherwise retry an unreachable host for
            # the whole timeout before the first call could say so
            "retry_timeout_seconds": 1,
            "clock": _NoRetryClock(),
            # databricks-sdk hands these to requests' HTTPAdapter crosswise (max_connection_pools becomes
            # pool_maxsize, with pool_block=True): set both, or every thread past 20 waits for a connection
            "max_connection_pools": POOL_SIZE,
            "max_connections_per_pool": POOL_SIZE,
        }
        if self.profile:
            kwargs["profile"] = self.profile
        if self.host:
            kwargs["host"] = self.host
        if self.token:
            kwargs["token"] = self.token.get_secret_value()
        return WorkspaceClient(config=Config(**kwargs))


class _LoopbackPoolNotice(logging.Filter):
    """databricks-sdk sizes its connection pool for https:// hosts only (through its public settings
    above); a plain-http host on loopback, the sandbox, keeps requests' pool of 10, so past 10 calls in
    flight urllib3 opens extra connections and says so for each. That is harmless on loopback: not worth a
    warning per call, nor a reach into the SDK's private session to change."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Connection pool is full") and ("127.0.0.1" in message or "localhost" in message)
        )


logging.getLogger("urllib3.connectionpool").addFilter(_LoopbackPoolNotice())
