"""Any label name works end to end: generated label sets through prepare, validate, baseline, train, evaluate,
compress and register, then served, and every answer carries the labels exactly as the user wrote them.

Each example is a whole pipeline on a tiny random BERT, so hypothesis draws four; every label
set holds one label of each hard kind (punctuation and ``/ ? %`` and spaces, non-ASCII with emoji or
right-to-left text, the numbers ``0``/``1``, a pair that differs only in case, a very long label, and a
near-colliding pair), with hypothesis choosing their spelling.
"""

from __future__ import annotations

import json
import random
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_helpers import free_port, tiny_project_params, write_params
from serving_helpers import running_server

from langops.config import load_params
from langops.label_keys import MAX_LABEL_CHARS, label_keys

pytestmark = pytest.mark.flow

ROWS_PER_LABEL = 14
WORDS = ["invoice", "parcel", "crash", "login", "refund", "tracking", "screen", "password", "upgrade", "courier",
         "receipt", "battery", "delivery", "account", "voucher", "router", "warranty", "coupon"]

punctuated = st.builds(lambda a, mark, b: f"{a}{mark}{b}", st.sampled_from(["card", "top up", "50", "a"]),
                       st.sampled_from(["?", "/", "%", " ", ": ", "!"]), st.sampled_from(["payment", "", "x", "off?"]))
non_ascii = st.sampled_from(["caf\u00e9", "\U0001f4b3 card", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",
                             "na\u00efve \u2013 r\u00e9sum\u00e9", "\U0001f469\u200d\U0001f4bb help", "\u65e5\u672c"])
case_twin = st.sampled_from(["Billing", "TOP_UP", "Refund_not_showing_up", "reverted_card_payment?"])
long_label = st.integers(60, MAX_LABEL_CHARS - 1).map(lambda n: ("very long label " * 20)[:n].strip() + "!")
near_pair = st.sampled_from([("a?", "a!"), ("x y", "x_y"), ("A/B", "A B"), ("card-payment", "card payment")])


@st.composite
def label_sets(draw) -> list[str]:
    twin = draw(case_twin)
    labels = [draw(punctuated), draw(non_ascii), "0", "1", twin, twin.swapcase() if twin.swapcase() != twin else twin.lower(),
              draw(long_label), *draw(near_pair)]
    return list(dict.fromkeys(label.strip() for label in labels if label.strip()))


def write_dataset(path: Path, labels: list[str], seed: int) -> Path:
    """A learnable CSV: each label gets its own keyword pair, so a tiny model can tell them apart."""
    import pandas as pd

    rng = random.Random(seed)
    rows = [
        {"text": f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} issue {i}-{j} {rng.randint(0, 9999)}",
         "label": label}
        for i, label in enumerate(labels)
        for j in range(ROWS_PER_LABEL)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(labels=label_sets())
def test_any_label_set_trains_registers_and_serves_with_its_labels_intact(tiny_base_model, labels):
    from langops import pipeline

    # uuid4, not tempfile's names: hypothesis seeds `random`, and MLflow keeps the engine of a SQLite path it saw
    with tempfile.TemporaryDirectory(prefix=f"langops-labels-{uuid.uuid4().hex}-") as tmp:
        root = Path(tmp)
        source = write_dataset(root / "labelled.csv", labels, seed=len(labels))
        params_path = write_params(root, tiny_project_params(
            root, tiny_base_model,
            data={"source": str(source), "labels": None},
            train={"max_epochs": 1, "batch_size": 16},
        ))
        params = load_params(params_path)

        prepared = pipeline.run_prepare(params)
        pipeline.run_validate(params, prepared)
        fitted = pipeline.run_baseline(params, prepared)
        trained = pipeline.run_train(params, prepared)
        evaluation = pipeline.run_evaluate(params, prepared, fitted, trained)
        distilled = pipeline.run_distill(params, prepared, fitted, trained)
        compressed = pipeline.run_compress(params, prepared, trained, distilled)
        registration = pipeline.run_register(params, trained, distilled, compressed)

        keys = label_keys(labels)
        assert evaluation.metrics["label_keys"] == {keys[label]: label for label in labels}
        assert {row["label"] for row in evaluation.metrics["per_class"].values()} == set(labels)
        from mlflow import MlflowClient

        logged = MlflowClient().get_run(registration.run_id).data.metrics
        assert {f"test_f1_{keys[label]}" for label in labels} <= set(logged)

        from langops.serving.app import ServerSettings

        server_settings = ServerSettings(tracking_uri=params.tracking_uri(), model_name=params.register.model_name,
                                         version=registration.version, port=free_port(),
                                         cache_dir=params.project.state_dir / "server-cache")
        with running_server(server_settings) as server, server.client() as client:
            _wait_ready(client)
            texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} question" for i in range(len(labels))]
            answer = client.post("/predict", json={"texts": texts})
            assert answer.status_code == 200, answer.text
            for prediction in answer.json()["predictions"]:
                assert prediction["label"] in labels
                assert set(prediction["probabilities"]) == set(labels)
            invocations = client.post("/invocations", json={"inputs": texts[:2]})
            assert invocations.status_code == 200, invocations.text
            rows = invocations.json()["predictions"]
            assert all(row["label"] in labels for row in rows)
            assert {f"prob_{label}" for label in labels} <= set(rows[0])


def _wait_ready(client: httpx.Client) -> None:
    from serving_helpers import wait_until

    wait_until(lambda: client.get("/ready").status_code == 200, what="the server to load the version")


def test_a_77_intent_dataset_runs_through_langops_run_to_a_served_model(tmp_path, tiny_base_model):
    import subprocess
    import sys

    from pipeline_helpers import INTENT_LABELS, write_intent_dataset

    source = write_intent_dataset(tmp_path / "intents.csv")
    port = free_port()
    write_params(tmp_path, tiny_project_params(
        tmp_path, tiny_base_model,
        data={"source": str(source), "labels": None},
        train={"max_epochs": 3, "learning_rate": 0.003},
        compress={"min_label_agreement": 0.0, "max_fp32_logit_diff": 0.01, "latency_runs": 5},
        deploy={"enabled": True, "port": port, "poll_seconds": 0.5},
    ))
    try:
        result = subprocess.run([sys.executable, "-m", "langops.cli", "run"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "langops-classifier version 1 (promoted to champion)" in result.stdout
        assert "(TF-IDF baseline " in result.stdout and "majority class " in result.stdout

        details = json.loads((tmp_path / "reports" / "evaluation" / "details.json").read_text())
        assert sorted(details["label_keys"].values()) == sorted(INTENT_LABELS)
        for_dvc = json.loads((tmp_path / "reports" / "evaluation" / "metrics.json").read_text())
        assert set(for_dvc["f1"]) == set(details["label_keys"])
        assert for_dvc["baseline_macro_f1"] > 0.5 > for_dvc["majority_baseline_macro_f1"]  # 77 keyword pairs: learnable
        reply = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=30,
                           json={"texts": ["w148 w149 please 7", "w150 w151 please 8", "w152 w153 please 9"]})
        assert reply.status_code == 200, reply.text
        assert all(set(p["probabilities"]) == set(INTENT_LABELS) for p in reply.json()["predictions"])
    finally:
        subprocess.run([sys.executable, "-m", "langops.cli", "stop"], cwd=tmp_path, capture_output=True, timeout=120)
