"""`dvc repro` in a fresh git repository runs every stage, records metrics, re-runs nothing the second time,
and `dvc exp run -S` re-runs only what a param touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import tiny_project_params, write_params

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "validate", "baseline", "train", "evaluate", "distill", "compress", "register", "promote", "deploy"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture()
def dvc_project(tmp_path, tiny_base_model) -> Path:
    """A copy of the repository's pipeline files in a new git repo, with params for a tiny model."""
    root = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if rel.startswith(("tests/", "benchmarks/", "docs/")):
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    params = tiny_project_params(root, tiny_base_model, project={"state_dir": ".langops", "seed": 7})
    params["train"]["num_threads"] = None  # the stages take their share of the CPUs, as on defaults
    write_params(root, params)
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


def test_dvc_repro_runs_every_stage_then_nothing_then_only_what_a_param_change_touches(dvc_project):
    first = _run(["dvc", "repro"], dvc_project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, first.stdout

    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    metrics = json.loads((dvc_project / "reports/evaluation/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    registration = json.loads((dvc_project / "reports/registration/registration.json").read_text())
    assert registration["version"] == "1"
    decision = json.loads((dvc_project / "reports/promotion/decision.json").read_text())
    assert decision["promote"] is True

    shown = _run(["dvc", "metrics", "show", "--json"], dvc_project)
    assert "macro_f1" in shown.stdout
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], dvc_project).stdout)
    assert {"reports/evaluation/confusion.csv", "reports/evaluation/confusion_matrix.png",
            "reports/evaluation/reliability_diagram.png"} <= set(plots["data"])
    baseline = json.loads((dvc_project / "reports/baseline/metrics.json").read_text())
    assert baseline["test"]["baseline"]["macro_f1"] == pytest.approx(metrics["baseline_macro_f1"])
    pushed = _run(["dvc", "push"], dvc_project)
    assert "pushed" in pushed.stdout and any((dvc_project / ".langops" / "dvc-remote").rglob("*"))

    second = _run(["dvc", "repro"], dvc_project)
    assert "Running stage" not in second.stdout, second.stdout
    assert "up to date" in second.stdout.lower()

    # The model version carries the hash DVC recorded for the data it was trained on.
    from mlflow import MlflowClient

    store = f"sqlite:///{dvc_project / '.langops' / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version("langops-classifier", "1")
    prepared_md5 = next(out["md5"] for out in lock["stages"]["prepare"]["outs"])
    assert version.tags["data_version"] == prepared_md5
    trained = json.loads((dvc_project / "models" / "trained" / "train.json").read_text())  # the teacher ships
    assert version.tags["calibration"] == trained["calibration"]
    assert float(version.tags["calibration.val_ece_uncalibrated"]) == trained["val_ece_uncalibrated"]

    # An experiment on a train knob, against the committed baseline: the data stages are skipped, train and
    # everything after it re-run, and metrics diff compares the two.
    _run(["git", "add", "-A"], dvc_project)
    _run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "baseline"], dvc_project)
    experiment = _run(["dvc", "exp", "run", "-S", "train.learning_rate=0.02"], dvc_project)
    assert "Running stage 'prepare'" not in experiment.stdout and "Running stage 'validate'" not in experiment.stdout
    assert "Running stage 'baseline'" not in experiment.stdout  # a train knob leaves the baseline as it was
    assert "Running stage 'train'" in experiment.stdout and "Running stage 'register'" in experiment.stdout
    diff = json.loads(_run(["dvc", "metrics", "diff", "--all", "--json"], dvc_project).stdout)
    accuracy = diff["reports/evaluation/metrics.json"]["accuracy"]
    assert isinstance(accuracy["old"], float) and isinstance(accuracy["new"], float)  # committed vs experiment
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], dvc_project).stdout)
    assert "0.02" in json.dumps(shown) and "train.learning_rate" in json.dumps(shown)
