"""MLflow wiring: one place that points the client at the configured store and experiment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langops.config import Params
from langops.io import jsonable
from langops.metrics import headline


def configure_mlflow(params: Params) -> str:
    """Point MLflow at the configured tracking store and make sure the experiment exists.

    With no tracking URI configured this is an SQLite store and a local artifact folder under
    ``project.state_dir``, created on first use. Returns the experiment id.
    """
    import mlflow

    uri = params.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with _environment_kept(TRACKING_ENV_VARS):  # MLflow exports the URI, which would then outrank params
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
    return experiment_id


TRACKING_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _environment_kept(names: tuple[str, ...]):
    """Undo what the block does to these environment variables.

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
    """The open MLflow run of a training: log each epoch as it ends, then the result."""

    run_id: str
    _logged_epochs: set[int] = field(default_factory=set)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=epoch)
        self._logged_epochs.add(epoch)

    def log_result(self, result: Any, record: dict[str, Any]) -> None:
        """The curve of epochs restored from checkpoints (not logged live), the headline, the record."""
        import mlflow

        for row in result.history:
            if row["epoch"] not in self._logged_epochs:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        headline = {"best_val_macro_f1": result.best_val_macro_f1, "best_epoch": result.best_epoch,
                    "train_seconds": result.seconds, "trainable_params": result.trainable_params,
                    "temperature": result.temperature, "train_attempts": result.attempts,
                    "val_ece_uncalibrated": result.val_ece_uncalibrated, "val_ece": result.val_ece}
        mlflow.log_metrics({k: v for k, v in headline.items() if v is not None})
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
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({f"langops.{k}": v for k, v in lineage.items()})
        mlflow.log_params(_flatten(params.model_dump(mode="json", include={"data", "prepare", "train"})))
        if validation_dir.is_dir() and any(validation_dir.iterdir()):
            mlflow.log_artifacts(str(validation_dir), "validation")
        yield TrainingRun(run_id=run.info.run_id)


def log_evaluation(params: Params, run_id: str, result: Any) -> None:
    """Test metrics of the torch model (per class by label key) and every evaluation file."""
    import mlflow

    with resumed_run(params, run_id):
        mlflow.log_metrics(headline(result.metrics, prefix="test_"))
        mlflow.log_metric("test_majority_baseline_accuracy", result.metrics["majority_baseline_accuracy"])
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
    """The student's size and validation macro-F1 beside its teacher's: what distillation cost."""
    import mlflow

    with resumed_run(params, run_id):
        mlflow.log_metrics({"student_layers": result.layers, "student_val_macro_f1": result.val_macro_f1,
                            "teacher_val_macro_f1": result.teacher_val_macro_f1, "student_seconds": result.seconds,
                            "student_temperature": result.temperature})


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
