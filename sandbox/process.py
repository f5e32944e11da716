"""A sandbox workspace in a process of its own, and the admin API every sandbox answers. Light on imports: a
command can start the sandbox's process before it imports anything heavy (the server's own imports are in
that process)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Any

import httpx


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


class SandboxProcess(_Admin):
    """A sandbox workspace in its own process, so that its work does not share this process's GIL with the
    client under test (benchmarks, kill tests). Same admin helpers as `Sandbox`.

    Example:
        with SandboxProcess(seed=0) as sb:
            sb.set_faults("chat", latency_ms=200)
    """

    def __init__(
        self,
        seed: int = 0,
        token: str | None = None,
        data: str | None = None,
        genie_answers: str | None = None,
        allow_writes: bool = False,
        tied: bool = False,
    ) -> None:
        """`tied`: the process ends when this one does (even killed with -9) and gets no signal from this one's
        terminal (a Ctrl-C there is this process's to handle, while its calls in flight finish)."""
        self.token = token or f"dapi-sandbox-{secrets.token_hex(8)}"
        self._args = [sys.executable, "-m", "sandbox", "--port", "0", "--token", self.token, "--seed", str(seed)]
        self._args += ["--data", data] if data else []
        self._args += ["--genie-answers", genie_answers] if genie_answers else []
        self._args += ["--allow-writes"] if allow_writes else []
        self._args += ["--parent", str(os.getpid())] if tied else []
        self._tied = tied
        self._proc: subprocess.Popen[str] | None = None

    def launch(self) -> SandboxProcess:
        """Start the process and return at once (`start` waits until it serves)."""
        if self._proc is None:
            self._proc = subprocess.Popen(self._args, stdout=subprocess.PIPE, text=True, start_new_session=self._tied)
        return self

    def start(self) -> SandboxProcess:
        self.launch()
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "http://127.0.0.1:PORT" once it is serving
        if not line.startswith("http://"):
            self._proc.kill()
            raise SandboxError(f"the sandbox process did not start (said {line!r})")
        self.host = line.strip()
        self._admin = httpx.Client(base_url=self.host, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        return self

    def stop(self) -> None:
        """End the process (a no-op once it has ended)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if hasattr(self, "_admin"):
            self._admin.close()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
