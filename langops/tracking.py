"""MLflow wiring: one place that points the client at the configured store and experiment."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langops.config import Params
from langops.io import jsonable
from langops.metrics import headline
from langops.processes import process_alive


def configure_mlflow(params: Params) -> str:
    """Point MLflow at the configured tracking store and make sure the experiment exists.

    With no tracking URI configured this is an SQLite store and a local artifact folder under
    ``project.state_dir``, created on first use. Returns the experiment id.
    """
    import mlflow

    uri = params.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with environment_kept(TRACKING_ENV_VARS):  # MLflow exports the URI, which would then outrank params
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        local_store = params.tracking.uri is None and uri.startswith("sqlite:")
        artifact_location = params.artifact_root() if local_store else None
        experiment_id = client.create_experiment(params.tracking.experiment, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    if uri not in _swept_stores:  # once per store and process: a search per step would cost seconds
        _swept_stores.add(uri)
        try:
            clean_up_after_dead_processes(client)
        except Exception as exc:  # housekeeping: a store that cannot answer these searches still works
            logging.getLogger(__name__).warning("could not close the runs of dead processes in %s: %s", uri, exc)
    return experiment_id


TRACKING_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


OWNER_HOST, OWNER_PID, OWNER_STARTED = "langops.owner_host", "langops.owner_pid", "langops.owner_started"
END_REASON = "langops.end_reason"
REGISTERING_TAG = "langops.registering"  # on a model version until the register step completed it: its owner
_swept_stores: set[str] = set()


def owner_tags() -> dict[str, str]:
    """Which process opened a run: its host, pid and start time (the start time tells a reused pid apart).

    A run whose owner died without ending it (``kill -9``, a lost machine) would stay RUNNING for good;
    these tags let a later command see that the owner is gone and close it (``clean_up_after_dead_processes``).
    """
    import socket

    import psutil

    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()),
            OWNER_STARTED: f"{psutil.Process().create_time():.2f}"}


def clean_up_after_dead_processes(client: Any) -> list[str]:
    """End the runs and delete the unfinished model versions whose owner process on this host is gone.

    Returns the ids of the runs closed and the ``name/version`` of the versions deleted.

    A promotion record whose champion move took effect before its process died is closed FINISHED, so
    ``langops history`` shows the move that happened; every other such run is closed KILLED. Both get a
    ``langops.end_reason`` tag that says what happened. A model version still tagged ``REGISTERING_TAG``
    was never completed by the register step, which deletes it on any failure it lives through; here the
    same happens for the ones whose process was killed. Runs and versions owned by live processes or by
    other hosts, and runs opened without owner tags, are left alone: nothing here can tell whether they
    are still being worked on.
    """
    import socket

    host = socket.gethostname()
    cleaned = _delete_unfinished_versions(client, host)
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiment_ids:
        return cleaned
    orphans = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'",
        max_results=1000,
    )
    for run in orphans:
        tags = run.data.tags
        if process_alive(int(tags.get(OWNER_PID, "0")), float(tags.get(OWNER_STARTED, "0"))):
            continue
        took_effect = _promotion_took_effect(client, tags)
        what = "the champion move it records took effect" if took_effect else "what it was doing did not finish"
        client.set_tag(run.info.run_id, END_REASON, f"process {tags.get(OWNER_PID)} on {host} died without "
                       f"ending this run; {what}; closed at {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
        client.set_terminated(run.info.run_id, status="FINISHED" if took_effect else "KILLED")
        cleaned.append(run.info.run_id)
    return cleaned


def _delete_unfinished_versions(client: Any, host: str) -> list[str]:
    import json

    deleted = []
    for version in client.search_model_versions(f"tags.`{REGISTERING_TAG}` != ''"):
        try:
            owner = json.loads(version.tags[REGISTERING_TAG])
            alive = process_alive(int(owner[OWNER_PID]), float(owner[OWNER_STARTED]))
        except (ValueError, KeyError, TypeError):
            continue  # not a tag this code wrote: leave the version alone
        if owner.get(OWNER_HOST) != host or alive:
            continue
        client.delete_model_version(version.name, version.version)
        deleted.append(f"{version.name}/{version.version}")
    return deleted


def _promotion_took_effect(client: Any, tags: dict[str, str]) -> bool:
    """A promotion record's change happened: the champion alias names its version, moved from another one; for a
    rollout record, the registry holds the rollout tag its change left (``langops.promotions.record_event``)."""
    from mlflow.exceptions import MlflowException

    from langops.aliases import CHAMPION, ROLLOUT_EFFECT_TAG, ROLLOUT_TAG

    model_name, to_version = tags.get("langops.model_name"), tags.get("langops.to_version")
    if not (tags.get("langops.event") and model_name and to_version):
        return False
    try:
        if ROLLOUT_EFFECT_TAG in tags:
            return client.get_registered_model(model_name).tags.get(ROLLOUT_TAG, "") == tags[ROLLOUT_EFFECT_TAG]
        champion = client.get_model_version_by_alias(model_name, CHAMPION).version
    except MlflowException:
        return False
    return str(champion) == to_version and tags.get("langops.from_version") != to_version


@contextlib.contextmanager
def environment_kept(names: tuple[str, ...]):
    """Undo what the block does to these environment variables (set them inside it, for the block alone).

    ``mlflow.set_tracking_uri`` writes ``$MLFLOW_TRACKING_URI``, and ``Params.tracking_uri`` lets that
    variable win (it is how a user points langops elsewhere), so without this the first project a process
    touches would capture every later one (two test projects, a sweep's trials).
    """
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def resumed_run(params: Params, run_id: str) -> Iterator[object]:
    """Re-open an existing MLflow run (started by the train step) so later steps log into it."""
    configure_mlflow(params)
    with reopened_run(run_id) as run:
        yield run


@contextlib.contextmanager
def reopened_run(run_id: str) -> Iterator[object]:
    """Re-open run ``run_id`` in the store MLflow is configured for (or use it, when it is active)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags(owner_tags())  # RUNNING again, now this process's: if it dies, the next command closes it
        yield run


def ui_links(tracking_uri: str, *, run_id: str, model_name: str, version: str) -> dict[str, str]:
    """Links to the run and the model version in the MLflow UI, when the store is an MLflow server.

    A file or SQLite store has no UI of its own (``mlflow ui`` or ``langops up`` serves one), so there
    are no links to give and this returns an empty dict.
    """
    from mlflow import MlflowClient

    if not tracking_uri.startswith(("http://", "https://")):
        return {}
    base = tracking_uri.rstrip("/")
    experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    return {
        "mlflow-run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
        "model-version": f"{base}/#/models/{model_name}/versions/{version}",
    }


# ------------------------------------------------------------------------------- what each step logs


@dataclass
class TrainingRun:
    """The open MLflow run of a training: log each evaluation as it comes, then the result."""

    run_id: str
    _logged_evaluations: set[int] = field(default_factory=set)

    def log_evaluation(self, metrics: dict[str, float], evaluation: int) -> None:
        """One evaluation's metrics (its optimiser step and epoch among them) at MLflow step ``evaluation``."""
        import mlflow

        mlflow.log_metrics(metrics, step=evaluation)
        self._logged_evaluations.add(evaluation)

    def log_result(self, result: Any, record: dict[str, Any]) -> None:
        """The evaluations restored from checkpoints (not logged live), the headline, why training stopped,
        the calibration decision with its evidence, and the record."""
        import mlflow

        for row in result.history:
            if row["evaluation"] not in self._logged_evaluations:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "evaluation"}, step=int(row["evaluation"]))
        headline = {"best_val_macro_f1": result.best_val_macro_f1, "best_epoch": result.best_epoch,
                    "best_step": result.best_step, "best_evaluation": result.best_evaluation,
                    "epochs_run": result.epochs_run, "train_seconds": result.seconds,
                    "train_loop_seconds": result.train_loop_seconds, "trainable_params": result.trainable_params,
                    "train_attempts": result.attempts, "temperature": result.temperature,
                    "temperature_fitted": result.temperature_fitted,
                    "temperature_folded": float(result.temperature_folded),
                    "val_ece_uncalibrated": result.val_ece_uncalibrated,
                    "val_ece_cross_fitted": result.val_ece_cross_fitted, "val_ece": result.val_ece}
        mlflow.log_metrics({k: v for k, v in headline.items() if v is not None})
        # why it stopped and what calibration decided: tags, so they can be copied to the registered version
        mlflow.set_tags({"langops.stop_reason": result.stop_reason, "langops.calibration": result.calibration[:5000]})
        # what the recipe resolved from the data ("auto" in params.yaml) and the rate of the run that counted
        mlflow.log_params({"train.world_size": result.world_size, "train.effective_batch_size": result.effective_batch_size,
                           "train.resolved_max_length": result.max_length, "train.steps": result.steps,
                           "train.resolved_learning_rate": result.learning_rate,
                           "train.resolved_class_weights": result.class_weights or "none"})
        mlflow.log_dict(record, "train/train.json")
        if result.adapter_dir is not None:
            mlflow.log_artifacts(str(result.adapter_dir), "train/adapter")


@contextlib.contextmanager
def training_run(params: Params, lineage: dict[str, str], *, validation_dir: Path) -> Iterator[TrainingRun]:
    """Open the model's MLflow run: lineage tags, the data/prepare/train params, the validation report."""
    import mlflow

    configure_mlflow(params)
    run_name = f"{params.train.method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    with mlflow.start_run(run_name=run_name, tags=owner_tags()) as run:
        mlflow.set_tags({f"langops.{k}": v for k, v in lineage.items()})
        mlflow.log_params(_flatten(params.model_dump(mode="json", include={"data", "prepare", "train"})))
        if validation_dir.is_dir() and any(validation_dir.iterdir()):
            mlflow.log_artifacts(str(validation_dir), "validation")
        yield TrainingRun(run_id=run.info.run_id)


def log_evaluation(params: Params, run_id: str, result: Any) -> None:
    """Test metrics of the torch model (per class by label key), the majority class's and the TF-IDF
    baseline's beside them, and every evaluation file (the confusion matrix and reliability diagram too).

    The baseline's are ``test_baseline_accuracy`` / ``test_baseline_macro_f1`` (fit on train + validation)
    and ``val_baseline_accuracy`` / ``val_baseline_macro_f1`` (fit on train alone), the majority class's
    ``test_majority_baseline_accuracy`` / ``test_majority_baseline_macro_f1``.
    """
    import mlflow

    metrics = result.metrics
    beside = {"test_majority_baseline_accuracy": metrics["majority_baseline_accuracy"],
              "test_majority_baseline_macro_f1": metrics["majority_baseline_macro_f1"],
              "test_baseline_accuracy": metrics["baseline_accuracy"],
              "test_baseline_macro_f1": metrics["baseline_macro_f1"],
              "val_baseline_accuracy": metrics["baseline_val_accuracy"],
              "val_baseline_macro_f1": metrics["baseline_val_macro_f1"]}
    with resumed_run(params, run_id):
        mlflow.log_metrics(headline(metrics, prefix="test_"))
        mlflow.log_metrics({name: float(value) for name, value in beside.items()})
        mlflow.set_tag("langops.baseline", metrics["baseline"]["model"])
        mlflow.log_artifacts(str(result.metrics_path.parent), "evaluation")


def log_compression(params: Params, run_id: str, result: Any) -> None:
    """Test metrics of the shipped model, parity, sizes and latencies, and the compression summary."""
    import mlflow

    scalars = {**headline(result.metrics, prefix="int8_test_")}
    scalars.update(_numeric(result.parity, "parity_"))
    scalars.update(_numeric(result.sizes_mb, "size_mb_"))
    scalars.update(_numeric(result.latency_ms, "latency_ms_"))
    with resumed_run(params, run_id):
        mlflow.log_metrics(scalars)
        mlflow.log_dict(jsonable(asdict(result)), "compress/compress.json")


def log_distillation(params: Params, run_id: str, result: Any) -> None:
    """Which model ships and why; a trained student's size and validation macro-F1 beside its teacher's."""
    import mlflow

    with resumed_run(params, run_id):
        mlflow.set_tags({"langops.shipped_model": "student" if result.shipped else "teacher",
                         "langops.distill": result.reason[:5000]})
        if result.val_macro_f1 is not None:
            mlflow.log_metrics({"student_layers": result.layers, "student_val_macro_f1": result.val_macro_f1,
                                "teacher_val_macro_f1": result.teacher_val_macro_f1,
                                "student_seconds": result.seconds, "student_temperature": result.temperature})


def log_decision(params: Params, run_id: str, decision: Any, files: tuple[Path, ...]) -> None:
    """The gate's decision files, and its verdict as a tag of the run."""
    import mlflow

    with resumed_run(params, run_id):
        for path in files:
            mlflow.log_artifact(str(path), "promotion")
        mlflow.set_tag("langops.decision", "promoted" if decision.promote else "rejected")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _numeric(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
