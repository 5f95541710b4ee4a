"""Score the trained (uncompressed) model on the held-out test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from langops.config import EvaluateConfig
from langops.io import read_json, read_labels, read_test_rows, write_json
from langops.metrics import (
    calibrated_ece_range,
    classification_metrics,
    expected_calibration_error,
    metrics_for_dvc,
    softmax,
)

METRICS_FILE = "metrics.json"  # the numbers DVC compares
DETAILS_FILE = "details.json"  # everything: per-class table with labels, label keys, confusion matrix
CONFUSION_CSV = "confusion.csv"  # actual/predicted per row: DVC's confusion plot
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS_CSV = "predictions.csv"


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, Any]
    metrics_path: Path
    details_path: Path
    confusion_png: Path
    confusion_csv: Path
    predictions_csv: Path

    @classmethod
    def load(cls, out_dir: Path) -> EvaluationResult:
        """The result as the step left it in ``out_dir`` (for a later stage run on its own)."""
        out_dir = Path(out_dir)
        return cls(
            metrics=read_json(out_dir / DETAILS_FILE),
            metrics_path=out_dir / METRICS_FILE,
            details_path=out_dir / DETAILS_FILE,
            confusion_png=out_dir / CONFUSION_PNG,
            confusion_csv=out_dir / CONFUSION_CSV,
            predictions_csv=out_dir / PREDICTIONS_CSV,
        )


def evaluate(cfg: EvaluateConfig, *, trained_dir: Path, prepared_dir: Path, out_dir: Path, max_length: int) -> EvaluationResult:
    """Accuracy, macro-F1, per-class P/R/F1, confusion matrix and calibration error on the test split.

    Writes ``metrics.json`` (DVC metrics: headline numbers and each class's F1 by label key),
    ``details.json`` (per-class precision/recall/F1 with the labels, the label-key map, the confusion
    matrix), ``confusion.csv`` (actual/predicted rows: a DVC confusion plot), ``confusion_matrix.png`` and
    ``predictions.csv`` to ``out_dir``.
    """
    # modeling imports torch and transformers: imported here, so that reading this step's file names (the
    # stage table, which the CLI loads for every command) does not pay for them
    from langops.modeling import load_trained_classifier, predict_logits

    trained_dir, out_dir = Path(trained_dir), Path(out_dir)
    labels = read_labels(trained_dir)
    texts, y_true = read_test_rows(prepared_dir, labels)
    model, tokenizer = load_trained_classifier(trained_dir / "model")
    logits = predict_logits(model, tokenizer, texts, batch_size=cfg.batch_size, max_length=max_length)
    probs = softmax(logits)
    metrics = classification_metrics(y_true, probs, labels, calibration_bins=cfg.calibration_bins)
    # the train step folded a temperature into the head; undone, it shows what calibration bought
    temperature = float(getattr(model.config, "langops_temperature", 1.0))
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = expected_calibration_error(softmax(logits * temperature), y_true, cfg.calibration_bins)
    # on a few hundred rows ECE is biased upwards: this is the figure a calibrated model could still show
    metrics["ece_if_calibrated_p95"] = calibrated_ece_range(probs.max(axis=1), cfg.calibration_bins)[1]

    out_dir.mkdir(parents=True, exist_ok=True)
    actual = [labels[i] for i in y_true]
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(out_dir / CONFUSION_CSV, index=False)
    pd.DataFrame(
        {"text": texts, "label": actual, "predicted": predicted, "confidence": probs.max(axis=1)}
    ).to_csv(out_dir / PREDICTIONS_CSV, index=False)
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), labels, out_dir / CONFUSION_PNG)
    write_json(out_dir / METRICS_FILE, metrics_for_dvc(metrics))
    write_json(out_dir / DETAILS_FILE, metrics)
    return EvaluationResult.load(out_dir)


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], path: Path) -> Path:
    """A row-normalised confusion matrix with raw counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.7 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of actual")
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
