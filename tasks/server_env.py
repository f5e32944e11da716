"""Settings of every Prefect API server batchflows runs: the warm and temporary ones (tasks.local_server),
Prefect's own temporary server (it inherits this process's environment), and the team set-up's.

Prefect's task-run recorder writes each task-run event the server receives in a transaction of its own (three
or more a task run: Pending, Running, its end). Written in batches (every second, or at 100 events), the server spent
0.36 s of CPU on a c=10 scoring run of 20 questions, not 0.58 s, on a machine where it shares two cores with
the run and the workspace. On SQLite, a flow run created while another transaction writes can be refused at
once ("database is locked", 503; Prefect's client asks again 2 s later): back-to-back runs met it in 2 of 60
starts here, 6 of 60 unbatched. The cost: a task run's state shows in the Prefect API and UI up to a second
later. A value already in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SERVER_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",  # whole seconds: Prefect 3.8 rounds it down
}


def server_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with batchflows' server settings where it has none of its own."""
    return {**SERVER_DEFAULTS, **env}


def set_server_defaults() -> None:
    """Give this process's environment batchflows' server settings where it has none (for a Prefect server
    started from it)."""
    os.environ.update(server_env(os.environ))
