"""A real Prefect server (SQLite or PostgreSQL) and process workers on this machine, for the end-to-end
tests, the scale-out benchmark, and trying the deployments before a team sets up its own server.

    with PrefectServer(home) as server, Worker(server, "batchflows"):
        subprocess.run([... "batchflows", "deploy", ...], env=server.env())
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.server_env import server_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class ServerError(RuntimeError):
    """The Prefect server or a worker did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """A throwaway PostgreSQL started by scripts/postgres.sh (Debian's packages)."""

    def __init__(self) -> None:
        # not under pytest's private tmp: the postgres user must reach the folder
        self.dir = Path(tempfile.mkdtemp(prefix="batchflows-pg-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.url = ""

    def start(self) -> Postgres:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts/postgres.sh"), "start", str(self.dir / "pg"), str(self.port)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise ServerError(f"PostgreSQL did not start (exit {done.returncode}): {done.stderr[-2000:]}")
        self.url = done.stdout.strip().splitlines()[-1]
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(ROOT / "scripts/postgres.sh"), "stop", str(self.dir / "pg")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class _Process:
    """A child process stopped on exit: SIGTERM, then SIGKILL after 20 s."""

    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __exit__(self, *_: Any) -> None:
        self.stop()


class PrefectServer(_Process):
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME (and SQLite database, unless
    `database_url` names another), the scheduler looking for due runs every second."""

    def __init__(self, home: Path, database_url: str | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.database_url = database_url

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a process that talks to this server."""
        env = server_env({k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")})
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url, PREFECT_LOGGING_LEVEL="INFO")
        env.update(extra)
        return env

    def start(self, timeout_s: float = 120) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.env(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        log = (self.home / "server.log").open("wb")
        command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"prefect server exited: {(self.home / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(f"prefect server not healthy after {timeout_s} s")

    def __enter__(self) -> PrefectServer:
        return self.start()


class Worker(_Process):
    """`prefect worker start --pool POOL` against `server`, its log in the server's home, polling for runs every
    `query_s` seconds (Prefect's default is 10)."""

    def __init__(
        self,
        server: PrefectServer,
        pool: str,
        name: str = "worker",
        limit: int = 4,
        env: dict[str, str] | None = None,
        query_s: float = 10,
    ) -> None:
        self.server, self.pool, self.name, self.limit = server, pool, name, limit
        self.extra_env = {"PREFECT_WORKER_QUERY_SECONDS": str(query_s), **(env or {})}
        self.log = server.home / f"{name}.log"

    def start(self) -> Worker:
        command = [str(BIN / "prefect"), "worker", "start", "--pool", self.pool, "--name", self.name]
        command += ["--limit", str(self.limit), "--type", "process"]
        self.proc = subprocess.Popen(
            command, env=self.server.env(**self.extra_env), stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        return self

    def __enter__(self) -> Worker:
        return self.start()
