"""Metric definitions and the evaluate step's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from langops.config import BaselineConfig, EvaluateConfig
from langops.metrics import (
    calibrated_ece_range,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)
from langops.tasks.baseline import BaselineResult, StaleBaselineError, baseline
from langops.tasks.evaluate import evaluate
from langops.tasks.prepare import PrepareResult


@pytest.mark.unit
def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    m = classification_metrics(y_true, probs, ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.75)
    # class a: P=1, R=0.5, F1=2/3; class b: P=2/3, R=1, F1=0.8
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["majority_baseline_accuracy"] == pytest.approx(0.5)
    assert m["majority_baseline_macro_f1"] == pytest.approx((2 / 3 + 0) / 2)  # class a for every row


@pytest.mark.unit
def test_reliability_bins_count_rows_and_average_confidence_and_accuracy_per_bin():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 0, 1, 0])
    bins = reliability_bins(probs, y, n_bins=5)  # edges 0, .2, .4, .6, .8, 1
    assert bins["counts"] == [0, 0, 2, 1, 2]
    assert bins["confidence"][2] == pytest.approx((0.6 + 0.55) / 2) and bins["accuracy"][2] == pytest.approx(0.5)
    assert bins["confidence"][3] == pytest.approx(0.7) and bins["accuracy"][3] == 1.0
    assert bins["confidence"][4] == pytest.approx(0.925) and bins["accuracy"][4] == pytest.approx(0.5)
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None
    confidence = probs.max(axis=1)
    ece = sum(c * abs(a - m) for c, a, m in zip(bins["counts"], bins["accuracy"], bins["confidence"]) if c) / len(y)
    assert ece == pytest.approx(expected_calibration_error(probs, y, n_bins=5))
    assert sum(bins["counts"]) == len(confidence)


@pytest.mark.unit
def test_calibration_error_is_zero_for_calibrated_and_large_for_overconfident():
    y = np.array([0, 1] * 50)
    calibrated = np.tile([0.5, 0.5], (100, 1))
    assert expected_calibration_error(calibrated, y) == pytest.approx(0.0, abs=0.01)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.49, abs=0.01)


def _calibrated_predictions(confidence: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities that say ``confidence`` for class 0, and labels right that often."""
    y = (np.random.default_rng(seed).random(len(confidence)) >= confidence).astype(int)
    return np.stack([confidence, 1 - confidence], axis=1), y


@pytest.mark.unit
def test_calibrated_ece_range_holds_a_perfectly_calibrated_models_ece_95_times_in_100():
    confidence = np.random.default_rng(0).uniform(0.55, 1.0, 800)
    median, p95 = calibrated_ece_range(confidence)
    measured = np.array([expected_calibration_error(*_calibrated_predictions(confidence, seed)) for seed in range(300)])
    assert 0.01 < median < p95 < 0.05  # 800 rows: far from the 0 a perfect model has on infinite data
    assert np.median(measured) == pytest.approx(median, rel=0.1)
    assert 0.02 <= (measured > p95).mean() <= 0.09


@pytest.mark.unit
def test_calibrated_ece_range_narrows_as_the_test_set_grows():
    confidence = np.random.default_rng(0).uniform(0.55, 1.0, 200)
    _, small = calibrated_ece_range(confidence)
    _, large = calibrated_ece_range(np.tile(confidence, 25))
    assert large < small / 3


@pytest.mark.unit
def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="expected"):
        classification_metrics([0, 1], np.ones((3, 2)) / 2, ["a", "b"])


def _baseline(prepared_dir, tmp_path) -> BaselineResult:
    return baseline(BaselineConfig(), prepared=PrepareResult.load(prepared_dir), out_dir=tmp_path / "baseline")


@pytest.mark.model
def test_evaluate_writes_metrics_plots_and_predictions(tiny_trained_dir, prepared_dir, tmp_path):
    fitted = _baseline(prepared_dir, tmp_path)
    result = evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir,
                      out_dir=tmp_path / "eval", max_length=32, baseline=fitted)

    saved = json.loads(result.details_path.read_text())
    assert set(saved) >= {"accuracy", "macro_f1", "ece", "per_class", "confusion_matrix", "label_keys", "baseline",
                          "reliability"}
    assert set(saved["per_class"]) == {"billing", "shipping", "technical"}
    test_rows = len(pd.read_parquet(prepared_dir / "test.parquet"))
    assert saved["rows"] == test_rows == np.sum(saved["confusion_matrix"])
    for_dvc = json.loads(result.metrics_path.read_text())  # numbers only: DVC makes a column of every leaf
    headline = ("rows", "accuracy", "macro_f1", "ece", "majority_baseline_accuracy", "majority_baseline_macro_f1",
                "baseline_accuracy", "baseline_macro_f1", "baseline_val_accuracy", "baseline_val_macro_f1",
                "ece_uncalibrated", "temperature", "ece_if_calibrated_p95")
    assert for_dvc == {**{k: saved[k] for k in headline},
                       "f1": {key: row["f1"] for key, row in saved["per_class"].items()}}
    confusion = pd.read_csv(result.confusion_csv)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == test_rows
    assert result.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.reliability_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.reliability_png.parent == result.confusion_png.parent
    for model in ("model", "baseline"):
        assert sum(saved["reliability"][model]["counts"]) == test_rows


@pytest.mark.model
def test_evaluate_sets_majority_class_baseline_and_model_side_by_side_on_the_same_rows(
    tiny_trained_dir, prepared_dir, tmp_path
):
    fitted = _baseline(prepared_dir, tmp_path)
    metrics = evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir,
                       out_dir=tmp_path / "eval", max_length=32, baseline=fitted).metrics

    # the baseline's figures are its own test figures, recomputed on the rows the model was scored on
    assert metrics["baseline_accuracy"] == pytest.approx(fitted.metrics["test"]["baseline"]["accuracy"])
    assert metrics["baseline_macro_f1"] == pytest.approx(fitted.metrics["test"]["baseline"]["macro_f1"])
    assert metrics["baseline_val_macro_f1"] == pytest.approx(fitted.metrics["validation"]["baseline"]["macro_f1"])
    assert metrics["majority_baseline_accuracy"] == pytest.approx(fitted.metrics["test"]["majority"]["accuracy"])
    assert metrics["majority_baseline_macro_f1"] == pytest.approx(fitted.metrics["test"]["majority"]["macro_f1"])
    # learnable keywords: the baseline is far above the majority class; the random tiny model is not
    assert metrics["baseline_macro_f1"] > 0.9 > metrics["majority_baseline_macro_f1"]
    assert metrics["baseline"]["model"] == fitted.description
    assert set(metrics["baseline"]["f1"]) == set(metrics["per_class"])


@pytest.mark.model
def test_evaluate_refuses_a_baseline_made_from_other_rows(tiny_trained_dir, prepared_dir, tmp_path):
    fitted = _baseline(prepared_dir, tmp_path)
    test = pd.read_parquet(prepared_dir / "test.parquet")
    test.head(len(test) - 1).to_parquet(prepared_dir / "test.parquet")
    with pytest.raises(StaleBaselineError, match="the test split changed"):
        evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir,
                 out_dir=tmp_path / "eval", max_length=32, baseline=fitted)


@pytest.mark.model
def test_evaluate_refuses_labels_the_model_never_saw(tiny_trained_dir, prepared_dir, tmp_path):
    fitted = _baseline(prepared_dir, tmp_path)
    test = pd.read_parquet(prepared_dir / "test.parquet")
    test.loc[0, "label"] = "refunds"
    test.to_parquet(prepared_dir / "test.parquet")
    with pytest.raises(ValueError, match="refunds"):
        evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir, out_dir=tmp_path / "e",
                 max_length=32, baseline=fitted)


def _summary(**overrides):
    from langops.flows.pipeline import PipelineSummary

    return PipelineSummary(**{
        "run_id": "abc", "model_name": "langops-classifier", "version": "3", "promoted": False,
        "decision_reason": "a tie", "champion_version": "2",
        "test_metrics": {"accuracy": 0.81, "macro_f1": 0.79, "ece": 0.02},
        "int8_metrics": {"accuracy": 0.8, "macro_f1": 0.78, "ece": 0.03},
        "majority_metrics": {"accuracy": 0.24, "macro_f1": 0.065},
        "baseline_metrics": {"accuracy": 0.78, "macro_f1": 0.77},
        "server_url": None, "tracking_uri": "sqlite:///x.db", "shipped_model": "int8 ONNX", **overrides,
    })


@pytest.mark.unit
def test_the_run_summary_and_the_metrics_artifact_set_majority_class_and_baseline_beside_the_models(tmp_path):
    from types import SimpleNamespace

    from langops.cli import _closing_summary
    from langops.config import Params, ProjectConfig
    from langops.flows.pipeline import metrics_table, summary_markdown

    markdown = summary_markdown(_summary())
    for row in ("| majority class | 0.2400 | 0.0650 |", "| TF-IDF + logistic regression (baseline) | 0.7800 | 0.7700 |",
                "| torch | 0.8100 | 0.7900 |", "| int8 ONNX | 0.8000 | 0.7800 |"):
        assert row in markdown

    params = Params().model_copy(update={"project": ProjectConfig(state_dir=tmp_path)})
    console = _closing_summary(params, _summary(), seconds=60.0)
    assert "test accuracy    0.8100 torch, 0.8000 int8 ONNX (TF-IDF baseline 0.7800, majority class 0.2400)" in console
    assert "test macro-F1    0.7900 torch, 0.7800 int8 ONNX (TF-IDF baseline 0.7700, majority class 0.0650)" in console

    evaluation = {"accuracy": 0.81, "macro_f1": 0.79, "ece": 0.02, "majority_baseline_accuracy": 0.24,
                  "majority_baseline_macro_f1": 0.065, "baseline_accuracy": 0.78, "baseline_macro_f1": 0.77,
                  "baseline": {"ece": 0.05}}
    compression = SimpleNamespace(shipped="int8", metrics={"accuracy": 0.8, "macro_f1": 0.78, "ece": 0.03})
    table = metrics_table(evaluation, compression)
    assert [(row["model"], row["macro_f1"]) for row in table] == [
        ("majority class", 0.065), ("TF-IDF + logistic regression (baseline)", 0.77), ("torch (fp32)", 0.79),
        ("int8 ONNX (shipped)", 0.78)]
