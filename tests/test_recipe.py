"""The default training recipe: a length that follows validation, loss weights, length from the data,
calibration that is checked on held-out rows, and the guard that names a run which collapsed to one class."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, write_prepared
from pipeline_helpers import TINY_RECIPE
from transformers import AutoTokenizer

from langops.calibration import fit_temperature, fold_temperature
from langops.config import TrainConfig
from langops.io import read_split, split_path, write_labels
from langops.metrics import expected_calibration_error, softmax
from langops.modeling import load_trained_classifier, predict_logits
from langops.tasks.train import (
    TrainingCollapsedError,
    _diverging,
    loss_weights,
    parameter_groups,
    resolve_max_length,
    train,
)


@pytest.mark.model
def test_a_run_still_improving_at_the_old_epoch_count_trains_on_until_validation_stops_improving(
    tiny_base_model, tmp_path
):
    prepared = write_prepared(tmp_path / "prepared", rows_per_class={"train": 40, "validation": 40, "test": 10})
    cfg = TrainConfig(base_model=str(tiny_base_model), method="full", learning_rate=3e-3, head_learning_rate=None,
                      batch_size=16, max_length=32, num_threads=1, early_stopping_patience=4, max_epochs=40,
                      **TINY_RECIPE)
    result = train(cfg, prepared_dir=prepared, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    f1 = {row["epoch"]: row["val_macro_f1"] for row in result.history}
    assert max(f1.values()) > f1[4.0] + 0.3, f1  # the old recipe's 4 epochs would have ended mid-climb
    assert result.best_epoch > 4 and result.epochs_run > result.best_epoch
    assert result.stop_reason == "patience" and result.stopped_early  # once it stopped improving, not at a ceiling
    stable = [row["learning_rate"] for row in result.history if row["epoch"] <= result.best_epoch]
    assert stable == [3e-3] * len(stable)  # no decay planned in advance: the full rate while it improves
    assert result.history[-1]["learning_rate"] < 3e-3 / 10  # then a cool-down to 0


@pytest.mark.unit
def test_loss_weights_only_for_imbalanced_classes_and_average_one_per_row():
    balanced = np.array([0] * 50 + [1] * 40 + [2] * 30)
    assert loss_weights(TrainConfig(class_weights="auto"), balanced, 3) is None
    skewed = np.array([0] * 500 + [1] * 10)
    weights = np.array(loss_weights(TrainConfig(class_weights="auto"), skewed, 2))
    assert weights[1] > weights[0]
    assert np.isclose((weights[skewed]).mean(), 1.0)
    assert weights[1] / weights[0] == pytest.approx(10.0)  # capped at 10x the most common class (not 50x)
    assert loss_weights(TrainConfig(class_weights="none"), skewed, 2) is None
    assert loss_weights(TrainConfig(class_weights="balanced"), balanced, 3) is not None


@pytest.mark.model
def test_auto_max_length_follows_the_texts_up_to_the_cap(tiny_base_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    short = ["ok", "great film", "not good at all"] * 50
    assert resolve_max_length(TrainConfig(max_length="auto"), tokenizer, short) == 16  # the floor
    sentences = [" ".join(["word"] * n) for n in range(1, 101)]  # 3 to 102 tokens with [CLS] and [SEP]
    assert resolve_max_length(TrainConfig(max_length="auto"), tokenizer, sentences) == 104  # p99, to a multiple of 8
    assert resolve_max_length(TrainConfig(max_length="auto", max_length_cap=64), tokenizer, sentences) == 64
    assert resolve_max_length(TrainConfig(max_length=40), tokenizer, sentences) == 40


@pytest.mark.unit
def test_temperature_scaling_fixes_overconfident_logits_without_changing_a_prediction():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), y] += 1.0  # right about 60% of the time ...
    overconfident = logits * 6  # ... but sure of every answer
    temperature = fit_temperature(overconfident, y)
    assert temperature > 3
    calibrated = softmax(overconfident / temperature)
    assert expected_calibration_error(calibrated, y) < 0.03 < expected_calibration_error(softmax(overconfident), y)
    assert (calibrated.argmax(1) == overconfident.argmax(1)).all()


@pytest.mark.model
def test_folding_the_temperature_divides_the_models_logits(tiny_trained_dir):
    model, tokenizer = load_trained_classifier(tiny_trained_dir / "model")
    texts = ["refund my card", "parcel lost", "login page broken"]
    before = predict_logits(model, tokenizer, texts, max_length=32)
    fold_temperature(model, 2.5)
    np.testing.assert_allclose(predict_logits(model, tokenizer, texts, max_length=32), before / 2.5, rtol=1e-5, atol=1e-6)


@pytest.mark.model
def test_the_head_learns_at_its_own_rate(tiny_base_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_base_model, num_labels=3)
    groups = parameter_groups(model, TrainConfig(method="full", learning_rate=5e-5, head_learning_rate=1e-3))
    head = {id(p) for p in model.classifier.parameters()}
    assert [g["lr"] for g in groups] == [5e-5, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}


def _collapsing_dataset(directory):
    """One class 20x the other and texts that barely tell them apart: at a huge learning rate a model
    predicts the common class for every row."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, (common, rare) in {"train": (400, 20), "validation": (60, 6), "test": (60, 6)}.items():
        rows = [{"text": f"message number {rng.integers(10**6)}", "label": "common"} for _ in range(common)]
        rows += [{"text": f"message number {rng.integers(10**6)} !", "label": "rare"} for _ in range(rare)]
        pd.DataFrame(rows).sample(frac=1, random_state=0).to_parquet(split_path(directory, split), index=False)
    write_labels(directory, ["common", "rare"])
    return directory


def _collapsing_cfg(base, **guard) -> TrainConfig:
    return TrainConfig(
        base_model=str(base), method="full", max_epochs=2, min_steps=0, batch_size=32, max_length=16, num_threads=1,
        learning_rate=3.0, head_learning_rate=3.0, warmup_steps=0, class_weights="none", calibrate=False,
        early_stopping_patience=5, collapse_guard=guard,
    )


@pytest.mark.unit
def test_a_rising_training_loss_is_divergence_only_while_validation_stops_improving():
    rising = [{"train_loss": loss} for loss in (0.50, 0.52, 0.55)]
    assert _diverging(rising, bad_evaluations=2, evaluations=2)
    assert not _diverging(rising, bad_evaluations=1, evaluations=2)  # noise at a constant rate, validation improving
    assert not _diverging([{"train_loss": loss} for loss in (0.50, 0.55, 0.52)], bad_evaluations=2, evaluations=2)
    assert not _diverging(rising[1:], bad_evaluations=2, evaluations=2)  # too few evaluations to tell


@pytest.mark.model
def test_a_run_that_collapses_to_one_class_fails_naming_the_class_and_the_fix(tiny_base_model, tmp_path):
    prepared = _collapsing_dataset(tmp_path / "prepared")
    cfg = _collapsing_cfg(tiny_base_model, action="fail")
    with pytest.raises(TrainingCollapsedError) as err:
        train(cfg, prepared_dir=prepared, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)
    message = str(err.value)
    assert "training collapsed to predicting 'common' for every row" in message
    assert "train.learning_rate 3" in message and "fix: set train.learning_rate: 0.75" in message
    assert not (tmp_path / "out").exists()  # no model is left for the next step to pick up


@pytest.mark.model
def test_a_collapsed_run_is_retried_with_smaller_learning_rates_as_policy_allows(tiny_base_model, tmp_path, caplog):
    prepared = _collapsing_dataset(tmp_path / "prepared")
    cfg = _collapsing_cfg(tiny_base_model, action="retry", retries=2, lr_factor=0.5)
    with caplog.at_level(logging.WARNING, logger="langops.tasks.train"), pytest.raises(TrainingCollapsedError):
        train(cfg, prepared_dir=prepared, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert "retrying with train.learning_rate 1.5 (attempt 2 of 3)" in retries[0]
    assert "retrying with train.learning_rate 0.75 (attempt 3 of 3)" in retries[1]


@pytest.mark.model
def test_warn_keeps_a_collapsed_model_and_says_so(tiny_base_model, tmp_path, caplog):
    prepared = _collapsing_dataset(tmp_path / "prepared")
    with caplog.at_level(logging.WARNING, logger="langops.tasks.train"):
        result = train(_collapsing_cfg(tiny_base_model, action="warn"), prepared_dir=prepared,
                       out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)
    assert result.model_dir.is_dir() and result.attempts == 1
    assert any("collapse_guard.action is warn: keeping the model" in r.getMessage() for r in caplog.records)


@pytest.mark.model
def test_a_trained_model_records_its_length_and_temperature(tiny_base_model, prepared_dir, tmp_path):
    cfg = TrainConfig(base_model=str(tiny_base_model), method="full", max_epochs=2, batch_size=16, learning_rate=1e-2,
                      max_length="auto", num_threads=1, **TINY_RECIPE)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)
    assert 16 <= result.max_length <= 32  # the fixture's texts are about 15 tokens
    assert result.temperature > 0 and result.val_ece is not None
    assert result.val_ece <= result.val_ece_uncalibrated + 1e-9
    assert result.temperature == (result.temperature_fitted if result.temperature_folded else 1.0)
    assert result.calibration and result.val_ece_cross_fitted is not None
    config = json.loads((result.model_dir / "config.json").read_text())
    assert (config["langops_temperature"], config["langops_max_length"]) == (result.temperature, result.max_length)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.model_max_length == result.max_length
    # the temperature was fitted on the kept (best) model's validation logits: undo it on the saved model
    model, _ = load_trained_classifier(result.model_dir)
    validation = read_split(prepared_dir, "validation")
    logits = predict_logits(model, tokenizer, validation["text"].tolist(), max_length=result.max_length)
    y = np.array([LABELS.index(label) for label in validation["label"]])
    assert expected_calibration_error(softmax(logits), y) == pytest.approx(result.val_ece, abs=1e-5)
    assert expected_calibration_error(softmax(logits * result.temperature), y) == pytest.approx(
        result.val_ece_uncalibrated, abs=1e-5)


@pytest.mark.model
def test_a_short_run_after_a_longer_one_keeps_its_own_checkpoint(tiny_base_model, prepared_dir, tmp_path):
    base = {"base_model": str(tiny_base_model), "batch_size": 16, "max_length": 32, "num_threads": 1, **TINY_RECIPE}
    checkpoints = tmp_path / "ckpt"
    train(TrainConfig(max_epochs=4, early_stopping_patience=4, **base), prepared_dir=prepared_dir,
          out_dir=tmp_path / "a", checkpoint_dir=checkpoints, seed=1)
    for path in checkpoints.iterdir():  # written a while ago
        os.utime(path, (time.time() - 60, time.time() - 60))
    train(TrainConfig(max_epochs=1, **base), prepared_dir=prepared_dir, out_dir=tmp_path / "b", checkpoint_dir=checkpoints,
          seed=1)
    assert "step-0000008.pt" in {p.name for p in checkpoints.iterdir()}  # 8 steps an epoch
    newest = max(checkpoints.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "step-0000008.pt"
    assert torch.load(newest, map_location="cpu", weights_only=False)["state"]["epoch"] == 1
