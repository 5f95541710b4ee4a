"""A hyper-parameter sweep as a Prefect flow: prepare and validate once, train the trials in parallel on
Dask, then take the best one (on the validation split) through the training pipeline's own steps.

The trials are the ``sweep:`` section of ``params.yaml`` (``langops.sweep.expand_trials``). Each trial is
one Prefect task on a Dask worker that calls ``langops.pipeline.run_train`` with its own params and output
folders, so it trains exactly as ``langops train`` would, and its MLflow run is nested under one parent
sweep run. Evaluate (test split), compress, register, the promotion gate and deploy are the training
pipeline's tasks, called with the best trial's params: the sweep ships a model the same way the pipeline does.

Where the trials run is a setting: ``sweep.dask_address`` (or ``$LANGOPS_DASK_ADDRESS``) names an existing
Dask scheduler; with neither, a local ``distributed`` cluster of ``sweep.n_workers`` processes (one
thread each) is started for the sweep and closed after it. A trial uses every GPU its worker sees when
``train.devices`` asks for them: ``run_train`` re-launches itself under ``torchrun``, one process per
device, so on a GPU cluster give each Dask worker its own GPUs (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from langops import pipeline
from langops.config import Params, load_params
from langops.faults import crash_point
from langops.flows.pipeline import run_cached, ship_trained_model, validate_or_stop
from langops.stages import stage
from langops.sweep import (
    Trial,
    TrialOutcome,
    dask_address,
    describe,
    expand_trials,
    score_from_history,
    select_best,
    trial_rows,
)
from langops.tasks.prepare import PrepareResult

PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests runs by


@dataclass(frozen=True)
class SweepSummary:
    sweep_run_id: str
    metric: str
    trials: tuple[TrialOutcome, ...]
    best_trial: str
    best_run_id: str
    best_score: float
    best_overrides: dict[str, Any]
    model_name: str
    version: str
    promoted: bool
    decision_reason: str
    champion_version: str | None
    test_metrics: dict[str, float]
    server_url: str | None
    tracking_uri: str


@task(name="sweep-trial", cache_policy=NO_CACHE)
def train_trial(trial: Trial, parent_run_id: str, prepared: PrepareResult) -> TrialOutcome:
    """Train one trial exactly as the train step does, then file its MLflow run under the sweep's.

    With ``train.devices`` > 1 (or ``auto`` on a GPU worker) ``run_train`` trains under torchrun on every
    GPU the worker sees. It opens the trial's run itself, so the run is tied to its parent once training
    returns; a run that failed half-way in this process is tied too (MLflow marks it FAILED), while one that
    failed inside a torchrun rank stays unnested and the trial's error says why.
    """
    import mlflow

    before = mlflow.last_active_run()
    try:
        record = pipeline.run_train(trial.params, prepared)
    except Exception:
        last = mlflow.last_active_run()
        if last is not None and (before is None or last.info.run_id != before.info.run_id):
            _file_under_sweep(trial, last.info.run_id, parent_run_id)
        raise
    _file_under_sweep(trial, record.run_id, parent_run_id)
    metric = trial.params.sweep.metric
    history = list(record.result.history)
    score = score_from_history(history, record.result.best_evaluation, metric)
    kept = next(row for row in history if int(row["evaluation"]) == record.result.best_evaluation)
    return TrialOutcome(
        index=trial.index,
        name=trial.name,
        overrides=trial.overrides,
        run_id=record.run_id,
        score=score,
        best_evaluation=record.result.best_evaluation,
        worker=_worker_address(),
        validation={k: float(v) for k, v in kept.items() if k.startswith("val_")},
    )


def _worker_address() -> str:
    """The Dask worker running this trial (``local`` outside a Dask worker)."""
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return "local"


def _file_under_sweep(trial: Trial, run_id: str, parent_run_id: str) -> None:
    """Nest the trial's run under the sweep run and log what reproduces it: overrides and seed."""
    from mlflow import MlflowClient

    from langops.tracking import configure_mlflow

    configure_mlflow(trial.params)
    client = MlflowClient()
    client.set_tag(run_id, PARENT_TAG, parent_run_id)
    client.set_tag(run_id, "langops.sweep_trial", trial.name)
    client.update_run(run_id, name=f"{trial.name} {describe(trial.overrides)}")
    client.log_param(run_id, "project.seed", trial.params.project.seed)
    client.log_param(run_id, "sweep.overrides", json.dumps(trial.overrides, sort_keys=True))


@flow(name="langops-sweep", log_prints=True)
def sweep_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> SweepSummary:
    """Train the ``sweep:`` trials in parallel, then evaluate, gate and ship the best one.

    Args:
        params_path: the project's params file; relative paths in it are relative to its folder.
        overrides: ``key=value`` changes to params for this run (all trials), e.g. ``train.max_epochs=2``.

    Raises:
        ConfigError: the sweep's trials are invalid (before anything runs).
        SweepError: no trial completed.
    """
    params = load_params(params_path, overrides)
    trials = expand_trials(params)  # every trial validated before any work
    prepared = run_cached("prepare", params)
    validate_or_stop(params, prepared)

    sweep_run_id = _open_sweep_run(params, trials)
    try:
        outcomes = _run_trials(params, trials, sweep_run_id, prepared)
        best = None
        try:
            best = select_best(outcomes, greater_is_better=params.sweep.greater_is_better)
        finally:  # the table is published either way: with no winner it is where the failures are read
            _publish_trials(params, sweep_run_id, trial_rows(outcomes, metric=params.sweep.metric, best=best), best)
    except BaseException:
        _close_sweep_run(params, sweep_run_id, "FAILED")
        raise
    _close_sweep_run(params, sweep_run_id, "FINISHED")

    chosen = next(t for t in trials if t.name == best.name).params
    shipped = ship_trained_model(chosen, prepared, stage("train").load(chosen))
    summary = SweepSummary(
        sweep_run_id=sweep_run_id,
        metric=params.sweep.metric,
        trials=tuple(sorted(outcomes, key=lambda o: o.index)),
        best_trial=best.name,
        best_run_id=str(best.run_id),
        best_score=float(best.score),
        best_overrides=best.overrides,
        model_name=shipped.registration.model_name,
        version=shipped.registration.version,
        promoted=shipped.decision.promote,
        decision_reason=shipped.decision.reason,
        champion_version=shipped.champion_version,
        test_metrics={k: shipped.evaluation.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        server_url=shipped.deployment.url if shipped.deployment is not None else None,
        tracking_uri=chosen.tracking_uri(),
    )
    create_markdown_artifact(summary_markdown(summary), key="sweep-summary", description="What this sweep produced")
    return summary


def task_runner_for(params: Params, *, trials: int):
    """prefect-dask's runner on the configured cluster, or on a local one started for this sweep.

    The local cluster has ``sweep.n_workers`` processes (no more than there are trials) of one thread each:
    Dask's nanny sets ``OMP_NUM_THREADS=1`` in them, so torch uses one core per trial unless
    ``train.num_threads`` says otherwise. Its workers are told the Prefect API this flow reports to: without
    it, under a temporary server (whose URL no setting holds) each worker started a temporary server of its
    own, with Prefect's 20 s startup limit. They log like the command that started the sweep
    (``langops.logs``).
    """
    from prefect_dask import DaskTaskRunner

    address = dask_address(params.sweep)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": min(params.sweep.n_workers, trials),
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",  # any free port: two sweeps on one machine do not collide
            "env": {"PREFECT_API_URL": _flow_api_url()},
            "preload": ["langops.logs"],
        }
    )


def _flow_api_url() -> str:
    """The Prefect API of the running flow, a temporary server's included."""
    from prefect.context import FlowRunContext

    return str(FlowRunContext.get().client.api_url).rstrip("/")


def _run_trials(params: Params, trials: list[Trial], sweep_run_id: str, prepared: PrepareResult) -> list[TrialOutcome]:
    """Submit every trial to Dask and wait for all; a failed trial is kept with its error, not raised."""
    logger = get_run_logger()
    outcomes = []
    with task_runner_for(params, trials=len(trials)) as runner:
        futures = [
            (trial, runner.submit(train_trial, parameters={"trial": trial, "parent_run_id": sweep_run_id,
                                                           "prepared": prepared}))
            for trial in trials
        ]
        for trial, future in futures:
            future.wait()
            state = future.state
            if state.is_completed():
                outcome = future.result()
                logger.info("%s (%s): %s %.4f", trial.name, describe(trial.overrides), params.sweep.metric, outcome.score)
            else:
                error = _error_of(future)
                logger.error("%s (%s) failed: %s", trial.name, describe(trial.overrides), error)
                outcome = TrialOutcome(index=trial.index, name=trial.name, overrides=trial.overrides,
                                       run_id=None, score=None, error=error)
            outcomes.append(outcome)
            crash_point("sweep:trial-finished")
    return outcomes


def _error_of(future) -> str:
    """Why a trial did not complete, as Prefect recorded it (the exception's type and message)."""
    state = future.state
    return f"{state.name}: {state.message}" if state.message else state.name


def _open_sweep_run(params: Params, trials: list[Trial]) -> str:
    """The parent MLflow run: the sweep's definition and the data it trained on."""
    from mlflow import MlflowClient

    from langops.lineage import dvc_dir_md5, git_commit
    from langops.tracking import configure_mlflow, owner_tags

    experiment_id = configure_mlflow(params)
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        tags={
            "langops.sweep": "true",
            "langops.data_version": dvc_dir_md5(params.paths.prepared),
            "langops.git_commit": git_commit(params.paths.prepared) or "unknown",
            "langops.params_hash": params.section_hash(),
            **owner_tags(),
        },
    )
    run_id = run.info.run_id
    for key, value in {
        "sweep.metric": params.sweep.metric,
        "sweep.greater_is_better": params.sweep.greater_is_better,
        "sweep.trials": len(trials),
        "sweep.grid": json.dumps({k: list(v) for k, v in params.sweep.grid.items()}),
        "sweep.explicit_trials": json.dumps([dict(t) for t in params.sweep.trials]),
        "project.seed": params.project.seed,
    }.items():
        client.log_param(run_id, key, value)
    return run_id


def _publish_trials(params: Params, run_id: str, rows: list[dict[str, Any]], best: TrialOutcome | None) -> None:
    """The trial table as a Prefect artifact and on the parent run, with the winner's trial, overrides and score."""
    from mlflow import MlflowClient

    from langops.tracking import configure_mlflow

    create_table_artifact(rows, key="sweep-trials", description=f"Sweep trials by validation {params.sweep.metric}")
    configure_mlflow(params)
    client = MlflowClient()
    client.log_dict(run_id, {"metric": params.sweep.metric, "trials": rows}, "sweep/trials.json")
    completed = sum(1 for row in rows if row["status"] == "completed")
    client.log_metric(run_id, "trials_completed", completed)
    client.log_metric(run_id, "trials_failed", len(rows) - completed)
    if best is None:
        return
    client.log_param(run_id, "best.trial", best.name)
    client.log_param(run_id, "best.run_id", best.run_id)
    for key, value in best.overrides.items():
        client.log_param(run_id, f"best.{key}", value)
    client.log_metric(run_id, f"best_{params.sweep.metric}", float(best.score))
    client.set_tag(best.run_id, "langops.sweep_best", "true")


def _close_sweep_run(params: Params, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    from langops.tracking import configure_mlflow

    configure_mlflow(params)
    MlflowClient().set_terminated(run_id, status)


def summary_markdown(summary: SweepSummary) -> str:
    verdict = "promoted to champion" if summary.promoted else "not promoted"
    lines = [
        f"# Sweep: {summary.best_trial} won, {summary.model_name} version {summary.version} {verdict}",
        "",
        f"| trial | overrides | validation {summary.metric} | MLflow run |",
        "|---|---|---|---|",
    ]
    for o in summary.trials:
        score = "failed: " + (o.error or "")[:80] if not o.completed else f"{o.score:.4f}"
        mark = " **(best)**" if o.name == summary.best_trial else ""
        lines.append(f"| {o.name}{mark} | {describe(o.overrides)} | {score} | `{o.run_id or '-'}` |")
    test = summary.test_metrics
    lines += [
        "",
        f"- best on validation {summary.metric}: {summary.best_score:.4f} ({describe(summary.best_overrides)})",
        f"- test accuracy / macro-F1 of the best (torch): {test['accuracy']:.4f} / {test['macro_f1']:.4f}",
        f"- gate: {summary.decision_reason}",
        f"- champion now: version {summary.champion_version}",
        f"- MLflow sweep run: `{summary.sweep_run_id}` in `{summary.tracking_uri}`",
        f"- model server: {summary.server_url or 'not deployed'}",
    ]
    return "\n".join(lines) + "\n"
