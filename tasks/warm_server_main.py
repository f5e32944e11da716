"""`python -m tasks.warm_server_main prefect server start --host H --port P`: Prefect's command, for the warm
server (`tasks.local_server`), with what its start-up loads frozen out of Python's full garbage collections.

Under a scoring bench's load the server collected its whole heap (Prefect's modules, its pydantic and
SQLAlchemy models) every ~20 s, and each full collection paused every request for 174-232 ms (gc callbacks in
its process; 20-31 ms once frozen). The modules are frozen once imported, and what the server builds at its start
(the app, its routes, its services) once it answers. The arguments are Prefect's command line, unchanged, so
the process still reads as a Prefect server (`tasks.local_server._ours`).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import urllib.request


def _freeze_once_serving(url: str, timeout_s: float = 120) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # this machine's server: no proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with direct.open(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    gc.freeze()


def main(argv: list[str]) -> None:
    """Run `argv` (`prefect server start ...`) as the `prefect` command would."""
    import prefect.server.api.server  # noqa: F401  # the server's modules, loaded before the freeze
    from prefect.cli import app

    gc.freeze()
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    port = argv[argv.index("--port") + 1] if "--port" in argv else "4200"
    threading.Thread(
        target=_freeze_once_serving, args=(f"http://{host}:{port}/api",), daemon=True, name="freeze-once-serving"
    ).start()
    sys.argv = argv
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
