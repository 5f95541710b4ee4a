"""``/invocations`` answers exactly what ``mlflow models serve`` answers for the same registered model.

Both servers run for real: ours in-process on uvicorn, MLflow's as the ``mlflow models serve
--env-manager local`` subprocess a user would start, on the same SQLite registry. Requests go one
at a time, so each is alone in its batch (batching can move int8 probabilities; see docs/serving.md).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytest_plugins = ["serving_helpers"]
from serving_helpers import RegisteredModels, free_port, running_server, wait_for_version, wait_until

pytestmark = pytest.mark.services

TEXTS = ["my invoice is wrong", "where is my parcel?", "the app crashes when I log in", "é ü 日本 🙂", "?"]
# (a blank text is no longer sent: ours refuses it with 422 where MLflow scores it; see docs/serving.md)
JSON = "application/json"


def _parquet(texts: list[str]) -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"text": texts}).to_parquet(buffer)
    return buffer.getvalue()


PAYLOADS: dict[str, tuple[bytes, str]] = {
    "dataframe_split": (json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}).encode(),
                        JSON),
    "dataframe_split-index": (json.dumps({"dataframe_split": {"index": [5, 6], "columns": ["text"],
                                                              "data": [["a"], ["b"]]}}).encode(), JSON),
    "dataframe_records": (json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode(), JSON),
    "instances-records": (json.dumps({"instances": [{"text": t} for t in TEXTS]}).encode(), JSON),
    "instances-list": (json.dumps({"instances": TEXTS}).encode(), JSON),
    "inputs-columns": (json.dumps({"inputs": {"text": TEXTS}}).encode(), JSON),
    "inputs-list": (json.dumps({"inputs": TEXTS}).encode(), f"{JSON}; charset=utf-8"),
    "one-text": (json.dumps({"inputs": ["just one"]}).encode(), JSON),
    "extra-column": (json.dumps({"dataframe_records": [{"text": "a", "other": 1}]}).encode(), JSON),
    "csv": (pd.DataFrame({"text": TEXTS[:4]}).to_csv(index=False).encode(), "text/csv"),
    "parquet": (_parquet(TEXTS), "application/vnd.apache.parquet"),
    # refused by both, with the same status and error code
    "malformed-json": (b'{"inputs": [', JSON),
    "no-format-key": (b'{"texts": ["a"]}', JSON),
    "two-format-keys": (b'{"inputs": ["a"], "instances": ["b"]}', JSON),
    "bare-list": (b'["a"]', JSON),
    "missing-column": (b'{"dataframe_records": [{"txt": "a"}]}', JSON),
    "wrong-content-type": (b"text\na\n", "text/plain"),
    "latin-1": (b'{"inputs": ["a"]}', f"{JSON}; charset=latin-1"),
}


@pytest.fixture(scope="module")
def both_servers(registered: RegisteredModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    registry, (first, _) = registered.registry, registered.good
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-serve") / "serve.log"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [mlflow_cli, "models", "serve", "-m", f"models:/{registry.model_name}/{first}", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            # mlflow starts `uvicorn` by name: the venv's bin must be on PATH
            env={**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri,
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        )
    mlflow_url = f"http://127.0.0.1:{port}"
    try:
        with running_server(registry.settings(version=first)) as ours, ours.client() as client:
            wait_for_version(client, first)
            wait_until(lambda: _answers(mlflow_url) or process.poll() is not None, what="mlflow models serve",
                       timeout=120)
            assert process.poll() is None, log.read_text()
            yield ours.url, mlflow_url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ping", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_invocations_match_mlflow_models_serve(both_servers: tuple[str, str], name: str) -> None:
    content, content_type = PAYLOADS[name]
    answers = [
        httpx.post(f"{url}/invocations", content=content, headers={"content-type": content_type}, timeout=60,
                   trust_env=False)
        for url in both_servers
    ]
    ours, theirs = answers
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    if theirs.status_code == 200:
        assert ours.json() == theirs.json()  # identical rows, identical floats
        assert ours.content == theirs.content
    elif theirs.headers["content-type"].startswith(JSON):
        assert ours.json()["error_code"] == theirs.json()["error_code"]
    else:
        assert ours.text == theirs.text
