"""Crash consistency: `langops run` killed with SIGKILL inside every step that writes shared state.

A SIGKILL runs no handler: no ``finally``, no exit hook. Each run below is killed at the next crash point
(``LANGOPS_CRASH_AT``, langops/faults.py) and the one after it starts from what the dead one left; the
last runs to the end. Between runs nothing of the dead run may survive (its temporary Prefect server, its
reaper), and at the end the project must be whole: every MLflow run closed (killed ones with a reason),
no unfinished model version, no staging debris, every killed run's Prefect flow run marked Crashed (by the
run after it), the champion moved only by recorded promotions that `langops history` lists, and the model
server serving that champion.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pipeline_helpers import tiny_project_params, write_params

pytest_plugins = ["serving_helpers"]

from langops.aliases import CHAMPION
from langops.config import load_params
from langops.faults import COMMAND_POINTS, CRASH_AT_ENV, STEP_POINTS
from langops.tasks.register import REQUIRED_LINEAGE
from langops.tracking import END_REASON, REGISTERING_TAG

pytestmark = pytest.mark.crash

# In pipeline order: each run gets one point further than the one before, with the stages before it cached.
# Every point inside a step is here. A kill inside a step also finds the steps before it finished but their
# results not yet used (evaluate's kill: a trained model to pick up; promote's: a registered version not yet
# judged), so the boundaries between steps ("after:<stage>", flows/pipeline.py) need no runs of their own.
KILL_POINTS = (
    "prepare:staged",
    "validate:reported",
    "baseline:staged",
    "train:checkpoint",
    "evaluate:staged",
    "distill:staged",
    "compress:exported",
    "register:logged",
    "register:created",
    "promote:alias-moved",
    "deploy:spawned",
)
GONE_WITHIN_S = 30.0  # the reaper notices a death at once and gives a helper 5 s after SIGTERM


def _langops(root: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """Run a command; its output goes through files, not pipes, which a process it left behind would hold open."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", CRASH_AT_ENV)}
    if crash_at is not None:
        env[CRASH_AT_ENV] = crash_at
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([sys.executable, "-m", "langops.cli", *args], cwd=root, env=env, stdout=out,
                              stderr=err, timeout=900, check=False).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, code, out.read(), err.read())


def _leftovers(root: Path) -> list[str]:
    """Live processes a command of this project started for itself: temporary Prefect servers, reapers, Dask
    workers, anything running in the project's folder (other tests, run at the same time, have their own). The
    model server is not one of them: it is meant to outlive the run that deployed it."""
    prefect_home = str(root / ".langops" / "prefect")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = process.info["cmdline"] or []
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("langops.serving" in (p.cmdline() or []) for p in [process, *process.parents()]):
                continue
            if process.cwd() == str(root) or process.environ().get("PREFECT_HOME") == prefect_home:
                found.append(f"{process.pid}: {' '.join(command)[:200]}")
        except psutil.Error:
            continue
    return found


def _wait_until_gone(root: Path) -> list[str]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := _leftovers(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _debris(root: Path) -> list[str]:
    """Staging and parked folders (``.<name>.staging-*``, ``.<name>.old-*``) under the pipeline's outputs."""
    pattern = re.compile(r"^\..+\.(staging|old)-\d+-[0-9a-f]+$")
    return [str(path.relative_to(root)) for folder in ("data", "models", "reports") if (root / folder).is_dir()
            for path in (root / folder).rglob(".*") if pattern.match(path.name)]


def _flow_run_states(root: Path) -> dict[str, int]:
    """Flow runs by state type, read from the project's Prefect database (its temporary server is gone)."""
    with sqlite3.connect(root / ".langops" / "prefect" / "prefect.db") as db:
        return dict(db.execute("SELECT state_type, count(*) FROM flow_run GROUP BY state_type").fetchall())


@pytest.fixture()
def project(tmp_path, tiny_base_model):
    # A one-layer student of the two-layer teacher, so that distillation writes a model (and can be killed).
    distill = {"enabled": True, "layers": 1, "max_epochs": 1, "batch_size": 16, "num_threads": 1, "max_val_drop": 1.0}
    params = tiny_project_params(tmp_path, tiny_base_model, deploy={"enabled": True},
                                 compress={"min_label_agreement": 0.5, "max_fp32_logit_diff": 0.01, "latency_runs": 5,
                                           "distill": distill})
    write_params(tmp_path, params)
    yield tmp_path
    from langops.tasks.deploy import stop_server

    stop_server(tmp_path / ".langops")


def test_a_run_killed_anywhere_is_finished_by_the_next_and_leaves_nothing_behind(project):
    assert set(point for point in KILL_POINTS if ":" in point and not point.startswith(("before:", "after:"))) \
        == set(STEP_POINTS)  # every point inside a step is taken
    for point in KILL_POINTS:
        killed = _langops(project, "run", crash_at=point)
        assert killed.returncode == -9, f"not killed at {point}:\n{killed.stderr[-3000:]}"
        assert not _wait_until_gone(project), f"left running after a kill at {point}: {_leftovers(project)}"

    final = _langops(project, "run")

    assert final.returncode == 0, final.stderr[-3000:]
    assert not _wait_until_gone(project)
    assert not _debris(project)

    # The killed runs' flow runs were marked Crashed by the runs after them; none is left Running.
    flow_runs = _flow_run_states(project)
    assert flow_runs.get("CRASHED", 0) >= len(KILL_POINTS) and "RUNNING" not in flow_runs, flow_runs
    assert flow_runs.get("COMPLETED") == 1, flow_runs

    from mlflow import MlflowClient

    params = load_params(project / "params.yaml")
    client = MlflowClient(tracking_uri=params.tracking_uri(), registry_uri=params.tracking_uri())
    runs = _mlflow_runs(project)
    assert not [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    killed_runs = [run for run in runs if run.info.status == "KILLED"]
    assert killed_runs and all("died without ending this run" in run.data.tags[END_REASON] for run in killed_runs)

    model = params.register.model_name
    versions = client.search_model_versions(f"name = '{model}'")
    assert versions
    for version in versions:  # complete: lineage, description, READY, and nobody still registering it
        assert REGISTERING_TAG not in version.tags
        assert all(version.tags.get(key) for key in REQUIRED_LINEAGE), version.tags
        assert version.description and version.status == "READY"

    from langops.promotions import read_history

    champion = client.get_model_version_by_alias(model, CHAMPION).version
    history = read_history(params, model)
    assert history and history[0].to_version == str(champion)
    assert all(newer.from_version == older.to_version for newer, older in zip(history, history[1:]))
    shown = _langops(project, "history")
    assert shown.returncode == 0 and f"- → {champion}" in shown.stdout, shown.stdout + shown.stderr

    served = httpx.get(f"http://127.0.0.1:{params.deploy.port}/version", timeout=30, trust_env=False).json()
    assert served["version"] == str(champion)


def _mlflow_runs(root: Path) -> list:
    from mlflow import MlflowClient

    params = load_params(root / "params.yaml")
    client = MlflowClient(tracking_uri=params.tracking_uri(), registry_uri=params.tracking_uri())
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def test_a_sweep_killed_while_its_trials_train_leaves_no_worker_and_the_next_sweep_finishes(tmp_path, tiny_base_model):
    assert "sweep:trial-finished" in COMMAND_POINTS
    # One trial: killed once it is trained, its Dask cluster still up (a worker and its nanny, in this folder).
    sweep = {"grid": {"train.learning_rate": [0.003]}, "n_workers": 1, "dask_address": None}
    write_params(tmp_path, tiny_project_params(tmp_path, tiny_base_model, sweep=sweep))

    killed = _langops(tmp_path, "sweep", crash_at="sweep:trial-finished")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not _wait_until_gone(tmp_path), f"left running after the sweep was killed: {_leftovers(tmp_path)}"
    final = _langops(tmp_path, "sweep")

    assert final.returncode == 0, final.stderr[-3000:]
    assert not _wait_until_gone(tmp_path)
    assert not _debris(tmp_path)
    flow_runs = _flow_run_states(tmp_path)
    assert flow_runs.get("CRASHED", 0) >= 1 and "RUNNING" not in flow_runs, flow_runs
    runs = _mlflow_runs(tmp_path)
    assert not [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    sweeps = {run.info.status for run in runs if run.data.tags.get("langops.sweep") == "true"}
    assert sweeps == {"KILLED", "FINISHED"}, sweeps


def test_a_server_killed_as_its_canary_steps_up_and_as_it_promotes_leaves_a_rollout_the_next_one_finishes(
    tmp_path, compressed_dir
):
    """The canary's state is in the registry, so a killed server's successor goes on from it; each record the
    dead one had open is closed by what the registry shows: a change that happened stays in the log."""
    from serving_helpers import empty_registry, free_port, wait_until

    from langops.config import RolloutConfig
    from langops.promotions import read_history
    from langops.rollouts import current_rollout, start_rollout

    assert {"canary:stepped", "canary:promoted"} <= set(COMMAND_POINTS)
    registry = empty_registry(tmp_path / "registry")
    champion, challenger = registry.register(compressed_dir), registry.register(compressed_dir)
    registry.promote(champion)
    # Loose limits: a shared CI machine must not fail the canary; judging has its own tests.
    canary = RolloutConfig(canary_steps=(50.0, 100.0), min_requests=20, min_comparisons=5, judge_every_s=0.2,
                           max_p50_ms=5000.0, max_p99_ms=10000.0, mirror_queue=10_000, challenger_timeout_ms=20_000.0)
    start_rollout(registry.params(), mode="canary", version=challenger, cfg=canary, actor="test", reason="test")
    settings_file = tmp_path / "server.json"

    def serve_until_killed_or_promoted(crash_at: str | None) -> int | None:
        settings = registry.settings(state_dir=registry.root, rollout=canary, port=free_port())
        settings_file.write_text(settings.model_dump_json())
        env = {**os.environ, **({CRASH_AT_ENV: crash_at} if crash_at else {})}
        server = subprocess.Popen([sys.executable, "-m", "langops.serving", "--settings", str(settings_file)],
                                  env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{settings.port}"

        def done() -> bool:
            if server.poll() is not None:
                return True
            try:
                httpx.post(f"{url}/predict", json={"text": f"my card was charged twice {time.monotonic()}"},
                           timeout=30, trust_env=False)
                served = httpx.get(f"{url}/version", timeout=30, trust_env=False).json()["version"]
            except httpx.HTTPError:
                return False  # not up yet
            return crash_at is None and served == challenger and current_rollout(registry.params()) is None

        try:
            wait_until(done, what=f"the server to die at {crash_at}" if crash_at else "the canary to be promoted",
                       timeout=180)
            return server.poll()
        finally:
            server.kill()
            server.wait(30)

    assert serve_until_killed_or_promoted("canary:stepped") == -9
    stepped = current_rollout(registry.params())
    assert stepped is not None and stepped.step == 1  # the step happened before the kill
    assert serve_until_killed_or_promoted("canary:promoted") == -9
    assert str(registry.client().get_model_version_by_alias(registry.model_name, CHAMPION).version) == challenger
    assert current_rollout(registry.params()) is None  # promoted: the tag the dead server left no longer counts
    assert serve_until_killed_or_promoted(None) is None

    from langops.tracking import clean_up_after_dead_processes

    clean_up_after_dead_processes(registry.client())  # what the next langops command does first
    history = read_history(registry.params(), registry.model_name)
    assert [(event.event, event.to_version) for event in reversed(history)][-3:] == [
        ("canary-start", challenger), ("canary-step", challenger), ("promote", challenger)]
    records = registry.client().search_runs(
        [e.experiment_id for e in registry.client().search_experiments()], max_results=1000)
    assert not [run.info.run_id for run in records if run.info.status == "RUNNING"]
