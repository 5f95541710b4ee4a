"""Calibration that is checked: a temperature is folded into the head only when it lowers validation ECE on
rows it was not fitted on (2-fold cross-fit); otherwise T = 1 ships, and the result says why."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from pipeline_helpers import TINY_RECIPE
from safetensors.torch import load_file

import langops.tasks.train as train_module
from langops.calibration import choose_temperature, stratified_halves
from langops.config import TrainConfig
from langops.metrics import expected_calibration_error, softmax
from langops.tasks.train import train


def _calibrated_but_for_a_few_confident_mistakes(rows: int = 600, mistakes: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model right with exactly the probability it claims, except a few answers it is sure of
    and gets wrong: their log-loss pulls the fitted temperature up, which makes every other answer too
    unsure."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=rows)
    confidence = rng.uniform(0.5, 0.99, size=rows)
    right = rng.random(rows) < confidence
    answer = np.where(right, y, (y + 1 + rng.integers(0, 2, size=rows)) % 3)
    logits = np.zeros((rows, 3))
    logits[np.arange(rows), answer] = np.log(2 * confidence / (1 - confidence))  # softmax gives `confidence`
    logits[:mistakes] = 0.0
    logits[np.arange(mistakes), (y[:mistakes] + 1) % 3] = 12.0
    return logits, y


def _overconfident(rows: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Right about 60 % of the time, but sure of every answer."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=rows)
    logits = rng.normal(size=(rows, 3))
    logits[np.arange(rows), y] += 1.0
    return logits * 6, y


@pytest.mark.unit
def test_a_temperature_that_worsens_held_out_ece_is_not_folded():
    logits, y = _calibrated_but_for_a_few_confident_mistakes()
    decision = choose_temperature(logits, y, seed=0)

    assert decision.fitted_temperature > 1.2  # the log-loss asks for softer probabilities ...
    assert decision.ece_cross_fitted > decision.ece_uncalibrated + 0.05  # ... which are worse on held-out rows
    assert decision.temperature == 1.0 and not decision.folded
    assert decision.ece_shipped == decision.ece_uncalibrated == expected_calibration_error(softmax(logits), y)
    assert decision.reason.startswith("no temperature folded (T = 1, fitted ")
    assert "it does not lower held-out ECE" in decision.reason


@pytest.mark.unit
def test_a_temperature_that_lowers_held_out_ece_is_folded():
    logits, y = _overconfident()
    decision = choose_temperature(logits, y, seed=0)

    assert decision.folded and decision.temperature == decision.fitted_temperature > 3
    assert decision.ece_cross_fitted < 0.03 < decision.ece_uncalibrated
    assert decision.ece_shipped == pytest.approx(expected_calibration_error(softmax(logits / decision.temperature), y))
    assert decision.reason.startswith(f"temperature {decision.temperature:.3f} folded: it lowers held-out ECE")


@pytest.mark.unit
def test_too_few_validation_rows_ship_no_temperature():
    decision = choose_temperature(np.array([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), np.array([0, 1, 1]))
    assert decision.temperature == 1.0 and not decision.folded and "too few" in decision.reason


@pytest.mark.unit
def test_the_halves_split_every_label_evenly_and_share_no_row():
    y = np.repeat(np.arange(5), [10, 11, 3, 2, 20])
    first, second = stratified_halves(y, seed=3)
    assert not set(first) & set(second) and sorted([*first, *second]) == list(range(len(y)))
    assert all(abs(np.sum(y[first] == label) - np.sum(y[second] == label)) <= 1 for label in range(5))
    assert abs(len(first) - len(second)) <= 1
    assert not np.array_equal(first, stratified_halves(y, seed=4)[0])  # the seed picks which rows


def _head(result) -> np.ndarray:
    return load_file(result.model_dir / "model.safetensors")["classifier.weight"].numpy()


@pytest.mark.model
def test_the_saved_head_is_the_trained_one_divided_by_the_temperature_and_untouched_when_none_ships(
    tiny_base_model, prepared_dir, tmp_path, monkeypatch
):
    base = dict(base_model=str(tiny_base_model), method="full", max_epochs=2, batch_size=16, learning_rate=1e-2,
                max_length=32, num_threads=1, **TINY_RECIPE)

    def run(name: str, **overrides):
        return train(TrainConfig(**{**base, **overrides}), prepared_dir=prepared_dir, out_dir=tmp_path / name,
                     checkpoint_dir=tmp_path / f"{name}-ckpt", seed=1)

    trained = _head(run("uncalibrated", calibrate=False))
    folded = run("folded")  # this tiny model is unsure of answers it gets right: the check folds a temperature
    assert folded.temperature_folded and folded.temperature != 1.0
    np.testing.assert_allclose(_head(folded), trained / folded.temperature, rtol=1e-5)

    def refuse(logits, y, *, seed):  # the same evidence, read as a refusal
        decided = choose_temperature(logits, y, seed=seed)
        return replace(decided, temperature=1.0, folded=False, ece_shipped=decided.ece_uncalibrated,
                       reason="no temperature folded (T = 1): refused")

    monkeypatch.setattr(train_module, "choose_temperature", refuse)
    refused = run("refused")
    assert (refused.temperature, refused.temperature_folded, refused.calibration) == (1.0, False,
                                                                                       "no temperature folded (T = 1): refused")
    assert np.array_equal(_head(refused), trained)
    assert json.loads((refused.model_dir / "config.json").read_text())["langops_temperature"] == 1.0
    assert refused.val_ece == refused.val_ece_uncalibrated and refused.temperature_fitted == folded.temperature_fitted
