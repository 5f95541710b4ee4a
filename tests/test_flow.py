"""The whole pipeline as a Prefect flow on a real (temporary) Prefect server and a real MLflow SQLite store."""

from __future__ import annotations

import httpx
import pytest
from mlflow import MlflowClient
from pipeline_helpers import tiny_project_params, write_bad_csv, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_model):
    root = tmp_path_factory.mktemp("project")
    params = tiny_project_params(root, tiny_base_model, deploy={"enabled": True})
    write_params(root, params)
    yield root, params
    from langops.tasks.deploy import stop_server

    stop_server(root / ".langops")


def _artifacts(flow_run_id):
    """The flow run's artifacts by key, read back over the Prefect REST API."""
    from prefect.settings import PREFECT_API_URL

    reply = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}},
        timeout=30,
    )
    reply.raise_for_status()
    return {a["key"]: a for a in reply.json()}


def _registry_state(client: MlflowClient) -> tuple[int, set[str], str | None]:
    """(runs, model versions, champion version): what a stopped run must leave unchanged."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name("langops")
    runs = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    versions = {str(v.version) for v in client.search_model_versions("name='langops-classifier'")}
    try:
        champion = str(client.get_model_version_by_alias("langops-classifier", "champion").version)
    except MlflowException:
        champion = None
    return runs, versions, champion


def _client(root) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / '.langops' / 'mlflow.db'}")


def test_pipeline_registers_promotes_and_serves_then_a_tie_leaves_the_champion(prefect_server, project):
    from langops.flows.pipeline import training_pipeline

    root, params = project
    state = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    assert state.is_completed(), state
    summary = state.result()

    assert (summary.version, summary.promoted, summary.champion_version) == ("1", True, "1")
    client = _client(root)
    version = client.get_model_version_by_alias("langops-classifier", "champion")
    assert str(version.version) == "1"
    for tag in ("data_version", "git_commit", "params_hash", "base_model"):
        assert version.tags.get(tag), f"lineage tag {tag} missing: {version.tags}"
    assert version.tags["langops.decision"] == "promoted"
    run = client.get_run(summary.run_id)
    assert {"test_accuracy", "test_macro_f1", "int8_test_accuracy", "val_macro_f1"} <= set(run.data.metrics)
    assert run.data.params["train.method"] == "full"
    assert {"validation-report", "test-metrics", "promotion-decision", "pipeline-summary"} <= set(
        _artifacts(state.state_details.flow_run_id)
    )

    # The server deployed by the flow answers over real HTTP with the champion's version.
    reply = httpx.post(f"{summary.server_url}/predict", json={"texts": ["I was charged twice for my order"]}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["label"] in params["data"]["labels"]
    assert str(reply.json()["version"]) == "1" == reply.headers["x-model-version"]

    # Same data, same seed: an identical challenger ties, so the gate refuses and the champion stays.
    second = training_pipeline(params_path=str(root / "params.yaml"))
    assert (second.version, second.promoted, second.champion_version) == ("2", False, "1")
    assert "tie" in second.decision_reason or "needs >=" in second.decision_reason
    assert client.get_model_version("langops-classifier", "2").tags["langops.decision"] == "rejected"
    # The second run resumed from the first's finished checkpoints, yet its MLflow run has the full curve.
    assert [m.step for m in client.get_metric_history(second.run_id, "val_macro_f1")] == [1, 2]
    assert str(client.get_model_version_by_alias("langops-classifier", "champion").version) == "1"


BAD_DATA = {  # defect -> what the error must name (the failed GX expectation, or the missing column)
    "blank_text": "expect_column_values_to_match_regex",
    "null_text": "expect_column_values_to_not_be_null",
    "unknown_label": "refunds",
    "text_too_short": "expect_column_value_lengths_to_be_between",
    "text_too_long": "expect_column_value_lengths_to_be_between",
    "class_too_small": "'feedback'",
    "duplicates": "expect_column_proportion_of_unique_values_to_be_between",
    "missing_column": "'label'",
}


@pytest.mark.parametrize("defect", sorted(BAD_DATA))
def test_bad_data_stops_the_flow_before_training_and_registers_nothing(prefect_server, project, tmp_path, defect):
    from langops.flows.pipeline import training_pipeline
    from langops.tasks.prepare import PrepareError
    from langops.tasks.validate import DataValidationError

    root, _ = project
    client = _client(root)
    before = _registry_state(client)
    bad = write_bad_csv(tmp_path / "bad.csv", defect)

    state = training_pipeline(
        params_path=str(root / "params.yaml"), overrides=[f"data.source={bad}"], return_state=True
    )
    assert state.is_failed()
    with pytest.raises((DataValidationError, PrepareError)) as err:
        state.result()
    assert BAD_DATA[defect] in str(err.value)

    # Nothing downstream happened: no new MLflow run, no new model version, the same champion.
    assert _registry_state(client) == before
    if isinstance(err.value, DataValidationError):
        report = _artifacts(state.state_details.flow_run_id)["validation-report"]
        assert BAD_DATA[defect] in report["data"]
