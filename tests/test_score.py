"""The scoring flow end to end on the sandbox: verdicts, batch vs sequential, reruns, breaker scenarios."""

from __future__ import annotations

import itertools
import re
import uuid
from importlib import resources

import pandas as pd
import pytest

from blocks.settings import score_settings
from flows.phase import summary_of
from flows.rerun import SAME_WITHOUT_FRESH
from flows.score import FAILED, score
from tasks.benchmarks import Benchmark, BenchmarkFileError, load_benchmarks

BENCHMARKS = str(resources.files("sandbox").joinpath("data/benchmarks.yaml"))
FAST = {
    "genie_rpm": 0,
    "genie_poll_initial": 0.05,
    "genie_poll_max": 0.2,
    "genie_retry_delay": 0.05,
    "fallback_delay": 0.05,
}


def _score(*args, **kwargs):
    """The run's report, also when every row failed (the run then ends Failed)."""
    return summary_of(_score_state(*args, **kwargs))


def _score_state(
    workspace_block,
    ledger_block,
    tmp_path,
    benchmarks=BENCHMARKS,
    sequential=False,
    space="retail",
    breaker=None,
    **settings,
):
    return score(
        benchmarks,
        space,
        "sandbox-warehouse",
        score_settings(**{**FAST, **settings}),
        sequential=sequential,
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path),
        breaker_block=breaker or f"b-{uuid.uuid4().hex[:8]}",
        return_state=True,
    )


def test_scorecard_gives_every_benchmark_a_verdict(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("genie", latency_ms=100)
    result = _score(workspace_block, ledger_block, tmp_path, extra_columns="judge")  # answers with extra columns
    assert result["total"] == 32 and len(result["rows"]) == 32
    assert sum(result["verdicts"].values()) == 32
    assert result["verdicts"]["correct"] >= 20
    assert result["verdicts"]["sql_error"] >= 1 and result["verdicts"]["no_sql"] >= 1
    assert result["judged"] >= 1 and result["judge_calls"] == sb.stats()["chat"]["calls"]
    # the comparison decides most cases: far fewer judge calls than cases
    assert result["judged"] < result["total"] / 3
    # the judge sees both SQLs and why the comparison could not decide, with a sample of both results
    fields = set(sb.requests("chat")[0]["fields"])
    assert {"question", "expected_sql", "answer_sql", "comparison", "expected", "actual"} <= fields
    assert sb.stats()["genie"]["calls"] == 32 and sb.stats()["genie"]["max_in_flight"] == 3
    frame = pd.read_parquet(result["files"]["parquet"])
    assert list(frame["id"]) == [f"q{i:02d}" for i in range(1, 33)]
    assert set(frame["stage"]) <= {"comparison", "judge", "genie"}


def test_batch_and_sequential_give_the_same_verdicts(sb, workspace_block, tmp_path, prefect_api):
    from blocks.ledger import RowLedger

    RowLedger(path=str(tmp_path / "a.sqlite")).save("ledger-a", overwrite=True)
    RowLedger(path=str(tmp_path / "b.sqlite")).save("ledger-b", overwrite=True)
    batch = _score(workspace_block, "ledger-a", tmp_path)
    sequential = _score(workspace_block, "ledger-b", tmp_path, sequential=True)
    assert [(r["id"], r["verdict"]) for r in batch["rows"]] == [(r["id"], r["verdict"]) for r in sequential["rows"]]


def test_rerun_asks_genie_nothing_it_already_answered(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("genie", script=["500"] * 3)  # three questions fail for good in run one (no retries)
    state = _score_state(workspace_block, ledger_block, tmp_path, genie_retry_attempts=0)
    # a partial run completes, saying what failed (which questions Genie meets first varies: a task per question;
    # one of the 3 may be a question whose answer fails anyway, sql_error)
    assert state.is_completed(), state
    done = re.fullmatch(r"(\d+)/32 judged, (\d+) failed: genie_error 3(?:, sql_error (\d))?", str(state.message))
    assert done and int(done[1]) + int(done[2]) == 32 and int(done[2]) == 3 + int(done[3] or 0), state.message
    first = summary_of(state)
    failed = {r["question"] for r in first["rows"] if r["verdict"] == "genie_error"}
    assert len(failed) == 3
    sb.reset()
    second = _score(workspace_block, ledger_block, tmp_path)
    assert {e["question"] for e in sb.requests("genie")} == failed  # only those were asked again
    assert sb.stats()["genie"]["calls"] == 3
    assert second["cached_genie_answers"] == 29
    assert second["verdicts"]["genie_error"] == 0


def test_breaker_healthy_stays_closed(sb, workspace_block, ledger_block, tmp_path):
    result = _score(workspace_block, ledger_block, tmp_path)
    assert result["circuit_state"] == "CLOSED" and result["circuit_events"] == []


def test_breaker_opens_falls_back_and_recovers(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("genie", script=["503"] * 5, retry_after_s=0)
    result = _score(
        workspace_block,
        ledger_block,
        tmp_path,
        genie_retry_attempts=0,
        genie_circuit_threshold=5,
        genie_circuit_cooldown=0.3,
        genie_max_concurrent=1,
    )
    assert result["circuit_events"] == [
        "Circuit breaker: Too many failures (5) - OPENING circuit",
        "Circuit breaker: Attempting to recover (HALF_OPEN)",
        "Circuit breaker: Service recovered (CLOSED)",
    ]
    assert result["circuit_state"] == "CLOSED"
    assert result["verdicts"]["genie_error"] == 5  # the five that failed before the circuit opened
    assert sb.stats()["genie"]["calls"] == 32  # 5 failures, then 27 answered (in batch and fallback)


def test_service_down_records_every_row_and_fails_the_run(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("genie", down=True, retry_after_s=0)
    state = _score_state(
        workspace_block,
        ledger_block,
        tmp_path,
        genie_retry_attempts=0,
        genie_circuit_threshold=5,
        genie_circuit_cooldown=0.6,
        fallback_max_wait=1,
    )
    # nothing judged: the run is Failed, its message says why, and its report still has every row
    assert state.is_failed(), state
    assert state.message == "0/32 judged, 32 failed: genie_error 32", state
    result = summary_of(state)
    assert result["verdicts"]["genie_error"] == 32
    kinds = {f["error_kind"] for f in result["failures"]}
    assert kinds == {"server_error", "circuit_open"}  # 503 Temporarily Unavailable, then the open circuit
    assert len(result["failures"]) == 32
    assert result["circuit_state"] in ("OPEN", "HALF_OPEN")


def test_genie_rpm_spaces_questions_apart(sb, workspace_block, ledger_block, tmp_path):
    items = load_benchmarks(BENCHMARKS)[:5]
    _score(workspace_block, ledger_block, tmp_path, benchmarks=items, genie_rpm=120, genie_max_concurrent=5)
    starts = sorted(e["t"] for e in sb.requests("genie"))
    assert len(starts) == 5
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.4  # 120 per minute: one every 0.5 s (less the request's own jitter)
    assert starts[-1] - starts[0] >= 1.8  # five questions need four full gaps of 0.5 s, in all


def test_bad_benchmark_file_names_every_bad_row(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("id,question,expected_sql\nq1,How many?,SELECT 1\nq1,Again?,SELECT 2\nq3,,SELECT 3\n")
    with pytest.raises(BenchmarkFileError) as info:
        load_benchmarks(path)
    message = str(info.value)
    assert "row 2: duplicate id 'q1' (first at row 1)" in message
    assert "row 3 (id 'q3'): question: String should have at least 1 character" in message


def test_invalid_settings_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="genie_max_concurrent"):
        score_settings(genie_max_concurrent=0)
    with pytest.raises(ValueError, match="eval_chunk_size"):
        score_settings(eval_chunk_size=500)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        score_settings("fast")
    assert score_settings("conservative", sql_max_concurrent=7).genie_max_concurrent == 2


def test_rerun_failed_calls_only_the_failed_rows_and_merges(sb, workspace_block, ledger_block, tmp_path):
    from pathlib import Path

    from flows.rerun import rerun_failed
    from flows.score import _markdown

    sb.set_faults("genie", script=["500"] * 4)  # the first four questions asked fail; no retries
    first = _score(workspace_block, ledger_block, tmp_path, genie_retry_attempts=0, genie_max_concurrent=1)
    genie_failed = {r["id"] for r in first["rows"] if r["verdict"] == "genie_error"}
    assert len(genie_failed) == 4
    report = Path(first["files"]["csv"]).parent
    assert f"batchflows rerun-failed {report}" in _markdown(first)  # the scorecard artifact says how
    sb.reset()
    merged = rerun_failed(str(report), kinds=["genie_error"])
    assert sb.stats()["genie"]["calls"] == 4  # exactly the failed rows, nothing that had an answer
    assert merged["rerun"] == 4 and merged["total"] == 32
    rows = {r["id"]: r for r in merged["rows"]}
    # fixed: every rerun row with a verdict now (one whose Genie SQL fails anyway ends sql_error, not fixed)
    assert merged["fixed"] == sum(rows[i]["verdict"] not in FAILED for i in genie_failed) >= 2
    assert not any(rows[i]["verdict"] == "genie_error" for i in genie_failed)
    assert {i for i, r in rows.items() if r["rerun"]} == genie_failed
    # rows not rerun keep their earlier verdicts
    assert all(rows[r["id"]]["verdict"] == r["verdict"] for r in first["rows"] if r["id"] not in genie_failed)


def test_rerun_of_a_fresh_run_reuses_its_genie_answers(sb, workspace_block, ledger_block, tmp_path):
    """A --fresh run's answers replace the older ones in the ledger; its failed-rows rerun must find them."""
    from pathlib import Path

    from flows.rerun import rerun_failed

    sb.set_faults("sql", script=["500"] * 3)  # three statements fail (no retries): their rows are sql_error
    first = score(
        BENCHMARKS,
        "retail",
        "sandbox-warehouse",
        score_settings("default", **FAST, sql_retry_attempts=0),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path),
        fresh=True,
    )
    failed = [r for r in first["rows"] if r["verdict"] == "sql_error"]
    assert failed and all(r["genie_sql"] for r in failed)  # Genie had answered them
    transient = [r for r in failed if r["error_kind"] not in SAME_WITHOUT_FRESH]
    sb.reset()
    merged = rerun_failed(str(Path(first["files"]["csv"]).parent))
    assert sb.stats()["genie"]["calls"] == 0  # the fresh run's answers were reused
    assert sb.stats()["sql"]["calls"] >= 1
    assert merged["rerun"] == len(transient) and merged["fixed"] >= 1
    left = [r for r in merged["rows"] if r["verdict"] == "sql_error"]
    assert all("500" not in r["reason"] for r in left)  # what is left is Genie's own bad SQL, not the faults


def test_rerun_failed_offers_only_failures_a_rerun_can_change(sb, workspace_block, ledger_block, tmp_path):
    """Genie's own SQL failing in the warehouse (q08, q24 on the sandbox) fails the same way from the ledger:
    a rerun without --fresh leaves those rows and says why; with --fresh it asks Genie for exactly them."""
    from pathlib import Path

    from flows.rerun import rerun_failed

    first = _score(workspace_block, ledger_block, tmp_path)
    own_sql = {r["id"] for r in first["rows"] if r["error_kind"] == "genie_sql"}
    assert own_sql == {"q08", "q24"}
    report = str(Path(first["files"]["csv"]).parent)
    sb.reset()
    again = rerun_failed(report)
    assert again["rerun"] == 0 and set(again["not_rerun"]) == own_sql
    assert "use --fresh" in again["not_rerun"]["q08"]
    assert sb.stats()["genie"]["calls"] == 0 and sb.stats()["sql"]["calls"] == 0
    fresh = rerun_failed(report, fresh=True)
    assert fresh["rerun"] == 2 and fresh["not_rerun"] == {}
    assert sb.stats()["genie"]["calls"] == 2


def test_repeats_report_each_benchmarks_agreement(sb, workspace_block, ledger_block, tmp_path):
    items = load_benchmarks(BENCHMARKS)[:3]
    sb.set_flaky(items[0].question)  # right, wrong, right, ...
    result = _score(workspace_block, ledger_block, tmp_path, benchmarks=items, repeats=3)
    assert sb.stats()["genie"]["calls"] == 9
    rows = {r["id"]: r for r in result["rows"]}
    assert len(result["rows"]) == 3 and result["total"] == 3
    assert rows["q01"]["agreement"] == "2/3 correct" and rows["q01"]["verdict"] == "correct"
    assert sorted(rows["q01"]["repeat_verdicts"].split(", ")) == ["correct", "correct", "incorrect"]  # any order
    assert rows["q02"]["agreement"] == rows["q03"]["agreement"] == "3/3 correct"
    assert "agreement" in pd.read_parquet(result["files"]["parquet"]).columns
    sb.reset()
    again = _score(workspace_block, ledger_block, tmp_path, benchmarks=items, repeats=3)
    assert sb.stats()["genie"]["calls"] == 0  # every repeat's answer is in the ledger
    assert [r["agreement"] for r in again["rows"]] == [r["agreement"] for r in result["rows"]]


def test_repeats_tie_goes_against_correct(sb, workspace_block, ledger_block, tmp_path):
    items = load_benchmarks(BENCHMARKS)[:1]
    sb.set_flaky(items[0].question)
    result = _score(workspace_block, ledger_block, tmp_path, benchmarks=items, repeats=2)
    assert result["rows"][0]["verdict"] == "incorrect" and result["rows"][0]["agreement"] == "1/2 correct"


def test_benchmarks_repeating_a_question_are_named_and_share_its_answer(
    sb, workspace_block, ledger_block, tmp_path, caplog
):
    first = load_benchmarks(BENCHMARKS)[0]
    twin = Benchmark(id="q01-twin", question=first.question, expected_sql="SELECT COUNT(*) + 1 AS n FROM customers")
    result = _score(workspace_block, ledger_block, tmp_path, benchmarks=[first, twin])
    assert sb.stats()["genie"]["calls"] == 1
    assert [r["verdict"] for r in result["rows"]] == ["correct", "incorrect"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("q01, q01-twin ask the same question" in w for w in warnings), warnings


def test_a_fresh_runs_answers_are_the_ones_later_runs_reuse(sb, workspace_block, ledger_block, tmp_path):
    """--fresh asks everything again and keeps the newest answers for every later run (no run-private scope)."""
    common = dict(workspace_block=workspace_block, ledger_block=ledger_block, output_dir=str(tmp_path))
    fresh = score(BENCHMARKS, "retail", "sandbox-warehouse", score_settings("default", **FAST), fresh=True, **common)
    assert sb.stats()["genie"]["calls"] == len(fresh["rows"])
    sb.reset()
    later = score(BENCHMARKS, "retail", "sandbox-warehouse", score_settings("default", **FAST), **common)
    assert sb.stats()["genie"]["calls"] == 0
    assert later["cached_genie_answers"] == len(later["rows"]) and later["score"] == fresh["score"]


def test_the_sql_runs_while_genie_is_asked_and_after_it_when_sequential(sb, workspace_block, tmp_path, prefect_api):
    """The expected SQL comes with Genie's first answer, and each answer's SQL runs as it comes: the warehouse
    works while Genie is asked. A sequential run keeps one call at a time, phase after phase."""
    from blocks.ledger import RowLedger

    items = load_benchmarks(BENCHMARKS)[:8]
    expected = {b.expected_sql for b in items}
    verdicts = []
    for sequential in (False, True):
        sb.reset()
        sb.set_faults("genie", latency_ms=400)  # 4 rounds of 2 questions: the first answer ~1 s before the last ask
        ledger = f"ledger-{str(sequential).lower()}"
        RowLedger(path=str(tmp_path / f"{ledger}.sqlite")).save(ledger, overwrite=True)
        result = _score(
            workspace_block, ledger, tmp_path, benchmarks=items, sequential=sequential, genie_max_concurrent=2
        )
        verdicts.append([r["verdict"] for r in result["rows"]])
        last_asked = max(e["t"] for e in sb.requests("genie"))
        ran = sb.requests("sql")
        assert {e["statement"] for e in ran} >= expected
        if sequential:
            assert min(e["t"] for e in ran) > last_asked
        else:
            assert all(e["t"] < last_asked for e in ran if e["statement"] in expected), (last_asked, ran)
            assert result["phases"][1]["calls"] == len(ran)  # the phase's own meter, in its own thread
    assert verdicts[0] == verdicts[1]


def test_the_expected_sql_runs_once_genies_first_round_is_out_not_after_its_first_answer(
    sb, workspace_block, ledger_block, tmp_path
):
    """The warehouse works while Genie thinks: the expected SQL starts when the first round of questions is
    out, not with the first answer, when the next round is being asked (it came 1.5 s later here)."""
    items = load_benchmarks(BENCHMARKS)[:3]
    sb.set_faults("genie", latency_ms=1500)
    _score(workspace_block, ledger_block, tmp_path, benchmarks=items, genie_max_concurrent=3)
    first_asked = min(e["t"] for e in sb.requests("genie"))
    expected = [e["t"] for e in sb.requests("sql") if e["statement"] in {b.expected_sql for b in items}]
    assert len(expected) == len({b.expected_sql for b in items})
    assert max(expected) < first_asked + 1.5, (first_asked, expected)


def test_the_sql_phase_holds_its_slots_only_while_statements_are_in_flight(
    sb, workspace_block, ledger_block, tmp_path, prefect_api, monkeypatch
):
    """Genie's answers come minutes apart on a real workspace: the SQL phase that takes them as they come must
    not keep the workspace's SQL slots (shared by every run) between them, past a short linger."""
    monkeypatch.setenv("BATCHFLOWS_SLOT_LINGER_S", "0.1")
    import contextlib
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    sb.set_faults("genie", latency_ms=800)  # 3 questions one at a time: ~2.7 s of Genie, SQL in between
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not done.is_set():
                with contextlib.suppress(ObjectNotFound):  # until the run creates the limit
                    seen.append(
                        client.read_global_concurrency_limit_by_name("batchflows-sql-local-sandbox").active_slots
                    )
                time.sleep(0.03)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _score(
            workspace_block,
            ledger_block,
            tmp_path,
            benchmarks=load_benchmarks(BENCHMARKS)[:3],
            genie_max_concurrent=1,
            sql_max_concurrent=4,
        )
    finally:
        done.set()
        watcher.join()
    assert result["phases"][1]["succeeded"] >= 3
    assert len(seen) > 20 and 4 in seen, seen  # the slots were taken for the statements
    assert seen.count(0) > len(seen) / 2, seen  # and free most of the time, while Genie was asked
