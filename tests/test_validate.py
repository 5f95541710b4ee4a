"""The validate step: clean splits pass; each kind of bad data gives one error naming it, and a report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_strategies import blank_texts, texts_with_one_visible_character

from langops.config import DataConfig, PrepareConfig, ValidateConfig
from langops.io import SPLITS, read_json, split_path, write_labels
from langops.tasks.prepare import prepare
from langops.tasks.validate import DataValidationError, validate

pytestmark = pytest.mark.data

LABELS = ("billing", "shipping", "technical")
DATA = DataConfig(labels=LABELS)
CFG = ValidateConfig(
    min_text_chars=3, max_text_chars=200, min_rows_per_class=5, max_duplicate_rate=0.1, max_examples=3
)
ROWS_PER_CLASS = {"train": 10, "validation": 3, "test": 3}

Splits = dict[str, pd.DataFrame]


def clean_splits() -> Splits:
    """Unique, well-formed tickets: 30 train rows, 9 validation, 9 test."""
    return {
        split: pd.DataFrame(
            [
                {"text": f"{split} ticket number {i} about {label}", "label": label}
                for label in LABELS
                for i in range(n)
            ]
        )
        for split, n in ROWS_PER_CLASS.items()
    }


def write_prepared(directory: Path, splits: Splits) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, frame in splits.items():
        frame.to_parquet(split_path(directory, split), index=False)
    write_labels(directory, list(LABELS))
    return directory


def run_validate(tmp_path: Path, splits: Splits, data: DataConfig = DATA, cfg: ValidateConfig = CFG):
    prepared = write_prepared(tmp_path / "prepared", splits)
    return validate(data, cfg, prepared_dir=prepared, report_dir=tmp_path / "report")


def failing_entries(report_dir: Path) -> list[dict]:
    return [e for e in read_json(report_dir / "validation.json")["expectations"] if not e["success"]]


def test_clean_data_passes_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of GX's may land in the working directory
    result = run_validate(tmp_path, clean_splits())

    assert result.success and result.failed == 0
    assert result.evaluated >= 25
    summary = read_json(result.summary_path)
    assert summary["success"] is True
    assert summary["statistics"]["evaluated"] == result.evaluated
    assert {e["split"] for e in summary["expectations"]} == {"train", "validation", "test"}
    assert "PASSED" in result.report_path.read_text()
    assert result.stats["rows"] == {"train": 30, "validation": 9, "test": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "report"]


def set_cell(split: str, row: int, column: str, value) -> Callable[[Splits], None]:
    def mutate(splits: Splits) -> None:
        splits[split].loc[row, column] = value

    return mutate


def drop_column(splits: Splits) -> None:
    splits["validation"] = splits["validation"].drop(columns="label")


def thin_class(keep: int) -> Callable[[Splits], None]:
    def mutate(splits: Splits) -> None:
        train = splits["train"]
        technical = train.index[train["label"] == "technical"]
        splits["train"] = train.drop(technical[keep:]).reset_index(drop=True)

    return mutate


def only_in_train(label: str) -> Callable[[Splits], None]:
    def mutate(splits: Splits) -> None:
        for split in ("validation", "test"):
            splits[split] = splits[split][splits[split]["label"] != label].reset_index(drop=True)

    return mutate


def duplicate_train(splits: Splits) -> None:
    train = splits["train"]
    train.loc[1:4, "text"] = train.loc[0, "text"]  # 4 repeats of row 0: 13% of 30 rows


def leak_test_into_train(splits: Splits) -> None:
    splits["test"].loc[2, "text"] = "  " + splits["train"].loc[7, "text"].replace(" ", "   ")


# (mutation, failing check, split, snippets that must appear in the error and the markdown report)
BAD_DATA = {
    "missing column": (
        drop_column,
        "column_present",
        "validation",
        ["required column 'label' missing", "columns present: ['text']"],
    ),
    "null text": (
        set_cell("train", 4, "text", None),
        "text_not_null",
        "train",
        ["text is null", "1 of 30 rows", "row 4: null"],
    ),
    "blank text": (
        set_cell("train", 5, "text", "   "),
        "text_not_blank",
        "train",
        ["text is empty: no visible character", "1 of 30 rows", "row 5: '   '"],
    ),
    "unknown label": (
        set_cell("test", 1, "label", "refunds"),
        "label_known",
        "test",
        ["label not in the declared set", "1 of 9 rows", "row 1: 'refunds'"],
    ),
    "null label": (
        set_cell("train", 3, "label", None),
        "label_not_null",
        "train",
        ["label is null", "1 of 30 rows", "row 3: null"],
    ),
    "conflicting labels": (
        set_cell("train", 10, "text", "train ticket number 0 about billing"),  # row 10 is shipping
        "label_conflicts",
        "train",
        ["texts with more than one label", "'train ticket number 0 about billing' labelled 'billing' x1, 'shipping' x1"],
    ),
    "test leaks into validation": (
        lambda splits: splits["test"].__setitem__("text", splits["test"]["text"].where(
            splits["test"].index != 0, splits["validation"].loc[4, "text"])),
        "no_validation_leak",
        "test",
        ["text also in validation", "1 of 9 rows", "row 0:"],
    ),
    "test leaks into train": (
        leak_test_into_train,
        "no_train_leak",
        "test",
        ["text also in train", "1 of 9 rows", "row 2:"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_each_kind_of_bad_data_is_named_counted_and_reported(tmp_path, case):
    mutate, check, split, snippets = BAD_DATA[case]
    splits = clean_splits()
    mutate(splits)

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits)

    message = str(err.value)
    assert f"[{split}]" in message
    for snippet in snippets:
        assert snippet in message
    result = err.value.result
    assert result.success is False and result.failed == 1
    (entry,) = failing_entries(result.summary_path.parent)
    assert (entry["check"], entry["split"]) == (check, split)
    assert entry["expectation"].startswith("expect_")
    assert entry["examples"]
    report = result.report_path.read_text()
    assert "FAILED" in report
    for snippet in snippets[:1]:
        assert snippet in report
    assert entry["examples"][0].replace("|", "\\|") in report


@pytest.mark.parametrize("mutate", [only_in_train("shipping"), thin_class(keep=0)], ids=["only in train", "absent from train"])
def test_a_class_that_cannot_be_learned_or_measured_stops_the_run_with_its_counts(tmp_path, mutate):
    splits = clean_splits()
    mutate(splits)

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits)

    message = str(err.value)
    assert "classes with no row in train, or none in validation and test (expect_column_values_to_be_in_set): 1 of 3 classes" in message
    assert ("'shipping': 10 rows in train; 10 in all (train 10, validation 0, test 0)" in message
            or "'technical': 0 rows (absent) in train" in message)
    assert "cannot be learned" in message and "cannot be measured" in message
    assert err.value.result.failed == 1  # the thin-class and per-split findings are warnings beside it
    assert {e["check"] for e in failing_entries(err.value.result.summary_path.parent) if e["severity"] == "error"} == {
        "class_usable"}


def test_every_problem_is_listed_in_one_error(tmp_path):
    splits = clean_splits()
    for mutate in (
        set_cell("train", 4, "text", None),
        set_cell("train", 6, "text", "ok"),
        set_cell("test", 1, "label", "refunds"),
        thin_class(keep=0),
        leak_test_into_train,
        drop_column,
    ):
        mutate(splits)

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits)

    message = str(err.value)
    assert "5 of" in message.splitlines()[0] and "(and 2 warnings)" in message.splitlines()[0]
    for snippet in (
        "text is null",
        "'refunds'",
        "'technical': 0 rows (absent)",
        "text also in train",
        "required column 'label' missing",
    ):
        assert snippet in message
    assert message.count("fix: ") == 5
    warnings_part = message.split("warnings (these alone would not stop the run):")[1]
    assert "text shorter than 3 chars" in warnings_part and "classes with fewer than 5 rows" in warnings_part
    assert err.value.result.failed == 5
    assert {e["check"] for e in failing_entries(err.value.result.summary_path.parent)} == {
        "text_not_null",
        "text_min_length",
        "label_known",
        "class_min_rows",
        "class_usable",
        "no_train_leak",
        "column_present",
    }


def relabel_some_billing(label: str) -> Callable[[Splits], None]:
    """Give a billing variant enough rows in every split to be a class of its own."""

    def mutate(splits: Splits) -> None:
        splits["train"].loc[0:4, "label"] = label
        splits["validation"].loc[0, "label"] = label
        splits["test"].loc[0, "label"] = label

    return mutate


# (mutation, warning check, split, snippets in the warning) -- the run goes on
WARNINGS = {
    "thin class": (
        thin_class(keep=2),
        "class_min_rows",
        "train",
        ["classes with fewer than 5 rows", "1 of 3 classes", "'technical': 2 rows in train; 8 in all",
         "per-class test metrics and the gate's recall guard rest on few rows"],
    ),
    "class missing from test": (
        lambda splits: splits.update(test=splits["test"][splits["test"]["label"] != "shipping"].reset_index(drop=True)),
        "class_in_every_split",
        "test",
        ["classes with no row in test", "'shipping': 10 rows in train; 13 in all (train 10, validation 3, test 0)",
         "no test metrics"],
    ),
    "too short": (
        set_cell("train", 6, "text", "ok"),
        "text_min_length",
        "train",
        ["text shorter than 3 chars", "1 of 30 rows", "row 6: 'ok' (2 chars)", "validate.min_text_chars: 2"],
    ),
    "too long": (
        set_cell("validation", 2, "text", "y" * 250),
        "text_max_length",
        "validation",
        ["text longer than 200 chars", "1 of 9 rows", "(250 chars)", "validate.max_text_chars: 250"],
    ),
    "too many duplicates": (
        duplicate_train,  # rows 1-4 repeat row 0
        "duplicate_rate",
        "train",
        [
            "duplicate texts above 10.0% of rows",
            "4 repeated of 30 rows",
            "'train ticket number 0 about billing' x5",
            "prepare.deduplicate: true",
            "validate.max_duplicate_rate: 0.14",
        ],
    ),
    "labels that differ only in case": (
        relabel_some_billing("Billing"),
        "label_variants",
        "train",
        ["labels that differ only in case or spacing", "'billing' (9 rows) / 'Billing' (7 rows)", "never merged"],
    ),
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_warnings_are_reported_and_the_run_goes_on(tmp_path, case):
    mutate, check, split, snippets = WARNINGS[case]
    splits = clean_splits()
    mutate(splits)
    data = DataConfig(labels=(*LABELS, "Billing")) if check == "label_variants" else DATA

    result = run_validate(tmp_path, splits, data=data)

    assert result.success and result.failed == 0
    (warning,) = result.warnings
    assert warning.startswith(f"[{split}]")
    for snippet in snippets:
        assert snippet in warning
    (entry,) = failing_entries(result.summary_path.parent)
    assert (entry["check"], entry["severity"]) == (check, "warn")
    report = result.report_path.read_text()
    assert "PASSED with 1 warnings" in report and "| warn |" in report


def test_a_warning_made_an_error_stops_the_run(tmp_path):
    splits = clean_splits()
    set_cell("train", 6, "text", "ok")(splits)
    strict = CFG.model_copy(update={"severity": {**CFG.severity, "text_min_length": "error"}})

    with pytest.raises(DataValidationError, match="text shorter than 3 chars") as err:
        run_validate(tmp_path, splits, cfg=strict)
    assert "fix: short texts are kept" in str(err.value)


def test_an_error_made_a_warning_lets_the_run_go_on(tmp_path):
    splits = clean_splits()
    leak_test_into_train(splits)
    lenient = ValidateConfig(**{**CFG.model_dump(), "severity": {"no_train_leak": "warn"}})

    result = run_validate(tmp_path, splits, cfg=lenient)

    assert result.success and "text also in train" in result.warnings[0]


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blank=st.lists(blank_texts.filter(len), min_size=3, max_size=3), visible=texts_with_one_visible_character)
def test_texts_with_nothing_visible_are_blank_and_one_visible_character_is_text(tmp_path_factory, blank, visible):
    """Whitespace, controls (NUL), format characters, combining marks, variation selectors and blank fillers
    (U+3164, U+2800) are no text; one visible character among them is."""
    tmp_path = tmp_path_factory.mktemp("validate")
    splits = clean_splits()
    splits["train"].loc[0:2, "text"] = blank
    splits["train"].loc[3, "text"] = visible

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits, cfg=CFG.model_copy(update={"min_text_chars": 1}))

    failed = {(e["check"], e["split"]): e for e in failing_entries(err.value.result.summary_path.parent)}
    assert set(failed) == {("text_not_blank", "train")}, sorted(failed)
    assert failed[("text_not_blank", "train")]["unexpected_count"] == 3
    assert "text is empty: no visible character" in str(err.value)


@pytest.mark.parametrize("blank", ["   ", "\u200b\u0301\u2060", "\u3164\u2800\u3164"], ids=["spaces", "zero-width-and-accent", "filler"])
def test_blank_texts_in_train_and_test_are_blank_not_leaked(tmp_path, blank):
    splits = clean_splits()
    splits["train"].loc[0, "text"] = blank
    splits["test"].loc[0, "text"] = blank

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits)

    failed = {(e["check"], e["split"]) for e in failing_entries(err.value.result.summary_path.parent)}
    assert failed == {("text_not_blank", "train"), ("text_not_blank", "test")}


def test_examples_are_capped_but_counts_are_complete(tmp_path):
    splits = clean_splits()
    splits["train"].loc[0:9, "text"] = None

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits)

    assert "10 of 30 rows (33.33%)" in str(err.value)
    (entry,) = failing_entries(err.value.result.summary_path.parent)
    assert entry["unexpected_count"] == 10
    assert len(entry["examples"]) == CFG.max_examples


def test_undeclared_labels_come_from_labels_json(tmp_path):
    splits = clean_splits()
    splits["train"].loc[0, "label"] = "refunds"
    with pytest.raises(DataValidationError, match="'refunds'"):
        run_validate(tmp_path, splits, data=DataConfig(labels=None))


def test_prepare_then_validate_reports_the_rows_prepare_kept(tmp_path):
    rows = [
        {"body": f"{label} ticket {i} needs help", "intent": label} for label in LABELS for i in range(12)
    ]
    rows[0]["body"] = "   "
    source = tmp_path / "tickets.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    data = DataConfig(source=str(source), text_column="body", label_column="intent", labels=LABELS)
    prepared = prepare(data, PrepareConfig(), seed=0, out_dir=tmp_path / "prepared")

    with pytest.raises(DataValidationError) as err:
        validate(data, CFG, prepared_dir=prepared.out_dir, report_dir=tmp_path / "report")

    assert "text is empty: no visible character" in str(err.value)


@pytest.mark.parametrize(
    ("bad_label", "problem"),
    [("", "empty"), ("x" * 250, "250 chars, at most 200"), ("two\nlines", "holds a control character")],
    ids=["empty", "too long", "newline"],
)
def test_labels_no_report_or_metric_name_can_carry_are_refused_before_training(tmp_path, bad_label, problem):
    splits = clean_splits()
    for split in SPLITS:
        splits[split].loc[0:5 if split == "train" else 0, "label"] = bad_label
    labels = (*LABELS, bad_label)

    with pytest.raises(DataValidationError) as err:
        run_validate(tmp_path, splits, data=DataConfig(labels=None) if bad_label == "" else DataConfig(labels=labels))

    message = str(err.value)
    assert "labels no report, metric or file name can carry" in message and problem in message
    assert "fix: rename these labels in the source: a label needs 1 to 200 characters" in message
