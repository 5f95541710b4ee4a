"""Gate the prepared splits with a Great Expectations suite built from ``params.yaml``.

Every check is a GX expectation, so the results have GX's shape (counts, percentages, offending rows)
and the suite can move to a GX data context unchanged. Each check has a severity
(``validate.severity``): a failed ``error`` stops the run, a failed ``warn`` is reported and the run goes
on. The step always writes ``validation.json`` and ``report.md`` first, then raises one error naming
every failed error-level check, each with what to change: a person fixing the data sees all problems at
once, and the fix, instead of one problem per run.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from langops.config import DataConfig, ValidateConfig
from langops.faults import crash_point
from langops.io import LABEL, SPLITS, TEXT, read_json, read_labels, read_split, write_json
from langops.label_keys import MAX_LABEL_CHARS
from langops.tasks.prepare import SOURCE_ROW, describe_changes, normalise_text
from langops.tasks.prepare import SUMMARY_FILE as PREPARE_SUMMARY
from langops.text_checks import BLANK_DESCRIPTION, is_blank

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.expectations import Expectation

SUMMARY_FILE = "validation.json"
REPORT_FILE = "report.md"
KEY = "text_key"  # derived column: text normalised as prepare does, compared across splits for leakage
ALSO_IN = "also_in_{split}"  # derived column: whether the row's text key is also a key of that earlier split
BLANK = "text_blank"  # derived column: whether the row's text has nothing visible (langops.text_checks)
CLASS_COUNTS_ASSET = "class_counts"  # rows of each declared label in each split
LABEL_SET_ASSET = "label_set"  # the labels, with the key two labels share when they differ only in case
CONFLICTS_ASSET = "{split}_label_conflicts"  # per text of a split: how many labels it carries
MAX_EXAMPLE_CHARS = 80
MAX_KWARG_ITEMS = 20
CHECKS = (  # report order within a split
    "column_present",
    "text_not_null",
    "text_not_blank",
    "text_min_length",
    "text_max_length",
    "label_not_null",
    "label_known",
    "label_form",
    "label_variants",
    "label_conflicts",
    "class_min_rows",
    "class_in_every_split",
    "class_usable",
    "duplicate_rate",
    "no_train_leak",
    "no_validation_leak",
)


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    report_path: Path
    summary_path: Path
    evaluated: int
    failed: int
    warnings: tuple[str, ...]
    stats: dict[str, Any]

    @classmethod
    def load(cls, report_dir: Path) -> ValidationResult:
        """The result as the step left it in ``report_dir`` (for a later stage run on its own)."""
        report_dir = Path(report_dir)
        summary = read_json(report_dir / SUMMARY_FILE)
        return cls(
            success=summary["success"],
            report_path=report_dir / REPORT_FILE,
            summary_path=report_dir / SUMMARY_FILE,
            evaluated=summary["statistics"]["evaluated"],
            failed=summary["statistics"]["failed"],
            warnings=tuple(summary.get("warnings", ())),
            stats=summary["stats"],
        )


class DataValidationError(ValueError):
    """The prepared data failed error-level checks; ``result`` points at the report that lists them all."""

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CheckOutcome:
    """One evaluated expectation, flattened to what a report and an error message need."""

    split: str
    check: str
    severity: str
    description: str
    expectation: str
    column: str
    kwargs: dict[str, Any]
    success: bool
    element_count: int | None
    unexpected_count: int | None
    observed_value: Any
    examples: tuple[str, ...]
    fix: str
    error: str | None

    @property
    def unexpected_percent(self) -> float | None:
        if self.unexpected_count is None or not self.element_count:
            return None
        return 100.0 * self.unexpected_count / self.element_count

    @property
    def stops_run(self) -> bool:
        return not self.success and self.severity == "error"


@dataclass(frozen=True)
class SuiteContext:
    """What the fixes need to know besides the failed rows: the thresholds, the labels, how the splits
    came to be (prepare's summary), and each class's rows per split."""

    cfg: ValidateConfig
    labels: tuple[str, ...]
    declared: bool
    splits_given: tuple[str, ...]
    class_counts: pd.DataFrame
    split_sizes: dict[str, float] = field(default_factory=dict)  # prepare's validation/test fractions

    def split_size(self, split: str) -> str:
        size = self.split_sizes.get(f"{split}_size")
        return f"{size:g}" if size is not None else "see params.yaml"


def validate(
    data: DataConfig, cfg: ValidateConfig, *, prepared_dir: Path, report_dir: Path,
    prepare_notes: Sequence[str] | None = None,
) -> ValidationResult:
    """Run the expectation suite over every prepared split and write the report.

    Args:
        data: the declared labels (when None, those in ``prepared_dir/labels.json``).
        cfg: thresholds, severities and how many examples to quote.
        prepared_dir: output of the prepare step.
        report_dir: receives ``validation.json`` and ``report.md``.
        prepare_notes: what prepare did to the rows, for the top of the report (``PrepareResult.notes``);
            None: read from the prepared summary.

    Returns:
        The result, when no error-level check failed; ``result.warnings`` lists failed warn-level checks.

    Raises:
        DataValidationError: one or more error-level checks failed; the message lists each with split,
            column, count, examples and the fix, and ``err.result`` locates the report.
        FileNotFoundError: a split or the label map is missing (prepare has not run).
    """
    prepared_dir, report_dir = Path(prepared_dir), Path(report_dir)
    labels = tuple(data.labels) if data.labels is not None else tuple(read_labels(prepared_dir))
    frames = {split: read_split(prepared_dir, split) for split in SPLITS}
    prepared_summary = _read_prepare_summary(prepared_dir)
    context = SuiteContext(
        cfg=cfg,
        labels=labels,
        declared=data.labels is not None,
        splits_given=tuple(prepared_summary.get("splits_given", ())),
        class_counts=class_counts(frames, labels),
        split_sizes={k: v for k, v in prepared_summary.get("split", {}).items() if k.endswith("_size")},
    )
    outcomes = run_suite(frames, context)
    errors = [o for o in outcomes if o.stops_run]
    warnings = [o for o in outcomes if not o.success and o.severity == "warn"]
    result = ValidationResult(
        success=not errors,
        report_path=report_dir / REPORT_FILE,
        summary_path=report_dir / SUMMARY_FILE,
        evaluated=len(outcomes),
        failed=len(errors),
        warnings=tuple(_one_line(o) for o in warnings),
        stats=describe_data(frames, labels),
    )
    if prepare_notes is not None:
        changes = list(prepare_notes)
    else:
        changes = list(describe_changes(prepared_summary)) if prepared_summary else []
    write_report(result, outcomes, prepared_dir=prepared_dir, changes=changes)
    if errors:
        raise DataValidationError(format_failures(errors, warnings, result, cfg.max_examples), result)
    return result


def _read_prepare_summary(prepared_dir: Path) -> dict[str, Any]:
    path = prepared_dir / PREPARE_SUMMARY
    return read_json(path) if path.is_file() else {}


def run_suite(frames: dict[str, pd.DataFrame], context: SuiteContext) -> list[CheckOutcome]:
    """Validate each split, and frames derived from all of them, with GX in an in-memory, quiet context."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"  # validation data never leaves the machine
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    cfg = context.cfg
    gx_context = gx.get_context(mode="ephemeral")
    gx_context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = gx_context.data_sources.add_pandas("prepared")
    keys = {split: text_keys(frame) for split, frame in frames.items() if TEXT in frame.columns}
    batches = [
        (split, with_blank_flags(with_leak_flags(split, frame, keys)),
         split_expectations(split, frame, context, earlier=list(keys)))
        for split, frame in frames.items()
    ]
    labelled = [split for split, frame in frames.items() if LABEL in frame.columns]
    if "train" in labelled:  # a split without labels is reported by column_present, not as empty classes
        batches.append((CLASS_COUNTS_ASSET, context.class_counts, class_expectations(cfg.min_rows_per_class, labelled)))
        batches.append((LABEL_SET_ASSET, label_set(context.labels, frames), label_set_expectations()))
    for split, frame in frames.items():
        if {TEXT, LABEL} <= set(frame.columns):
            batches.append((CONFLICTS_ASSET.format(split=split), labels_per_text(frame), [conflict_expectation(split)]))

    outcomes: list[CheckOutcome] = []
    for asset_name, frame, expectations in batches:
        suite = gx.ExpectationSuite(name=f"langops-{asset_name}", expectations=expectations)
        batch = (
            source.add_dataframe_asset(asset_name)
            .add_batch_definition_whole_dataframe(asset_name)
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.max_examples}
        if asset_name not in SPLITS:  # derived frames: name the class or text, not a row position
            result_format["unexpected_index_column_names"] = [_row_name_column(asset_name)]
        validation = batch.validate(suite, result_format=result_format)
        outcomes.extend(to_outcomes(validation, frame, context))
    check_rank = {check: i for i, check in enumerate(CHECKS)}
    split_rank = {split: i for i, split in enumerate(SPLITS)}
    return sorted(outcomes, key=lambda o: (split_rank[o.split], check_rank[o.check], o.column))


def _row_name_column(asset_name: str) -> str:
    return TEXT if asset_name.endswith(CONFLICTS_ASSET.format(split="")) else LABEL


def _meta(split: str, check: str, description: str, column: str = TEXT) -> dict[str, str]:
    return {"split": split, "check": check, "description": description, "column": column}


def split_expectations(
    split: str, frame: pd.DataFrame, context: SuiteContext, *, earlier: Sequence[str]
) -> list[Expectation]:
    """The expectations for one split; checks on a missing column are left out (its absence already fails)."""
    from great_expectations import expectations as gxe

    cfg = context.cfg
    expectations: list[Expectation] = [
        gxe.ExpectColumnToExist(
            column=column, meta=_meta(split, "column_present", f"required column {column!r} missing", column)
        )
        for column in (TEXT, LABEL)
    ]
    if TEXT in frame.columns:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=TEXT, meta=_meta(split, "text_not_null", "text is null")),
            gxe.ExpectColumnValuesToNotBeInSet(
                column=BLANK, value_set=[True],
                meta=_meta(split, "text_not_blank", f"text is empty: {BLANK_DESCRIPTION}"),
            ),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=TEXT,
                min_value=cfg.min_text_chars,
                meta=_meta(split, "text_min_length", f"text shorter than {cfg.min_text_chars} chars"),
            ),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=TEXT,
                max_value=cfg.max_text_chars,
                meta=_meta(split, "text_max_length", f"text longer than {cfg.max_text_chars} chars"),
            ),
        ]
        if split == "train":
            expectations.append(
                gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
                    column=TEXT,
                    min_value=1 - cfg.max_duplicate_rate,
                    meta=_meta(split, "duplicate_rate", f"duplicate texts above {cfg.max_duplicate_rate:.1%} of rows"),
                )
            )
        for check, earlier_split in (("no_train_leak", "train"), ("no_validation_leak", "validation")):
            if SPLITS.index(split) > SPLITS.index(earlier_split) and earlier_split in earlier:
                expectations.append(
                    gxe.ExpectColumnValuesToNotBeInSet(
                        column=ALSO_IN.format(split=earlier_split),
                        value_set=[True],
                        meta=_meta(split, check, f"text also in {earlier_split} (after unicode and whitespace normalisation)"),
                    )
                )
    if LABEL in frame.columns:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=LABEL, meta=_meta(split, "label_not_null", "label is null", LABEL)),
            gxe.ExpectColumnValuesToBeInSet(
                column=LABEL,
                value_set=list(context.labels),
                meta=_meta(split, "label_known", f"label not in the declared set {_label_list(context.labels)}", LABEL),
            ),
        ]
    return expectations


def class_expectations(min_rows: int, labelled: Sequence[str]) -> list[Expectation]:
    """Over the per-class count frame, so a declared class with zero rows fails too."""
    from great_expectations import expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="train", min_value=min_rows,
            meta=_meta("train", "class_min_rows", f"classes with fewer than {min_rows} rows", LABEL),
        ),
        *(
            gxe.ExpectColumnValuesToBeBetween(
                column=split, min_value=1,
                meta=_meta(split, "class_in_every_split", f"classes with no row in {split}", LABEL),
            )
            for split in ("validation", "test")
            if split in labelled
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="usable", value_set=[True],
            meta=_meta("train", "class_usable", "classes with no row in train, or none in validation and test", LABEL),
        ),
    ]


def label_set_expectations() -> list[Expectation]:
    from great_expectations import expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeInSet(
            column="form_problem", value_set=[""],
            meta=_meta("train", "label_form", "labels no report, metric or file name can carry", LABEL),
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="folded",
            meta=_meta("train", "label_variants", "labels that differ only in case or spacing", LABEL),
        ),
    ]


def conflict_expectation(split: str) -> Expectation:
    from great_expectations import expectations as gxe

    return gxe.ExpectColumnValuesToBeBetween(
        column="labels", max_value=1, meta=_meta(split, "label_conflicts", "texts with more than one label")
    )


def class_counts(frames: dict[str, pd.DataFrame], labels: Sequence[str]) -> pd.DataFrame:
    """Rows per declared label in each split, zero included: a class missing from train is the worst imbalance."""
    columns: dict[str, Any] = {LABEL: list(labels)}
    for split, frame in frames.items():
        counts = frame[LABEL].value_counts() if LABEL in frame.columns else pd.Series(dtype=int)
        columns[split] = [int(counts.get(label, 0)) for label in labels]
    frame = pd.DataFrame(columns)
    held_out = sum((frame[split] for split in ("validation", "test") if split in frame.columns), start=0)
    train = frame["train"] if "train" in frame.columns else 0
    return frame.assign(usable=(train >= 1) & (held_out >= 1))


def label_set(labels: Sequence[str], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every label, declared or seen, with its case- and space-folded form: equal forms are variants."""
    seen = [str(v) for frame in frames.values() if LABEL in frame.columns for v in frame[LABEL].dropna().unique()]
    names = list(dict.fromkeys([*labels, *seen]))
    return pd.DataFrame({
        LABEL: names,
        "folded": [" ".join(name.casefold().split()) for name in names],
        "form_problem": [label_form_problem(name) for name in names],
    })


def label_form_problem(label: str) -> str:
    """Why a label cannot be carried into reports, metric names and files ("" when it can)."""
    if not label:
        return "empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"{len(label)} chars, at most {MAX_LABEL_CHARS}"
    if any(unicodedata.category(char) == "Cc" for char in label):
        return "holds a control character (newline, tab ...)"
    return ""


def labels_per_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Each text of a split with its number of distinct labels (more than one is a conflict)."""
    rows = frame[frame[TEXT].notna() & frame[LABEL].notna()]
    per_text = rows.groupby(TEXT, sort=True)[LABEL].nunique()
    derived = pd.DataFrame({TEXT: per_text.index.astype(object), "labels": per_text.to_numpy()})
    conflicting = rows[rows[TEXT].isin(set(per_text.index[per_text > 1]))]
    counts = {
        text: ", ".join(f"{label!r} x{n}" for label, n in group.value_counts().sort_index().items())
        for text, group in conflicting.groupby(TEXT)[LABEL]
    }
    return derived.assign(label_counts=derived[TEXT].map(counts))


def text_keys(frame: pd.DataFrame) -> set[str]:
    """A split's leakage keys; blank texts (``is_blank``) are left out, the blank check already reports them."""
    return {key for key in with_text_key(frame)[KEY].dropna() if not is_blank(key)}


def with_text_key(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the leakage key, so "Refund  please " in test matches "Refund please" in train.

    Case is kept, as in prepare's split and ``deduplicate``: prepared splits then never fail this check.
    """
    if TEXT not in frame.columns:
        return frame
    keys = frame[TEXT].map(lambda text: normalise_text(str(text)), na_action="ignore")
    return frame.assign(**{KEY: keys})


def with_blank_flags(frame: pd.DataFrame) -> pd.DataFrame:
    """The split with, per row, whether its text is blank (``langops.text_checks.is_blank``: nothing a reader
    would see), the flag the ``text_not_blank`` check reads. A null text is not flagged: ``text_not_null``
    reports it."""
    if TEXT not in frame.columns:
        return frame
    return frame.assign(**{BLANK: frame[TEXT].map(lambda text: isinstance(text, str) and is_blank(text))})


def with_leak_flags(split: str, frame: pd.DataFrame, keys: dict[str, set[str]]) -> pd.DataFrame:
    """The split with its text keys and, per earlier split, whether each key is also there.

    The check runs on these flags rather than on a set of every train text: GX copies an expectation's
    arguments many times per run, and a 50,000-text set made validation take minutes.
    """
    keyed = with_text_key(frame)
    if KEY not in keyed.columns:
        return keyed
    flags = {
        ALSO_IN.format(split=earlier): keyed[KEY].isin(keys[earlier])
        for earlier in SPLITS[: SPLITS.index(split)]
        if earlier in keys
    }
    return keyed.assign(**flags)


def to_outcomes(
    validation: ExpectationSuiteValidationResult, frame: pd.DataFrame, context: SuiteContext
) -> Iterable[CheckOutcome]:
    """Flatten GX's results; our ``meta`` says which split and check each one belongs to."""
    cfg = context.cfg
    for item in validation.results:
        config = item.expectation_config
        if config is None:  # GX attaches it to every result of a suite run; without it nothing can be named
            raise RuntimeError(f"GX returned a result without its expectation: {item}")
        kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "row_condition", "condition_parser")}
        result = item.result or {}
        check, split = config.meta["check"], config.meta["split"]
        element_count, unexpected = result.get("element_count"), result.get("unexpected_count")
        if check == "duplicate_rate":  # an aggregate: GX reports the unique proportion only
            texts = frame[TEXT].dropna()
            element_count, unexpected = len(texts), int(texts.duplicated().sum())
        raised = bool(item.exception_info and item.exception_info.get("raised_exception"))
        success = bool(item.success)
        examples = () if success else tuple(islice(examples_for(check, result, frame, kwargs, context), cfg.max_examples))
        yield CheckOutcome(
            split=split,
            check=check,
            severity=cfg.severity[check],
            description=config.meta["description"],
            expectation=config.type,
            column=config.meta["column"],
            kwargs=kwargs,
            success=success,
            element_count=element_count,
            unexpected_count=unexpected,
            observed_value=result.get("observed_value"),
            examples=examples,
            fix="" if success else fix_for(check, split, result, frame, context),
            error=item.exception_info.get("exception_message") if raised else None,
        )


def examples_for(
    check: str, result: dict[str, Any], frame: pd.DataFrame, kwargs: dict[str, Any], context: SuiteContext
) -> Iterable[str]:
    """Readable offending values: the row and the line of the user's file it came from, the class and its
    counts, the repeated texts."""
    if check == "column_present":
        yield f"columns present: {[c for c in frame.columns if c in (TEXT, LABEL)]}"
    elif check in ("class_min_rows", "class_in_every_split", "class_usable"):
        for row in result.get("partial_unexpected_index_list") or []:
            yield _class_line(context.class_counts, row[LABEL])
    elif check == "label_form":
        seen = context.class_counts.set_index(LABEL)[list(SPLITS)].sum(axis=1)
        for row in result.get("partial_unexpected_index_list") or []:
            name = row[LABEL]
            problem = frame.loc[frame[LABEL] == name, "form_problem"].iloc[0]
            yield f"{shorten(name)} ({problem}; {int(seen.get(name, 0))} rows)"
    elif check == "label_variants":
        folded = frame.set_index(LABEL)["folded"]
        seen = context.class_counts.set_index(LABEL)[list(SPLITS)].sum(axis=1)
        for key in dict.fromkeys(folded[folded.duplicated(keep=False)]):
            variants = folded.index[folded == key]
            yield " / ".join(f"{name!r} ({int(seen.get(name, 0))} rows)" for name in variants)
    elif check == "label_conflicts":
        for row in result.get("partial_unexpected_index_list") or []:
            counts = frame.loc[frame[TEXT] == row[TEXT], "label_counts"]
            yield f"{shorten(row[TEXT])} labelled {counts.iloc[0]}"
    elif check == "duplicate_rate":
        repeated = frame[TEXT].dropna().value_counts()
        for text, n in repeated[repeated > 1].items():
            yield f"{shorten(text)} x{n}"
    else:
        derived = str(kwargs.get("column")).startswith(ALSO_IN.format(split="")) or kwargs.get("column") == BLANK
        shown = TEXT if derived else kwargs.get("column")
        for row in result.get("partial_unexpected_index_list") or []:
            value = frame.at[row, shown]
            length = f" ({len(value)} chars)" if check.startswith("text_m") and isinstance(value, str) else ""
            origin = f" ({frame.at[row, SOURCE_ROW]})" if SOURCE_ROW in frame.columns else ""
            yield f"row {row}{origin}: {shorten(value)}{length}"


def _class_line(counts: pd.DataFrame, label: str) -> str:
    row = counts.set_index(LABEL).loc[label]
    total = int(sum(int(row[s]) for s in SPLITS))
    per_split = ", ".join(f"{s} {int(row[s])}" for s in SPLITS)
    train = int(row["train"])
    return f"{label!r}: {train} rows" + (" (absent)" if train == 0 else "") + f" in train; {total} in all ({per_split})"


def fix_for(check: str, split: str, result: dict[str, Any], frame: pd.DataFrame, context: SuiteContext) -> str:
    """What to change so the check passes: a params key and a value that would pass, or what to do with the rows."""
    cfg = context.cfg
    given = split in context.splits_given
    in_file = f"the {split} file you gave" if given else "the source"
    if check == "column_present":
        return "the prepared splits lack a column: run the prepare step again (langops prepare)"
    if check in ("text_not_null", "text_not_blank", "label_not_null"):
        what = "a label" if check == "label_not_null" else "a text"
        return f"give these rows {what} in {in_file}, or remove them"
    if check == "text_min_length":
        lengths = frame[TEXT].dropna().map(len)
        shortest = max(1, int(lengths[lengths > 0].min())) if (lengths > 0).any() else 1
        return (f"short texts are kept and trained on; remove them from {in_file} if they are noise, or set "
                f"validate.min_text_chars: {shortest} to accept them")
    if check == "text_max_length":
        longest = int(frame[TEXT].dropna().map(len).max())
        return (f"the model reads only the first train.max_length tokens of a text; shorten or remove these rows, "
                f"or set validate.max_text_chars: {longest} to accept them")
    if check == "label_known":
        return _fix_unknown_labels(frame, context)
    if check == "label_form":
        return (f"rename these labels in {in_file}: a label needs 1 to {MAX_LABEL_CHARS} characters and no "
                "control characters; or remove their rows")
    if check == "label_variants":
        return ("labels are never merged: these are trained as separate classes. If they are one class, "
                "fix the labels in the source")
    if check == "label_conflicts":
        if given and split == "test":
            return ("the test split you gave has texts with different labels; fix them in the test file, or set "
                    "validate.severity.label_conflicts: warn to evaluate on it as it is")
        return ("set prepare.label_conflicts: majority (keep each text's majority label) or drop (drop them), "
                "or fix the labels in the source")
    if check == "class_min_rows":
        failing = [row[LABEL] for row in result.get("partial_unexpected_index_list") or []]
        smallest = int(context.class_counts.set_index(LABEL).loc[failing, "train"].min()) if failing else 0
        lower = f", or set validate.min_rows_per_class: {smallest}" if smallest > 0 else ""
        return (f"these classes have fewer than {cfg.min_rows_per_class} train rows (validate.min_rows_per_class): "
                "the model learns them from few examples, and their per-class test metrics and the gate's recall "
                "guard rest on few rows (the gate reports, and does not gate, a class with fewer than "
                "promote.min_class_rows compared rows). Add rows, merge the class into another, or remove its rows"
                + (" and leave it out of data.labels" if context.declared else "") + lower)
    if check == "class_in_every_split":
        if given:
            return (f"{in_file} has no row of these classes, so they cannot be evaluated there: add {split} rows "
                    "of each, or merge or remove the classes")
        if split == "validation":
            return ("early stopping and calibration never see these classes: add rows (each text lands in "
                    f"validation with probability prepare.validation_size, {context.split_size(split)}), merge "
                    "the class into another, or remove its rows")
        return (f"these classes have no test row, so they get no test metrics (each text lands in test with "
                f"probability prepare.test_size, {context.split_size(split)}): add rows, merge the class into "
                "another, or remove its rows")
    if check == "class_usable":
        return ("a class with no train row cannot be learned, and one with no row in validation or test cannot be "
                "measured: add rows of it (a text lands in validation or test with probability "
                "prepare.validation_size + test_size), give a validation or test file that holds it, merge it into "
                "another class, or remove its rows" + (" and leave it out of data.labels" if context.declared else ""))
    if check == "duplicate_rate":
        texts = frame[TEXT].dropna()
        rate = texts.duplicated().sum() / max(len(texts), 1)
        return (f"every copy of a text is kept in one split, so nothing leaks; set prepare.deduplicate: true to "
                f"keep one copy of each, or validate.max_duplicate_rate: {math.ceil(rate * 100) / 100:.2f} "
                "to accept them")
    if check in ("no_train_leak", "no_validation_leak"):
        earlier = "train" if check == "no_train_leak" else "validation"
        if earlier not in context.splits_given:  # carved from train by prepare, which never splits a text
            earlier = "train (validation is carved from it)"
        return (f"the splits you gave share texts: set prepare.split_overlap: drop to drop them from {earlier}, "
                f"or remove them from one of the files")
    raise KeyError(f"no fix written for check {check!r}")


def _fix_unknown_labels(frame: pd.DataFrame, context: SuiteContext) -> str:
    unknown = frame[LABEL].dropna()
    unknown = unknown[~unknown.isin(context.labels)].value_counts()
    folded = {" ".join(label.casefold().split()): label for label in context.labels}
    near = [f"{name!r} is {folded[key]!r} but for case or spacing" for name in unknown.index
            if (key := " ".join(str(name).casefold().split())) in folded]
    listed = ", ".join(f"{name!r} ({n} rows)" for name, n in unknown.head(10).items())
    advice = (f"unknown labels {listed}: add them to data.labels, set data.labels: null to take the labels found "
              "in the data, or remove those rows")
    return advice + (f" ({'; '.join(near)}: fix the spelling in the source)" if near else "")


def shorten(value: Any) -> str:
    """A quoted, truncated value; the whole of a 5,000-character ticket helps nobody in an error."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "null"
    if isinstance(value, str) and len(value) > MAX_EXAMPLE_CHARS:
        value = value[:MAX_EXAMPLE_CHARS] + "..."
    return repr(value)


def _label_list(labels: Sequence[str], limit: int = 12) -> str:
    shown = [repr(label) for label in labels[:limit]]
    return "[" + ", ".join(shown) + (f", ... {len(labels) - limit} more" if len(labels) > limit else "") + "]"


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


def _one_line(outcome: CheckOutcome) -> str:
    examples = f"; e.g. {'; '.join(outcome.examples)}" if outcome.examples else ""
    return f"{describe_outcome(outcome)}{examples}; fix: {outcome.fix}"


def describe_outcome(outcome: CheckOutcome) -> str:
    """One line: where, what, how many, and the counted values."""
    line = f"[{outcome.split}] column {outcome.column!r}: {outcome.description} ({outcome.expectation})"
    if outcome.error:
        return f"{line}: could not be evaluated: {outcome.error}"
    if outcome.check == "duplicate_rate":
        line += f": {outcome.unexpected_count} repeated of {outcome.element_count} rows"
        line += f" (unique proportion {outcome.observed_value:.3f})"
    elif outcome.unexpected_count is not None and outcome.element_count:
        noun = {"class_min_rows": "classes", "class_in_every_split": "classes", "class_usable": "classes",
                "label_variants": "labels", "label_form": "labels",
                "label_conflicts": "texts"}.get(outcome.check, "rows")
        share = f"{outcome.unexpected_percent:.2f}%"
        line += f": {outcome.unexpected_count} of {outcome.element_count} {noun} ({share})"
    return line


def format_failures(
    errors: Sequence[CheckOutcome], warnings: Sequence[CheckOutcome], result: ValidationResult, max_examples: int
) -> str:
    """The error message: each failed error-level check with its examples and fix, then the warnings."""
    lines = [
        f"data validation failed: {len(errors)} of {result.evaluated} expectations failed"
        + (f" (and {len(warnings)} warnings)" if warnings else "")
        + "; rows are 0-based positions in <split>.parquet, with the file and line they came from"
    ]
    for outcome in errors:
        lines.append(f"  - {describe_outcome(outcome)}")
        if outcome.examples:
            lines.append(f"      examples (up to {max_examples}): " + "; ".join(outcome.examples))
        lines.append(f"      fix: {outcome.fix}")
    if warnings:
        lines.append("warnings (these alone would not stop the run):")
        lines += [f"  - {describe_outcome(o)}" for o in warnings]
    lines.append(f"full report: {result.report_path}")
    return "\n".join(lines)


def write_report(
    result: ValidationResult, outcomes: Sequence[CheckOutcome], *, prepared_dir: Path, changes: Sequence[str]
) -> None:
    """``validation.json`` for machines (DVC metrics, MLflow, later stages), ``report.md`` for people; failures
    first. The report is written first: ``validation.json``, what later steps read, is the step's last word."""
    ranked = sorted(outcomes, key=lambda o: (o.success, o.severity != "error"))
    warned = sum(1 for o in outcomes if not o.success and o.severity == "warn")
    result.report_path.parent.mkdir(parents=True, exist_ok=True)
    result.report_path.write_text(render_markdown(result, ranked, prepared_dir, changes, warned))
    crash_point("validate:reported")
    write_json(
        result.summary_path,
        {
            "success": result.success,
            "prepared_dir": str(prepared_dir),
            "statistics": {
                "evaluated": result.evaluated,
                "successful": sum(1 for o in outcomes if o.success),
                "failed": result.failed,
                "warnings": warned,
                "success_percent": round(100.0 * sum(o.success for o in outcomes) / max(result.evaluated, 1), 2),
            },
            "prepare_changes": list(changes),
            "warnings": list(result.warnings),
            "stats": result.stats,
            "expectations": [
                {**asdict(o), "kwargs": abbreviate(o.kwargs), "unexpected_percent": o.unexpected_percent}
                for o in ranked
            ],
        },
    )


def abbreviate(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Long value sets (the train texts used for the leak check) are summarised, not dumped."""
    return {
        key: f"<{len(value)} values>"
        if isinstance(value, list | tuple) and len(value) > MAX_KWARG_ITEMS
        else value
        for key, value in kwargs.items()
    }


def render_markdown(
    result: ValidationResult, outcomes: Sequence[CheckOutcome], prepared_dir: Path, changes: Sequence[str], warned: int
) -> str:
    """Verdict, what prepare changed, the split sizes, then every expectation (failures first) with its fix."""
    status = "PASSED" if result.success else "FAILED"
    passed = sum(o.success for o in outcomes)
    lines = [
        f"# Data validation {status}" + (f" with {warned} warnings" if warned else ""),
        "",
        f"{passed} of {result.evaluated} expectations passed for `{prepared_dir}`"
        + (f"; {result.failed} errors stop the run" if result.failed else "")
        + (f"; {warned} warnings do not" if warned else "") + ".",
        "",
    ]
    if changes:
        lines += ["## What prepare did", "", *(f"- {change}" for change in changes), ""]
    lines += [
        "| split | rows |",
        "| --- | --- |",
        *(f"| {split} | {n} |" for split, n in result.stats["rows"].items()),
        "",
        "| result | split | check | expectation | column | unexpected | problem, examples and fix |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        unexpected = "" if o.unexpected_count is None else str(o.unexpected_count)
        if o.unexpected_percent is not None and o.check != "duplicate_rate":
            unexpected += f" ({o.unexpected_percent:.2f}%)"
        if o.error:
            detail = f"could not be evaluated: {o.error}"
        else:
            detail = "" if o.success else "<br>".join((f"**{o.description}**", *o.examples, f"*fix:* {o.fix}"))
        verdict = "pass" if o.success else ("FAIL" if o.severity == "error" else "warn")
        cells = [verdict, o.split, o.check, f"`{o.expectation}`", o.column, unexpected, detail]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
