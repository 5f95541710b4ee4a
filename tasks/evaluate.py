"""Score the trained (uncompressed) model on the held-out test split, beside the majority class and the
TF-IDF + logistic-regression baseline (``tasks/baseline.py``) on the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from langops.config import EvaluateConfig
from langops.faults import crash_point
from langops.io import read_json, read_labels, read_test_rows, staging_dir, swap_in, write_json
from langops.metrics import (
    calibrated_ece_range,
    classification_metrics,
    expected_calibration_error,
    metrics_for_dvc,
    reliability_bins,
    softmax,
)
from langops.tasks.baseline import BaselineResult

METRICS_FILE = "metrics.json"  # the numbers DVC compares
DETAILS_FILE = "details.json"  # everything: per-class table with labels, label keys, confusion matrix
CONFUSION_CSV = "confusion.csv"  # actual/predicted per row: DVC's confusion plot
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability_diagram.png"  # confidence bins against accuracy, with the rows in each bin
PREDICTIONS_CSV = "predictions.csv"


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, Any]
    metrics_path: Path
    details_path: Path
    confusion_png: Path
    reliability_png: Path
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
            reliability_png=out_dir / RELIABILITY_PNG,
            confusion_csv=out_dir / CONFUSION_CSV,
            predictions_csv=out_dir / PREDICTIONS_CSV,
        )


def evaluate(
    cfg: EvaluateConfig, *, trained_dir: Path, prepared_dir: Path, out_dir: Path, max_length: int,
    baseline: BaselineResult,
) -> EvaluationResult:
    """Accuracy, macro-F1, per-class P/R/F1, confusion matrix and calibration error on the test split, with
    the majority class and the baseline scored on the same rows beside them.

    Writes ``metrics.json`` (DVC metrics: headline numbers, ``majority_baseline_*`` and ``baseline_*``
    beside them, and each class's F1 by label key), ``details.json`` (per-class precision/recall/F1 with
    the labels, the label-key map, the confusion matrix, the baseline's figures and the reliability bins),
    ``confusion.csv`` (actual/predicted rows: a DVC confusion plot), ``confusion_matrix.png``,
    ``reliability_diagram.png`` and ``predictions.csv`` to ``out_dir``.

    Raises:
        StaleBaselineError: the baseline was made from other prepared rows than ``prepared_dir`` holds.
        ValueError: the test split holds labels the model does not know, or the baseline's labels differ
            from the model's.
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
    baseline_probs = baseline_test_probabilities(baseline, prepared_dir, labels)
    scored = classification_metrics(y_true, baseline_probs, labels, calibration_bins=cfg.calibration_bins)
    validation = baseline.metrics["validation"]["baseline"]
    metrics |= {"baseline_accuracy": scored["accuracy"], "baseline_macro_f1": scored["macro_f1"],
                "baseline_val_accuracy": validation["accuracy"], "baseline_val_macro_f1": validation["macro_f1"]}
    metrics["baseline"] = {
        "model": baseline.description, "ece": scored["ece"],
        "f1": {key: row["f1"] for key, row in scored["per_class"].items()},
        "majority_class_of_fit_rows": baseline.metrics["test"]["majority"],
    }
    metrics["reliability"] = {"model": reliability_bins(probs, y_true, cfg.calibration_bins),
                              "baseline": reliability_bins(baseline_probs, y_true, cfg.calibration_bins)}

    # Written beside the folder and swapped in whole: a crash never leaves new plots beside old metrics.
    staging = staging_dir(out_dir)
    actual = [labels[i] for i in y_true]
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(staging / CONFUSION_CSV, index=False)
    pd.DataFrame(
        {"text": texts, "label": actual, "predicted": predicted, "confidence": probs.max(axis=1)}
    ).to_csv(staging / PREDICTIONS_CSV, index=False)
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), labels, staging / CONFUSION_PNG)
    reliability = metrics["reliability"]
    plot_reliability_diagram({"torch model": reliability["model"], "TF-IDF baseline": reliability["baseline"]},
                             staging / RELIABILITY_PNG)
    write_json(staging / METRICS_FILE, metrics_for_dvc(metrics))
    write_json(staging / DETAILS_FILE, metrics)
    crash_point("evaluate:staged")
    swap_in(staging, out_dir)
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


def baseline_test_probabilities(baseline: BaselineResult, prepared_dir: Path, labels: list[str]) -> np.ndarray:
    """The baseline's test probabilities with columns in the model's label order.

    Raises:
        StaleBaselineError: the prepared rows changed since the baseline was made.
        ValueError: the baseline knows other labels than the model.
    """
    if set(baseline.labels) != set(labels):
        raise ValueError(f"the baseline was fit on labels {list(baseline.labels)}, the model on {labels}: "
                         "run the baseline step on the data the model was trained on")
    probs = baseline.test_probabilities(prepared_dir)
    return probs[:, [baseline.labels.index(label) for label in labels]]


def plot_reliability_diagram(reliability: dict[str, dict[str, list]], path: Path) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with each bin's row count.

    ``reliability`` maps a model's name to its ``langops.metrics.reliability_bins``; the first is drawn as
    bars, the others as lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for i, (name, bins) in enumerate(reliability.items()):
        edges = np.array(bins["edges"])
        width = np.diff(edges)
        used = [j for j, count in enumerate(bins["counts"]) if count]
        accuracy = np.array([bins["accuracy"][j] for j in used])
        confidence = np.array([bins["confidence"][j] for j in used])
        if i == 0:
            top.bar(edges[used], accuracy, width=width[used], align="edge", color="tab:blue", alpha=0.7,
                    edgecolor="white", label=f"{name}: accuracy")
            top.bar(edges[used], confidence - accuracy, bottom=accuracy, width=width[used], align="edge",
                    color="tab:red", alpha=0.25, label=f"{name}: gap to mean confidence")
            bottom.bar(edges[used], [bins["counts"][j] for j in used], width=width[used], align="edge",
                       color="tab:blue", alpha=0.7, edgecolor="white", label=name)
            for j, acc in zip(used, accuracy):
                top.text(edges[j] + width[j] / 2, min(acc + 0.02, 0.97), str(bins["counts"][j]), ha="center",
                         fontsize=7)
        else:
            top.plot(confidence, accuracy, marker="o", color="tab:orange", label=f"{name}: accuracy")
            bottom.step(edges[:-1], bins["counts"], where="post", color="tab:orange", label=name)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("Reliability diagram (test split; numbers: rows per bin)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("rows")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
