"""Gate the prepared splits with a Great Expectations suite built from ``params.yaml``.

Every check is a GX expectation, so the results have GX's shape (counts, percentages, offending rows)
and the suite can move to a GX data context unchanged. The step always writes ``validation.json`` and
``report.md`` first, then raises one error naming every failed expectation: a person fixing the data
sees all problems at once instead of one per run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from langops.config import DataConfig, ValidateConfig
from langops.io import LABEL, SPLITS, TEXT, read_labels, read_split, write_json
from langops.tasks.prepare import normalise_text

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

SUMMARY_FILE = "validation.json"
REPORT_FILE = "report.md"
KEY = "text_key"  # derived column: text normalised as prepare does, compared across splits for leakage
COUNTS_ASSET = "train_class_counts"
LEAK_SPLITS = ("validation", "test")
MAX_EXAMPLE_CHARS = 80
MAX_KWARG_ITEMS = 20
CHECKS = (  # report order within a split
    "column_present",
    "text_not_null",
    "text_not_blank",
    "text_length",
    "label_not_null",
    "label_known",
    "class_min_rows",
    "duplicate_rate",
    "no_train_leak",
)


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    report_path: Path
    summary_path: Path
    evaluated: int
    failed: int
    stats: dict[str, Any]


class DataValidationError(ValueError):
    """The prepared data failed expectations; ``result`` points at the report that lists them all."""

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CheckOutcome:
    """One evaluated expectation, flattened to what a report and an error message need."""

    split: str
    check: str
    description: str
    expectation: str
    column: str
    kwargs: dict[str, Any]
    success: bool
    element_count: int | None
    unexpected_count: int | None
    observed_value: Any
    examples: tuple[str, ...]
    error: str | None

    @property
    def unexpected_percent(self) -> float | None:
        if self.unexpected_count is None or not self.element_count:
            return None
        return 100.0 * self.unexpected_count / self.element_count


def validate(
    data: DataConfig, cfg: ValidateConfig, *, prepared_dir: Path, report_dir: Path
) -> ValidationResult:
    """Run the expectation suite over every prepared split and write the report.

    Args:
        data: the declared labels (when None, those in ``prepared_dir/labels.json``).
        cfg: thresholds: text length, rows per class, duplicate rate, examples quoted.
        prepared_dir: output of the prepare step.
        report_dir: receives ``validation.json`` and ``report.md``.

    Returns:
        The result, when every expectation passed.

    Raises:
        DataValidationError: one or more expectations failed; the message lists each with split, column,
            count, percent and examples, and ``err.result`` locates the report.
        FileNotFoundError: a split or the label map is missing (prepare has not run).
    """
    prepared_dir, report_dir = Path(prepared_dir), Path(report_dir)
    labels = list(data.labels) if data.labels is not None else read_labels(prepared_dir)
    frames = {split: read_split(prepared_dir, split) for split in SPLITS}
    outcomes = run_suite(frames, labels, cfg)
    failed = [outcome for outcome in outcomes if not outcome.success]
    result = ValidationResult(
        success=not failed,
        report_path=report_dir / REPORT_FILE,
        summary_path=report_dir / SUMMARY_FILE,
        evaluated=len(outcomes),
        failed=len(failed),
        stats=describe_data(frames, labels),
    )
    write_report(result, outcomes, prepared_dir=prepared_dir)
    if failed:
        raise DataValidationError(format_failures(failed, result, cfg.max_examples), result)
    return result


def run_suite(
    frames: dict[str, pd.DataFrame], labels: Sequence[str], cfg: ValidateConfig
) -> list[CheckOutcome]:
    """Validate each split (and train's per-class counts) with GX in an in-memory, quiet context."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"  # validation data never leaves the machine
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("prepared")
    train = frames["train"]
    train_keys = text_keys(train) if TEXT in train.columns else None
    batches = [
        (split, with_text_key(frame), split_expectations(split, frame, labels, cfg, train_keys=train_keys))
        for split, frame in frames.items()
    ]
    if LABEL in train.columns:
        batches.append(
            (COUNTS_ASSET, class_counts(train, labels), [min_rows_expectation(cfg.min_rows_per_class)])
        )

    outcomes: list[CheckOutcome] = []
    for asset_name, frame, expectations in batches:
        suite = gx.ExpectationSuite(name=f"langops-{asset_name}", expectations=expectations)
        batch = (
            source.add_dataframe_asset(asset_name)
            .add_batch_definition_whole_dataframe(asset_name)
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.max_examples}
        if asset_name == COUNTS_ASSET:
            result_format["unexpected_index_column_names"] = [LABEL]  # name the class, not just its count
        validation = batch.validate(suite, result_format=result_format)
        outcomes.extend(to_outcomes(validation, frame, cfg.max_examples))
    check_rank = {check: i for i, check in enumerate(CHECKS)}
    split_rank = {split: i for i, split in enumerate(SPLITS)}
    return sorted(outcomes, key=lambda o: (split_rank[o.split], check_rank[o.check], o.column))


def split_expectations(
    split: str,
    frame: pd.DataFrame,
    labels: Sequence[str],
    cfg: ValidateConfig,
    *,
    train_keys: list[str] | None,
) -> list[Expectation]:
    """The expectations for one split; checks on a missing column are left out (its absence already fails)."""
    from great_expectations import expectations as gxe

    def meta(check: str, description: str, column: str = TEXT) -> dict[str, str]:
        return {"split": split, "check": check, "description": description, "column": column}

    expectations: list[Expectation] = [
        gxe.ExpectColumnToExist(
            column=column, meta=meta("column_present", f"required column {column!r} missing", column)
        )
        for column in (TEXT, LABEL)
    ]
    if TEXT in frame.columns:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=TEXT, meta=meta("text_not_null", "text is null")),
            gxe.ExpectColumnValuesToMatchRegex(
                column=TEXT, regex=r"\S", meta=meta("text_not_blank", "text is empty or whitespace only")
            ),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=TEXT,
                min_value=cfg.min_text_chars,
                max_value=cfg.max_text_chars,
                meta=meta(
                    "text_length", f"text length outside {cfg.min_text_chars}-{cfg.max_text_chars} chars"
                ),
            ),
        ]
        if split == "train":
            expectations.append(
                gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
                    column=TEXT,
                    min_value=1 - cfg.max_duplicate_rate,
                    meta=meta(
                        "duplicate_rate", f"duplicate texts above {cfg.max_duplicate_rate:.1%} of rows"
                    ),
                )
            )
        if split in LEAK_SPLITS and train_keys is not None:
            expectations.append(
                gxe.ExpectColumnValuesToNotBeInSet(
                    column=KEY,
                    value_set=train_keys,
                    meta=meta(
                        "no_train_leak", "text also in train (after unicode and whitespace normalisation)"
                    ),
                )
            )
    if LABEL in frame.columns:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(
                column=LABEL, meta=meta("label_not_null", "label is null", LABEL)
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column=LABEL,
                value_set=list(labels),
                meta=meta("label_known", f"label not in the declared set {list(labels)}", LABEL),
            ),
        ]
    return expectations


def min_rows_expectation(min_rows: int) -> Expectation:
    """Over the per-class count frame, so a declared class with zero rows fails too."""
    from great_expectations import expectations as gxe

    return gxe.ExpectColumnValuesToBeBetween(
        column="rows",
        min_value=min_rows,
        meta={
            "split": "train",
            "check": "class_min_rows",
            "description": f"classes with fewer than {min_rows} rows",
            "column": LABEL,
        },
    )


def class_counts(frame: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Rows per declared label, zero included: a class missing from train is the worst imbalance."""
    counts = frame[LABEL].value_counts()
    return pd.DataFrame({LABEL: list(labels), "rows": [int(counts.get(label, 0)) for label in labels]})


def text_keys(frame: pd.DataFrame) -> list[str]:
    """Train's leakage keys; blank texts are left out, the blank check already reports them."""
    return sorted({key for key in with_text_key(frame)[KEY].dropna() if key})


def with_text_key(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the leakage key, so "Refund  please " in test matches "Refund please" in train.

    Case is kept, as in prepare's ``deduplicate``: deduplicated data then never fails this check.
    """
    if TEXT not in frame.columns:
        return frame
    keys = frame[TEXT].map(lambda text: normalise_text(str(text)), na_action="ignore")
    return frame.assign(**{KEY: keys})


def to_outcomes(
    validation: ExpectationSuiteValidationResult, frame: pd.DataFrame, max_examples: int
) -> Iterable[CheckOutcome]:
    """Flatten GX's results; our ``meta`` says which split and check each one belongs to."""
    for item in validation.results:
        config = item.expectation_config
        if config is None:  # GX attaches it to every result of a suite run; without it nothing can be named
            raise RuntimeError(f"GX returned a result without its expectation: {item}")
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        result = item.result or {}
        check = config.meta["check"]
        element_count, unexpected = result.get("element_count"), result.get("unexpected_count")
        if check == "duplicate_rate":  # an aggregate: GX reports the unique proportion only
            texts = frame[TEXT].dropna()
            element_count, unexpected = len(texts), int(texts.duplicated().sum())
        raised = bool(item.exception_info and item.exception_info.get("raised_exception"))
        examples = (
            () if item.success else tuple(islice(examples_for(check, result, frame, kwargs), max_examples))
        )
        yield CheckOutcome(
            split=config.meta["split"],
            check=check,
            description=config.meta["description"],
            expectation=config.type,
            column=config.meta["column"],
            kwargs=kwargs,
            success=bool(item.success),
            element_count=element_count,
            unexpected_count=unexpected,
            observed_value=result.get("observed_value"),
            examples=examples,
            error=item.exception_info.get("exception_message") if raised else None,
        )


def examples_for(
    check: str, result: dict[str, Any], frame: pd.DataFrame, kwargs: dict[str, Any]
) -> Iterable[str]:
    """Readable offending values: row numbers into the split file, the class and its count, the repeats."""
    if check == "column_present":
        yield f"columns present: {[c for c in frame.columns if c != KEY]}"
    elif check == "class_min_rows":
        for row in result.get("partial_unexpected_index_list") or []:
            yield f"{row[LABEL]!r}: {row['rows']} rows" + (" (absent)" if row["rows"] == 0 else "")
    elif check == "duplicate_rate":
        repeated = frame[TEXT].dropna().value_counts()
        for text, n in repeated[repeated > 1].items():
            yield f"{shorten(text)} x{n}"
    else:
        shown = TEXT if kwargs.get("column") == KEY else kwargs.get("column")
        for row in result.get("partial_unexpected_index_list") or []:
            value = frame.at[row, shown]
            length = f" ({len(value)} chars)" if check == "text_length" and isinstance(value, str) else ""
            yield f"row {row}: {shorten(value)}{length}"


def shorten(value: Any) -> str:
    """A quoted, truncated value; the whole of a 5,000-character ticket helps nobody in an error."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "null"
    if isinstance(value, str) and len(value) > MAX_EXAMPLE_CHARS:
        value = value[:MAX_EXAMPLE_CHARS] + "..."
    return repr(value)


def describe_data(frames: dict[str, pd.DataFrame], labels: Sequence[str]) -> dict[str, Any]:
    """Row and class counts per split: the context a reader of the report needs."""
    stats: dict[str, Any] = {
        "labels": list(labels),
        "rows": {split: len(frame) for split, frame in frames.items()},
    }
    stats["class_counts"] = {
        split: {str(k): int(v) for k, v in frame[LABEL].value_counts().sort_index().items()}
        for split, frame in frames.items()
        if LABEL in frame.columns
    }
    train = frames["train"]
    if TEXT in train.columns and len(train):
        texts = train[TEXT].dropna()
        stats["train_duplicate_rate"] = float(texts.duplicated().sum() / max(len(texts), 1))
    return stats


def describe_outcome(outcome: CheckOutcome) -> str:
    """One line: where, what, how many, and the counted values."""
    line = f"[{outcome.split}] column {outcome.column!r}: {outcome.description} ({outcome.expectation})"
    if outcome.error:
        return f"{line}: could not be evaluated: {outcome.error}"
    if outcome.check == "duplicate_rate":
        line += f": {outcome.unexpected_count} repeated of {outcome.element_count} rows"
        line += f" (unique proportion {outcome.observed_value:.3f})"
    elif outcome.unexpected_count is not None and outcome.element_count:
        noun = "classes" if outcome.check == "class_min_rows" else "rows"
        share = f"{outcome.unexpected_percent:.2f}%"
        line += f": {outcome.unexpected_count} of {outcome.element_count} {noun} ({share})"
    return line


def format_failures(failed: Sequence[CheckOutcome], result: ValidationResult, max_examples: int) -> str:
    """The error message: one entry per failed expectation, enough to fix the data without the report."""
    lines = [
        f"data validation failed: {result.failed} of {result.evaluated} expectations failed"
        " (rows are 0-based positions in <split>.parquet)"
    ]
    for outcome in failed:
        lines.append(f"  - {describe_outcome(outcome)}")
        if outcome.examples:
            lines.append(f"      examples (up to {max_examples}): " + "; ".join(outcome.examples))
    lines.append(f"full report: {result.report_path}")
    return "\n".join(lines)


def write_report(result: ValidationResult, outcomes: Sequence[CheckOutcome], *, prepared_dir: Path) -> None:
    """``validation.json`` for machines (DVC metrics, MLflow), ``report.md`` for people; failures first."""
    ranked = sorted(outcomes, key=lambda o: o.success)
    write_json(
        result.summary_path,
        {
            "success": result.success,
            "prepared_dir": str(prepared_dir),
            "statistics": {
                "evaluated": result.evaluated,
                "successful": result.evaluated - result.failed,
                "failed": result.failed,
                "success_percent": round(
                    100.0 * (result.evaluated - result.failed) / max(result.evaluated, 1), 2
                ),
            },
            "stats": result.stats,
            "expectations": [
                {**asdict(o), "kwargs": abbreviate(o.kwargs), "unexpected_percent": o.unexpected_percent}
                for o in ranked
            ],
        },
    )
    result.report_path.write_text(render_markdown(result, ranked, prepared_dir))


def abbreviate(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Long value sets (the train texts used for the leak check) are summarised, not dumped."""
    return {
        key: f"<{len(value)} values>"
        if isinstance(value, list | tuple) and len(value) > MAX_KWARG_ITEMS
        else value
        for key, value in kwargs.items()
    }


def render_markdown(result: ValidationResult, outcomes: Sequence[CheckOutcome], prepared_dir: Path) -> str:
    """A table of every expectation, in the order given (failures first), problem and examples inline."""
    status = "PASSED" if result.success else "FAILED"
    lines = [
        f"# Data validation {status}",
        "",
        f"{result.evaluated - result.failed} of {result.evaluated} expectations passed for `{prepared_dir}`.",
        "",
        "| split | rows |",
        "| --- | --- |",
        *(f"| {split} | {n} |" for split, n in result.stats["rows"].items()),
        "",
        "| result | split | check | expectation | column | unexpected | problem and examples |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        unexpected = "" if o.unexpected_count is None else str(o.unexpected_count)
        if o.unexpected_percent is not None and o.check != "duplicate_rate":
            unexpected += f" ({o.unexpected_percent:.2f}%)"
        if o.error:
            detail = f"could not be evaluated: {o.error}"
        else:
            detail = "" if o.success else "<br>".join((f"**{o.description}**", *o.examples))
        cells = [
            "pass" if o.success else "FAIL",
            o.split,
            o.check,
            f"`{o.expectation}`",
            o.column,
            unexpected,
            detail,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
