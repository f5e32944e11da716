"""The Prefect API server the CLI's commands use when PREFECT_API_URL is not set.

By default a **warm** one: `prefect server start` in the background, started by the first command and reused by
the next (its pid, port and log under BATCHFLOWS_HOME/server), so a command pays no server start-up. It is this
machine's own server on Prefect's usual database (the one Prefect's temporary server uses), with its UI on the
same port. A command finds it by its state file; a dead or unanswering one is replaced, as is one of another
Prefect version or database. `batchflows server start|stop|status` manage it. A file lock makes two commands
that start at once share one server.

With BATCHFLOWS_PREFECT_SERVER=temporary, a **temporary** one instead: a child process that dies with the
command, even kill -9 (without PREFECT_API_URL, Prefect's own temporary server outlives a killed parent). It
is the same uvicorn command Prefect uses (`prefect.server.api.server:create_app`, on the same database), in a
child that asks Linux to signal it when its parent dies (PR_SET_PDEATHSIG) and, on any platform, watches its
parent and exits once it is gone.

    with local_server():  # PREFECT_API_URL points at it inside the block
        run_the_flow()
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from blocks.ledger import default_home
from tasks.server_env import server_env

MODE_ENV = "BATCHFLOWS_PREFECT_SERVER"  # "warm" (the default) or "temporary"

_PRIVATE: list[str] = []  # the API URL of this process's own server, while it runs


def private_api_url() -> str | None:
    """The URL of the local server `local_server` points this process at, if any (only this machine uses it)."""
    return _PRIVATE[-1] if _PRIVATE else None


@contextlib.contextmanager
def local_server() -> Iterator[str | None]:
    """Point Prefect at this machine's warm server (started if need be) or, with BATCHFLOWS_PREFECT_SERVER=
    temporary, at a temporary one that dies with this process; a no-op when PREFECT_API_URL is set."""
    if PREFECT_API_URL.value():
        yield None
        return
    mode = os.environ.get(MODE_ENV, "warm")
    if mode not in ("warm", "temporary"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected 'warm' or 'temporary'")
    if mode == "warm":
        with _pointed_at(warm_server().url):
            yield _PRIVATE[-1]
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = server_env({**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"})  # as Prefect's own
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.local_server", str(os.getpid()), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C in the terminal is the CLI's to handle: the server stays up for it
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(process, url, _startup_timeout())
        with _pointed_at(url):
            yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _pointed_at(url: str) -> Iterator[None]:
    _PRIVATE.append(url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        # what is queued for the server (logs, events) goes before the command ends
        with contextlib.suppress(Exception), temporary_settings(updates={PREFECT_API_URL: url}):
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        _PRIVATE.remove(url)


def _startup_timeout() -> float:
    return max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), 60)


@dataclass(frozen=True)
class WarmServer:
    """This machine's warm Prefect server, as its state file records it."""

    pid: int
    port: int
    url: str
    started: float  # time.time() at start
    prefect_version: str
    database: str
    log: str

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _server_dir() -> Path:
    path = default_home() / "server"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One command at a time looks for, starts or stops the warm server (two that start at once share one)."""
    with open(_server_dir() / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _recorded() -> WarmServer | None:
    try:
        return WarmServer(**json.loads((_server_dir() / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _database() -> str:
    return str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "")


def server_status() -> tuple[WarmServer | None, str]:
    """The recorded warm server and what it is doing: "running", "not answering", "not running" or "none"."""
    server = _recorded()
    if server is None:
        return None, "none"
    if not _ours(server.pid):
        return server, "not running"
    return server, "running" if _healthy(server.url) else "not answering"


def warm_server() -> WarmServer:
    """The warm server, started now if there is none, or the recorded one is dead, stuck (not answering within
    the start-up timeout), of another Prefect version or on another database."""
    with _locked():
        server, state = server_status()
        if server is not None and state == "not answering":  # busy, or still starting: give it time
            deadline = time.monotonic() + _startup_timeout()
            while state == "not answering" and time.monotonic() < deadline:
                time.sleep(0.5)
                server, state = server_status()
        if server is not None and state == "running":
            if (server.prefect_version, server.database) == (prefect.__version__, _database()):
                return server
            _stop(server)  # a Prefect upgrade or another database: this command's server is another one
        elif server is not None and state == "not answering":
            _stop(server)
        return _start()


def stop_server() -> WarmServer | None:
    """Stop the warm server; the one stopped, or None if none was running."""
    with _locked():
        server, state = server_status()
        if server is None:
            return None
        _stop(server)
        return server if state != "not running" else None


def _start() -> WarmServer:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = _server_dir() / "server.log"
    env = server_env({k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")})
    env["PREFECT_UI_API_URL"] = url
    # `prefect server start`, its start-up frozen out of full garbage collections (tasks.warm_server_main)
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks.warm_server_main", *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the command that starts it, and signals in its terminal
        )
    server = WarmServer(process.pid, port, url, time.time(), prefect.__version__, _database(), str(log))
    (_server_dir() / "server.json").write_text(json.dumps(asdict(server)))
    try:
        _wait_healthy(process, url, _startup_timeout(), log=log)
    except BaseException:
        _stop(server)
        raise
    return server


def _stop(server: WarmServer) -> None:
    """End the server's process group (`prefect server start` and the API process it runs)."""
    if _ours(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _ours(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    (_server_dir() / "server.json").unlink(missing_ok=True)


def _ours(pid: int) -> bool:
    """Whether `pid` is alive and a Prefect server (a recycled pid is someone else's process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it and it has ended
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:  # no /proc: trust the pid
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return b"prefect" in cmdline and b"server" in cmdline


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if log is not None:
                    error = log.read_text(errors="replace")[-2000:]
                else:
                    error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
                raise RuntimeError(f"the local Prefect server exited with {process.returncode}: {error}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the local Prefect server did not answer on {url} within {timeout_s:g} s")


def _die_with(parent: int) -> None:
    """End this process when `parent` ends: at once on Linux, within a second elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent:  # the parent died before the request above took effect
        sys.exit(0)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    import uvicorn

    _die_with(int(sys.argv[1]))
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=int(sys.argv[2]),
        log_level="error",
        lifespan="on",
    )
