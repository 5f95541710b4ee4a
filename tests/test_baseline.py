"""The TF-IDF + logistic-regression baseline step: its figures, its per-row predictions, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import LABELS, write_prepared

from langops.config import BaselineConfig
from langops.io import split_path, write_labels
from langops.tasks.baseline import (
    METRICS_FILE,
    BaselineError,
    BaselineResult,
    StaleBaselineError,
    baseline,
)
from langops.tasks.prepare import PrepareResult

pytestmark = pytest.mark.data


def _prepared(directory, **kwargs) -> PrepareResult:
    return PrepareResult.load(write_prepared(directory, **kwargs))


def test_the_baseline_learns_what_the_majority_class_cannot(tmp_path):
    prepared = _prepared(tmp_path / "prepared", rows_per_class={"train": 40, "validation": 10, "test": 10})
    result = baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")

    for split in ("test", "validation"):
        figures = result.metrics[split]
        assert figures["rows"] == 30
        assert figures["majority"]["accuracy"] == pytest.approx(1 / 3)  # three balanced classes
        assert figures["baseline"]["macro_f1"] > 0.9 > figures["majority"]["macro_f1"]
    saved = json.loads((tmp_path / "baseline" / METRICS_FILE).read_text())  # DVC metrics: numbers only
    assert saved["test"]["baseline"] == result.metrics["test"]["baseline"]
    assert "label" not in saved["test"]["majority"]
    assert "TF-IDF" in result.description and "C 10" in result.description


def test_predictions_line_up_row_by_row_with_the_prepared_splits(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    result = baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")

    for split in ("test", "validation"):
        rows = pd.read_parquet(split_path(prepared.out_dir, split))
        predicted = result.predictions(split, prepared.out_dir)
        probs = result.probabilities(split, prepared.out_dir)
        assert predicted.shape == (len(rows),) and probs.shape == (len(rows), len(LABELS))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (probs.argmax(axis=1) == predicted).all()
        # each row's prediction is its own: the keyword in the text names its class (ids in labels.json order)
        truth = rows["label"].map({label: i for i, label in enumerate(LABELS)}).to_numpy()
        accuracy = (predicted == truth).mean()
        assert accuracy == pytest.approx(result.metrics[split]["baseline"]["accuracy"]) and accuracy > 0.9
    np.testing.assert_array_equal(result.test_predictions(prepared.out_dir), result.predictions("test", prepared.out_dir))
    np.testing.assert_array_equal(result.validation_predictions(prepared.out_dir),
                                  result.predictions("validation", prepared.out_dir))


def test_load_round_trips(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    result = baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")
    assert BaselineResult.load(tmp_path / "baseline") == result
    with pytest.raises(FileNotFoundError, match="run the baseline step first"):
        BaselineResult.load(tmp_path / "nowhere")


def test_a_prepared_split_that_changed_is_refused_by_name(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    result = baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")

    test_file = split_path(prepared.out_dir, "test")
    test = pd.read_parquet(test_file)
    test.iloc[::-1].reset_index(drop=True).to_parquet(test_file)  # the same rows, in another order
    with pytest.raises(StaleBaselineError, match="the test split changed"):
        result.test_predictions(prepared.out_dir)
    result.validation_predictions(prepared.out_dir)  # fit on train, scored on validation: still theirs
    test.to_parquet(test_file)
    result.test_predictions(prepared.out_dir)

    train_file = split_path(prepared.out_dir, "train")
    train = pd.read_parquet(train_file)
    train.loc[0, "label"] = next(label for label in LABELS if label != train.loc[0, "label"])
    train.to_parquet(train_file)
    for split in ("test", "validation"):  # both models were fit on train
        with pytest.raises(StaleBaselineError, match="the train split changed"):
            result.predictions(split, prepared.out_dir)

    write_labels(prepared.out_dir, list(reversed(LABELS)))
    with pytest.raises(StaleBaselineError, match="labels"):
        result.test_predictions(prepared.out_dir)
    with pytest.raises(ValueError, match="not 'train'"):
        result.predictions("train", prepared.out_dir)


def test_a_split_with_one_class_is_refused(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    train_file = split_path(prepared.out_dir, "train")
    train = pd.read_parquet(train_file)
    train[train["label"] == "billing"].to_parquet(train_file)
    validation_file = split_path(prepared.out_dir, "validation")
    validation = pd.read_parquet(validation_file)
    validation[validation["label"] == "billing"].to_parquet(validation_file)
    with pytest.raises(BaselineError, match=r"the train \+ validation rows hold one class \('billing'\)"):
        baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")
    assert not (tmp_path / "baseline").exists()  # nothing half-written


def test_an_empty_validation_split_is_refused(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    validation_file = split_path(prepared.out_dir, "validation")
    pd.read_parquet(validation_file).head(0).to_parquet(validation_file)
    with pytest.raises(BaselineError, match="the validation split is empty"):
        baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")


def test_a_label_outside_labels_json_is_refused(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    test_file = split_path(prepared.out_dir, "test")
    test = pd.read_parquet(test_file)
    test.loc[0, "label"] = "refunds"
    test.to_parquet(test_file)
    with pytest.raises(BaselineError, match=r"the test split holds labels that labels.json does not list: \['refunds'\]"):
        baseline(BaselineConfig(), prepared=prepared, out_dir=tmp_path / "baseline")


def test_a_rerun_replaces_the_folder_whole(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    out = tmp_path / "baseline"
    baseline(BaselineConfig(), prepared=prepared, out_dir=out)
    (out / "stray.txt").write_text("left by hand")
    again = baseline(BaselineConfig(word_ngrams=(1, 1), char_ngrams=(3, 4)), prepared=prepared, out_dir=out)
    assert not (out / "stray.txt").exists()
    assert "word 1-1, char 3-4" in again.description
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "baseline.json", "test_predictions.npz", "validation_predictions.npz"])


def test_the_stage_runs_on_its_own_from_the_prepared_folder_and_loads_back(tmp_path):
    from langops.config import parse_params
    from langops.stages import run_stage, stage

    write_prepared(tmp_path / "prepared")
    params = parse_params({"paths": {"prepared": str(tmp_path / "prepared"), "baseline": str(tmp_path / "baseline")},
                           "project": {"state_dir": str(tmp_path / "state")}})
    result = run_stage("baseline", params)  # what `langops baseline` and `dvc repro` run
    assert result.out_dir == tmp_path / "baseline"
    assert stage("baseline").load(params) == result  # what evaluate gets when it runs on its own
    assert stage("evaluate").needs == ("prepare", "baseline", "train")
