"""Run the sandbox workspace on 127.0.0.1 in a background thread, and talk to its admin API."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import uvicorn

from sandbox.app import Workspace, create_app
from sandbox.faults import FaultSpec
from sandbox.genie import AnswerMix


class SandboxError(RuntimeError):
    """The sandbox could not start (port taken, server failed)."""


class _Admin:
    """The sandbox's admin API, over real HTTP like any other client."""

    host: str
    token: str
    _admin: httpx.Client

    def set_faults(self, group: str, **spec: Any) -> None:
        self._admin.put(f"/sandbox/faults/{group}", json=spec).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return self._admin.get("/sandbox/stats").json()

    def requests(self, group: str | None = None) -> list[dict[str, Any]]:
        return self._admin.get("/sandbox/requests", params={"group": group} if group else None).json()

    def set_flaky(self, *questions: str) -> None:
        """Make Genie answer these questions right and wrong in turn (the same question, asked again)."""
        self._admin.put("/sandbox/genie/flaky", json={"questions": list(questions)}).raise_for_status()

    def set_contracts(self, **contracts: Any) -> None:
        """Shrink or set the limits the sandbox enforces (chunk_bytes, inline_limit_bytes, cold_start_s,
        max_conversations, result_ttl_s, link_ttl_s); a reset restores the defaults."""
        self._admin.put("/sandbox/contracts", json=contracts).raise_for_status()

    def reset(self, clear_faults: bool = True) -> None:
        if clear_faults:
            for group in ("genie", "genie_poll", "sql", "chat", "embeddings"):
                self.set_faults(group)
        self._admin.post("/sandbox/reset").raise_for_status()


class Sandbox(_Admin):
    """A running sandbox workspace, served from a thread of this process.

    Example:
        with Sandbox() as sb:
            w = WorkspaceClient(host=sb.host, token=sb.token)
    """

    def __init__(
        self,
        port: int = 0,
        token: str | None = None,
        seed: int = 0,
        faults: dict[str, FaultSpec] | None = None,
        mix: AnswerMix | None = None,
        allow_writes: bool = False,
        data: str | None = None,
        genie_answers: str | None = None,
    ) -> None:
        self.token = token or f"dapi-sandbox-{secrets.token_hex(8)}"
        self.workspace = Workspace(self.token, seed, faults, mix, allow_writes, data, genie_answers)
        self.problems = self.workspace.problems  # files or answer lines that could not be used
        self._socket = _bind(port)
        self.port = self._socket.getsockname()[1]
        self.host = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(self.workspace),
            log_level="warning",
            timeout_graceful_shutdown=1,
            lifespan="off",
            limit_concurrency=2000,
            backlog=2048,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="sandbox-server", daemon=True
        )
        self._admin = httpx.Client(base_url=self.host, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    def start(self) -> Sandbox:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SandboxError(f"the sandbox server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=5)
        self._admin.close()
        self._socket.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class SandboxProcess(_Admin):
    """A sandbox workspace in its own process, so that its work does not share this process's GIL with the
    client under test (benchmarks, kill tests). Same admin helpers as `Sandbox`.

    Example:
        with SandboxProcess(seed=0) as sb:
            sb.set_faults("chat", latency_ms=200)
    """

    def __init__(
        self, seed: int = 0, token: str | None = None, data: str | None = None, genie_answers: str | None = None
    ) -> None:
        self.token = token or f"dapi-sandbox-{secrets.token_hex(8)}"
        self._args = [sys.executable, "-m", "sandbox", "--port", "0", "--token", self.token, "--seed", str(seed)]
        self._args += ["--data", data] if data else []
        self._args += ["--genie-answers", genie_answers] if genie_answers else []
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> SandboxProcess:
        self._proc = subprocess.Popen(self._args, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "http://127.0.0.1:PORT" once it is serving
        if not line.startswith("http://"):
            self._proc.kill()
            raise SandboxError(f"the sandbox process did not start (said {line!r})")
        self.host = line.strip()
        self._admin = httpx.Client(base_url=self.host, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._admin.close()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _bind(port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the listening socket
    # says so, and without it every response waits ~40 ms on Nagle + delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise SandboxError(
            f"port {port} on 127.0.0.1 is already in use ({exc.strerror}); "
            "pick another with --port or use --port 0 for a free one"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
