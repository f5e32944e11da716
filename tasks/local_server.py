"""The CLI's own temporary Prefect API server: a child process that dies with the command, even kill -9.

Without PREFECT_API_URL, Prefect starts a temporary server in a subprocess that outlives a killed parent
(one leaked server per `kill -9`). The CLI starts this one instead: the same uvicorn command Prefect uses
(`prefect.server.api.server:create_app`, on the same database), in a child that asks Linux to signal it
when its parent dies (PR_SET_PDEATHSIG) and, on any platform, watches its parent and exits once it is gone.

    with local_server():  # PREFECT_API_URL points at it inside the block
        run_the_flow()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

_PRIVATE: list[str] = []  # the API URL of this process's own server, while it runs


def private_api_url() -> str | None:
    """The URL of the server `local_server` started in this process, if any (only this process uses it)."""
    return _PRIVATE[-1] if _PRIVATE else None


@contextlib.contextmanager
def local_server() -> Iterator[str | None]:
    """Point Prefect at a temporary server that dies with this process; a no-op when PREFECT_API_URL is set."""
    if PREFECT_API_URL.value():
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}  # as Prefect's own
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.local_server", str(os.getpid()), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C in the terminal is the CLI's to handle: the server stays up for it
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(process, url, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        _PRIVATE.append(url)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        # what is queued for the server (logs, events) goes before it stops
        with contextlib.suppress(Exception), temporary_settings(updates={PREFECT_API_URL: url}):
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        if _PRIVATE and _PRIVATE[-1] == url:
            _PRIVATE.pop()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + max(timeout_s, 60)
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
                raise RuntimeError(f"the temporary Prefect server exited with {process.returncode}: {error}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the temporary Prefect server did not answer on {url} within {timeout_s:g} s")


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
