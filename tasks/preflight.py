"""Checks before the first billable call: the workspace answers, accepts the token, and has the space,
warehouse and serving endpoints the job names. Each problem is one line naming the input and the cause,
within seconds, instead of a hundred failed calls or a traceback after minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from blocks.workspace import DatabricksWorkspace
from tasks.calls import read_again
from tasks.errors import BatchflowsError, CallTimeout, ConnectionFailed, NotFound, Unauthorized, classify
from tasks.inputs import InputError
from tasks.resilience import run_logger

TIMEOUT_S = 10
_CAUSES = (
    (
        ("NameResolution", "Name or service not known", "nodename nor servname", "getaddrinfo"),
        "its name does not resolve",
    ),
    (("Connection refused",), "connection refused"),
    (("reset by peer", "RemoteDisconnected", "aborted"), "the connection was dropped"),
)


class PreflightError(InputError):
    """An input of the job is wrong (unreachable host, refused token, unknown space, warehouse or endpoint)."""


def check_workspace(
    workspace: DatabricksWorkspace,
    *,
    space_id: str | None = None,
    warehouse_id: str | None = None,
    endpoints: Iterable[str] = (),
) -> None:
    """Raise `PreflightError` naming the first input the workspace refuses; return when all are usable.

    The calls are reads (the user, the space, the warehouse, the endpoints): none asks Genie a question,
    runs a statement or invokes a model.
    """
    try:
        client = workspace.client(TIMEOUT_S)
    except Exception as exc:  # the SDK refuses the configuration itself (no host, bad profile)
        raise PreflightError(f"workspace configuration: {exc}") from exc
    host = str(client.config.host or "(no host)")
    _check(f"the workspace at {host}", host, client.current_user.me)
    if space_id:
        _check(f"Genie space {space_id!r}", host, lambda: client.genie.get_space(space_id))
    if warehouse_id:
        warehouse = _check(f"SQL warehouse {warehouse_id!r}", host, lambda: client.warehouses.get(warehouse_id))
        state = getattr(getattr(warehouse, "state", None), "value", None)
        if state and state != "RUNNING":
            run_logger().warning(f"SQL warehouse {warehouse_id} is {state}: the first statements wait for it to start")
    for name in dict.fromkeys(endpoints):
        endpoint = _check(f"serving endpoint {name!r}", host, lambda n=name: client.serving_endpoints.get(n))  # type: ignore[misc]
        ready = getattr(getattr(getattr(endpoint, "state", None), "ready", None), "value", None)
        if ready and ready != "READY":
            run_logger().warning(f"serving endpoint {name} is {ready}: its calls may fail until it is ready")


def _check(what: str, host: str, read: Callable[[], Any]) -> Any:
    try:
        return read_again(read, what)
    except Exception as exc:
        raise PreflightError(describe(classify(exc, TIMEOUT_S), what, host)) from exc


def describe(error: BatchflowsError, what: str, host: str) -> str:
    """One line: which input, and what to do about it."""
    if isinstance(error, Unauthorized):
        return (
            f"{what}: the workspace at {host} refused the credentials ({error}); check DATABRICKS_TOKEN, the "
            "profile or the workspace block's token, and its permissions"
        )
    if isinstance(error, NotFound):
        return f"{what} does not exist in {host}, or this user cannot see it ({error})"
    if isinstance(error, ConnectionFailed):
        text = str(error)
        cause = next((why for words, why in _CAUSES if any(w in text for w in words)), text)
        return f"cannot reach the workspace at {host}: {cause} (check DATABRICKS_HOST and the network)"
    if isinstance(error, CallTimeout):
        return f"the workspace at {host} did not answer within {TIMEOUT_S} s (check DATABRICKS_HOST and the network)"
    return f"{what}: {error.kind}: {error}"
