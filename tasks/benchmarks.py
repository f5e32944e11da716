"""Benchmark files (JSON, YAML or CSV): id, question, expected_sql, optional tags, validated row by row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class BenchmarkFileError(ValueError):
    """A benchmarks file that cannot be used; the message names every problem and its row."""


class Benchmark(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    expected_sql: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.replace(";", ",").split(",") if t.strip()]
        return value or []

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


def _records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkFileError(f"cannot read benchmarks file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".csv":
            data = list(csv.DictReader(text.splitlines()))
        else:
            raise BenchmarkFileError(f"{path}: unsupported format {suffix!r}; use .json, .yaml, .yml or .csv")
    except (ValueError, yaml.YAMLError) as exc:
        raise BenchmarkFileError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        data = data["benchmarks"]
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path}: expected a list of benchmarks (or {{'benchmarks': [...]}})")
    return data


def load_benchmarks(path: str | Path) -> list[Benchmark]:
    """Read and validate every row; raise one error listing all bad rows (nothing is dropped silently).

    Raises:
        BenchmarkFileError: unreadable file, wrong format, an invalid row, or a duplicate id.
    """
    path = Path(path)
    problems: list[str] = []
    benchmarks: list[Benchmark] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(_records(path), start=1):
        if not isinstance(record, dict):
            problems.append(f"row {number}: expected an object with id, question, expected_sql")
            continue
        try:
            benchmark = Benchmark.model_validate(
                {k: v for k, v in record.items() if v not in (None, "") or k != "tags"}
            )
        except ValidationError as exc:
            label = record.get("id") or "(no id)"
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
            problems.append(f"row {number} (id {label}): {details}")
            continue
        if benchmark.id in seen:
            problems.append(f"row {number}: duplicate id {benchmark.id!r} (first at row {seen[benchmark.id]})")
            continue
        seen[benchmark.id] = number
        benchmarks.append(benchmark)
    if problems:
        raise BenchmarkFileError(f"{path}: {len(problems)} invalid row(s):\n  " + "\n  ".join(problems))
    if not benchmarks:
        raise BenchmarkFileError(f"{path}: no benchmarks found")
    return benchmarks


def repeated_questions(benchmarks: list[Benchmark]) -> list[list[str]]:
    """Ids of benchmarks that ask the same question, one list per question (Genie is asked it once)."""
    by_question: dict[str, list[str]] = {}
    for b in benchmarks:
        by_question.setdefault(b.question, []).append(b.id)
    return [ids for ids in by_question.values() if len(ids) > 1]
