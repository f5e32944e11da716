"""The `batchflows` command: one sub-command per job, plus the sandbox workspace and the team's set-up.

One module per family of commands (genie, rows, ops); `common` holds what they share.
"""

import gc

from batchflows_cli import genie, ops, rows  # noqa: F401  (each registers its commands on the app)
from batchflows_cli.common import app
from tasks.server_env import set_server_defaults

__all__ = ["app", "main"]

set_server_defaults()  # for a Prefect server a command starts (tasks.local_server's, or Prefect's own)


def main() -> None:
    """The `batchflows` command."""
    gc.disable()  # while the command loads its modules; `common.loaded` turns collection back on
    app()
