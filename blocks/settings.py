"""Job settings: one pydantic model per job, every field with a default, bounds and a description.

The same model is the flow's parameter type (the Prefect UI renders it as a form) and the target of
the CLI's flags. Presets are named instances of it.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

JUDGE_MAX_CHUNK = 50  # items per judge call the default endpoint handles within its context window
_WORDS = {"sql": "SQL", "rpm": "calls per minute", "llm": "LLM", "usd": "(USD)", "s": "(s)", "eval": "judge"}


def field_title(name: str, _info: object = None) -> str:
    """A form label in plain words: `sql_max_concurrent` → "SQL max concurrent", `cooldown_s` → "Cooldown (s)"."""
    text = " ".join(_WORDS.get(word, word) for word in name.split("_"))
    return text[:1].upper() + text[1:]


FORM = ConfigDict(extra="forbid", field_title_generator=field_title)


class ScoreSettings(BaseModel):
    """How the scoring job treats Genie, the SQL warehouse and the judge endpoint."""

    model_config = FORM

    genie_max_concurrent: int = Field(3, ge=1, le=50, description="Genie questions in flight at once, across all runs")
    genie_adaptive: bool = Field(
        False,
        description="adapt the Genie questions in flight to what the service takes, up to genie_max_concurrent: "
        "fewer after a 429, one more after a round of successes; the next run starts where this one ended",
    )
    genie_retry_attempts: int = Field(2, ge=0, le=10, description="retries per question after the first attempt")
    genie_retry_delay: float = Field(5, ge=0, description="seconds before the first retry; doubles each time")
    genie_timeout: float = Field(
        600, gt=0, description="seconds to wait for one Genie answer (Databricks advises polling up to 10 minutes)"
    )
    genie_circuit_threshold: int = Field(5, ge=1, description="consecutive failures that open Genie's circuit")
    genie_circuit_cooldown: float = Field(60, ge=0, description="seconds the circuit stays open before a probe")
    genie_rpm: float = Field(
        5,
        ge=0,
        title="Genie questions per minute",
        description="Genie questions per minute across all runs (0: no limit)",
    )
    genie_poll_initial: float = Field(1, gt=0, le=5, description="first poll interval for an answer, seconds")
    genie_poll_max: float = Field(5, gt=0, le=30, description="longest poll interval, seconds")
    sql_max_concurrent: int = Field(10, ge=1, le=100, description="SQL statements in flight at once, across all runs")
    sql_adaptive: bool = Field(
        False, description="adapt the SQL statements in flight the same way, up to sql_max_concurrent"
    )
    sql_timeout: float = Field(
        300, gt=0, description="seconds one statement may take, waiting for a stopped warehouse to start included"
    )
    sql_retry_attempts: int = Field(2, ge=0, le=10, description="retries per SQL statement after the first attempt")
    sql_row_limit: int = Field(
        100_000,
        ge=1,
        le=1_000_000,
        description="rows read from each statement's result (every chunk up to this); a result with more is "
        "truncated and goes to the judge undecided",
    )
    eval_chunk_size: int = Field(10, ge=1, le=JUDGE_MAX_CHUNK, description="undecided cases per judge call")
    eval_timeout: float = Field(30, gt=0, description="seconds one judge call may take")
    eval_max_concurrent: int = Field(4, ge=1, le=50, description="judge calls in flight at once")
    eval_adaptive: bool = Field(
        False, description="adapt the judge calls in flight the same way, up to eval_max_concurrent"
    )
    eval_retry_attempts: int = Field(2, ge=0, le=10, description="retries per judge call after the first attempt")
    judge_endpoint: str = Field(
        "databricks-meta-llama-3-3-70b-instruct",
        min_length=1,
        description="serving endpoint that judges undecided cases",
    )
    fallback_delay: float = Field(1, ge=0, description="pause between items in the sequential fallback")
    fallback_max_wait: float = Field(
        180, ge=0, description="longest the fallback waits for the circuit to allow a probe"
    )
    numeric_tolerance: float = Field(
        1e-6, gt=0, lt=1, description="relative tolerance when comparing floating-point (FLOAT, DOUBLE) values"
    )
    numeric_abs_tolerance: float = Field(
        1e-9, ge=0, lt=1, description="absolute tolerance for floating-point values near zero"
    )
    extra_columns: Literal["allow", "judge", "incorrect"] = Field(
        "allow",
        description="an answer with every expected column plus others: allow (correct), judge (ask the LLM), "
        "or incorrect",
    )
    allowed_functions: list[str] = Field(
        default_factory=list,
        description="SQL functions let through although they read files, secrets or services (e.g. ai_query)",
    )
    flaky_window: int = Field(
        5, ge=3, le=50, description="runs looked at to mark a benchmark flaky (its verdict changed twice or more)"
    )
    repeats: int = Field(
        1, ge=1, le=10, description="ask each question this many times and report how often the answer agreed"
    )

    @model_validator(mode="after")
    def _poll_bounds(self) -> ScoreSettings:
        if self.genie_poll_initial > self.genie_poll_max:
            raise ValueError(
                f"genie_poll_initial ({self.genie_poll_initial}) must not exceed genie_poll_max ({self.genie_poll_max})"
            )
        return self


Preset = Literal["default", "conservative", "aggressive"]

PRESETS: dict[str, dict[str, float | int]] = {
    "default": {},
    "conservative": {
        "genie_max_concurrent": 2,
        "genie_retry_attempts": 3,
        "genie_circuit_threshold": 3,
        "sql_max_concurrent": 5,
    },
    "aggressive": {
        "genie_max_concurrent": 10,
        "genie_retry_attempts": 1,
        "genie_timeout": 300,
        "genie_circuit_threshold": 10,
        "sql_max_concurrent": 20,
    },
}


def score_settings(preset: str = "default", **overrides: object) -> ScoreSettings:
    """The preset's settings with `overrides` applied (None values are ignored).

    Raises:
        ValueError: unknown preset, unknown key, or a value out of bounds (pydantic names the field).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return ScoreSettings.model_validate(values)


class Overrides(BaseModel):
    """Only the settings a user set for one run; an empty (None) field keeps the preset's value.

    A flow's form built from this shows every field empty, so choosing a preset and filling two fields runs
    the preset with those two changed. A full settings object given instead (code, a rerun) sets every field.
    """

    model_config = FORM

    @model_validator(mode="before")
    @classmethod
    def _from_settings(cls, data: Any) -> Any:
        return data.model_dump() if isinstance(data, BaseModel) else data

    def changed(self) -> dict[str, Any]:
        """The fields set, by name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


def overrides_of(model: type[BaseModel]) -> type[Overrides]:
    """The Overrides model of a settings model: the same fields, bounds and descriptions, each optional."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        described = FieldInfo.merge_field_infos(
            info,
            default=None,
            default_factory=None,
            description=f"{info.description}; empty: the preset's value (default {default})",
        )
        fields[name] = (info.annotation | None, described)  # type: ignore[operator]  # every field is annotated
    return create_model(f"{model.__name__}Overrides", __base__=Overrides, __doc__=Overrides.__doc__, **fields)


ScoreOverrides = overrides_of(ScoreSettings)


def resolve_score_settings(
    preset: str = "default", overrides: BaseModel | dict[str, Any] | None = None, settings_block: str | None = None
) -> tuple[ScoreSettings, dict[str, Any]]:
    """(the settings a scoring run uses, the fields set for the run): the preset (or the saved ScorePreset
    block `settings_block`) first, then only the fields set in `overrides`.

    Raises:
        ValueError: unknown preset, unknown field or a value out of bounds, named.
    """
    changed = ScoreOverrides.model_validate(overrides or {}).changed()
    base = ScorePreset.load(settings_block).settings if settings_block else score_settings(preset)  # type: ignore[union-attr]
    return ScoreSettings.model_validate({**base.model_dump(), **changed}), changed


class ScorePreset(Block):
    """Scoring settings saved under a name, to pick in a deployment's form (`settings_block`) or edit in the
    UI. `batchflows deploy` saves the three built-in presets as score-default, score-conservative and
    score-aggressive."""

    _block_type_name = "batchflows score preset"
    _description = "Concurrency, retries, timeouts, circuit breaker and judge settings for scoring a Genie space."

    settings: ScoreSettings = Field(default_factory=ScoreSettings, description="the scoring settings")


def save_presets() -> list[str]:
    names = []
    for name in PRESETS:
        ScorePreset(settings=score_settings(name)).save(f"score-{name}", overwrite=True)
        names.append(f"score-{name}")
    return names
