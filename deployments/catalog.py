"""One deployment per job, the same for `batchflows serve` (no infrastructure) and `batchflows deploy`
(a process work pool and its workers): name, entrypoint, description, tags, parameter defaults, schedule.

Secrets never travel as parameters: a deployment names a saved DatabricksWorkspace block, whose token the
UI shows masked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAGS = ["batchflows"]


@dataclass
class Job:
    name: str
    entrypoint: str  # path:function, relative to the repository root
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    interval_s: float | None = None

    def flow(self) -> Any:
        path, function = self.entrypoint.split(":")
        return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)

    def schedule(self) -> dict[str, Any]:
        if self.cron:
            return {"cron": self.cron}
        if self.interval_s:
            return {"interval": timedelta(seconds=self.interval_s)}
        return {}


def jobs(
    workspace_block: str | None = None,
    score: dict[str, Any] | None = None,
    score_cron: str | None = None,
    score_interval_s: float | None = None,
    output_dir: str | None = None,
) -> list[Job]:
    """The deployments. `score` holds the scoring parameters (benchmarks, space_id, warehouse_id) a schedule
    needs; without them the scoring deployment has no schedule (a scheduled run could not start)."""
    common = {"workspace_block": workspace_block} if workspace_block else {}
    if output_dir:
        common["output_dir"] = output_dir
    scoring = {**common, **(score or {})}
    scheduled = {"benchmarks", "space_id", "warehouse_id"} <= set(scoring)
    return [
        Job(
            "score",
            "flows/score.py:score",
            "Score a Genie space against benchmark questions (Genie, SQL, compare, judge).",
            scoring,
            cron=score_cron if scheduled else None,
            interval_s=score_interval_s if scheduled else None,
        ),
        Job(
            "improve",
            "flows/improve.py:improve",
            "Improve a Genie space from its failures on a dev copy; promote only if better.",
            {**common, **{k: v for k, v in (score or {}).items() if k in ("benchmarks", "space_id", "warehouse_id")}},
        ),
        Job(
            "rerun-failed",
            "flows/rerun.py:rerun_failed",
            "Rerun only the failed rows of an earlier scoring run (its flow run id or report folder) and merge.",
            {"output_dir": output_dir} if output_dir else {},
        ),
        Job("enrich", "flows/enrich.py:enrich", "Add LLM-generated columns to rows, 20 rows per call.", common),
        Job(
            "embed", "flows/embed.py:embed", "Embed documents into a searchable vector store, within a budget.", common
        ),
        Job("analyse", "flows/analyse.py:analyse", "Analyse ordered items in parallel, then merge in order.", common),
    ]


def served(job_list: list[Job]) -> list[Any]:
    """RunnerDeployments for `prefect.serve` (flows run in subprocesses of the serving process)."""
    return [
        j.flow().to_deployment(
            name=j.name, description=j.description, tags=TAGS, parameters=j.parameters, **j.schedule()
        )
        for j in job_list
    ]


def ensure_pool(name: str) -> None:
    """Create the process work pool `name` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", description="batchflows jobs"))


def deploy(job_list: list[Job], pool: str) -> dict[str, str]:
    """Deploy every job to the process work pool `pool` (created if missing), with this checkout as the code
    location. Returns deployment name -> id."""
    from prefect import Flow

    ensure_pool(pool)
    ids = {}
    for j in job_list:
        flow = Flow.from_source(source=str(ROOT), entrypoint=j.entrypoint)
        deployment_id = flow.deploy(  # type: ignore[union-attr]
            name=j.name,
            work_pool_name=pool,
            description=j.description,
            tags=TAGS,
            parameters=j.parameters,
            print_next_steps=False,
            **j.schedule(),
        )
        ids[f"{flow.name}/{j.name}"] = str(deployment_id)  # type: ignore[union-attr]
    return ids


def create_limits(workspace_block: str | None, settings: dict[str, Any] | None) -> list[str]:
    """The scoring job's shared limits on the deployments' workspace, made now from the deployed settings so
    that the team's limits exist before any run (a run never changes one that exists). Returns them as
    "name=value" lines; none when the block names no host (the first run then creates them)."""
    from blocks.settings import ScoreSettings
    from blocks.workspace import DatabricksWorkspace, workspace_slug
    from tasks.limits import ensure_service_limits, limit_name, scoped

    block: Any = DatabricksWorkspace.load(workspace_block) if workspace_block else DatabricksWorkspace()
    if not block.host:
        return []
    score = ScoreSettings.model_validate(settings or {})
    made = []
    for service, concurrency, rpm in (
        ("genie", score.genie_max_concurrent, score.genie_rpm),
        ("sql", score.sql_max_concurrent, 0),
        ("llm", score.eval_max_concurrent, 0),
    ):
        name = scoped(service, workspace_slug(block.host))
        allowed, rate = ensure_service_limits(name, concurrency, rpm)
        made.append(f"{limit_name(name)}={allowed}" + (f" ({rate.per_minute:g} a minute)" if rate else ""))
    return made


def register_blocks() -> list[str]:
    """Register our block types so the UI lists them (with their descriptions) before any is saved, and save
    the scoring presets as ScorePreset blocks."""
    from blocks.breaker import CircuitBreaker
    from blocks.ledger import RowLedger
    from blocks.settings import ScorePreset, save_presets
    from blocks.workspace import DatabricksWorkspace

    names = []
    for block in (DatabricksWorkspace, CircuitBreaker, RowLedger, ScorePreset):
        block.register_type_and_schema()
        names.append(block.get_block_type_name())
    return names + save_presets()
