"""A local workspace that speaks the Databricks REST APIs batchflows uses (Genie, SQL, serving endpoints).

It stands for the outside world: it imports nothing from flows/, tasks/ or blocks/.
"""

from sandbox.faults import FaultSpec
from sandbox.genie import AnswerMix
from sandbox.server import Sandbox, SandboxError, SandboxProcess

__all__ = ["AnswerMix", "FaultSpec", "Sandbox", "SandboxError", "SandboxProcess"]
