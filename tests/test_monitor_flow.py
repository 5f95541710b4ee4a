"""`langops monitor` as a Prefect flow on a real (temporary) Prefect server and a real MLflow SQLite registry.

A tiny model built by the real compress step is registered and promoted; prediction logs in the server's
record schema are written from its reference set, unchanged (control) or drifted. The deployments of the
repository's prefect.yaml are applied to the same server, so the training deployment's trigger is checked
by the server's own automation services.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from pipeline_helpers import flow_run_artifacts, prefect_harness

from langops.config import load_params
from langops.monitor import EVENT_DRIFT, EVENT_FEEDBACK, monitoring_experiment_name

pytest_plugins = ["serving_helpers"]
pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_harness() as api_url:
        yield api_url


def make_project(root: Path, compressed_dir: Path):
    """A project under ``root`` whose champion is the tiny model; params.yaml beside its state."""
    from serving_helpers import empty_registry

    registry = empty_registry(root)
    version = registry.register(compressed_dir)
    registry.promote(version)
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump({"project": {"state_dir": str(root)},
                                           "paths": {"monitoring": str(root / "reports" / "monitoring")},
                                           "monitor": {"retrain_feedback_rows": 40, "cooldown_hours": 6.0}}))
    reference = pd.read_parquet(compressed_dir / "reference.parquet")
    return root, params_path, registry, version, reference


@pytest.fixture(scope="module")
def project(tmp_path_factory, compressed_dir):
    return make_project(tmp_path_factory.mktemp("monitored"), compressed_dir)


def write_log(root: Path, reference: pd.DataFrame, version: str, *, drifted: bool, rows: int = 300,
              seed: int = 0) -> Path:
    """``rows`` records resampled from the reference (the last hour); drifted: long texts full of unknown
    tokens whose embeddings moved."""
    rng = np.random.default_rng(seed)
    sample = reference.iloc[rng.integers(0, len(reference), rows)].reset_index(drop=True)
    now = datetime.now(timezone.utc)
    log_dir = root / "server" / "predictions"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "predictions.jsonl"
    with path.open("w") as handle:
        for i, row in sample.iterrows():
            embedding = np.asarray(row["embedding"], dtype=float)
            record = {
                "time": (now - timedelta(seconds=10 * (rows - i))).isoformat(timespec="milliseconds"),
                "request_id": f"req{seed}-{i}-0", "endpoint": "/predict", "model_name": "langops-classifier",
                "version": version, "label": row["label"], "confidence": float(row["confidence"]),
                "probabilities": {k: float(v) for k, v in row["probabilities"].items() if v is not None},
                "text_chars": int(row["text_chars"]), "tokens": int(row["tokens"]),
                "unknown_share": float(row["unknown_share"]), "embedding": embedding.tolist(),
            }
            if drifted:
                record |= {"text_chars": int(row["text_chars"]) * 4, "tokens": int(row["tokens"]) * 4,
                           "unknown_share": 0.4, "embedding": (embedding + rng.normal(0.3, 0.1, embedding.size)).tolist()}
            handle.write(json.dumps(record) + "\n")
    return path


def run_monitor(params_path: Path, **overrides):
    from langops.flows.monitor import monitor_pipeline

    state = monitor_pipeline(params_path=str(params_path), overrides=[f"{k}={v}" for k, v in overrides.items()],
                             return_state=True)
    return state.state_details.flow_run_id, state.result()


def monitor_events(api: str) -> list[dict]:
    reply = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["langops.monitor."]}},
                                                    "limit": 50}, timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.json()["events"]


def training_runs(api: str) -> list[dict]:
    reply = httpx.post(f"{api}/flow_runs/filter",
                       json={"deployments": {"name": {"any_": ["langops-training"]}}}, timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.json()


def wait_for(fetch, count: int, *, timeout: float = 90.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = fetch()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def test_drift_is_reported_emitted_and_retrains_once_while_a_clean_window_emits_nothing(prefect_api, project,
                                                                                     monkeypatch):
    from langops.services import apply_deployments

    root, params_path, registry, version, reference = project
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    applied = apply_deployments(load_params(params_path), project_dir=REPO, prefect_file=REPO / "prefect.yaml")
    assert {"langops-training", "langops-monitor"} <= {d.name for d in applied}

    # The control window: the reference itself, resampled. A report, a run, an artifact; no event.
    write_log(root, reference, version, drifted=False)
    flow_run_id, clean = run_monitor(params_path)
    assert clean.verdict == "ok", clean.reasons
    assert clean.event is None and clean.suppressed is None
    assert {"drift-report.md", "drift-report.json", "scores.png"} <= {p.name for p in Path(clean.report_dir).iterdir()}
    artifact = flow_run_artifacts(flow_run_id, api_url=prefect_api)["drift-report"]
    assert "OK: no drift" in artifact["data"] and clean.run_id in artifact["data"]

    client = MlflowClient(tracking_uri=registry.tracking_uri)
    run = client.get_run(clean.run_id)
    assert client.get_experiment(run.info.experiment_id).name == monitoring_experiment_name(load_params(params_path))
    metrics = run.data.metrics
    assert metrics["rows"] == 300
    for check in ("predicted_labels", "confidence", "text_length", "unknown_share", "embedding_classifier",
                  "embedding_mmd"):
        assert f"{check}.score" in metrics and 0 <= metrics[f"{check}.p_value"] <= 1, check
    assert "estimated_accuracy" in metrics and metrics["drift"] == 0
    assert run.data.tags["langops.monitor.event"] == "none"
    stored = {f.path for f in client.list_artifacts(clean.run_id, "report")}
    assert {"report/drift-report.md", "report/drift-report.json"} <= stored

    # The drifted window: drift, one event naming the model version and carrying the report's run.
    write_log(root, reference, version, drifted=True, seed=1)
    flow_run_id, drifted = run_monitor(params_path)
    assert drifted.verdict == "drift"
    assert drifted.event == EVENT_DRIFT and drifted.event_id
    assert "DRIFT" in flow_run_artifacts(flow_run_id, api_url=prefect_api)["drift-report"]["data"]
    events = wait_for(lambda: monitor_events(prefect_api), 1)
    assert [e["event"] for e in events] == [EVENT_DRIFT]
    (event,) = events
    assert event["id"] == drifted.event_id
    assert event["resource"]["prefect.resource.id"] == f"langops.model.langops-classifier.{version}"
    assert event["resource"]["langops.model.version"] == version
    assert event["payload"]["mlflow_run_id"] == drifted.run_id
    assert event["payload"]["metrics"]["text_length.score"] > 0.5
    assert client.get_run(drifted.run_id).data.tags["langops.monitor.event"] == EVENT_DRIFT

    # The trigger of prefect.yaml, as an automation on this server, scheduled one training run for it.
    runs = wait_for(lambda: training_runs(prefect_api), 1)
    assert len(runs) == 1
    assert runs[0]["parameters"] == {
        "params_path": "params.yaml", "overrides": [], "dataset": None, "retraining": True,
        "trigger": {"event": EVENT_DRIFT, "monitor_run_id": drifted.run_id,
                    "report_dir": drifted.report_dir},  # rendered from the event: history links the report
    }

    # The same drift again, within the cool-down: reported, but no second event and no second training.
    flow_run_id, again = run_monitor(params_path)
    assert again.verdict == "drift" and again.event is None and again.suppressed == EVENT_DRIFT
    assert any("cool-down" in reason for reason in again.event_reasons)
    time.sleep(8)  # longer than the event persister's flush interval
    assert len(monitor_events(prefect_api)) == 1
    assert len(training_runs(prefect_api)) == 1


def test_new_feedback_past_the_count_emits_the_feedback_event_and_too_few_rows_emit_nothing(prefect_api, project):
    root, params_path, _registry, version, reference = project
    write_log(root, reference, version, drifted=False, seed=2)
    feedback = root / "server" / "predictions" / "feedback.jsonl"
    now = datetime.now(timezone.utc).isoformat()
    feedback.write_text("".join(json.dumps({"time": now, "request_id": f"req2-{i}-0", "label": "billing"}) + "\n"
                                for i in range(45)))
    try:
        _, result = run_monitor(params_path, **{"monitor.cooldown_hours": 0})
        assert result.event == EVENT_FEEDBACK, result.event_reasons
        assert any("45 feedback labels" in reason for reason in result.event_reasons)
        assert EVENT_FEEDBACK in [e["event"] for e in wait_for(lambda: monitor_events(prefect_api), 2)]

        _, few = run_monitor(params_path, **{"monitor.cooldown_hours": 0, "monitor.min_rows": 1000})
        assert few.verdict == "no_verdict" and few.event is None
        assert "no verdict" in few.event_reasons[0]
    finally:
        feedback.unlink()


def test_a_monitor_killed_while_sending_its_event_leaves_it_pending_and_the_next_run_sends_it_once(
    prefect_api, tmp_path, compressed_dir
):
    from langops.faults import COMMAND_POINTS, CRASH_AT_ENV

    root, params_path, registry, version, reference = make_project(tmp_path, compressed_dir)
    write_log(root, reference, version, drifted=True, seed=3)

    def monitor(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "langops.cli", "monitor", "--params", str(params_path)],
                              env={**os.environ, "PREFECT_API_URL": prefect_api, **env}, cwd=root,
                              capture_output=True, text=True, timeout=300, check=False)

    assert "monitor:sent" in COMMAND_POINTS
    killed = monitor(**{CRASH_AT_ENV: "monitor:sent"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    experiment = client.get_experiment_by_name(monitoring_experiment_name(load_params(params_path)))
    (pending,) = client.search_runs([experiment.experiment_id], "tags.`langops.monitor.emission` = 'pending'")
    event_id = pending.data.tags["langops.monitor.event_id"]

    again = monitor()

    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_run(pending.info.run_id).data.tags["langops.monitor.emission"] == "sent"
    runs = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 2
    time.sleep(8)  # longer than the event persister's flush interval
    ours = [event for event in monitor_events(prefect_api) if event["payload"]["mlflow_run_id"] in runs]
    assert [event["id"] for event in ours] == [event_id]  # sent once, under the id recorded before the kill
