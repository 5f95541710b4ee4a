"""The model server's production surface over real HTTP: MLflow formats, metrics, limits, auth,
overload, batching, the prediction log and graceful shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from langops.config import DeployConfig, ServerConfig
from langops.onnx_model import Scores
from langops.serving.app import ServerSettings, parse_model_uri
from langops.serving.prediction_log import PredictionLog, PredictionLogConfig

pytest_plugins = ["serving_helpers"]
from conftest import LABELS
from serving_helpers import LiveServer, free_port, running_server, serving_local, wait_for_version, wait_until

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["my invoice is wrong", "where is my parcel?", "the app crashes when I log in"]
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def server(compressed_dir: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), max_request_texts=8, max_text_chars=200,
                              max_body_bytes=BODY_LIMIT)
    with serving_local(settings) as live:
        yield live


@pytest.fixture(scope="module")
def classifier(compressed_dir: Path):
    from langops.onnx_model import OnnxClassifier

    return OnnxClassifier.load(compressed_dir)


def prediction_rows(probs: np.ndarray) -> list[dict]:
    """What the pyfunc returns for ``probs``, as MLflow's JSON rows (computed independently here)."""
    rows = []
    for row in probs:
        item = {"label": LABELS[int(row.argmax())], "confidence": float(row.max())}
        item.update({f"prob_{label}": float(p) for label, p in zip(LABELS, row, strict=True)})
        rows.append(item)
    return rows


@pytest.mark.model
@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}, "application/json"),
        ({"dataframe_records": [{"text": t} for t in TEXTS]}, "application/json"),
        ({"instances": [{"text": t} for t in TEXTS]}, "application/json"),
        ({"instances": TEXTS}, "application/json"),
        ({"inputs": {"text": TEXTS}}, "application/json"),
        ({"inputs": TEXTS}, "application/json; charset=utf-8"),
        (pd.DataFrame({"text": TEXTS}).to_csv(index=False), "text/csv"),
    ],
    ids=["dataframe_split", "dataframe_records", "instances-records", "instances-list", "inputs-columns",
         "inputs-list", "csv"],
)
def test_invocations_formats(client: httpx.Client, classifier, content: object, content_type: str) -> None:
    body = content if isinstance(content, str) else json.dumps(content)
    response = client.post("/invocations", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "local"
    predictions = response.json()["predictions"]
    expected = prediction_rows(classifier.predict_proba(TEXTS))
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    for got, want in zip(predictions, expected, strict=True):
        assert set(got) == set(want)
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)


@pytest.mark.model
def test_invocations_parquet(client: httpx.Client) -> None:
    buffer = io.BytesIO()
    pd.DataFrame({"text": TEXTS}).to_parquet(buffer)
    response = client.post("/invocations", content=buffer.getvalue(),
                           headers={"content-type": "application/vnd.apache.parquet"})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == len(TEXTS)


@pytest.mark.model
def test_a_request_alone_matches_the_classifier_exactly(client: httpx.Client, classifier) -> None:
    response = client.post("/predict", json={"texts": TEXTS})
    expected = classifier.predict_proba(TEXTS)
    got = np.array([[p["probabilities"][label] for label in LABELS] for p in response.json()["predictions"]])
    assert np.array_equal(got, expected)


@pytest.mark.model
@pytest.mark.parametrize(
    ("content", "content_type", "status", "error_code", "message"),
    [
        (b'{"dataframe_split": ', "application/json", 400, "BAD_REQUEST", "valid JSON"),
        (b'{"text": ["a"]}', "application/json", 400, "BAD_REQUEST", "dataframe_split"),
        (b'["a", "b"]', "application/json", 400, "BAD_REQUEST", "Received a list"),
        (b'{"dataframe_records": [{"txt": "a"}]}', "application/json", 400, "INVALID_PARAMETER_VALUE", "text"),
        (b'{"dataframe_records": [{"text": "a"}, {"text": 3}]}', "application/json", 400, "BAD_REQUEST", "rows [1]"),
        (b'\xff\xfe{"inputs": ["a"]}', "application/json", 400, "BAD_REQUEST", "valid JSON"),
        (json.dumps({"inputs": ["x"] * 9}).encode(), "application/json", 413, "RESOURCE_LIMIT_EXCEEDED",
         "limit is 8"),
        (json.dumps({"inputs": ["x" * 201]}).encode(), "application/json", 413, "RESOURCE_LIMIT_EXCEEDED",
         "limit is 200"),
    ],
    ids=["malformed-json", "no-format-key", "bare-list", "missing-column", "number-text", "not-utf8", "too-many",
         "too-long"],
)
def test_invocations_errors_in_mlflow_shape(
    client: httpx.Client, content: bytes, content_type: str, status: int, error_code: str, message: str
) -> None:
    response = client.post("/invocations", content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == error_code and message in body["message"]


@pytest.mark.model
def test_invocations_refuses_other_content_types(client: httpx.Client) -> None:
    response = client.post("/invocations", content=b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "only supports the following content types" in response.text
    response = client.post("/invocations", content=b"{}", headers={"content-type": "application/json; charset=latin-1"})
    assert response.status_code == 415 and "UTF-8" in response.text


@pytest.mark.model
def test_predict_refuses_bytes_that_are_not_utf8(client: httpx.Client) -> None:
    response = client.post("/predict", content=b'{"text": "caf\xe9"}', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid UTF-8: byte 13" in response.json()["detail"]


@pytest.mark.model
def test_lone_surrogates_are_refused_not_crashed_on(client: httpx.Client) -> None:
    body = b'{"texts": ["fine", "broken \\ud800 text"]}'
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "text 1 is not valid Unicode" in response.json()["detail"]
    assert client.post("/predict", json={"text": "still alive?"}).status_code == 200


@pytest.mark.model
def test_body_size_limit_declared_and_streamed(client: httpx.Client) -> None:
    big = json.dumps({"texts": ["x" * 100] * 50}).encode()
    assert len(big) > BODY_LIMIT
    declared = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and f"limit is {BODY_LIMIT} bytes" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    streamed = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and f"over the limit of {BODY_LIMIT} bytes" in streamed.json()["detail"]
    small = json.dumps({"texts": TEXTS}).encode()
    chunked_ok = client.post("/predict", content=iter([small[:10], small[10:]]),
                             headers={"content-type": "application/json"})
    assert chunked_ok.status_code == 200
    assert client.post("/invocations", content=big, headers={"content-type": "application/json"}).json()[
        "error_code"] == "RESOURCE_LIMIT_EXCEEDED"


@pytest.mark.model
def test_metrics(client: httpx.Client) -> None:
    assert client.post("/predict", json={"texts": TEXTS}).status_code == 200
    assert client.post("/predict", json={"texts": []}).status_code == 422
    text = client.get("/metrics").text
    assert 'langops_requests_total{endpoint="/predict",status="200"}' in text
    assert 'langops_requests_total{endpoint="/predict",status="422"}' in text
    assert 'langops_errors_total{endpoint="/predict",kind="client_error"}' in text
    assert 'langops_request_latency_seconds_bucket{endpoint="/predict",le="0.25"}' in text
    assert "langops_batch_size_count" in text and "langops_queue_depth 0.0" in text
    assert 'langops_model_info{model_name="compressed",version="local"} 1.0' in text
    scored = [line for line in text.splitlines() if line.startswith('langops_texts_scored_total{endpoint="/predict"}')]
    assert float(scored[0].split()[-1]) >= len(TEXTS)


@pytest.mark.model
def test_openapi_documents_every_endpoint(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/health", "/ready", "/version", "/metrics", "/predict", "/invocations", "/reload"} <= set(spec["paths"])
    predict = spec["paths"]["/predict"]["post"]
    assert "texts" in predict["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "413", "422", "503"} <= set(predict["responses"])
    invocations = spec["paths"]["/invocations"]["post"]
    examples = invocations["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"dataframe_split", "dataframe_records", "instances", "inputs"}
    assert "PredictResponse" in spec["components"]["schemas"]


@pytest.mark.model
def test_concurrent_requests_share_batches(compressed_dir: Path) -> None:
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), max_wait_ms=100.0, max_batch_size=16)
    with running_server(settings) as live, live.client() as client:
        wait_for_version(client, "local")
        results: list[int] = []
        threads = [threading.Thread(target=lambda t=text: results.append(
            httpx.post(f"{live.url}/predict", json={"text": t}, timeout=30, trust_env=False).status_code))
            for text in TEXTS * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [200] * len(threads)
        metrics = client.get("/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("langops_batch_size_count"))
    total = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("langops_batch_size_sum"))
    assert total == len(threads)  # every text went through the batcher once (the smoke test bypasses it)
    assert count < len(threads), f"{len(threads)} concurrent requests took {count} batches"


@pytest.mark.model
def test_overload_sheds_with_503_and_retry_after(compressed_dir: Path) -> None:
    # A batch waits 300 ms to fill and at most 4 texts may wait: the first two requests fill the queue.
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), max_queue=4, max_wait_ms=300.0,
                              retry_after_s=2)
    with running_server(settings) as live, live.client() as client:
        wait_for_version(client, "local")
        too_big = client.post("/predict", json={"texts": ["a", "b", "c", "d", "e"]})
        assert too_big.status_code == 503 and too_big.headers["Retry-After"] == "2"
        responses: list[httpx.Response] = []
        lock = threading.Lock()

        def send() -> None:
            response = httpx.post(f"{live.url}/predict", json={"texts": ["a", "b"]}, timeout=30, trust_env=False)
            with lock:
                responses.append(response)

        threads = [threading.Thread(target=send) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses, statuses
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "2" and "overloaded" in r.json()["detail"] for r in shed)
        assert client.post("/predict", json={"text": "still answering"}).status_code == 200
        assert 'langops_errors_total{endpoint="/predict",kind="unavailable"}' in client.get("/metrics").text


@pytest.mark.model
def test_bearer_token(compressed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGOPS_TEST_TOKEN", "s3cret-token")
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), auth_token_env="LANGOPS_TEST_TOKEN")
    with running_server(settings) as live, live.client() as client:
        assert client.get("/health").status_code == 200 and client.get("/ping").status_code == 200
        for method, path in [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/version"), ("POST", "/predict"),
                             ("POST", "/invocations"), ("GET", "/openapi.json")]:
            response = client.request(method, path, json={"text": "hi"})
            assert response.status_code == 401, path
            assert response.headers["WWW-Authenticate"] == "Bearer"
        wrong = client.post("/predict", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
        auth = {"Authorization": "Bearer s3cret-token"}
        wait_until(lambda: client.get("/ready", headers=auth).status_code == 200, what="the model")
        assert client.post("/predict", json={"text": "hi"}, headers=auth).status_code == 200
        invocation = client.post("/invocations", json={"inputs": ["hi"]})
        assert invocation.status_code == 401 and invocation.json()["error_code"] == "UNAUTHENTICATED"


@pytest.mark.model
def test_prediction_log_hashes_and_rotates(compressed_dir: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "predictions"
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), prediction_log_dir=log_dir,
                              prediction_log_max_bytes=2048, prediction_log_backups=2, prediction_log_text="sha256")
    with running_server(settings) as live, live.client() as client:
        wait_for_version(client, "local")
        for index in range(40):
            assert client.post("/predict", json={"texts": [f"text number {index}", "again"]}).status_code == 200
        assert client.post("/invocations", json={"inputs": ["via mlflow"]}).status_code == 200
        wait_until(lambda: "via mlflow" in _logged_hashes(log_dir), what="the last record")
        text = client.get("/metrics").text
    files = sorted(path.name for path in log_dir.glob("predictions*"))
    assert files == ["predictions.jsonl", "predictions.jsonl.1", "predictions.jsonl.2"]
    assert (log_dir / "issued-ids.sqlite3").is_file()  # the ids feedback may name, beside the log
    assert all((log_dir / name).stat().st_size <= 2048 for name in files)
    records = [json.loads(line) for name in files for line in (log_dir / name).read_text().splitlines()]
    assert all("text" not in r and r["version"] == "local" and set(r["probabilities"]) == set(LABELS) for r in records)
    newest = [json.loads(line) for line in (log_dir / "predictions.jsonl").read_text().splitlines()]
    assert newest[-1]["endpoint"] == "/invocations"
    assert newest[-1]["text_sha256"] == hashlib.sha256(b"via mlflow").hexdigest()
    assert "langops_prediction_log_written_total 81.0" in text


def _logged_hashes(log_dir: Path) -> dict[str, str]:
    path = log_dir / "predictions.jsonl"
    found = set(path.read_text().split('"text_sha256": "')) if path.is_file() else set()
    wanted = {"via mlflow": hashlib.sha256(b"via mlflow").hexdigest()}
    return {text: digest for text, digest in wanted.items() if any(part.startswith(digest) for part in found)}


def _scores(probs: np.ndarray) -> Scores:
    """Scores as the classifier returns them, for log tests that need no model."""
    n = len(probs)
    embeddings = np.full((n, 32), 1 / np.sqrt(32), dtype=np.float32)
    return Scores(probs, embeddings, np.full(n, 3), np.zeros(n))


@pytest.mark.unit
def test_prediction_log_sampling_and_plain_texts(tmp_path: Path) -> None:
    import random

    config = PredictionLogConfig(directory=tmp_path, sample_rate=0.25, text="raw", max_bytes=10**6,
                                 backups=1, queue_size=10_000)
    log = PredictionLog(config, rng=random.Random(7))
    scores = _scores(np.array([[0.7, 0.2, 0.1]]))
    for index in range(2000):
        log.record(request_id=f"r{index}", endpoint="/predict", model_name="m", version="1", texts=[f"t{index}"],
                   labels=LABELS, scores=scores)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert 400 < len(records) < 600  # 2000 x 0.25, with room for chance
    assert records[0]["text"].startswith("t") and records[0]["label"] == LABELS[0]


@pytest.mark.unit
def test_prediction_log_drops_and_counts_when_the_queue_is_full(tmp_path: Path) -> None:
    dropped: list[int] = []
    config = PredictionLogConfig(directory=tmp_path, sample_rate=1.0, text="sha256", max_bytes=10**6,
                                 backups=1, queue_size=1)
    log = PredictionLog(config, on_dropped=dropped.append)
    started = time.perf_counter()
    scores = _scores(np.full((2, 3), 1 / 3))
    for index in range(2000):
        log.record(request_id=f"r{index}", endpoint="/predict", model_name="m", version="1", texts=["a", "b"],
                   labels=LABELS, scores=scores)
    elapsed = time.perf_counter() - started
    log.close()
    written = len((tmp_path / "predictions.jsonl").read_text().splitlines())
    assert sum(dropped) > 0 and written + sum(dropped) == 4000
    assert elapsed < 2.0  # recording never waited for the writer


@pytest.mark.services
def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(compressed_dir: Path) -> None:
    port = free_port()
    # Every batch waits 1.5 s for company: the request below is still in flight when SIGTERM arrives.
    process = subprocess.Popen(
        [sys.executable, "-m", "langops.serving", "--model-dir", str(compressed_dir), "--port", str(port),
         "--max-wait-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), what="the subprocess server")
        outcome: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: outcome.setdefault(
            "response", httpx.post(f"{url}/predict", json={"text": "slow one"}, timeout=30, trust_env=False)))
        sender.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: not _accepts(url), what="the listening socket to close", timeout=5)
        sender.join(30)
        assert outcome["response"].status_code == 200
        assert len(outcome["response"].json()["predictions"]) == 1
        # uvicorn re-raises the signal it caught once shutdown is complete, so a clean exit reads -15
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Waiting for connections to close" in output or "Shutting down" in output, output


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _accepts(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1, trust_env=False)
    except httpx.ConnectError:
        return False
    except httpx.HTTPError:
        return True
    return True


@contextlib.contextmanager
def _two_workers(compressed_dir: Path, *options: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """A ready two-worker server (with more command-line ``options``) in its own process group, its output in
    a file (an orphaned worker holding a pipe would hang the reader); the whole group is killed on the way out."""
    port = free_port()
    output = compressed_dir.parent / f"two-workers-{port}.log"
    with output.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "langops.serving", "--model-dir", str(compressed_dir), "--port", str(port),
             "--workers", "2", *options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "LANGOPS_SERVER_TOKEN": ""},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # /ready is one worker's answer; each worker loads the model on its own, and says so in the log
        wait_until(lambda: output.read_text().count("now serving") >= 2 or process.poll() is not None,
                   what="both workers to load the model")
        assert process.poll() is None and _ready(url), output.read_text()
        yield process, url, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


def _workers(process: subprocess.Popen) -> list[psutil.Process]:
    """The uvicorn workers of ``process`` (multiprocessing children, not its resource tracker)."""
    return [p for p in psutil.process_iter() if _in_group(p, process.pid) and p.pid != process.pid
            and "spawn_main" in " ".join(p.cmdline())]


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ProcessLookupError):
        return False


@pytest.mark.services
def test_workers_share_the_port_and_each_scrape_counts_what_all_of_them_did(compressed_dir: Path) -> None:
    with _two_workers(compressed_dir) as (process, url, output):
        # A connection per request, as separate clients: the kernel deals them to both workers.
        answers = [httpx.post(f"{url}/predict", json={"text": f"hello {i}"}, timeout=30, trust_env=False)
                   for i in range(20)]
        assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text[:300]) for a in answers]
        for _ in range(8):  # whichever worker answers the scrape
            scrape = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
            assert 'langops_texts_scored_total{endpoint="/predict"} 20.0' in scrape, scrape[:3000]
            assert 'langops_model_info{model_name="compressed",version="local"} 1.0' in scrape
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
    assert output.read_text().count("Application startup complete") == 2, output.read_text()


@pytest.mark.services
def test_workers_stop_when_their_supervisor_is_killed(compressed_dir: Path) -> None:
    with _two_workers(compressed_dir) as (process, url, output):
        workers = _workers(process)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        process.kill()  # SIGKILL: the supervisor cannot pass anything on to its workers
        process.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"orphaned workers still serve: {[w.pid for w in alive]}\n{output.read_text()}"
        assert not _accepts(url)
        assert output.read_text().count("this worker stops") == 2, output.read_text()


@pytest.mark.services
def test_feedback_reaches_any_worker_and_lands_on_the_text_it_names(compressed_dir: Path, tmp_path: Path) -> None:
    """Each worker writes its own prediction and feedback files (named by its pid), so the files say which
    worker scored a text and which took its label; feedback is sent until some label has reached a worker
    other than the one that scored its text."""
    log_dir = tmp_path / "predictions"
    with _two_workers(compressed_dir, "--prediction-log-dir", str(log_dir), "--prediction-log-text", "raw") as (
            _, url, _):
        def predict(text: str) -> httpx.Response:
            """A connection each, as separate clients: the kernel deals them to both workers."""
            return httpx.post(f"{url}/predict", json={"text": text}, headers={"X-Request-Id": "same-client-id"},
                              timeout=30, trust_env=False)

        texts = {}
        for i in range(20):
            answer = predict(f"my parcel {i} is late")
            assert answer.status_code == 200, answer.text
            texts[f"{answer.headers['X-Request-Id']}-0"] = f"my parcel {i} is late"

        def lines(pattern: str) -> list[tuple[str, dict]]:
            """(the writing worker's pid, record) of each complete line."""
            found = []
            for path in log_dir.glob(pattern):
                for line in path.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):  # a line still being written
                        found.append((path.name.split("-")[1].split(".")[0], json.loads(line)))
            return found

        def scored() -> list[tuple[str, dict]]:
            return lines("predictions-*.jsonl")

        wait_until(lambda: len(scored()) == 20, what="20 logged predictions")
        scored_by = {record["request_id"]: pid for pid, record in scored()}
        assert {record["text"] for _, record in scored()} == set(texts.values())
        names = list(texts)
        for attempt in range(200):
            name = names[attempt % len(names)]
            answer = httpx.post(f"{url}/feedback", json={"request_id": name, "label": "shipping"}, timeout=30,
                                trust_env=False)
            assert answer.status_code == 202 and answer.json()["request_ids"] == [name], answer.text
            if attempt % 10 == 9 and any(scored_by[line["request_id"]] != pid
                                         for pid, line in lines("feedback-*.jsonl")):
                break
        else:
            pytest.fail(f"no label reached another worker than the one that scored its text: {scored_by}")
        refused = httpx.post(f"{url}/feedback", json={"request_id": "same-client-id", "label": "shipping"},
                             timeout=30, trust_env=False)
        assert refused.status_code == 409 and "scored texts were sent with" in refused.json()["detail"]


@pytest.mark.unit
def test_model_uri_forms(tmp_path: Path) -> None:
    assert parse_model_uri("models:/langops-classifier@champion") == {"model_name": "langops-classifier",
                                                                      "alias": "champion"}
    assert parse_model_uri("models:/langops-classifier/3") == {"model_name": "langops-classifier", "version": "3"}
    assert parse_model_uri(str(tmp_path)) == {"model_dir": tmp_path}
    for bad in ("models:/langops-classifier/latest", "models:/@champion", "models:/"):
        with pytest.raises(ValueError, match="expected models:/<name>@<alias>"):
            parse_model_uri(bad)


@pytest.mark.unit
def test_deploy_defaults_match_the_server_and_params_yaml() -> None:
    deploy, settings = DeployConfig(), ServerSettings.model_fields
    for name in ServerConfig.model_fields:
        assert getattr(deploy, name) == settings[name].default, name
    in_yaml = yaml.safe_load((REPO / "params.yaml").read_text())["deploy"]
    dumped = deploy.model_dump(mode="json")  # nested sections (rollout) compare as the YAML's mappings
    for name, value in in_yaml.items():
        assert dumped[name] == value, f"params.yaml deploy.{name}"
    assert deploy.max_batch_size == ServerConfig().max_batch_size == 64  # the pyfunc's chunk: parity with MLflow


@pytest.mark.model
def test_pinned_version_is_served(registered) -> None:
    registry, (first, second) = registered.registry, registered.good
    registry.set_champion(second)
    with running_server(registry.settings(version=first)) as live, live.client() as client:
        wait_for_version(client, first)
        info = client.get("/version").json()
        assert info["alias"] is None and info["version"] == first
        assert client.post("/reload").json()["new_version"] == first
