"""Every task input is data (names, keys, settings), not a lambda or a handle: a whole scoring job and an
enrichment job run under Prefect's process-based task runner, each phase's tasks in other processes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect.task_runners import ProcessPoolTaskRunner

from blocks.settings import score_settings
from flows.enrich import EnrichSettings, enrich
from flows.score import score

pytestmark = pytest.mark.e2e
BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))


def _in_processes(flow: Any) -> Any:
    return flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=2))


def test_a_scoring_run_with_its_tasks_in_other_processes(
    sb: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    fast = {"genie_rpm": 0, "genie_poll_initial": 0.05, "genie_poll_max": 0.2, "genie_retry_delay": 0.05}
    run: tuple[Any, ...] = (BENCHMARKS, "retail", "sandbox-warehouse", score_settings("default", **fast))
    where: dict[str, Any] = {
        "workspace_block": workspace_block,
        "ledger_block": ledger_block,
        "output_dir": str(tmp_path),
    }
    summary = _in_processes(score)(*run, **where)
    assert summary["total"] == 32 and summary["verdicts"]["genie_error"] == 0, summary["failures"]
    assert summary["verdicts"]["correct"] >= 20  # the sandbox's space answers some questions wrong on purpose
    assert sb.stats()["genie"]["calls"] == 32
    calls = {p["phase"]: p["calls"] for p in summary["phases"]}  # counted in the processes that made them
    assert calls["genie"] == 32 and calls["sql"] == sb.stats()["sql"]["calls"], (calls, sb.stats()["sql"])
    # the answers the other processes wrote to the ledger are the next run's (the call-free rerun)
    sb.reset()
    again = score(*run, **where)
    assert sb.stats()["genie"]["calls"] == 0 and again["verdicts"] == summary["verdicts"]


def test_an_enrichment_run_with_its_tasks_in_other_processes(
    sb: Any, workspace_block: str, ledger_block: str, tmp_path: Path
) -> None:
    rows = pd.DataFrame(
        {
            "id": [f"t{i:03d}" for i in range(45)],
            "topic": [f"Topic {i}" for i in range(45)],
            "description": [f"How a team handles concern number {i} in day to day delivery work." for i in range(45)],
        }
    )
    rows.to_csv(tmp_path / "rows.csv", index=False)
    sb.set_faults("chat", script=["500"])  # one batch fails once and is retried in its process
    summary = _in_processes(enrich)(
        ["topic", "description"],
        input_path=str(tmp_path / "rows.csv"),
        id_column="id",
        settings=EnrichSettings(rpm=0, max_concurrent=2, retry_delay=0.05),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
    )
    assert (summary["newly_enriched"], summary["failed"]) == (45, 0), summary["failures"]
    # batches of 20, 20 and 5, and the retry: counted in the processes that made them
    assert summary["api_calls"] == sb.stats()["chat"]["calls"] == 4
    out = pd.read_parquet(summary["files"]["parquet"])
    assert out["status"].eq("ok").all() and out["tldr"].notna().all()
