"""The register step on a real MLflow SQLite store: tagged versions, a loadable pyfunc, no half versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LABELS
from test_compress import build_compressed_dir

from langops.config import Params, parse_params
from langops.model_files import FILES_TAG, decode_manifest
from langops.pyfunc import predictions_frame, texts_from_input
from langops.tasks.compress import CompressionResult
from langops.tasks.register import RegistrationResult, ShippedCalibration, register
from langops.tracking import configure_mlflow

LINEAGE = {
    "data_version": "0123abcd.dir",
    "git_commit": "f00dfeed",
    "params_hash": "a1b2c3d4e5f60718",
    "base_model": "tiny-bert",
    "train_method": "lora",
}


@pytest.fixture(scope="module")
def compression(tmp_path_factory, tiny_trained_dir) -> CompressionResult:
    return build_compressed_dir(tmp_path_factory.mktemp("register"), tiny_trained_dir)


@pytest.fixture
def params(tmp_path: Path) -> Params:
    """A project whose MLflow store is a fresh SQLite file under tmp_path."""
    return parse_params({"project": {"state_dir": "state"}}).resolved(tmp_path)


@pytest.fixture
def run_id(params: Params) -> str:
    import mlflow

    configure_mlflow(params)
    with mlflow.start_run() as run:
        return run.info.run_id


def register_version(params: Params, compression: CompressionResult, *, run_id: str, lineage=LINEAGE):
    return register(
        params.register, compression=compression, run_id=run_id, lineage=lineage, out_dir=params.paths.registration
    )


def registered_versions(name: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(mv.version) for mv in MlflowClient().search_model_versions(f"name = '{name}'"))


@pytest.mark.model
def test_register_creates_a_tagged_described_version(params, run_id, compression) -> None:
    from mlflow import MlflowClient

    result = register_version(params, compression, run_id=run_id)

    name = params.register.model_name
    assert result == RegistrationResult(
        model_name=name, version="1", model_uri=f"models:/{name}/1", run_id=run_id
    )
    version = MlflowClient().get_model_version(name, "1")
    assert version.status == "READY" and version.run_id == run_id
    assert {k: version.tags[k] for k in LINEAGE} == LINEAGE
    assert float(version.tags["metric.macro_f1"]) == compression.metrics["macro_f1"]
    assert float(version.tags["metric.accuracy"]) == compression.metrics["accuracy"]
    assert RegistrationResult.load(params.paths.registration) == result  # what a later stage run reads
    assert version.tags["quantized"] == "true"
    assert "tiny-bert" in version.description and run_id in version.description


@pytest.mark.model
def test_the_version_records_what_calibration_decided_for_the_shipped_model(params, run_id, compression) -> None:
    from mlflow import MlflowClient

    refused = ShippedCalibration("no temperature folded (T = 1): it raises held-out ECE (0.0310 without, 0.0420 "
                                 "cross-fitted)", temperature=1.0, val_ece_uncalibrated=0.031, val_ece_cross_fitted=0.042)
    result = register(params.register, compression=compression, run_id=run_id, lineage=LINEAGE,
                      out_dir=params.paths.registration, calibration=refused)

    tags = MlflowClient().get_model_version(result.model_name, result.version).tags
    assert tags["calibration"] == refused.decision
    assert {key: float(tags[f"calibration.{key}"]) for key in ("temperature", "val_ece_uncalibrated",
                                                               "val_ece_cross_fitted")} == {
        "temperature": 1.0, "val_ece_uncalibrated": 0.031, "val_ece_cross_fitted": 0.042}
    assert float(tags["metric.ece"]) == compression.metrics["ece"]  # and the shipped model's test ECE beside them


@pytest.mark.model
def test_version_is_created_with_the_size_and_sha256_of_every_model_file(
    params, run_id, compression, monkeypatch
) -> None:
    import hashlib

    from mlflow import MlflowClient

    def tag_written_later(*args, **kwargs):
        raise AssertionError("the file manifest must be written with the version, not after it")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tag_written_later)
    result = register_version(params, compression, run_id=run_id)

    manifest = decode_manifest(MlflowClient().get_model_version(result.model_name, result.version).tags[FILES_TAG])
    files = sorted(path.name for path in compression.out_dir.iterdir())
    assert sorted(manifest) == files and "serving.json" in files and "model.onnx" in files
    for name in files:
        content = (compression.out_dir / name).read_bytes()
        assert manifest[name].size == len(content)
        assert manifest[name].sha256 == hashlib.sha256(content).hexdigest()


@pytest.mark.model
def test_registered_model_loads_in_a_fresh_process(params, run_id, compression, tmp_path) -> None:
    from mlflow import MlflowClient

    result = register_version(params, compression, run_id=run_id)
    MlflowClient().set_registered_model_alias(result.model_name, "champion", result.version)
    script = (
        "import json, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{result.model_name}@champion')\n"
        "out = model.predict(pd.DataFrame({'text': ['my card was charged twice', 'where is my parcel?']}))\n"
        "print(json.dumps({'columns': list(out.columns), 'labels': out['label'].tolist(),\n"
        "                  'sums': out.filter(like='prob_').sum(axis=1).tolist()}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking_uri()}
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["columns"] == ["label", "confidence", *(f"prob_{label}" for label in LABELS)]
    assert len(answer["labels"]) == 2 and set(answer["labels"]) <= set(LABELS)
    assert answer["sums"] == pytest.approx([1.0, 1.0])


@pytest.mark.model
def test_a_failure_after_version_creation_leaves_no_version(
    params, run_id, compression, monkeypatch
) -> None:
    from mlflow import MlflowClient

    register_version(params, compression, run_id=run_id)

    def refuse_update(*args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(MlflowClient, "update_model_version", refuse_update)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        register_version(params, compression, run_id=run_id)
    assert registered_versions(params.register.model_name) == ["1"]


@pytest.mark.model
def test_missing_lineage_is_refused_before_logging(params, compression) -> None:
    lineage = {k: v for k, v in LINEAGE.items() if k != "git_commit"}
    with pytest.raises(ValueError, match=r"lineage is missing \['git_commit'\]"):
        register_version(params, compression, run_id="unused", lineage=lineage)
    assert not (params.project.state_dir / "mlflow.db").exists()


@pytest.mark.unit
def test_pyfunc_accepts_frames_series_and_lists() -> None:
    texts = ["a", "b"]
    assert texts_from_input(pd.DataFrame({"text": texts, "other": [1, 2]})) == texts
    assert texts_from_input(pd.Series(texts)) == texts
    assert texts_from_input(texts) == texts
    with pytest.raises(ValueError, match="needs a 'text' column"):
        texts_from_input(pd.DataFrame({"body": texts}))
    with pytest.raises(TypeError):
        texts_from_input("a")


@pytest.mark.unit
def test_predictions_frame_columns() -> None:
    frame = predictions_frame(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]), LABELS)
    assert list(frame.columns) == ["label", "confidence", *(f"prob_{label}" for label in LABELS)]
    assert frame["label"].tolist() == ["shipping", "billing"]
    assert frame["confidence"].tolist() == [0.5, 0.6]


@pytest.mark.model
def test_registering_while_another_thread_reads_new_environment_variables_succeeds(
    params, run_id, compression
) -> None:
    """A flow's other threads (Prefect's logging, events, settings) read os.environ while a model is logged."""
    import threading
    import time

    stop = threading.Event()

    def read_new_environment_variables() -> None:
        index = 0
        while not stop.is_set():
            name = f"LANGOPS_TEST_READ_{index}"
            os.environ[name] = "1"
            os.environ.get(name)
            del os.environ[name]
            index += 1
            time.sleep(0.0002)

    reader = threading.Thread(target=read_new_environment_variables, daemon=True)
    reader.start()
    try:
        result = register_version(params, compression, run_id=run_id)
    finally:
        stop.set()
        reader.join()
    assert result.version == "1"
