"""`python -m sandbox --port 0`: serve the sandbox workspace until killed; prints its URL once it serves.
With `--parent PID` it also ends when that process does (even one killed with -9)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
import time

from sandbox.server import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--genie-answers", default=None)
    parser.add_argument("--allow-writes", action="store_true")
    parser.add_argument("--parent", type=int, default=None, help="end when this process ends")
    args = parser.parse_args()
    if args.parent:
        _end_with(args.parent)
    sb = Sandbox(
        port=args.port,
        token=args.token,
        seed=args.seed,
        data=args.data,
        genie_answers=args.genie_answers,
        allow_writes=args.allow_writes,
    )
    for problem in sb.problems:
        print(f"not loaded: {problem}", file=sys.stderr)
    sb.start()
    # what start-up loaded (data, parsed answers, the web app) stays: out of the full garbage collections,
    # which scanned it all every ~15 s of load and paused every request for 70-90 ms (a workspace's own
    # pauses are not ours to measure)
    gc.freeze()
    print(sb.host, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sb.stop()


def _end_with(parent: int) -> None:
    """SIGTERM this process when `parent` ends: at once on Linux (PR_SET_PDEATHSIG), within a second anywhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request above took effect
        sys.exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


if __name__ == "__main__":
    main()
