"""The production loop on real services: drift in served traffic retrains, gates and swaps the model by itself.

`langops up` runs the Prefect server and worker and the MLflow server; `langops deploy` applies prefect.yaml,
whose training deployment has a trigger on the monitor's events. A champion serves. Clean traffic is judged
first (the control: no event, no training). Then traffic with new vocabulary arrives, people label it
(`POST /feedback`; the server keeps a text only once it is labelled), and one run of the monitor deployment has
to do the rest on its own: detect the drift, emit the event, and the trigger's training run on the worker
collects the labelled texts into the feedback dataset, trains on them, passes the gate, and the server swaps to
it while a client keeps calling it. No person exports anything.

The first champion is deliberately undertrained (a learning rate of 1e-9), so that the retrained model beats it
beyond noise whatever a tiny random model makes of the new rows; the gate's guards (calibration, per-class
recall) are off because a tiny random model's calibration is noise. What is under test is the loop.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from pipeline_helpers import flow_run_artifacts, free_port, tiny_project_params, write_params
from services_helpers import down_and_kill_leftovers, langops, ok_json
from serving_helpers import RequestLoop, wait_for_version

from langops.demo_data import DEMO_LABELS, generate_demo_dataset
from langops.monitor import EVENT_DRIFT

pytestmark = pytest.mark.services

FLOW_TIMEOUT_S = 900
MONITOR = "langops-monitor/langops-monitor"
TRAINING = "langops-training-pipeline/langops-training"


@contextmanager
def serving_project(root: Path, tiny_base_model: Path, **deploy: object) -> Iterator[tuple[Path, dict, dict]]:
    """`langops up`, `langops deploy`, and an undertrained first champion serving: (root, params, URLs)."""
    params = tiny_project_params(
        root, tiny_base_model,
        data={"source": "demo", "labels": list(DEMO_LABELS), "demo_rows": 360,
              "extra_sources": ["data/raw/feedback.csv"]},
        deploy={"enabled": True, "port": free_port(), "poll_seconds": 0.5, **deploy},  # texts: labelled, the default
        services={"prefect_port": free_port(), "mlflow_port": free_port(), "start_timeout_s": 180.0},
        monitor={"window_hours": 1.0, "min_rows": 200, "cooldown_hours": 6.0, "retrain_feedback_rows": 100_000},
    )
    params["train"] |= {"max_epochs": 10, "learning_rate": 0.003, "batch_size": 16}  # macro-F1 about 0.6 on 760 rows
    params["promote"]["guards"] = {}
    write_params(root, params)
    try:
        for command in (["up"], ["deploy"], ["run", "--set", "train.learning_rate=1e-9", "--set", "train.max_epochs=1"]):
            result = langops(root, *command, timeout=900)
            assert result.returncode == 0, f"langops {command}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        urls = {"prefect": f"http://127.0.0.1:{params['services']['prefect_port']}/api",
                "mlflow": f"http://127.0.0.1:{params['services']['mlflow_port']}",
                "server": f"http://127.0.0.1:{params['deploy']['port']}"}
        with httpx.Client(base_url=urls["server"], timeout=30) as server:
            wait_for_version(server, "1")
        yield root, params, urls
    finally:
        down_and_kill_leftovers(root)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_model):
    with serving_project(tmp_path_factory.mktemp("retrain-loop"), tiny_base_model) as project:
        yield project


def logged_in_files(root: Path) -> Callable[[], int]:
    """Predictions in the server's log folder (the embedded default)."""
    folder = root / ".langops" / "server" / "predictions"
    return lambda: sum(len(path.read_text().splitlines()) for path in folder.glob("predictions*.jsonl"))


def test_drift_retrains_gates_and_swaps_by_itself_while_clean_traffic_raises_nothing(served):
    root, _, _ = served
    closes_the_loop(*served, logged=logged_in_files(root))


def closes_the_loop(root: Path, params: dict, urls: dict, *, logged: Callable[[], int]) -> None:
    """Clean traffic raises nothing; drifted, labelled traffic retrains, gates and swaps by itself."""
    mlflow = MlflowClient(tracking_uri=urls["mlflow"], registry_uri=urls["mlflow"])
    model = params["register"]["model_name"]

    # The control: traffic like the training data. A verdict, a report, no event, no training.
    clean = generate_demo_dataset(DEMO_LABELS, 300, seed=101)
    predict_each(urls["server"], clean["text"], prefix="clean")
    wait_for_logged(logged, 300)
    control = run_deployment(urls["prefect"], MONITOR)
    control_run = latest_monitoring_run(mlflow, params)
    assert control_run.data.tags["langops.monitor.verdict"] == "ok", control_run.data.tags["langops.monitor.reasons"]
    assert control_run.data.tags["langops.monitor.event"] == "none"
    assert control["state_type"] == "COMPLETED"
    # Its report is one page, served by the MLflow server and linked from the flow run.
    link = flow_run_artifacts(control["id"], api_url=urls["prefect"])["drift-report-page"]["data"]
    assert f"/runs/{control_run.info.run_id}/artifacts/report/drift-report.html" in link, link
    page = httpx.get(f"{urls['mlflow']}/get-artifact", timeout=30,
                     params={"path": "report/drift-report.html", "run_uuid": control_run.info.run_id})
    assert page.status_code == 200 and page.text.startswith("<!doctype html>") and 'data-verdict="ok"' in page.text

    # The world changes: new products, devices and slang. People label what the model met.
    drifted = generate_demo_dataset(DEMO_LABELS, 400, seed=202, drift="new_vocabulary")
    predict_each(urls["server"], drifted["text"], prefix="drift")
    labels = [{"request_id": f"drift-{i}-0", "label": label} for i, label in enumerate(drifted["label"])]
    for start in range(0, len(labels), 100):  # a connection each: any worker takes them
        accepted = httpx.post(f"{urls['server']}/feedback", json=labels[start:start + 100], timeout=30)
        assert accepted.status_code == 202 and accepted.json()["accepted"] == len(labels[start:start + 100])
    held_back = generate_demo_dataset(DEMO_LABELS, 200, seed=404, drift="new_vocabulary")  # never labelled
    before = accuracy(urls["server"], held_back, expected_version="1")
    wait_for_logged(logged, 900)
    assert not (root / "data" / "raw" / "feedback.csv").exists()  # nobody exports
    assert no_manual_training_runs(urls["prefect"]) == []

    # One monitor run; everything after it happens by itself, while a client keeps calling the server.
    later_traffic = generate_demo_dataset(DEMO_LABELS, 500, seed=303, drift="new_vocabulary")["text"]
    with RequestLoop(urls["server"], texts=later_traffic) as requests, \
            httpx.Client(base_url=urls["server"], timeout=30) as server:
        run_deployment(urls["prefect"], MONITOR)
        drift_run = latest_monitoring_run(mlflow, params)
        assert drift_run.data.tags["langops.monitor.verdict"] == "drift"
        assert drift_run.data.tags["langops.monitor.event"] == EVENT_DRIFT
        training = wait_for_flow_run(urls["prefect"], lambda: no_manual_training_runs(urls["prefect"]))
        assert training["state_type"] == "COMPLETED", training["state"]
        wait_for_version(server, "2")
    assert requests.failures == [], requests.failures[:5]
    assert {"1", "2"} <= requests.versions
    wait_for_every_worker(urls["server"], "2")
    after = accuracy(urls["server"], held_back, expected_version="2")
    print(f"held-back drifted rows, accuracy: version 1 {before:.3f}, version 2 {after:.3f}")
    assert after > before + 0.1, f"drifted rows held back: {before:.3f} before, {after:.3f} after retraining"

    # The trigger handed the event to the training run, which trained on the labelled production rows.
    assert training["parameters"]["trigger"]["event"] == EVENT_DRIFT and training["parameters"]["retraining"] is True
    assert training["parameters"]["trigger"]["monitor_run_id"] == drift_run.info.run_id
    summary = json.loads((root / "data" / "prepared" / "summary.json").read_text())
    assert summary["extra_sources"]["feedback.csv"]["rows"] == 400  # collected by the run itself
    version = mlflow.get_model_version(model, "2")
    assert "champion" in version.aliases and version.tags["langops.decision"] == "promoted"

    # History shows the chain: the promotion, and the event with the drift report that started it.
    history = langops(root, "history")
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    promoted = next(i for i, line in enumerate(lines) if re.search(r"\bpromote\s+1 → 2\b", line))
    report_dir = drift_run.data.tags["mlflow.runName"].rsplit(" ", 1)[-1]
    assert lines[promoted + 1].strip().startswith(f"started by {EVENT_DRIFT}: drift report "), history.stdout
    assert report_dir in lines[promoted + 1] and drift_run.info.run_id in lines[promoted + 1]
    assert lines[promoted + 2].strip().startswith("learned from feedback feedback.csv md5 "), history.stdout
    assert ": 400 rows, labelled " in lines[promoted + 2]
    assert Path(root / "reports" / "monitoring" / report_dir / "drift-report.md").is_file()


# ---------------------------------------------------------------------------------------------- helpers


def predict_each(url: str, texts, *, prefix: str) -> None:
    """One request per text, ids ``<prefix>-<i>`` (the text ids ``<prefix>-<i>-0`` that feedback names)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for i, text in enumerate(texts):
            ok_json(client.post("/predict", json={"text": text}, headers={"X-Request-Id": f"{prefix}-{i}"}))


def wait_for_every_worker(url: str, version: str, timeout: float = 60.0) -> None:
    """Until ten answers in a row, each on a connection of its own (any worker), come from ``version``."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < 10:
        assert time.monotonic() < deadline, f"not every worker serves version {version}"
        served = httpx.get(f"{url}/version", timeout=30).json()["version"]
        in_a_row = in_a_row + 1 if served == version else 0
        time.sleep(0.1)


def accuracy(url: str, rows, *, expected_version: str) -> float:
    """Share of ``rows`` (text, label) the served model labels right, every answer from ``expected_version``."""
    right = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(rows), 50):
            chunk = rows.iloc[start:start + 50]
            answer = ok_json(client.post("/predict", json={"texts": list(chunk["text"])}))
            assert answer["version"] == expected_version, answer["version"]
            right += sum(p["label"] == label for p, label in zip(answer["predictions"], chunk["label"], strict=True))
    return right / len(rows)


def wait_for_logged(logged: Callable[[], int], rows: int, timeout: float = 60.0) -> None:
    """The prediction log is written off the request path: wait until it holds ``rows`` records."""
    deadline = time.monotonic() + timeout
    while True:
        count = logged()
        if count >= rows or time.monotonic() > deadline:
            assert count >= rows, f"{count} predictions logged, expected {rows}"
            return
        time.sleep(0.5)


def run_deployment(api: str, name: str) -> dict:
    """Start a run of deployment ``name`` on the worker and wait for it to finish."""
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = ok_json(client.get(f"/deployments/name/{name}"))
        flow_run = ok_json(client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}))
    finished = wait_for_flow_run(api, lambda: [flow_run])
    assert finished["state_type"] == "COMPLETED", finished["state"]
    return finished


def wait_for_flow_run(api: str, find, timeout: float = FLOW_TIMEOUT_S) -> dict:
    """Wait until ``find()`` names a flow run and that run has ended; its last state."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api, timeout=30) as client:
        while time.monotonic() < deadline:
            found = find()
            if found:
                flow_run = ok_json(client.get(f"/flow_runs/{found[0]['id']}"))
                if flow_run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    return flow_run
            time.sleep(2)
    raise AssertionError(f"no flow run ended within {timeout:g}s: {find()}")


def no_manual_training_runs(api: str) -> list[dict]:
    """Runs of the training deployment that its nightly schedule did not create (the trigger's, here)."""
    reply = ok_json(httpx.post(f"{api}/flow_runs/filter", timeout=30,
                               json={"deployments": {"name": {"any_": ["langops-training"]}}}))
    return [run for run in reply if not run["auto_scheduled"]]


def latest_monitoring_run(client: MlflowClient, params: dict):
    experiment = client.get_experiment_by_name(f"{params['tracking']['experiment']}-monitoring")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return run
