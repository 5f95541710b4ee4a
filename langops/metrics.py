"""Classification metrics shared by evaluate, compress (int8 re-evaluation) and the promotion gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from langops.label_keys import label_keys


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: |confidence - accuracy| per confidence bin, weighted by the bin's share of rows."""
    if len(y_true) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    return float(_binned_ece(confidence, correct[None, :].astype(float), n_bins)[0])


def calibrated_ece_range(
    confidence: np.ndarray, n_bins: int = 15, *, draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these top-label confidences would measure on this many
    rows: its median and 95th percentile over ``draws`` simulated test sets, each row right with
    probability equal to its confidence.

    ECE is biased upwards on small test sets (on SST-2's 872 dev rows a perfectly calibrated model
    measures about 0.02), so a measured ECE is only evidence of miscalibration above the 95th percentile.
    """
    confidence = np.asarray(confidence, dtype=float)
    if len(confidence) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    eces = np.concatenate([
        _binned_ece(confidence, (rng.random((min(100, draws - start), len(confidence))) < confidence).astype(float),
                    n_bins)
        for start in range(0, draws, 100)
    ])
    return float(np.median(eces)), float(np.percentile(eces, 95))


def _binned_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of ``correct`` (draws × rows, 1.0 where right) against the same ``confidence``."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    one_hot = np.zeros((len(confidence), n_bins))
    one_hot[np.arange(len(confidence)), bins] = 1.0
    used = counts > 0
    mean_confidence = (confidence @ one_hot)[used] / counts[used]
    accuracy = (correct @ one_hot)[:, used] / counts[used]
    return np.abs(accuracy - mean_confidence) @ (counts[used] / len(confidence))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    calibration_bins: int = 15,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and calibration error.

    Args:
        y_true: gold label ids (indices into ``labels``).
        probs: class probabilities, shape (rows, len(labels)).
        labels: label names in id order.

    ``per_class`` is keyed by each label's safe key (``langops.label_keys``; a plain label is its own key),
    each row holding the label itself; ``label_keys`` maps every key back to its label.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(labels)):
        raise ValueError(f"probs has shape {probs.shape}, expected ({len(y_true)}, {len(labels)})")
    y_pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    counts = np.bincount(y_true, minlength=len(labels))
    majority = np.full(len(y_true), counts.argmax())  # the test split's most frequent class, for every row
    keys = label_keys(labels)
    return {
        "rows": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y_true, calibration_bins),
        "majority_baseline_accuracy": float(counts.max() / max(len(y_true), 1)),
        "majority_baseline_macro_f1": float(f1_score(y_true, majority, labels=ids, average="macro", zero_division=0)),
        "label_keys": {keys[name]: name for name in labels},
        "per_class": {
            keys[name]: {
                "label": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, list[Any]]:
    """The reliability diagram's numbers: top-label confidence in ``n_bins`` equal-width bins (the bins of
    ``expected_calibration_error``), each bin's row count, mean confidence and accuracy (None when empty)."""
    confidence = np.asarray(probs, dtype=float).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)

    def per_bin(values: np.ndarray) -> list[float | None]:
        sums = np.bincount(bins, weights=values.astype(float), minlength=n_bins)
        return [float(total / count) if count else None for total, count in zip(sums, counts)]

    return {"edges": edges.tolist(), "counts": counts.tolist(), "confidence": per_bin(confidence),
            "accuracy": per_bin(correct)}


# evaluate's: the torch model before calibration, the temperature, and the ECE a perfectly calibrated model
# with the same confidences stays under 95 times in 100 on as many rows (``calibrated_ece_range``)
CALIBRATION_KEYS = ("ece_uncalibrated", "temperature", "ece_if_calibrated_p95")
# evaluate's too: the TF-IDF + logistic-regression baseline (tasks/baseline.py) on the same test rows, and on
# validation when fit on train alone
BASELINE_KEYS = ("baseline_accuracy", "baseline_macro_f1", "baseline_val_accuracy", "baseline_val_macro_f1")


def headline(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The flat scalar metrics worth logging to MLflow (per-class ones as ``f1_<label key>``)."""
    flat = {f"{prefix}{k}": float(metrics[k]) for k in ("accuracy", "macro_f1", "ece", *CALIBRATION_KEYS) if k in metrics}
    for key, row in metrics["per_class"].items():
        flat[f"{prefix}f1_{key}"] = row["f1"]
    return flat


def metrics_for_dvc(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers ``dvc metrics show/diff`` compare: the headline scalars and one F1 per class, named by its
    label key. The per-class table with the labels, the key map and the confusion matrix stay out: DVC
    would make a column of every string in them."""
    compact = {k: metrics[k] for k in ("rows", "accuracy", "macro_f1", "ece", "majority_baseline_accuracy")}
    compact |= {k: metrics[k] for k in ("majority_baseline_macro_f1", *BASELINE_KEYS, *CALIBRATION_KEYS) if k in metrics}
    compact["f1"] = {key: row["f1"] for key, row in metrics["per_class"].items()}
    return compact
