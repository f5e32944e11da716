"""The `batchflows` command: one sub-command per job, plus the sandbox workspace and the team's set-up.

One module per family of commands (genie, rows, ops); `common` holds what they share.
"""

import gc
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from batchflows_cli import genie, ops, rows  # noqa: F401  (each registers its commands on the app)
from batchflows_cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """The `batchflows` command."""
    gc.disable()  # while the command loads its modules; `common.loaded` turns collection back on
    app()
