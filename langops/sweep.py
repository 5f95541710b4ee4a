"""Hyper-parameter sweeps without the engine: expand ``sweep:`` into trials, score them, pick the best.

Plain functions (no Prefect, no Dask) so the flow (``flows/sweep.py``), the CLI and the tests share them.
A trial is the project's params with its override set applied and its own output folders
(``<paths.sweep>/<trial>/trained`` and ``checkpoints``); it is validated by the same params model as
``params.yaml``, so a bad value fails before any training and names the trial and the key.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

from langops.config import (
    SWEEP_ENGINE_ADDRESS_ENV,
    ConfigError,
    Params,
    SweepConfig,
    _set_dotted,
    parse_params,
)


class SweepError(RuntimeError):
    """A sweep cannot go on: no trial finished, or none produced the selection metric."""


@dataclass(frozen=True)
class Trial:
    """One configuration of the sweep: its place in the order, its overrides, and the params it trains with."""

    index: int
    name: str
    overrides: dict[str, Any]
    params: Params


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial left: its MLflow run and its validation score (``None`` when it failed)."""

    index: int
    name: str
    overrides: dict[str, Any]
    run_id: str | None
    score: float | None
    best_evaluation: int | None = None  # the kept weights' evaluation: its MLflow step
    error: str | None = None
    worker: str = ""
    validation: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.error is None and self.score is not None and not math.isnan(self.score)


def override_sets(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The grid's combinations (first key slowest, values in the order written), then the explicit sets."""
    keys = list(cfg.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))] if keys else []
    return combos + [dict(overrides) for overrides in cfg.trials]


def expand_trials(params: Params) -> list[Trial]:
    """Every trial of ``params.sweep``, each with validated params and its own output folders.

    Raises:
        ConfigError: there are no trials, more than ``sweep.max_trials``, two identical ones, or a
            value the params model refuses (the message names the trial and the key).
    """
    cfg = params.sweep
    sets = override_sets(cfg)
    if not sets:
        raise ConfigError("sweep has no trials: set sweep.grid and/or sweep.trials")
    if len(sets) > cfg.max_trials:
        raise ConfigError(
            f"sweep expands to {len(sets)} trials, more than sweep.max_trials={cfg.max_trials}: "
            "shrink sweep.grid/sweep.trials or raise max_trials"
        )
    seen: dict[str, int] = {}
    for i, overrides in enumerate(sets, start=1):
        signature = repr(sorted(overrides.items()))
        if signature in seen:
            raise ConfigError(f"sweep trials {seen[signature]} and {i} are identical: {overrides}")
        seen[signature] = i

    trials = []
    for i, overrides in enumerate(sets, start=1):
        name = f"trial-{i:02d}"
        raw = params.model_dump(mode="json")
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        folder = params.paths.sweep / name
        raw["paths"]["trained"] = str(folder / "trained")
        raw["paths"]["checkpoints"] = str(folder / "checkpoints")
        trial_params = parse_params(raw, origin=f"sweep {name} {describe(overrides)}")
        trials.append(Trial(index=i, name=name, overrides=overrides, params=trial_params))
    return trials


def score_from_history(
    history: list[dict[str, float]] | tuple[dict[str, float], ...], best_evaluation: int, metric: str
) -> float:
    """The trial's score: ``metric`` at the evaluation whose weights were kept (validation split only).

    Raises:
        SweepError: no history row for ``best_evaluation`` or the row lacks ``metric``.
    """
    if not metric.startswith("val_"):
        raise SweepError(f"sweep metric {metric!r} is not a validation metric")
    for row in history:
        if int(row["evaluation"]) == best_evaluation:
            if metric not in row:
                raise SweepError(f"evaluation {best_evaluation} has no {metric!r}: {sorted(row)}")
            return float(row[metric])
    raise SweepError(f"no history row for the kept evaluation {best_evaluation}")


def select_best(outcomes: list[TrialOutcome], *, greater_is_better: bool) -> TrialOutcome:
    """The completed trial with the best score; a tie goes to the trial that comes first in the sweep.

    Raises:
        SweepError: no trial completed (every failure is listed).
    """
    completed = [o for o in outcomes if o.completed]
    if not completed:
        failures = "; ".join(f"{o.name}: {o.error or 'no score'}" for o in outcomes)
        raise SweepError(f"no sweep trial completed ({len(outcomes)} tried): {failures}")
    sign = -1.0 if greater_is_better else 1.0
    return min(completed, key=lambda o: (sign * float(o.score), o.index))


def dask_address(cfg: SweepConfig) -> str | None:
    """The scheduler to run trials on: ``$LANGOPS_DASK_ADDRESS``, then ``sweep.dask_address``; None = local."""
    return os.environ.get(SWEEP_ENGINE_ADDRESS_ENV) or cfg.dask_address or None


def describe(overrides: dict[str, Any]) -> str:
    """``learning_rate=0.002 lora.r=8``: a trial's overrides in a line (``train.`` dropped)."""
    return " ".join(f"{k.removeprefix('train.')}={v}" for k, v in overrides.items()) or "(base params)"


def trial_rows(outcomes: list[TrialOutcome], *, metric: str, best: TrialOutcome | None) -> list[dict[str, Any]]:
    """The trial table: one row per trial, a column per swept key, then status, score and MLflow run."""
    keys = list(dict.fromkeys(k for o in outcomes for k in o.overrides))
    rows = []
    for o in sorted(outcomes, key=lambda o: o.index):
        row: dict[str, Any] = {"trial": o.name}
        row.update({k: o.overrides.get(k, "") for k in keys})
        row.update(
            {
                "status": "completed" if o.completed else "failed",
                metric: None if o.score is None else round(o.score, 6),
                "best_evaluation": o.best_evaluation,
                "best": best is not None and o.name == best.name,
                "run_id": o.run_id or "",
                "worker": o.worker,
                "error": o.error or "",
            }
        )
        rows.append(row)
    return rows
