"""Row enrichment against the sandbox's chat endpoint: batching, per-row cache, validation, fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flows.enrich import EnrichSettings, enrich
from tasks.enrich import Tldr, model_from_json_schema, pack
from tasks.inputs import InputError

FAST = EnrichSettings(rpm=0, max_concurrent=1, retry_delay=0.05)


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"t{i:03d}" for i in range(n)],
            "topic": [f"Topic {i}" for i in range(n)],
            "description": [f"How a team handles concern number {i} in day to day delivery work." for i in range(n)],
        }
    )


def _run(tmp_path: Path, frame: pd.DataFrame, workspace_block: str, ledger_block: str, **kw: Any) -> dict[str, Any]:
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return enrich(
        ["topic", "description"],
        input_path=str(path),
        id_column="id",
        settings=kw.pop("settings", FAST),
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _batch_sizes(sb: Any) -> list[int]:
    """Rows per call that reached the model, largest first (batches run in parallel chunks: any order)."""
    return sorted((len(r["ids"]) for r in sb.requests("chat") if "ids" in r), reverse=True)


def test_150_rows_take_8_calls_then_none_then_one_for_3_edits(sb, workspace_block, ledger_block, tmp_path):
    frame = _rows(150)
    first = _run(tmp_path, frame, workspace_block, ledger_block)
    assert _batch_sizes(sb) == [20] * 7 + [10]
    assert (first["api_calls"], first["newly_enriched"], first["cache_hits"], first["failed"]) == (8, 150, 0, 0)
    out = pd.read_parquet(first["files"]["parquet"])
    assert list(out["id"]) == list(frame["id"]) and set(out["challenge"]) <= {"practice", "expert"}
    assert all(0 < len(t.split()) <= 12 for t in out["tldr"])

    sb.reset()
    second = _run(tmp_path, frame, workspace_block, ledger_block)
    assert sb.stats()["chat"]["calls"] == 0
    assert (second["cache_hits"], second["newly_enriched"], second["api_calls"]) == (150, 0, 0)

    sb.reset()
    edited = frame.copy()
    edited.loc[[5, 70, 149], "description"] = "Rewritten: how the team negotiates scope with stakeholders."
    third = _run(tmp_path, edited, workspace_block, ledger_block)
    assert _batch_sizes(sb) == [3]
    assert (third["cache_hits"], third["newly_enriched"], third["api_calls"]) == (147, 3, 1)


@pytest.mark.parametrize(
    ("fault", "sizes"),
    [
        ("missing_id", [20, 20, 1]),  # the dropped row asked again alone
        ("bad_enum", [20, 20, 1]),  # the invalid row asked again alone
        ("extra_id", [20, 20]),  # the unknown id ignored; nothing to redo
        ("malformed", [20, 20, 10, 10]),  # no element usable: the batch split in halves, never guessed
    ],
)
def test_a_broken_batch_keeps_its_good_rows_and_redoes_the_bad(
    sb, workspace_block, ledger_block, tmp_path, fault, sizes
):
    sb.set_faults("chat", script=[fault])
    result = _run(tmp_path, _rows(40), workspace_block, ledger_block)
    assert _batch_sizes(sb) == sizes
    assert (result["newly_enriched"], result["failed"], result["api_calls"]) == (40, 0, len(sizes))


def test_a_row_that_stays_invalid_is_a_failure_record_and_the_rest_succeed(sb, workspace_block, ledger_block, tmp_path):
    sb.set_faults("chat", script=["bad_enum", "bad_enum"])  # the batch, then the row asked alone
    result = _run(tmp_path, _rows(5), workspace_block, ledger_block)
    assert _batch_sizes(sb) == [5, 1]
    assert (result["newly_enriched"], result["failed"]) == (4, 1)
    [failure] = result["failures"]
    assert failure["row_key"] == "t000" and "challenge" in failure["message"]
    out = pd.read_parquet(result["files"]["parquet"])
    assert list(out["status"]) == ["failed", "ok", "ok", "ok", "ok"]
    # the rerun asks only for the failed row
    sb.reset()
    again = _run(tmp_path, _rows(5), workspace_block, ledger_block)
    assert _batch_sizes(sb) == [1] and again["failed"] == 0


def test_a_batch_that_keeps_failing_falls_back_to_single_rows(sb, workspace_block, ledger_block, tmp_path):
    settings = EnrichSettings(rpm=0, max_concurrent=1, retry_attempts=1, retry_delay=0.05)
    sb.set_faults("chat", script=["500", "500"])  # the batch's two attempts
    result = _run(tmp_path, _rows(4), workspace_block, ledger_block, settings=settings)
    assert _batch_sizes(sb) == [1, 1, 1, 1]  # the failed attempts are not in the content log
    assert sb.stats()["chat"]["calls"] == 6
    assert (result["newly_enriched"], result["failed"]) == (4, 0)


def test_bad_rows_are_reported_and_the_rest_go_on(sb, workspace_block, ledger_block, tmp_path):
    frame = _rows(6)
    frame.loc[1, "id"] = ""
    frame.loc[3, "id"] = "t000"
    frame.loc[4, ["topic", "description"]] = ["", ""]
    result = _run(tmp_path, frame, workspace_block, ledger_block)
    messages = [f["message"] for f in result["failures"]]
    assert messages == [
        "row 2: empty id in column 'id'",
        "row 4: duplicate id 't000' (first at row 1)",
        "row 5 (id t004): every text column is empty",
    ]
    assert (result["total"], result["newly_enriched"], result["failed"]) == (6, 3, 3)
    assert _batch_sizes(sb) == [3]


def test_unusable_inputs_are_refused_with_the_reason(workspace_block, ledger_block, tmp_path):
    with pytest.raises(InputError, match=r"column\(s\) summary not in the input"):
        enrich(["summary"], input_path=_write(tmp_path, _rows(2)), workspace_block=workspace_block)
    with pytest.raises(InputError, match=r"unknown file type \.txt"):
        enrich(["topic"], input_path=str(tmp_path / "rows.txt"), workspace_block=workspace_block)
    with pytest.raises(InputError, match="exactly one of an input file or a SQL query"):
        enrich(["topic"], workspace_block=workspace_block)
    with pytest.raises(ValueError, match="batch_size"):
        EnrichSettings(batch_size=500)


def test_rows_from_a_warehouse_query_with_a_custom_schema(sb, workspace_block, ledger_block, tmp_path):
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxWords": 5},
            "tier": {"type": "string", "enum": ["basic", "premium"]},
        },
        "required": ["summary", "tier"],
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = enrich(
        ["name", "category"],
        query="SELECT product_id, name, category FROM products ORDER BY product_id LIMIT 25",
        warehouse_id="sandbox-warehouse",
        id_column="product_id",
        schema_path=str(tmp_path / "schema.json"),
        settings=FAST,
        workspace_block=workspace_block,
        ledger_block=ledger_block,
        output_dir=str(tmp_path / "out"),
    )
    out = pd.read_parquet(result["files"]["parquet"])
    assert result["newly_enriched"] == 25 and _batch_sizes(sb) == [20, 5]
    assert set(out["tier"]) <= {"basic", "premium"} and all(len(s.split()) <= 5 for s in out["summary"])


def test_schema_validation_and_packing():
    model = model_from_json_schema({"properties": {"n": {"type": "integer", "minimum": 1}, "tag": {"enum": ["a"]}}})
    assert model.model_validate({"n": 2, "tag": "a"})
    with pytest.raises(ValueError):
        model.model_validate({"n": 0, "tag": "a"})
    with pytest.raises(ValueError, match="at most 12 words"):
        Tldr.model_validate({"tldr": " ".join(["w"] * 13), "challenge": "expert"})
    with pytest.raises(ValueError, match="must not define 'id'"):
        model_from_json_schema({"properties": {"id": {"type": "string"}}})
    items = [{"id": str(i), "text": "x" * 400} for i in range(30)]  # ~100 tokens each
    assert [len(b) for b in pack(items, 20, 1000)] == [9, 9, 9, 3]
    assert [len(b) for b in pack(items, 20, 100_000)] == [20, 10]


def _write(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_the_deployment_form_is_typed():
    """The Prefect UI renders a flow's form from this schema: settings fields with types, limits, defaults."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(enrich).model_dump()
    settings = schema["definitions"]["EnrichSettings"]["properties"]
    assert settings["batch_size"]["type"] == "integer" and settings["batch_size"]["maximum"] == 50
    assert settings["rpm"]["default"] == 15 and "description" in settings["rpm"]
    assert schema["properties"]["text_columns"]["type"] == "array"
    assert "text_columns" in schema["required"]


def test_a_transport_error_while_re_asking_keeps_the_batchs_valid_rows(sb, workspace_block, ledger_block, tmp_path):
    """19 of 20 rows answered, the re-ask of the 20th hits a 500: the retry sends that one row, not 20."""
    sb.set_faults("chat", script=["bad_enum", "500"])
    result = _run(tmp_path, _rows(20), workspace_block, ledger_block)
    assert _batch_sizes(sb) == [20, 1]
    assert sb.stats()["chat"]["calls"] == 3
    assert (result["newly_enriched"], result["failed"]) == (20, 0)
    sb.reset()
    again = _run(tmp_path, _rows(20), workspace_block, ledger_block)
    assert sb.stats()["chat"]["calls"] == 0 and again["cache_hits"] == 20
