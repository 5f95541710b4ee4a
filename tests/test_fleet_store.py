"""A fleet of model servers on one PostgreSQL store, as a team runs it: replicas on different machines (their
own log folders), one of them with two worker processes, reached only through ``$LANGOPS_PREDICTION_STORE``.
A prediction answered by any worker of one replica takes its label through the other replica; the monitor's
window, the feedback export and the CLI read the same rows, straight from PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from pipeline_helpers import REPO_PARAMS, free_port
from postgres_helpers import (
    ServerProcess,
    postgres_unavailable_reason,
    running_postgres,
    running_server_process,
)
from serving_helpers import wait_until

from langops.config import MonitorConfig
from langops.fleet_store import StoreLogs
from langops.monitoring import load_window, read_feedback
from langops.prediction_records import labelled_texts

pytest_plugins = ["serving_helpers"]
pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(postgres_unavailable_reason() is not None, reason=postgres_unavailable_reason() or ""),
]

TEXTS = [f"my parcel {i} never arrived and the tracking page is empty" for i in range(20)]


@pytest.fixture(scope="module")
def store() -> Iterator[str]:
    with running_postgres(["fleet"]) as cluster:
        yield cluster.url("fleet", "postgresql+psycopg2")


@contextmanager
def replica(compressed_dir: Path, log_dir: Path, store: str, *, workers: int) -> Iterator[ServerProcess]:
    """One replica: a server process with its own log folder, told the store by the environment only."""
    port = free_port()
    env = {**os.environ, "LANGOPS_PREDICTION_STORE": store, "LANGOPS_SERVER_TOKEN": ""}
    command = [sys.executable, "-m", "langops.serving", "--model-dir", str(compressed_dir), "--port", str(port),
               "--workers", str(workers), "--prediction-log-dir", str(log_dir)]
    with running_server_process(command, url=f"http://127.0.0.1:{port}", health_path="/ready", env=env,
                                log_path=log_dir.parent / f"{log_dir.name}.log") as server:
        wait_until(lambda: server.log_tail(10**6).count("now serving") >= workers, what=f"{workers} workers to load")
        yield server


def post(url: str, path: str, body: object) -> httpx.Response:
    """A connection per request, as separate clients: the kernel deals them to the replica's workers."""
    return httpx.post(url + path, json=body, timeout=30, trust_env=False)


def test_a_fleet_on_one_postgresql_store_takes_labels_anywhere_and_is_read_as_one(
    compressed_dir: Path, store: str, tmp_path: Path
) -> None:
    here, there = tmp_path / "machine-a" / "predictions", tmp_path / "machine-b" / "predictions"
    with replica(compressed_dir, here, store, workers=2) as first, replica(compressed_dir, there, store,
                                                                           workers=1) as second:
        scored = {}
        for text in TEXTS:
            answer = post(first.url, "/predict", {"text": text})
            assert answer.status_code == 200, answer.text
            scored[f"{answer.headers['X-Request-Id']}-0"] = text
        labels = {name: ("shipping" if i % 2 else "billing") for i, name in enumerate(scored)}
        for name, label in labels.items():
            accepted = post(second.url, "/feedback", {"request_id": name, "label": label})
            assert accepted.status_code == 202, accepted.text  # scored by replica A, labelled through B
        name = next(iter(labels))
        relabel = post(first.url, "/feedback", {"request_id": name, "label": "technical"})
        assert relabel.status_code == 409 and f"was labelled {labels[name]!r}" in relabel.json()["detail"]
        unknown = post(second.url, "/feedback", {"request_id": "never-issued-0", "label": "billing"})
        assert unknown.status_code == 404, unknown.text
        shown = httpx.get(second.url + "/version", timeout=30, trust_env=False).json()
        assert "langops-test-password" not in str(shown) and "***" in shown["settings"]["prediction_store"]

    logs = StoreLogs(store)
    found = labelled_texts(logs)  # the texts the fleet kept for feedback, joined to the labels it took
    assert sorted(found.rows) == sorted((scored[name], label) for name, label in labels.items())
    window = load_window(logs, MonitorConfig(), version="local", feedback=read_feedback(logs.feedback_lines()))
    assert len(window.frame) == len(TEXTS) and window.frame["true_label"].notna().all()
    assert "langops-test-password" not in window.source
    on_disk = [path for folder in (here, there) if folder.exists() for path in folder.rglob("*") if path.is_file()]
    assert on_disk == [], f"the store was configured, yet files were written: {on_disk}"

    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["project"]["state_dir"] = str(tmp_path / ".langops")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    exported = subprocess.run(
        [sys.executable, "-m", "langops.cli", "feedback", "export", "--output", "labelled.csv"], cwd=tmp_path,
        env={**os.environ, "LANGOPS_PREDICTION_STORE": store}, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"wrote {len(TEXTS)} labelled texts" in exported.stdout


def test_two_replicas_claiming_one_text_at_once_on_postgresql_record_one_label(store: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from langops.prediction_records import new_request_id
    from langops.serving.issued_ids import IssuedIds

    replicas = [IssuedIds(store, window_hours=1.0, max_requests=100, queue_size=10) for _ in range(2)]
    try:
        for attempt in range(20):  # the claims race every time; exactly one wins every time
            text = f"{new_request_id()}-0"
            with ThreadPoolExecutor(2) as pool:
                outcomes = list(pool.map(lambda pair: pair[0].claim_labels([(text, pair[1])]),
                                         zip(replicas, ["billing", "shipping"], strict=True)))
            assert sorted(len(conflicts) for conflicts in outcomes) == [0, 1], (attempt, outcomes)
    finally:
        for replica_ids in replicas:
            replica_ids.close()


def test_workers_on_postgresql_share_their_canary_counts_and_read_the_fleets_new_feedback(store: str) -> None:
    from langops.prediction_records import Feedback
    from langops.serving.fleet_windows import FleetWindows
    from langops.serving.prediction_log import FeedbackLog
    from langops.serving.rollout import RolloutWindow

    here, there = (FleetWindows(store, judge_every_s=60.0, worker=name) for name in ("pod-a:7", "pod-b:7"))
    try:
        assert here.new_feedback() == []  # the tail starts now: labels given before are not this window's
        window = RolloutWindow(low_confidence=0.5)
        window.record_answers("challenger", latency_ms=12.0, labels=["billing"], confidences=[0.9], request_id="x")
        assert there.exchange("r-9", 0, RolloutWindow(low_confidence=0.5).counts()) == []
        (theirs,) = here.exchange("r-9", 0, window.counts())  # the same step: pod-b's counts
        assert theirs.requests == {"champion": 0, "challenger": 0}
        (mine,) = there.exchange("r-9", 0, RolloutWindow(low_confidence=0.5).counts())
        assert mine.requests["challenger"] == 1 and mine.latencies["challenger"] == [12.0]
        assert there.exchange("r-9", 1, window.counts()) == []  # pod-a has not reached step 1
        labels = FeedbackLog.in_store(store)
        try:
            labels.record([Feedback("x-0", "shipping")])
        finally:
            labels.close()
        assert here.new_feedback() == [("x-0", "shipping")] and here.new_feedback() == []
    finally:
        here.close()
        there.close()
