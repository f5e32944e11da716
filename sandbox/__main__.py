"""`python -m sandbox --port 0`: serve the sandbox workspace until killed; prints its URL once it serves."""

from __future__ import annotations

import argparse
import sys
import time

from sandbox.server import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--genie-answers", default=None)
    args = parser.parse_args()
    sb = Sandbox(port=args.port, token=args.token, seed=args.seed, data=args.data, genie_answers=args.genie_answers)
    for problem in sb.problems:
        print(f"not loaded: {problem}", file=sys.stderr)
    sb.start()
    print(sb.host, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sb.stop()


if __name__ == "__main__":
    main()
