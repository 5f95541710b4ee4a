"""The whole pipeline as a Prefect flow on a real (temporary) Prefect server and a real MLflow SQLite store."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient
from pipeline_helpers import (
    flow_run_artifacts,
    prefect_harness,
    tiny_project_params,
    write_bad_csv,
    write_params,
)
from serving_helpers import RequestLoop, wait_for_version

from langops.config import load_params
from langops.promotions import read_history

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_harness():
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_model):
    root = tmp_path_factory.mktemp("project")
    params = tiny_project_params(root, tiny_base_model, deploy={"enabled": True})
    write_params(root, params)
    yield root, params
    from langops.tasks.deploy import stop_server

    stop_server(root / ".langops")


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
    uri = f"sqlite:///{root / '.langops' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the process-wide registry URI


def test_pipeline_registers_promotes_and_serves_then_a_tie_leaves_the_champion(prefect_server, project):
    from langops.flows.pipeline import training_pipeline

    root, params = project
    state = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert set(_task_run_states(state.state_details.flow_run_id).values()) == {"Completed"}

    assert (summary.version, summary.promoted, summary.champion_version) == ("1", True, "1")
    client = _client(root)
    version = client.get_model_version_by_alias("langops-classifier", "champion")
    assert str(version.version) == "1"
    for tag in ("data_version", "git_commit", "params_hash", "base_model"):
        assert version.tags.get(tag), f"lineage tag {tag} missing: {version.tags}"
    assert version.tags["langops.decision"] == "promoted"
    run = client.get_run(summary.run_id)
    assert {"test_accuracy", "test_macro_f1", "int8_test_accuracy", "val_macro_f1", "test_baseline_macro_f1",
            "test_baseline_accuracy", "val_baseline_macro_f1", "test_majority_baseline_macro_f1"} <= set(run.data.metrics)
    assert run.data.params["train.method"] == "full"
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"validation-report", "test-metrics", "promotion-decision", "pipeline-summary"} <= set(artifacts)
    side_by_side = json.dumps(artifacts["test-metrics"]["data"])
    assert all(model in side_by_side for model in ("majority class", "TF-IDF", "torch (fp32)", "(shipped)"))
    assert "TF-IDF + logistic regression (baseline)" in artifacts["pipeline-summary"]["data"]
    assert summary.baseline_metrics["macro_f1"] == run.data.metrics["test_baseline_macro_f1"]
    evaluation_files = {f.path for f in client.list_artifacts(summary.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/reliability_diagram.png"} <= evaluation_files

    # The server deployed by the flow answers over real HTTP with the champion's version.
    reply = httpx.post(f"{summary.server_url}/predict", json={"texts": ["I was charged twice for my order"]}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["label"] in params["data"]["labels"]
    assert str(reply.json()["version"]) == "1" == reply.headers["x-model-version"]

    # Nothing changed: the steps that only depend on their inputs come from Prefect's cache, so no new
    # MLflow run and no new version; the gate sees the champion itself and moves nothing.
    runs_before = _registry_state(client)[0]
    rerun = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    assert (rerun.result().version, rerun.result().promoted, rerun.result().champion_version) == ("1", False, "1")
    assert "already the champion" in rerun.result().decision_reason
    states = _task_run_states(rerun.state_details.flow_run_id, expected=(*CACHED_STEPS, "promote-decide"))
    assert {step: states[step] for step in CACHED_STEPS} == dict.fromkeys(CACHED_STEPS, "Cached"), states
    assert states["promote-decide"] == "Completed"
    assert _registry_state(client)[0] == runs_before
    assert client.get_model_version("langops-classifier", "1").tags["langops.decision"] == "promoted"

    # A deleted output is rebuilt: train runs again (resuming from the finished checkpoints) and the steps
    # after it see a new model, so an identical version 2 is registered; it ties, and the champion stays.
    shutil.rmtree(root / "models" / "trained")
    second_state = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    states = _task_run_states(second_state.state_details.flow_run_id,
                              expected=("prepare", "validate", "baseline", "train", "register"))
    assert (states["prepare"], states["validate"], states["baseline"], states["train"], states["register"]) == (
        "Cached", "Cached", "Cached", "Completed", "Completed"
    ), states
    second = second_state.result()
    assert (second.version, second.promoted, second.champion_version) == ("2", False, "1")
    assert "tie" in second.decision_reason or "needs >=" in second.decision_reason
    assert client.get_model_version("langops-classifier", "2").tags["langops.decision"] == "rejected"
    # The retrain resumed from the first's finished checkpoints, yet its MLflow run has the full curve.
    assert [m.step for m in client.get_metric_history(second.run_id, "val_macro_f1")] == [1, 2]
    assert str(client.get_model_version_by_alias("langops-classifier", "champion").version) == "1"
    assert "tie" in client.get_model_version("langops-classifier", "2").tags["langops.decision_reason"]
    history = read_history(load_params(root / "params.yaml"), "langops-classifier")
    assert [(e.event, e.from_version, e.to_version, e.actor) for e in history] == [("promote", None, "1", "pipeline")]


CACHED_STEPS = ("prepare", "validate", "baseline", "train", "evaluate", "compress", "register")


FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _task_run_states(flow_run_id, expected: tuple[str, ...] = ()) -> dict[str, str]:
    """Each task run's final state name (``Cached``, ``Completed``...) by task name, over the REST API,
    once every task run it lists is final and the ``expected`` task names are among them."""
    from prefect.settings import PREFECT_API_URL

    # The server records task runs and their states from events, a moment after the flow returns on a busy
    # machine: a task run may not be listed at all yet.
    deadline = time.monotonic() + 60
    while True:
        reply = httpx.post(
            f"{PREFECT_API_URL.value()}/task_runs/filter",
            json={"task_runs": {"flow_run_id": {"any_": [str(flow_run_id)]}}},
            timeout=30,
        )
        reply.raise_for_status()
        runs = reply.json()
        listed = {run["name"].rsplit("-", 1)[0] for run in runs}
        final = all(run["state"] and run["state"]["type"] in FINAL_STATES for run in runs)
        if (final and set(expected) <= listed) or time.monotonic() > deadline:
            return {run["name"].rsplit("-", 1)[0]: (run["state"] or {}).get("name") for run in runs}
        time.sleep(0.5)


def test_forced_promotion_and_rollback_are_recorded_and_served_without_a_failed_request(prefect_server, project):
    """Continues the registry the first test left: champion 1, version 2 refused by the gate."""
    from langops.promotions import rollback
    from langops.stages import run_stage

    root, _ = project
    params = load_params(root / "params.yaml")
    client = _client(root)
    url = f"http://127.0.0.1:{params.deploy.port}"
    with RequestLoop(url) as requests, httpx.Client(base_url=url, timeout=30) as server:
        decision = run_stage("promote", params, force_reason="ship the retrained model tonight", actor="alice")
        assert decision.forced and decision.promote and decision.failed  # the refused checks stay on record
        wait_for_version(server, "2")
        assert (_alias(client, "champion"), _alias(client, "previous_champion")) == ("2", "1")

        event = rollback(params, model_name="langops-classifier", reason="complaints from support", actor="bob")
        assert (event.from_version, event.to_version) == ("2", "1")
        wait_for_version(server, "1")
        assert (_alias(client, "champion"), _alias(client, "previous_champion")) == ("1", "2")

    assert requests.failures == [], requests.failures[:5]
    assert requests.versions <= {"1", "2"} and {"1", "2"} <= requests.versions
    history = read_history(params, "langops-classifier")
    assert [(e.event, e.from_version, e.to_version, e.actor) for e in history] == [
        ("rollback", "2", "1", "bob"), ("force", "1", "2", "alice"), ("promote", None, "1", "pipeline"),
    ]
    assert client.get_model_version("langops-classifier", "1").tags["langops.last_event"].startswith("rollback")

    # A barely trained challenger is refused on the evidence; the rolled-back champion stays.
    from langops.flows.pipeline import training_pipeline

    worse = training_pipeline(params_path=str(root / "params.yaml"), overrides=["train.learning_rate=1e-9"])
    assert (worse.version, worse.promoted, worse.champion_version) == ("3", False, "1")
    assert "beats_champion:macro_f1" in worse.decision_reason
    assert (_alias(client, "challenger"), _alias(client, "champion"), _alias(client, "previous_champion")) == ("3", "1", "2")
    assert len(read_history(params, "langops-classifier")) == 3


def test_with_approval_required_the_flow_pauses_and_a_reviewer_decides(prefect_server, tmp_path, tiny_base_model):

    from langops.flows.pipeline import training_pipeline

    params = tiny_project_params(tmp_path, tiny_base_model, promote={"require_approval": True})
    write_params(tmp_path, params)
    client = _client(tmp_path)
    for approve, reviewer, comment in [(False, "carol", "not before the freeze"), (True, "dave", "ship it")]:
        runs_before = set(_flow_run_ids())
        answer = {"approve": approve, "reviewer": reviewer, "comment": comment}
        reviewer_thread = threading.Thread(target=_resume_when_paused, args=(runs_before, answer), daemon=True)
        reviewer_thread.start()
        summary = training_pipeline(params_path=str(tmp_path / "params.yaml"))
        reviewer_thread.join(timeout=60)

        assert summary.promoted is approve
        version = client.get_model_version("langops-classifier", summary.version)
        assert version.tags["langops.decision"] == ("promoted" if approve else "rejected")
        if not approve:
            assert version.tags["langops.decision_reason"].startswith("rejected by carol: not before the freeze")
        decision = json.loads((tmp_path / "reports" / "promotion" / "decision.json").read_text())
        assert decision["approval"] == {"approved": approve, "reviewer": reviewer, "comment": comment}

        if not approve:
            # Outside the flow (the DVC stage, the CLI) nobody can be asked: the passing model stays out.
            from langops.stages import run_stage

            unattended = run_stage("promote", load_params(tmp_path / "params.yaml"))
            assert not unattended.promote and unattended.approval["reviewer"] == "nobody"

    # The rerun reused the cached model: the version carol rejected is the one dave approved.
    assert _alias(client, "champion") == summary.version == "1"
    assert [(e.event, e.actor) for e in read_history(load_params(tmp_path / "params.yaml"), "langops-classifier")] == [
        ("promote", "pipeline")
    ]


def _flow_run_ids() -> list[str]:
    from prefect.settings import PREFECT_API_URL

    reply = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json={}, timeout=30)
    reply.raise_for_status()
    return [run["id"] for run in reply.json()]


def _resume_when_paused(known: set[str], answer: dict) -> None:
    """Play the reviewer: wait for a new flow run to pause, then resume it with ``answer``."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        reply = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json={}, timeout=30).json()
        paused = [r["id"] for r in reply if r["id"] not in known and r["state"] and r["state"]["type"] == "PAUSED"]
        if paused:
            resume_flow_run(paused[0], run_input=answer)
            return
        time.sleep(0.5)


def _alias(client: MlflowClient, alias: str) -> str:
    return str(client.get_model_version_by_alias("langops-classifier", alias).version)


# defect -> what the error must name (the failed GX expectation, or the missing column). Short and long texts
# and duplicates are warnings by default: tests/test_validate.py pins that they are reported and do not stop.
BAD_DATA = {
    "blank_text": "expect_column_values_to_not_be_in_set",
    "null_text": "expect_column_values_to_not_be_null",
    "unknown_label": "refunds",
    "single_row_class": "'feedback': ",
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

    state = training_pipeline(params_path=str(root / "params.yaml"), dataset=str(bad), return_state=True)
    assert state.is_failed()
    with pytest.raises((DataValidationError, PrepareError)) as err:
        state.result()
    assert BAD_DATA[defect] in str(err.value)

    # Nothing downstream happened: no new MLflow run, no new model version, the same champion.
    assert _registry_state(client) == before
    if isinstance(err.value, DataValidationError):
        report = flow_run_artifacts(state.state_details.flow_run_id)["validation-report"]
        assert BAD_DATA[defect] in report["data"]


EMOTION = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tweet_eval_emotion" / "train.csv"


@pytest.mark.skipif(not EMOTION.is_file(), reason="../shared/datasets/tweet_eval_emotion is not here")
def test_a_challenger_on_grown_data_is_compared_only_on_rows_neither_model_trained_on(
    prefect_server, tmp_path, tiny_base_model
):
    """Day two: the champion trained on 1,000 public tweets, the challenger on the same file with 100 more."""
    import pandas as pd

    from langops.flows.pipeline import training_pipeline
    from langops.io import read_json, read_split
    from langops.text_hashes import MANIFEST_FILE, TextManifest, text_hashes

    source = tmp_path / "emotion.csv"
    params = tiny_project_params(tmp_path, tiny_base_model, data={"source": str(source), "labels": None},
                                 promote={"min_compared_rows": 20})
    params_path = write_params(tmp_path, params)
    tweets = pd.read_csv(EMOTION, keep_default_na=False)
    manifests: dict[str, TextManifest] = {}

    def run_version(rows: int, *overrides: str) -> dict:
        tweets.head(rows).to_csv(source, index=False)
        state = training_pipeline(params_path=str(params_path), overrides=list(overrides), return_state=True)
        assert state.is_completed(), state
        version = state.result().version
        manifests[version] = TextManifest.load(tmp_path / "models" / "compressed" / MANIFEST_FILE)
        return read_json(tmp_path / "reports" / "promotion" / "decision.json")

    def trained_on_by_either(decision: dict) -> int:
        test = text_hashes(read_split(tmp_path / "data" / "prepared", "test")["text"])
        models = (manifests[decision["champion_version"]], manifests[decision["challenger_version"]])
        return int(np.logical_or.reduce([manifest.seen_any(test) for manifest in models]).sum())

    first = run_version(1000)
    assert first["champion_version"] is None and first["compared_rows"] is None

    grown = run_version(1100)
    compared = grown["compared_rows"]
    assert grown["champion_version"] == "1" and grown["challenger_version"] == "2"
    assert trained_on_by_either(grown) == 0  # no test text of the grown data was trained on by either model
    assert compared["compared"] == compared["test_rows"] == len(read_split(tmp_path / "data" / "prepared", "test"))
    assert sum(compared["removed"].values()) == 0
    changes = read_json(tmp_path / "reports" / "prepare" / "split_changes.json")
    assert changes["texts"]["changed"] == 0 and changes["texts"]["joined"] > 0
    report = (tmp_path / "reports" / "validation" / "report.md").read_text()
    assert f"{changes['texts']['kept']} texts kept their split, {changes['texts']['joined']} joined" in report

    # A new split seed deals every text anew: the champion's training texts reach the test split, and go.
    reseeded = run_version(1100, "prepare.split_seed=1")
    compared = reseeded["compared_rows"]
    removed = trained_on_by_either(reseeded)
    assert removed > 50
    assert sum(compared["removed"].values()) == removed == compared["test_rows"] - compared["compared"]
    champion = reseeded["champion_version"]
    assert compared["removed"][f"champion version {champion}'s train split"] > 0
    gate = next(check for check in reseeded["checks"] if check["name"] == "compared_rows")
    assert f"{compared['compared']} of {compared['test_rows']} test rows (removed as trained on: " in gate["detail"]


def test_a_retraining_run_learns_the_labels_given_since_and_skips_when_nothing_is_new(
    prefect_server, tmp_path, tiny_base_model
):
    """No person between the server's feedback and the next model: the run a schedule or a monitor event starts
    collects the labelled texts into a DVC-versioned dataset, trains on them and records which ones."""
    import subprocess
    import sys

    import pandas as pd
    import yaml

    from langops.demo_data import DEMO_LABELS, generate_demo_dataset
    from langops.flows.pipeline import SkippedRun, training_pipeline
    from langops.io import read_json

    params_path = write_params(tmp_path, tiny_project_params(tmp_path, tiny_base_model))
    for command in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "local", str(tmp_path / ".langops" / "dvc-remote")]):
        subprocess.run([sys.executable, "-m", "dvc", *command], cwd=tmp_path, check=True, capture_output=True)
    client = _client(tmp_path)

    first = training_pipeline(params_path=str(params_path), retraining=True)
    assert (first.version, first.promoted) == ("1", True)  # no champion yet: it trains
    assert "training_feedback" not in client.get_model_version("langops-classifier", "1").tags

    state_before = _registry_state(client)
    idle = training_pipeline(params_path=str(params_path), retraining=True, return_state=True)
    skipped = idle.result()
    assert isinstance(skipped, SkippedRun) and skipped.champion_version == "1"
    assert skipped.reason.startswith("nothing new to learn: the champion, langops-classifier version 1, was trained")
    assert _registry_state(client) == state_before  # no run, no version
    assert set(_task_run_states(idle.state_details.flow_run_id, expected=("prepare",))) == {"collect-feedback", "prepare"}

    # People label what the server answered; it wrote each label with its text (prediction_log_text: labelled).
    labelled = generate_demo_dataset(DEMO_LABELS, 40, seed=99)
    log_dir = tmp_path / ".langops" / "server" / "predictions"
    log_dir.mkdir(parents=True)
    (log_dir / "feedback.jsonl").write_text("".join(
        json.dumps({"time": f"2026-12-0{1 + i // 20}T10:{i % 60:02d}:00.000+00:00", "request_id": f"{i:032x}-0",
                    "label": label, "text": text}) + "\n"
        for i, (text, label) in enumerate(zip(labelled["text"], labelled["label"], strict=True))))
    learned = training_pipeline(params_path=str(params_path), retraining=True)
    assert learned.version == "2"
    dataset = tmp_path / "data" / "raw" / "feedback.csv"
    assert len(pd.read_csv(dataset)) == 40
    md5 = yaml.safe_load((dataset.parent / "feedback.csv.dvc").read_text())["outs"][0]["md5"]
    assert any(path.name == md5[2:] for path in (tmp_path / ".langops" / "dvc-remote").rglob("*"))  # pushed
    assert read_json(tmp_path / "data" / "prepared" / "summary.json")["extra_sources"]["feedback.csv"]["rows"] == 40
    assert client.get_model_version("langops-classifier", "2").tags["training_feedback"] == (
        f"feedback.csv md5 {md5}: 40 rows, labelled 2026-12-01T10:00:00.000+00:00 to 2026-12-02T10:39:00.000+00:00")


DOOMED_FLOW = """
import os, signal
from prefect import flow
from langops.orphaned_runs import runs_tagged_with_this_process

@flow(name="doomed")
def doomed():
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: nothing reports the run's end

with runs_tagged_with_this_process():
    doomed()
"""


def test_a_flow_run_whose_process_was_killed_is_marked_crashed_by_the_next_command(prefect_server):
    import os
    import subprocess
    import sys

    from prefect import flow, get_client
    from prefect.settings import PREFECT_API_URL

    from langops.orphaned_runs import mark_dead_runs_crashed, runs_tagged_with_this_process

    killed = subprocess.run([sys.executable, "-c", DOOMED_FLOW], env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]

    @flow(name="alive")
    def alive() -> list[str]:
        return mark_dead_runs_crashed()  # this run is Running too, but its process is alive

    with runs_tagged_with_this_process():
        marked = alive()

    with get_client(sync_client=True) as client:
        doomed, living = (client.read_flow_by_name(name).id for name in ("doomed", "alive"))
        runs = client.read_flow_runs()
    [dead] = [run for run in runs if run.flow_id == doomed]
    assert marked == [dead.name]
    assert dead.state.type.value == "CRASHED" and "died without ending it" in dead.state.message
    assert [run.state.type.value for run in runs if run.flow_id == living] == ["COMPLETED"]
    assert mark_dead_runs_crashed() == []  # once marked, never again
