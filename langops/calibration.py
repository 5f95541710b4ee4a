"""Temperature scaling that is checked on rows it was not fitted on before it ships.

A temperature fitted on the validation split always lowers that split's negative log-likelihood, but not
always its expected calibration error (ECE), and a figure measured on the rows it was fitted on says
little about other rows. So the decision is cross-fitted: the validation rows are split into two halves,
stratified by label; the temperature fitted on each half scores the other. The temperature fitted on every
validation row is folded into the head only when these held-out probabilities have a lower ECE than the
model's own; otherwise T = 1 ships and the result says why. Train and distill both decide this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from langops.metrics import expected_calibration_error, softmax

FOLDS = 2


@dataclass(frozen=True)
class Calibration:
    """The temperature that ships and the evidence for it (ECE on the validation split)."""

    temperature: float = 1.0  # folded into the head; 1.0 when none is
    folded: bool = False
    reason: str = ""
    fitted_temperature: float | None = None  # fitted on every validation row, whether it ships or not
    ece_uncalibrated: float | None = None  # the model's own probabilities: nothing was fitted on these rows
    ece_cross_fitted: float | None = None  # each row scored with the temperature fitted on the other half
    ece_shipped: float | None = None  # the shipped model's (in-sample when a temperature is folded)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``y`` (Guo et al., 2017).

    Dividing the logits by it changes no prediction, only how sure each one claims to be.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    if not len(y):
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def choose_temperature(logits: np.ndarray, y: np.ndarray, *, seed: int = 0, n_bins: int = 15) -> Calibration:
    """Fold a temperature only when it lowers validation ECE on rows it was not fitted on (2-fold cross-fit).

    It must also not raise the ECE of the rows it was fitted on: a temperature that does is no calibration.
    """
    ece_before = expected_calibration_error(softmax(logits), y, n_bins)
    halves = stratified_halves(y, seed)
    if min(len(h) for h in halves) < 2:
        return Calibration(ece_uncalibrated=ece_before, ece_shipped=ece_before,
                           reason=f"no temperature folded (T = 1): {len(y)} validation rows are too few to check one "
                                  "on rows it was not fitted on")
    crossed = np.empty_like(logits, dtype=float)
    for fit_rows, score_rows in (halves, halves[::-1]):
        crossed[score_rows] = softmax(logits[score_rows] / fit_temperature(logits[fit_rows], y[fit_rows]))
    ece_crossed = expected_calibration_error(crossed, y, n_bins)
    fitted = fit_temperature(logits, y)
    ece_fitted = expected_calibration_error(softmax(logits / fitted), y, n_bins)
    evidence = (f"validation ECE {ece_before:.4f} without it, {ece_crossed:.4f} with a temperature fitted on the "
                f"other half of the {len(y)} rows")
    common = dict(fitted_temperature=fitted, ece_uncalibrated=ece_before, ece_cross_fitted=ece_crossed)
    if ece_crossed >= ece_before:
        return Calibration(**common, ece_shipped=ece_before,
                           reason=f"no temperature folded (T = 1, fitted {fitted:.3f}): it does not lower held-out "
                                  f"ECE: {evidence}")
    if ece_fitted > ece_before:
        return Calibration(**common, ece_shipped=ece_before,
                           reason=f"no temperature folded (T = 1, fitted {fitted:.3f}): it raises the ECE of the "
                                  f"rows it was fitted on to {ece_fitted:.4f}; {evidence}")
    return Calibration(**common, temperature=fitted, folded=True, ece_shipped=ece_fitted,
                       reason=f"temperature {fitted:.3f} folded: it lowers held-out ECE: {evidence}")


def stratified_halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the rows, each label's rows dealt alternately to them in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    return np.sort(order[0::2]), np.sort(order[1::2])


def fold_temperature(model: torch.nn.Module, temperature: float) -> None:
    """Divide the output layer by ``temperature``, so the saved model's logits are the calibrated ones."""
    if temperature == 1.0:
        return
    num_labels = model.config.num_labels
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not outputs:
        raise ValueError(f"no output layer of {num_labels} units in {type(model).__name__} to calibrate")
    with torch.no_grad():
        outputs[-1].weight.div_(temperature)
        if outputs[-1].bias is not None:
            outputs[-1].bias.div_(temperature)
