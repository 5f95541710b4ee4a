"""Metric definitions and the evaluate step's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from langops.config import EvaluateConfig
from langops.metrics import calibrated_ece_range, classification_metrics, expected_calibration_error
from langops.tasks.evaluate import evaluate


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


@pytest.mark.model
def test_evaluate_writes_metrics_plots_and_predictions(tiny_trained_dir, prepared_dir, tmp_path):
    result = evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir,
                      out_dir=tmp_path / "eval", max_length=32)

    saved = json.loads(result.details_path.read_text())
    assert set(saved) >= {"accuracy", "macro_f1", "ece", "per_class", "confusion_matrix", "label_keys"}
    assert set(saved["per_class"]) == {"billing", "shipping", "technical"}
    test_rows = len(pd.read_parquet(prepared_dir / "test.parquet"))
    assert saved["rows"] == test_rows == np.sum(saved["confusion_matrix"])
    for_dvc = json.loads(result.metrics_path.read_text())  # numbers only: DVC makes a column of every leaf
    headline = ("rows", "accuracy", "macro_f1", "ece", "majority_baseline_accuracy", "ece_uncalibrated", "temperature",
                "ece_if_calibrated_p95")
    assert for_dvc == {**{k: saved[k] for k in headline},
                       "f1": {key: row["f1"] for key, row in saved["per_class"].items()}}
    confusion = pd.read_csv(result.confusion_csv)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == test_rows
    assert result.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_evaluate_refuses_labels_the_model_never_saw(tiny_trained_dir, prepared_dir, tmp_path):
    test = pd.read_parquet(prepared_dir / "test.parquet")
    test.loc[0, "label"] = "refunds"
    test.to_parquet(prepared_dir / "test.parquet")
    with pytest.raises(ValueError, match="refunds"):
        evaluate(EvaluateConfig(), trained_dir=tiny_trained_dir, prepared_dir=prepared_dir, out_dir=tmp_path / "e", max_length=32)
