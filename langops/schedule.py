"""How long a run trains and at what learning rate: it follows validation, not a length fixed in advance.

Warmup-stable-decay (WSD). The learning rate warms up linearly over ``warmup_steps``, then stays constant
for as long as validation macro-F1 keeps improving. Once it has not improved for ``patience`` evaluations
(and at least ``min_steps`` steps are done), or once a ceiling comes near (``max_steps``, ``max_epochs``,
``max_minutes``), the rate decays linearly to 0 over a cool-down of ``cooldown_fraction`` of the steps
trained so far, and the run ends. A cool-down that patience (or the time ceiling) begins starts from the
best evaluation's weights, not from those that stopped improving after them: on small datasets the
steps after the best one mostly overfit. The best evaluation's weights are the model, wherever it fell.

Why this schedule. A linear or cosine decay has to know the run's end before it starts, so that the rate
reaches 0 there; a run stopped early ends at a high rate, and one that is still improving at the planned
end cannot go on. WSD needs no end in advance, and its cool-down recovers what an annealed schedule gains
at its end: with a cool-down of 10-20 % of the steps it matches a cosine schedule of the same length
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"; Hu et al.
2024, MiniCPM). Reduce-on-plateau was the other candidate: it halves the rate at each plateau, each
costing ``patience`` evaluations, and never anneals to 0, so it spends more evaluations to reach the same
end.

A ``Schedule`` is pure arithmetic on step counts, seconds and evaluation results, so train and distill
share it and the tests pin it down without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PATIENCE = "patience"
STEP_CEILING = "step ceiling"
EPOCH_CEILING = "epoch ceiling"
TIME_CEILING = "time ceiling"
DIVERGING = "training loss rising"


@dataclass(frozen=True)
class Cooldown:
    """The final linear decay of the learning rate to 0, and why it began."""

    start: int  # optimiser steps done when it began
    steps: int
    reason: str  # PATIENCE or a ceiling: the run's stop reason once it ends

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class Verdict:
    """What the schedule says after an evaluation: stop now (and why), begin a cool-down now, or go on."""

    stop: str | None = None
    cooldown: Cooldown | None = None


@dataclass(frozen=True)
class Schedule:
    """The stopping rule and learning-rate factor of one run with ``batches_per_epoch`` steps per epoch."""

    batches_per_epoch: int
    patience: int
    min_steps: int = 0
    max_steps: int | None = None
    max_epochs: int | None = None
    max_seconds: float | None = None
    warmup_steps: int = 0
    cooldown_fraction: float = 0.2
    eval_every_steps: int | None = None

    @classmethod
    def from_config(cls, cfg: Any, batches_per_epoch: int) -> Schedule:
        """The schedule a ``TrainConfig`` (or ``DistillConfig``) asks for."""
        return cls(
            batches_per_epoch=batches_per_epoch,
            patience=cfg.early_stopping_patience,
            min_steps=cfg.min_steps,
            max_steps=cfg.max_steps,
            max_epochs=cfg.max_epochs,
            max_seconds=None if cfg.max_minutes is None else 60.0 * cfg.max_minutes,
            warmup_steps=cfg.warmup_steps,
            cooldown_fraction=cfg.cooldown_fraction,
            eval_every_steps=cfg.eval_every_steps,
        )

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1:
            raise ValueError("a schedule needs at least one batch per epoch")
        if self.max_steps is None and self.max_epochs is None and self.max_seconds is None:
            raise ValueError("a schedule needs a ceiling: max_steps, max_epochs or max_minutes")

    # ------------------------------------------------------------------------------- when to evaluate

    @property
    def evaluations_per_epoch(self) -> int:
        """At least one per epoch; more on large datasets, so that at most ``eval_every_steps`` pass between two."""
        if not self.eval_every_steps:
            return 1
        return max(1, math.ceil(self.batches_per_epoch / self.eval_every_steps))

    @property
    def evaluation_positions(self) -> frozenset[int]:
        """Batches done within an epoch after which validation is scored: evenly spread, the last at its end."""
        k = self.evaluations_per_epoch
        return frozenset(round(j * self.batches_per_epoch / k) for j in range(1, k + 1))

    @property
    def evaluation_interval(self) -> int:
        return math.ceil(self.batches_per_epoch / self.evaluations_per_epoch)

    def evaluates_at(self, position: int, steps: int, cooldown: Cooldown | None) -> bool:
        """Whether to evaluate after ``position`` batches of the epoch, ``steps`` in all: on the epoch's grid,
        at the end of a cool-down, and at the step ceiling."""
        ceiling = self.ceiling
        return (position in self.evaluation_positions or (cooldown is not None and steps >= cooldown.end)
                or (ceiling is not None and steps >= ceiling[0]))

    # ----------------------------------------------------------------------------------------- ceilings

    @property
    def ceiling(self) -> tuple[int, str] | None:
        """The most steps the run may take, and which ceiling sets it (``max_steps`` or ``max_epochs``)."""
        ceilings = []
        if self.max_steps is not None:
            ceilings.append((self.max_steps, STEP_CEILING))
        if self.max_epochs is not None:
            ceilings.append((self.max_epochs * self.batches_per_epoch, EPOCH_CEILING))
        return min(ceilings) if ceilings else None

    def ceiling_cooldown(self) -> Cooldown | None:
        """The cool-down that ends exactly at the step ceiling: it begins where the steps left make up
        ``cooldown_fraction`` of the steps before it."""
        ceiling = self.ceiling
        if ceiling is None:
            return None
        steps, reason = ceiling
        length = round(steps * self.cooldown_fraction / (1 + self.cooldown_fraction))
        return Cooldown(start=steps - length, steps=length, reason=reason) if length > 0 else None

    def cooldown_for(self, steps: int, current: Cooldown | None) -> Cooldown | None:
        """The cool-down in force for the next step: the one begun already, or the ceiling's once it is reached."""
        if current is not None:
            return current
        planned = self.ceiling_cooldown()
        return planned if planned is not None and steps >= planned.start else None

    # ---------------------------------------------------------------------------------- learning rate

    def lr_factor(self, steps: int, cooldown: Cooldown | None) -> float:
        """The share of the configured learning rates for the step taken after ``steps`` steps."""
        factor = min(1.0, (steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if cooldown is not None and steps >= cooldown.start:
            factor *= max(0.0, (cooldown.end - steps) / cooldown.steps)
        return factor

    # ------------------------------------------------------------------------------------ the verdict

    def after_evaluation(
        self,
        *,
        steps: int,
        bad_evaluations: int,
        seconds: float,
        seconds_per_step: float,
        cooldown: Cooldown | None,
        diverged: bool = False,
    ) -> Verdict:
        """Stop, begin a cool-down, or go on, after an evaluation at ``steps`` steps and ``seconds`` of training.

        Args:
            bad_evaluations: evaluations in a row without a better validation metric.
            seconds_per_step: what a step has cost so far, evaluations included (for the time ceiling).
            diverged: the training loss rose evaluation after evaluation (the collapse guard's signal).
        """
        if diverged:
            return Verdict(stop=DIVERGING)
        if self.max_seconds is not None and seconds >= self.max_seconds:
            return Verdict(stop=TIME_CEILING)
        if cooldown is not None:
            return Verdict(stop=cooldown.reason) if steps >= cooldown.end else Verdict()
        ceiling = self.ceiling
        if ceiling is not None and steps >= ceiling[0]:
            return Verdict(stop=ceiling[1])
        if bad_evaluations >= self.patience and steps >= self.min_steps:
            return self._cool_down(steps, self._cooldown_steps(steps), PATIENCE)
        if self.max_seconds is not None:
            left = self.max_seconds - seconds
            planned = self._cooldown_steps(steps)
            if (self.evaluation_interval + planned) * seconds_per_step > left:  # the next interval would not fit
                return self._cool_down(steps, min(planned, int(left / max(seconds_per_step, 1e-9))), TIME_CEILING)
        return Verdict()

    def _cooldown_steps(self, steps: int) -> int:
        length = round(self.cooldown_fraction * steps)
        ceiling = self.ceiling
        return min(length, ceiling[0] - steps) if ceiling is not None else length

    @staticmethod
    def _cool_down(steps: int, length: int, reason: str) -> Verdict:
        return Verdict(cooldown=Cooldown(start=steps, steps=length, reason=reason)) if length > 0 else Verdict(stop=reason)

    def describe(self) -> str:
        """One line for the log: what ends this run."""
        ceilings = [f"{self.max_steps} steps" if self.max_steps is not None else "",
                    f"{self.max_epochs} epochs" if self.max_epochs is not None else "",
                    f"{self.max_seconds / 60:g} min" if self.max_seconds is not None else ""]
        return (f"evaluating {self.evaluations_per_epoch}x per epoch of {self.batches_per_epoch} steps; "
                f"cool-down after {self.patience} evaluations without a better validation macro-F1 "
                f"(not before step {self.min_steps}) or near the ceiling of {', '.join(c for c in ceilings if c)}")
