"""Sweeps: trial expansion and selection (unit), and a 2-trial sweep on a real local Dask cluster, a real
Prefect test server and a real MLflow SQLite store (services)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_helpers import (
    flow_run_artifacts,
    prefect_harness,
    tiny_project_params,
    write_bad_csv,
    write_params,
)

from langops.config import ConfigError, load_params
from langops.sweep import (
    TrialOutcome,
    dask_address,
    expand_trials,
    override_sets,
    score_from_history,
    select_best,
)

# ---------------------------------------------------------------------------------------------- fast


def _params(tmp_path, sweep: dict):
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"sweep": sweep}))
    return load_params(path)


@pytest.mark.unit
def test_grid_expands_in_a_stable_order_first_key_slowest_then_explicit_trials(tmp_path):
    params = _params(tmp_path, {
        "grid": {"train.learning_rate": [0.002, 0.0005], "train.lora.r": [8, 16, 4]},
        "trials": [{"train.max_epochs": 1, "project.seed": 3}],
    })
    trials = expand_trials(params)
    assert [t.name for t in trials] == [f"trial-{i:02d}" for i in range(1, 8)]
    assert [t.overrides for t in trials] == [
        {"train.learning_rate": 0.002, "train.lora.r": 8},
        {"train.learning_rate": 0.002, "train.lora.r": 16},
        {"train.learning_rate": 0.002, "train.lora.r": 4},
        {"train.learning_rate": 0.0005, "train.lora.r": 8},
        {"train.learning_rate": 0.0005, "train.lora.r": 16},
        {"train.learning_rate": 0.0005, "train.lora.r": 4},
        {"train.max_epochs": 1, "project.seed": 3},
    ]
    assert override_sets(params.sweep) == [t.overrides for t in expand_trials(params)]  # same order every time
    # Each trial trains with its values, into its own folders; everything else is the base params.
    assert (trials[4].params.train.learning_rate, trials[4].params.train.lora.r) == (0.0005, 16)
    assert (trials[6].params.train.max_epochs, trials[6].params.project.seed) == (1, 3)
    assert trials[6].params.train.learning_rate == params.train.learning_rate
    assert trials[1].params.paths.trained == params.paths.sweep / "trial-02" / "trained"
    assert trials[1].params.paths.checkpoints == params.paths.sweep / "trial-02" / "checkpoints"
    assert trials[1].params.paths.prepared == params.paths.prepared
    assert len({t.params.paths.trained for t in trials}) == len(trials)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("train.learnin_rate", "sweep key 'train.learnin_rate': train has no setting 'learnin_rate'"),
        ("train.lora.rank", "sweep key 'train.lora.rank': train.lora has no setting 'rank'"),
        ("prepare.test_size", "sweep key 'prepare.test_size': a sweep varies training only"),
    ],
)
def test_a_bad_grid_key_is_refused_when_params_load_naming_the_key(tmp_path, key, message):
    with pytest.raises(ConfigError) as err:
        _params(tmp_path, {"grid": {key: [1, 2]}})
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="sweep.trials"):
        _params(tmp_path, {"trials": [{"train.max_epochs": 2}, {key: 1}]})


@pytest.mark.unit
def test_bad_trial_values_too_many_trials_and_duplicates_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError) as err:
        expand_trials(_params(tmp_path, {"grid": {"train.max_epochs": [2, 0]}}))
    assert "trial-02" in str(err.value) and "train.max_epochs" in str(err.value)
    with pytest.raises(ConfigError, match="4 trials, more than sweep.max_trials=3"):
        expand_trials(_params(tmp_path, {"grid": {"train.max_epochs": [1, 2], "train.lora.r": [4, 8]}, "max_trials": 3}))
    with pytest.raises(ConfigError, match="trials 1 and 2 are identical"):
        expand_trials(_params(tmp_path, {"grid": {"train.max_epochs": [1]}, "trials": [{"train.max_epochs": 1}]}))
    with pytest.raises(ConfigError, match="no trials"):
        expand_trials(_params(tmp_path, {"grid": {}, "trials": []}))
    with pytest.raises(ConfigError, match="val_loss is better when lower"):
        _params(tmp_path, {"grid": {"train.max_epochs": [1]}, "metric": "val_loss"})


def _outcome(index: int, score: float | None, error: str | None = None) -> TrialOutcome:
    return TrialOutcome(index=index, name=f"trial-{index:02d}", overrides={}, run_id=f"r{index}", score=score, error=error)


@pytest.mark.unit
def test_best_trial_is_the_best_score_ties_go_to_the_earlier_trial_failures_never_win():
    outcomes = [_outcome(1, 0.5), _outcome(2, 0.8), _outcome(3, 0.8), _outcome(4, None, "RuntimeError: OOM")]
    assert select_best(outcomes, greater_is_better=True).name == "trial-02"
    assert select_best(list(reversed(outcomes)), greater_is_better=True).name == "trial-02"
    assert select_best(outcomes, greater_is_better=False).name == "trial-01"
    assert select_best([_outcome(1, float("nan")), _outcome(2, 0.1)], greater_is_better=True).name == "trial-02"
    with pytest.raises(Exception, match="no sweep trial completed.*trial-04: RuntimeError: OOM"):
        select_best([_outcome(4, None, "RuntimeError: OOM")], greater_is_better=True)


@pytest.mark.unit
def test_score_is_the_validation_metric_of_the_kept_evaluation():
    history = [{"evaluation": 1, "epoch": 0.5, "val_macro_f1": 0.4, "val_loss": 1.2},
               {"evaluation": 2, "epoch": 1.0, "val_macro_f1": 0.6, "val_loss": 0.9}]
    assert score_from_history(history, 1, "val_loss") == 1.2
    assert score_from_history(history, 2, "val_macro_f1") == 0.6
    with pytest.raises(Exception, match="not a validation metric"):
        score_from_history(history, 2, "test_macro_f1")


@pytest.mark.unit
def test_the_cluster_address_is_a_setting_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("LANGOPS_DASK_ADDRESS", raising=False)
    assert dask_address(_params(tmp_path, {}).sweep) is None
    configured = _params(tmp_path, {"dask_address": "tcp://scheduler:8786"}).sweep
    assert dask_address(configured) == "tcp://scheduler:8786"
    monkeypatch.setenv("LANGOPS_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert dask_address(configured) == "tcp://10.0.0.5:8786"


@pytest.mark.unit
def test_the_sweep_command_refuses_a_bad_sweep_before_starting_anything(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(json.dumps({"project": {"state_dir": str(tmp_path / "state")}}))

    def sweep(*overrides: str) -> subprocess.CompletedProcess:
        sets = [arg for override in overrides for arg in ("--set", override)]
        return subprocess.run([sys.executable, "-m", "langops.cli", "sweep", "--params", str(params_path), *sets],
                              check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    typo = sweep("sweep.grid={train.epochz: [1, 2]}")
    assert typo.returncode == 2, typo.stderr
    assert "sweep key 'train.epochz': train has no setting 'epochz'" in typo.stderr
    too_many = sweep("sweep.grid={train.max_epochs: [1, 2], train.lora.r: [4, 8]}", "sweep.max_trials=3")
    assert too_many.returncode == 2, too_many.stderr
    assert "4 trials, more than sweep.max_trials=3" in too_many.stderr
    assert not (tmp_path / "state" / "mlflow.db").exists() and not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------------------ services


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_harness():
        yield


def _client(root) -> MlflowClient:
    uri = f"sqlite:///{root / '.langops' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.services
def test_sweep_trains_trials_on_dask_nests_their_runs_and_ships_the_best(prefect_server, tmp_path, tiny_base_model):
    from langops.flows.sweep import sweep_pipeline

    # A learning rate of 1e-9 leaves the random model as it was (validation macro-F1 about 0.04) while 0.003
    # learns (about 0.35): the first trial must lose, so picking the first trial on a tie fails this test.
    sweep = {"grid": {"train.learning_rate": [1e-9, 0.003]}, "n_workers": 2, "dask_address": None}
    params = tiny_project_params(tmp_path, tiny_base_model, sweep=sweep)
    params["train"].update(max_epochs=6, batch_size=8, early_stopping_patience=6, num_threads=1)
    write_params(tmp_path, params)

    state = sweep_pipeline(params_path=str(tmp_path / "params.yaml"), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    client = _client(tmp_path)

    # The parent sweep run and exactly its two trials, nested under it, each with its params and score.
    parent = client.get_run(summary.sweep_run_id)
    assert parent.data.tags["langops.sweep"] == "true" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_trial = {run.data.tags["langops.sweep_trial"]: run for run in children}
    assert sorted(by_trial) == ["trial-01", "trial-02"]
    assert [float(by_trial[t].data.params["train.learning_rate"]) for t in ("trial-01", "trial-02")] == [1e-9, 0.003]
    scores = {}
    for name, run in by_trial.items():
        assert run.info.status == "FINISHED"
        # Reproducible from what was logged: the overrides, the seed, the data version and the full train params.
        assert json.loads(run.data.params["sweep.overrides"]) == {"train.learning_rate": float(run.data.params["train.learning_rate"])}
        assert run.data.params["project.seed"] == "7"
        assert run.data.tags["langops.data_version"] == parent.data.tags["langops.data_version"]
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        kept = int(run.data.metrics["best_evaluation"])
        scores[name] = next(m.value for m in history if m.step == kept)
        train_json = json.loads((tmp_path / "models" / "sweep" / name / "trained" / "train.json").read_text())
        assert train_json["run_id"] == run.info.run_id  # each trial wrote its own folder
    assert scores["trial-02"] > scores["trial-01"] + 0.1, scores  # the trials genuinely differ
    best = by_trial["trial-02"]
    assert (summary.best_trial, summary.best_run_id) == ("trial-02", best.info.run_id)
    assert summary.best_score == pytest.approx(scores["trial-02"])
    assert [o.score for o in summary.trials] == pytest.approx([scores["trial-01"], scores["trial-02"]])

    # The trials ran on the Dask cluster's two worker processes, at the same time.
    workers = [o.worker for o in summary.trials]
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers) and len(set(workers)) == 2, workers
    first, second = (by_trial[t].info for t in ("trial-01", "trial-02"))
    assert first.start_time < second.end_time and second.start_time < first.end_time

    # The parent records the winner and the trial table.
    assert parent.data.params["best.trial"] == "trial-02"
    assert parent.data.params["best.run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(scores["trial-02"])
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json", str(tmp_path))).read_text())
    assert [(r["trial"], r["run_id"], r["best"]) for r in table["trials"]] == [
        ("trial-01", by_trial["trial-01"].info.run_id, False), ("trial-02", best.info.run_id, True)
    ]

    # The best trial, and only it, went on: evaluated on test, registered from its run, judged by the gate.
    versions = client.search_model_versions("name='langops-classifier'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", best.info.run_id)]
    best_after = client.get_run(best.info.run_id)
    assert {"test_macro_f1", "int8_test_accuracy"} <= set(best_after.data.metrics)
    assert "test_macro_f1" not in client.get_run(by_trial["trial-01"].info.run_id).data.metrics
    assert (summary.version, summary.promoted, summary.champion_version) == ("1", True, "1")
    assert client.get_model_version("langops-classifier", "1").tags["langops.decision"] == "promoted"
    decision = json.loads((tmp_path / "reports" / "promotion" / "decision.json").read_text())
    assert decision["promote"] is True and decision["challenger_version"] == "1"

    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"validation-report", "sweep-trials", "sweep-summary", "promotion-decision", "test-metrics"} <= set(artifacts)
    rows = json.loads(artifacts["sweep-trials"]["data"])
    assert [(r["trial"], r["train.learning_rate"], r["run_id"], r["best"]) for r in rows] == [
        ("trial-01", 1e-9, by_trial["trial-01"].info.run_id, False), ("trial-02", 0.003, best.info.run_id, True)
    ]
    assert rows[1]["val_macro_f1"] == pytest.approx(scores["trial-02"], abs=1e-6)
    assert "trial-02 won" in artifacts["sweep-summary"]["data"]


@pytest.mark.services
def test_bad_data_stops_the_sweep_before_any_trial_or_run(prefect_server, tmp_path, tiny_base_model):
    from langops.flows.sweep import sweep_pipeline
    from langops.tasks.validate import DataValidationError

    bad = write_bad_csv(tmp_path / "bad.csv", "unknown_label")
    params = tiny_project_params(tmp_path, tiny_base_model, sweep={"grid": {"train.learning_rate": [1e-9, 0.01]}})
    params["data"]["source"] = str(bad)
    write_params(tmp_path, params)

    state = sweep_pipeline(params_path=str(tmp_path / "params.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataValidationError, match="refunds"):
        state.result()
    client = _client(tmp_path)
    experiment = client.get_experiment_by_name("langops")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "models" / "sweep").exists()


@pytest.mark.services
def test_a_failed_trial_is_recorded_nested_and_never_chosen(prefect_server, tmp_path, tiny_base_model):
    from langops.flows.sweep import sweep_pipeline
    from langops.sweep import SweepError

    sweep = {"grid": {}, "trials": [{"train.base_model": str(tmp_path / "no-such-model")}], "n_workers": 1}
    params = tiny_project_params(tmp_path, tiny_base_model, sweep=sweep)
    write_params(tmp_path, params)

    state = sweep_pipeline(params_path=str(tmp_path / "params.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(SweepError, match="no sweep trial completed .1 tried.: trial-01: Failed"):
        state.result()
    client = _client(tmp_path)
    experiment = client.get_experiment_by_name("langops")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("langops.sweep") == "true")
    assert parent.info.status == "FAILED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [(r.data.tags["langops.sweep_trial"], r.info.status) for r in children] == [("trial-01", "FAILED")]
    assert client.search_model_versions("name='langops-classifier'") == []
    rows = json.loads(flow_run_artifacts(state.state_details.flow_run_id)["sweep-trials"]["data"])
    assert [(r["trial"], r["status"], r["run_id"]) for r in rows] == [("trial-01", "failed", "")]
    assert "no-such-model" in rows[0]["error"]
