"""MLflow wiring: one place that points the client at the configured store and experiment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from langops.config import Params


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
    import mlflow

    configure_mlflow(params)
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
