"""A TF-IDF + logistic-regression baseline on the prepared splits: the figure the model has to beat.

Users compare a fine-tuned transformer with word and character n-gram TF-IDF features and a logistic
regression, fit on the same rows and scored on the same test rows; on small or keyword-driven data the
linear model can win. This step fits that recipe twice:

- on train + validation, scoring the test split: what evaluate reports beside the model and the promotion
  gate pairs row by row with the model's predictions;
- on train alone, scoring the validation split: what a step that chooses on validation (distillation)
  can compare a model with, without touching the test rows.

Both come with the majority class of the rows they were fit on, as the floor below any model. Each
scored split's predictions are kept in the split's row order, with the hash of the rows they were made
for, so a reader can never pair them with a split that changed since (``BaselineResult.predictions``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from langops.config import BaselineConfig
from langops.faults import crash_point
from langops.io import (
    LABEL,
    LABELS_FILE,
    TEXT,
    read_json,
    read_labels,
    read_split,
    staging_dir,
    swap_in,
    write_json,
)
from langops.tasks.prepare import PrepareResult

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # the numbers DVC compares: majority class and baseline, on test and validation
SUMMARY_FILE = "baseline.json"  # everything: the figures, the row hashes, the labels, the fits' cost
TEST_PREDICTIONS = "test_predictions.npz"  # label ids and probabilities, one row per test row, in its order
VALIDATION_PREDICTIONS = "validation_predictions.npz"

# Each scored split, the splits its model is fit on, and the file of its per-row predictions.
FITS: dict[str, tuple[tuple[str, ...], str]] = {
    "test": (("train", "validation"), TEST_PREDICTIONS),
    "validation": (("train",), VALIDATION_PREDICTIONS),
}


class BaselineError(ValueError):
    """The prepared splits cannot fit or score a baseline (one class, an empty split, an unknown label)."""


class StaleBaselineError(ValueError):
    """The prepared data changed since the baseline was made: its predictions belong to other rows."""


@dataclass(frozen=True)
class BaselineResult:
    """The baseline's figures and where its per-row predictions are.

    ``metrics[split]`` holds ``rows``, ``majority`` and ``baseline`` (each ``accuracy`` and ``macro_f1``)
    for ``test`` and ``validation``; ``row_hashes`` the hash of every prepared split's texts and labels
    as the step read them.
    """

    out_dir: Path
    labels: tuple[str, ...]
    metrics: dict[str, Any]
    row_hashes: dict[str, str]
    description: str
    seconds: float
    fits: dict[str, Any]  # per scored split: the rows fit on, features, solver iterations, balanced, seconds

    @classmethod
    def load(cls, out_dir: Path) -> BaselineResult:
        """The result as the step left it in ``out_dir`` (for a later stage run on its own).

        Raises:
            FileNotFoundError: the baseline step has not written ``out_dir``.
        """
        out_dir = Path(out_dir)
        path = out_dir / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the baseline step first")
        summary = read_json(path)
        return cls(out_dir=out_dir, labels=tuple(summary["labels"]), metrics=summary["metrics"],
                   row_hashes=summary["row_hashes"], description=summary["description"],
                   seconds=float(summary["seconds"]), fits=summary["fits"])

    def predictions(self, split: str, prepared_dir: Path) -> np.ndarray:
        """The baseline's label id for every row of ``split`` (``test`` or ``validation``), in the row
        order of the prepared split file, ids in ``labels.json`` order.

        Raises:
            StaleBaselineError: the split, or a split its model was fit on, is not the one the baseline
                was made from (the error names it), or ``labels.json`` changed.
        """
        return self._read(split, prepared_dir)["predicted"].astype(np.int64)

    def probabilities(self, split: str, prepared_dir: Path) -> np.ndarray:
        """Class probabilities (rows × labels, ``labels.json`` order) for every row of ``split``; checked
        like ``predictions``."""
        return self._read(split, prepared_dir)["probabilities"].astype(np.float64)

    def test_predictions(self, prepared_dir: Path) -> np.ndarray:
        """Label ids of the model fit on train + validation, for each test row (see ``predictions``)."""
        return self.predictions("test", prepared_dir)

    def validation_predictions(self, prepared_dir: Path) -> np.ndarray:
        """Label ids of the model fit on train alone, for each validation row (see ``predictions``)."""
        return self.predictions("validation", prepared_dir)

    def test_probabilities(self, prepared_dir: Path) -> np.ndarray:
        return self.probabilities("test", prepared_dir)

    def validation_probabilities(self, prepared_dir: Path) -> np.ndarray:
        return self.probabilities("validation", prepared_dir)

    def check_rows(self, split: str, prepared_dir: Path) -> None:
        """Refuse a prepared folder whose labels, ``split`` or the splits its model was fit on changed.

        Raises:
            StaleBaselineError: naming every split that changed.
            ValueError: ``split`` is not ``test`` or ``validation``.
        """
        if split not in FITS:
            raise ValueError(f"the baseline scores {list(FITS)}, not {split!r}")
        prepared_dir = Path(prepared_dir)
        labels = tuple(read_labels(prepared_dir))
        if labels != self.labels:
            raise StaleBaselineError(
                f"the baseline in {self.out_dir} was made for labels {list(self.labels)}, but "
                f"{prepared_dir / LABELS_FILE} now holds {list(labels)}: run the baseline step again")
        fitted_on, _ = FITS[split]
        changed = [name for name in (*fitted_on, split)
                   if row_hash(read_split(prepared_dir, name)) != self.row_hashes[name]]
        if changed:
            raise StaleBaselineError(
                f"the baseline's {split} predictions in {self.out_dir} were made from other rows than "
                f"{prepared_dir} holds now: the {' and '.join(changed)} split{'s' if len(changed) > 1 else ''} "
                "changed since (texts, labels or their order); run the baseline step again")

    def _read(self, split: str, prepared_dir: Path) -> dict[str, np.ndarray]:
        self.check_rows(split, prepared_dir)
        with np.load(self.out_dir / FITS[split][1]) as saved:
            return {name: saved[name] for name in saved.files}


def baseline(cfg: BaselineConfig, *, prepared: PrepareResult, out_dir: Path) -> BaselineResult:
    """Fit the TF-IDF + logistic-regression baseline and score it, with the majority class beside it.

    Args:
        cfg: the n-gram ranges, TF-IDF options and the logistic regression's C and solver.
        prepared: the prepared splits (``train``, ``validation``, ``test`` and ``labels.json``).
        out_dir: replaced in one swap by ``metrics.json`` (DVC metrics), ``baseline.json`` (the figures,
            the row hashes, the cost) and ``test_predictions.npz`` / ``validation_predictions.npz``
            (``predicted``: label ids, ``probabilities``: rows × labels, float32; one row per split row,
            in its order).

    Returns:
        The figures and where the predictions are; ``predictions(split, prepared_dir)`` reads them back.

    Raises:
        BaselineError: a split is empty, the rows a model is fit on hold a single class, or a split holds
            a label that ``labels.json`` does not list.
    """
    prepared_dir = Path(prepared.out_dir)
    labels = tuple(read_labels(prepared_dir))
    splits = {name: read_split(prepared_dir, name) for name in ("train", "validation", "test")}
    ids = {name: _label_ids(frame, labels, name) for name, frame in splits.items()}

    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    scored: dict[str, dict[str, np.ndarray]] = {}
    fits: dict[str, Any] = {}
    for split, (fitted_on, _) in FITS.items():
        texts = [text for name in fitted_on for text in splits[name][TEXT]]
        y_fit = np.concatenate([ids[name] for name in fitted_on])
        _require_two_classes(y_fit, labels, fitted_on)
        clock = time.perf_counter()
        model, fit = fit_baseline(cfg, texts, y_fit)
        probs = _probabilities(model, splits[split][TEXT].tolist(), len(labels))
        fit["seconds"] = round(time.perf_counter() - clock, 2)
        fits[split] = {"fitted_on": list(fitted_on), "rows": len(y_fit), **fit}
        majority = int(np.bincount(y_fit, minlength=len(labels)).argmax())
        metrics[split] = {
            "rows": len(ids[split]),
            "majority": {"label": labels[majority], **_scores(ids[split], np.full(len(ids[split]), majority), labels)},
            "baseline": _scores(ids[split], probs.argmax(axis=1), labels),
        }
        scored[split] = {"predicted": probs.argmax(axis=1).astype(np.int32), "probabilities": probs.astype(np.float32)}
        log.info("baseline on %s (fit on %s, %d rows, %.1f s): macro-F1 %.4f, accuracy %.4f; majority class %r: "
                 "%.4f, %.4f", split, " + ".join(fitted_on), len(y_fit), fit["seconds"],
                 metrics[split]["baseline"]["macro_f1"], metrics[split]["baseline"]["accuracy"], labels[majority],
                 metrics[split]["majority"]["macro_f1"], metrics[split]["majority"]["accuracy"])
    seconds = round(time.perf_counter() - started, 2)
    description = describe(cfg, balanced=fits["test"]["balanced"])

    summary = {"description": description, "labels": list(labels), "metrics": metrics,
               "row_hashes": {name: row_hash(frame) for name, frame in splits.items()},
               "fits": fits, "seconds": seconds}
    out_dir = Path(out_dir)
    staging = staging_dir(out_dir)  # written beside, then swapped in: readers never see old and new mixed
    try:
        for split, arrays in scored.items():
            np.savez_compressed(staging / FITS[split][1], **arrays)
        write_json(staging / METRICS_FILE, metrics_for_dvc(metrics))
        write_json(staging / SUMMARY_FILE, summary)
        crash_point("baseline:staged")
        swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BaselineResult.load(out_dir)


def describe(cfg: BaselineConfig, *, balanced: bool) -> str:
    """The recipe in one line, as tables and reports name it (``balanced``: the fit weighed classes)."""
    word, char = cfg.word_ngrams, cfg.char_ngrams
    return (f"TF-IDF (word {word[0]}-{word[1]}, {cfg.char_analyzer} {char[0]}-{char[1]} n-grams, min_df {cfg.min_df}"
            f"{', sublinear tf' if cfg.sublinear_tf else ''}) + logistic regression (C {cfg.C:g}"
            f"{', balanced class weights' if balanced else ''})")


def metrics_for_dvc(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numbers only (DVC makes a column of every leaf): the majority class's name stays in the summary."""
    return {split: {"rows": figures["rows"],
                    "majority": {k: v for k, v in figures["majority"].items() if k != "label"},
                    "baseline": figures["baseline"]}
            for split, figures in metrics.items()}


def row_hash(frame: pd.DataFrame) -> str:
    """sha256 of a split's texts and labels in row order: what its predictions belong to."""
    digest = hashlib.sha256()
    for text, label in zip(frame[TEXT].tolist(), frame[LABEL].tolist()):
        digest.update(json.dumps([text, label], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _label_ids(frame: pd.DataFrame, labels: tuple[str, ...], split: str) -> np.ndarray:
    if frame.empty:
        raise BaselineError(f"the {split} split is empty: the baseline needs rows in train, validation and test")
    unknown = sorted(set(frame[LABEL]) - set(labels))
    if unknown:
        raise BaselineError(f"the {split} split holds labels that {LABELS_FILE} does not list: {unknown[:10]}")
    index = {label: i for i, label in enumerate(labels)}
    return frame[LABEL].map(index).to_numpy(dtype=np.int64)


def _require_two_classes(y: np.ndarray, labels: tuple[str, ...], fitted_on: tuple[str, ...]) -> None:
    present = np.flatnonzero(np.bincount(y, minlength=len(labels)))
    if len(present) < 2:
        raise BaselineError(f"the {' + '.join(fitted_on)} rows hold one class ({labels[present[0]]!r}): a classifier "
                            "needs at least two to learn from")


def fit_baseline(cfg: BaselineConfig, texts: list[str], y: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """The pipeline fit on ``texts``; and what the fit cost (features, solver iterations, convergence)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline
    from threadpoolctl import threadpool_limits

    dtype = np.float32 if cfg.dtype == "float32" else np.float64
    balanced = weigh_classes(cfg, y)
    shared = {"lowercase": cfg.lowercase, "sublinear_tf": cfg.sublinear_tf, "min_df": cfg.min_df,
              "max_features": cfg.max_features, "dtype": dtype}
    model = Pipeline([
        ("features", FeatureUnion([
            ("word", TfidfVectorizer(analyzer="word", ngram_range=cfg.word_ngrams, **shared)),
            ("char", TfidfVectorizer(analyzer=cfg.char_analyzer, ngram_range=cfg.char_ngrams, **shared)),
        ])),
        ("classifier", LogisticRegression(C=cfg.C, solver=cfg.solver, max_iter=cfg.max_iter, tol=cfg.tol,
                                          class_weight="balanced" if balanced else None, random_state=0)),
    ])
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=cfg.num_threads):
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            model.fit(texts, y)
        except ValueError as exc:  # e.g. min_df leaves no n-gram at all
            raise BaselineError(f"the baseline cannot be fit on these {len(texts)} texts: {exc}") from exc
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    iterations = int(np.max(model.named_steps["classifier"].n_iter_))
    if not converged:
        log.warning("baseline: the logistic regression stopped at baseline.max_iter (%d iterations) before "
                    "converging; its figures are those of the unconverged model", cfg.max_iter)
    features = sum(len(vectorizer.vocabulary_) for _, vectorizer in model.named_steps["features"].transformer_list)
    return model, {"features": features, "iterations": iterations, "converged": converged, "balanced": balanced}


def weigh_classes(cfg: BaselineConfig, y: np.ndarray) -> bool:
    """Whether the fit weighs rows by their class's inverse frequency: ``balanced``, or ``auto`` on rows whose
    largest class has 3x the rows of the smallest (the rule of ``train.class_weights``)."""
    if cfg.class_weight != "auto":
        return cfg.class_weight == "balanced"
    counts = np.bincount(y)
    present = counts[counts > 0]
    return bool(present.max() >= 3 * present.min())


def _probabilities(model: Any, texts: list[str], n_labels: int) -> np.ndarray:
    """rows × every label: a label the model never saw in its rows gets probability 0."""
    probs = np.zeros((len(texts), n_labels))
    probs[:, model.classes_] = model.predict_proba(texts)
    return probs


def _scores(y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(len(labels))), average="macro",
                                       zero_division=0))}
