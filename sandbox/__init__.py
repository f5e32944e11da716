"""A local workspace that speaks the Databricks REST APIs batchflows uses (Genie, SQL, serving endpoints).

It stands for the outside world: it imports nothing from flows/, tasks/ or blocks/. Its names load when first
used, so `sandbox.process` (a sandbox in its own process) costs no server imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.faults import FaultSpec
    from sandbox.genie import AnswerMix
    from sandbox.process import SandboxError, SandboxProcess
    from sandbox.server import Sandbox

__all__ = ["AnswerMix", "FaultSpec", "Sandbox", "SandboxError", "SandboxProcess"]
_HOME = {
    "AnswerMix": "sandbox.genie",
    "FaultSpec": "sandbox.faults",
    "Sandbox": "sandbox.server",
    "SandboxError": "sandbox.process",
    "SandboxProcess": "sandbox.process",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
