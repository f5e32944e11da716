"""Run the sandbox workspace on 127.0.0.1 in a background thread (`Sandbox`; `SandboxProcess`, its own process,
is in sandbox/process.py)."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import httpx
import uvicorn

from sandbox.app import Workspace, create_app
from sandbox.faults import FaultSpec
from sandbox.genie import AnswerMix
from sandbox.process import SandboxError, _Admin


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
