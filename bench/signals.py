"""Signals, kill -9 and a Prefect server restart against the real CLI: time from the event to the command's
exit, Genie calls made after it, and the slots left taken on the server (issue #18).

Cases: SIGTERM and SIGINT mid-Genie-phase (graceful stop), a second SIGINT (quit at once), kill -9 of the
CLI (and whether its temporary Prefect server survives), and a restart of the Prefect server under a run.

    .venv/bin/python bench/signals.py [--genie-latency-ms 1500]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from deployments.local import PrefectServer
from sandbox import SandboxProcess

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
CLI = str(Path(sys.executable).with_name("batchflows"))
LIMITS = ("batchflows-genie-local-sandbox", "batchflows-sql-local-sandbox", "batchflows-llm-local-sandbox")


def taken(server: PrefectServer) -> int:
    total = 0
    for name in LIMITS:
        answer = httpx.get(f"{server.api_url}/v2/concurrency_limits/{name}", timeout=10)
        total += answer.json()["active_slots"] if answer.status_code == 200 else 0
    return total


def score(server: PrefectServer, home: Path, **env: str) -> subprocess.Popen[str]:
    command = [CLI, "score", "--benchmarks", BENCHMARKS, "--space-id", "retail", "--warehouse-id",
               "sandbox-warehouse", "--workspace-block", "bench-sandbox", "--genie-rpm", "0",
               "--output-dir", str(home / "out")]  # fmt: skip
    environment = server.env(BATCHFLOWS_HOME=str(home / "batchflows"), **env)
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def until_asked(sandbox: SandboxProcess, n: int) -> int:
    while (calls := sandbox.stats()["genie"]["calls"]) < n:
        time.sleep(0.05)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--genie-latency-ms", type=float, default=1500)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-signals-"))
    rows: list[tuple[Any, ...]] = []
    with SandboxProcess() as sandbox, PrefectServer(home / "prefect") as server:
        sandbox.set_faults("genie", latency_ms=args.genie_latency_ms)
        subprocess.run(
            [sys.executable, "-c", "from blocks.workspace import DatabricksWorkspace as W; import sys; "
             "W(host=sys.argv[1], token=sys.argv[2]).save('bench-sandbox', overwrite=True)",
             sandbox.host, sandbox.token],
            env=server.env(), check=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        for name, signals in (("SIGTERM", [signal.SIGTERM]), ("SIGINT", [signal.SIGINT]),
                              ("SIGINT x2", [signal.SIGINT, signal.SIGINT])):  # fmt: skip
            sandbox.reset(clear_faults=False)
            print(f"{name}...", file=sys.stderr, flush=True)
            process = score(server, home / name.replace(" ", ""))
            asked = until_asked(sandbox, 4)
            t0 = time.monotonic()
            for sig in signals:
                process.send_signal(sig)
                time.sleep(0.3)
            process.communicate(timeout=300)
            exited = time.monotonic() - t0
            time.sleep(1)
            after = sandbox.stats()["genie"]["calls"] - asked
            rows.append((name, f"{exited:.1f}", process.returncode, after, taken(server), "-"))

        sandbox.reset(clear_faults=False)
        print("kill -9...", file=sys.stderr, flush=True)
        command = [CLI, "score", "--sandbox", "--genie-rpm", "0", "--output-dir", str(home / "kill9")]
        environment = server.env(PREFECT_API_URL="", PREFECT_HOME=str(home / "kill9-prefect"))
        process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout or []:  # its own temporary server is up once the sandbox block is saved
            if "Embedded sandbox workspace on" in line:
                break
        time.sleep(3)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        t0 = time.monotonic()
        process.kill()
        process.wait()
        exited = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while children and time.monotonic() < deadline and any(_alive(int(p)) for p in children):
            time.sleep(0.2)
        left = sum(_alive(int(p)) for p in children)
        rows.append(("kill -9", f"{exited:.1f}", process.returncode, "-", "-", f"{left} of {len(children)} alive"))

        sandbox.reset(clear_faults=False)
        print("server restart...", file=sys.stderr, flush=True)
        process = score(server, home / "restart")
        until_asked(sandbox, 4)
        t0 = time.monotonic()
        server.stop()
        server.start()
        restarted = time.monotonic() - t0
        process.communicate(timeout=600)
        rows.append((f"server restart ({restarted:.0f} s)", f"{time.monotonic() - t0:.1f}", process.returncode,
                     "-", taken(server), "-"))  # fmt: skip

    print(f"\nGenie latency {args.genie_latency_ms:.0f} ms, 32 benchmarks, 3 questions in flight")
    print(f"{'case':<26}{'exit after s':>13}{'code':>6}{'calls after':>13}{'slots taken':>13}  child server")
    for case, seconds, code, after, slots, child in rows:
        print(f"{case:<26}{seconds:>13}{code!s:>6}{after!s:>13}{slots!s:>13}  {child}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
