"""Space versions: list the configurations a Genie space had, and put an earlier one back (rollback)."""

from __future__ import annotations

import json
from typing import Any

from databricks.sdk.errors import ResourceConflict
from prefect import flow

from blocks.ledger import RowLedger, history_store
from blocks.workspace import workspace_key
from flows.phase import load_blocks
from tasks.calls import read_again
from tasks.history import HistoryStore, default_url
from tasks.inputs import InputError
from tasks.resilience import run_logger
from tasks.space_config import SpaceConfigError
from tasks.space_config import check as check_space_config


class RollbackError(InputError):
    """A rollback that would overwrite a configuration nobody has seen, or restore one that is not known."""


def open_history(
    ledger_block: str | None = None, history_url: str | None = None, workspace_block: str | None = None
) -> HistoryStore:
    """The score history of a saved ledger block (or the default ledger), or at `history_url`; a history on a
    SQL warehouse is reached through the workspace block (default: databricks-sdk's env/profile)."""
    ledger: RowLedger = RowLedger.load(ledger_block) if ledger_block else RowLedger()  # type: ignore[assignment]
    url = history_url or ledger.history_url or default_url(ledger.path)
    client = None
    if url.startswith("databricks://"):
        from blocks.workspace import DatabricksWorkspace

        workspace = DatabricksWorkspace.load(workspace_block) if workspace_block else DatabricksWorkspace()
        client = workspace.client(120)  # type: ignore[union-attr]
    return HistoryStore(url, client)


def workspace_of(store: HistoryStore, space_id: str, workspace: str | None) -> str:
    """`workspace`, or the one workspace whose runs or versions know `space_id`.

    Raises:
        InputError: no history of the space, or several workspaces have a space of that id.
    """
    if workspace:
        return workspace_key(workspace)
    hosts = store.workspaces(space_id)
    if not hosts:
        raise InputError(f"the score history at {store.url} knows no space {space_id!r}; score it first")
    if len(hosts) > 1:
        raise InputError(f"spaces named {space_id!r} exist in {len(hosts)} workspaces ({', '.join(hosts)}); name one")
    return hosts[0]


@flow(name="rollback-genie-space", persist_result=False)
def rollback_space(
    space_id: str,
    to: int,
    workspace_block: str | None = None,
    ledger_block: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write version `to` of a space's configuration back to the space, as a new version.

    The space must still be the version the history saw last (same etag), so a change made by hand
    since is not overwritten unseen (`force` overrides); the write itself is conditioned on the etag
    read just before, as improve's promotion is.

    Args:
        space_id: the Genie space.
        to: the version number to restore (`batchflows versions --space-id ...` lists them).
        workspace_block: saved DatabricksWorkspace block (default: databricks-sdk's env/profile).
        ledger_block: saved RowLedger block whose history holds the versions.
        force: overwrite the space even if it changed since the history last saw it.
    """
    log = run_logger()
    workspace, ledger = load_blocks(workspace_block, ledger_block)
    client = workspace.client(60)
    host = workspace_key(client.config.host or "")
    store = history_store(ledger, client)
    versions = store.versions(host, space_id)
    target = next((v for v in versions if v.version == to), None)
    if target is None:
        known = ", ".join(f"v{v.version}" for v in versions) or "none"
        raise RollbackError(f"space {space_id} has no version {to} in the history (known: {known})")
    if target.config is None:
        raise RollbackError(f"version {to} of {space_id} was recorded without its configuration; it cannot be restored")
    try:
        check_space_config(target.config)
    except SpaceConfigError as exc:
        raise RollbackError(f"version {to} of {space_id} cannot be restored as it was recorded: {exc}") from exc
    space = read_again(lambda: client.genie.get_space(space_id), "the space")
    latest = versions[-1]
    if latest.etag and space.etag != latest.etag and not force:
        raise RollbackError(
            f"space {space_id} changed since the history last saw it (etag {space.etag}, v{latest.version} had "
            f"{latest.etag}); score it first so the change is kept as a version, or force the rollback"
        )
    try:
        updated = client.genie.update_space(
            space_id, serialized_space=json.dumps(target.config, ensure_ascii=False), etag=space.etag
        )
    except ResourceConflict as exc:
        raise RollbackError(f"space {space_id} changed during the rollback (etag {space.etag}); try again") from exc
    flow_run = _flow_run_id()
    number = store.record_version(host, space_id, updated.etag, target.config, "rollback", flow_run)
    log.info(f"Space {space_id}: version {to} restored as version {number}")
    return {"space_id": space_id, "restored": to, "version": number, "etag": updated.etag}


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None
