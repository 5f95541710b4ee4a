"""A project folder moved or copied elsewhere: refused with the fix named, then rewritten by `langops relocate`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import tiny_project_params, write_params

from langops.config import load_params
from langops.tracking import configure_mlflow

pytestmark = pytest.mark.unit


def _langops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "langops.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def _project_with_a_logged_artifact(root: Path) -> str:
    """A project whose embedded store holds a run with an artifact and a version registered from it."""
    import mlflow
    from mlflow import MlflowClient

    params = tiny_project_params(root, Path("no-model"))
    params["project"]["state_dir"] = ".langops"  # as `langops init` writes it: relative to the project
    write_params(root, params)
    assert _langops("history", cwd=root).returncode == 0  # first use: the state folder records its place
    params = load_params(root / "params.yaml")
    configure_mlflow(params)
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "notes/hello.txt")
    client = MlflowClient()
    client.create_registered_model("moved-model")
    client.create_model_version("moved-model", source=f"{run.info.artifact_uri}/notes", run_id=run.info.run_id)
    return run.info.run_id


def test_a_moved_project_is_refused_until_relocated_and_then_finds_its_artifacts(tmp_path):
    from mlflow import MlflowClient

    old, new = tmp_path / "old-place", tmp_path / "new place"  # a space: file URIs escape it
    old.mkdir()
    run_id = _project_with_a_logged_artifact(old)
    shutil.move(old, new)

    refused = _langops("history", cwd=new)
    assert refused.returncode == 2, refused.stderr
    assert (f"this project's state folder {new / '.langops'} was created at {old / '.langops'}" in refused.stderr
            and "run `langops relocate`" in refused.stderr)

    relocated = _langops("relocate", cwd=new)
    assert relocated.returncode == 0, relocated.stderr
    assert f"MLflow store now points at {new / '.langops'}" in relocated.stdout

    assert _langops("history", cwd=new).returncode == 0
    params = load_params(new / "params.yaml")
    configure_mlflow(params)
    client = MlflowClient()
    assert client.get_run(run_id).info.artifact_uri.startswith((new / ".langops").as_uri())
    downloaded = client.download_artifacts(run_id, "notes/hello.txt", str(tmp_path / "download"))
    assert Path(downloaded).read_text() == "hello"
    version = client.get_model_version("moved-model", "1")
    assert (new / ".langops").as_uri() in client.get_model_version_download_uri("moved-model", version.version)
    assert not old.exists()  # nothing wrote to the old place


def test_relocate_in_a_project_that_has_not_moved_changes_nothing(tmp_path):
    _project_with_a_logged_artifact(tmp_path)

    result = _langops("relocate", cwd=tmp_path)

    assert result.returncode == 0 and "has not moved: nothing to rewrite" in result.stdout


def test_a_project_moved_before_its_store_existed_just_records_its_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    params = tiny_project_params(old, Path("no-model"))
    params["project"]["state_dir"] = ".langops"
    write_params(old, params)
    assert _langops("stop", cwd=old).returncode == 0  # records its place; creates no MLflow store
    assert (old / ".langops" / "location.json").is_file() and not (old / ".langops" / "mlflow.db").exists()
    shutil.move(old, new)

    assert _langops("history", cwd=new).returncode == 0
    assert _langops("history", cwd=new).returncode == 0  # and again, now with a store made here
