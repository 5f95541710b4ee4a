"""`langops up/status/deploy/down` with real servers: a Prefect server and worker, an MLflow server and the
model server, a deployment run on the worker, and both UIs rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pipeline_helpers import flow_run_artifacts, free_port, tiny_project_params, write_params
from services_helpers import down_and_kill_leftovers, langops, ok_json, processes_of

from langops.config import load_params

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_TIMEOUT_S = 600
ARTIFACT_KEYS = {"validation-report", "test-metrics", "promotion-decision", "pipeline-summary"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base_model):
    root = tmp_path_factory.mktemp("services-project")
    params = tiny_project_params(
        root, tiny_base_model,
        deploy={"enabled": True, "port": free_port()},
        services={"prefect_port": free_port(), "mlflow_port": free_port(), "start_timeout_s": 180.0},
    )
    write_params(root, params)
    # Something tracked before `up`, straight into the embedded SQLite store: the MLflow server must show it.
    from mlflow import MlflowClient

    store = f"sqlite:///{root / '.langops' / 'mlflow.db'}"
    (root / ".langops").mkdir()
    MlflowClient(tracking_uri=store).create_experiment("made-before-up")
    yield root, params
    down_and_kill_leftovers(root)


@pytest.fixture(scope="module")
def services(project):
    """`langops up` once for the module; `langops down` (and a kill of anything left) however it ends."""
    root, params = project
    result = langops(root, "up", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    yield root, params, result.stdout


@pytest.fixture(scope="module")
def completed_run(services):
    """`langops deploy`, then one run of the training deployment, triggered over the API, until it ends."""
    root, params, _ = services
    api = f"http://127.0.0.1:{params['services']['prefect_port']}/api"
    deployed = langops(root, "deploy", timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = ok_json(client.get("/deployments/name/langops-training-pipeline/langops-training"))
        flow_run = ok_json(client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            flow_run = client.get(f"/flow_runs/{flow_run['id']}").json()
            if flow_run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
    worker_log = (root / ".langops" / "services" / "prefect-worker.log").read_text()
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state']}\n{worker_log[-4000:]}"
    return root, params, deployed.stdout, deployment, flow_run


@pytest.mark.services
def test_a_taken_port_is_named_and_nothing_starts(project):
    root, _ = project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = langops(root, "up", "--set", f"services.mlflow_port={port}")
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "mlflow-server" in result.stderr, result.stderr
    assert "services.mlflow_port" in result.stderr and "nothing was started" in result.stderr
    assert not list((root / ".langops" / "services").glob("*.pid"))
    assert processes_of(root) == []


@pytest.mark.services
def test_up_starts_healthy_services_and_twice_is_harmless(services):
    root, params, first = services
    ports = params["services"]
    for name in ("prefect-server", "mlflow-server", "prefect-worker"):
        assert re.search(rf"^{name}\s+healthy\s+pid \d+.*\[started\]", first, re.MULTILINE), first
    # No champion yet: the model server is reported, not started.
    assert re.search(r"^model-server\s+down\b.*starts it when there is a champion", first, re.MULTILINE), first
    assert "model server not started: langops-classifier has no champion yet" in first
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect_port']}/api" in first
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow_port']}" in first

    pids = _service_pids(root)
    again = langops(root, "up")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("[already running]") == 3 and "[started]" not in again.stdout, again.stdout
    assert _service_pids(root) == pids

    status = langops(root, "status")
    assert status.returncode == 0, status.stdout
    for name, pid in pids.items():
        assert re.search(rf"^{name}\s+healthy\s+pid {pid}\b", status.stdout, re.MULTILINE), status.stdout
    # The servers answer on the configured ports, over the same state the pipeline uses without them.
    assert httpx.get(f"http://127.0.0.1:{ports['prefect_port']}/api/health", timeout=10).json() is True
    assert httpx.get(f"http://127.0.0.1:{ports['mlflow_port']}/health", timeout=10).status_code == 200
    assert (root / ".langops" / "prefect" / "prefect.db").is_file()
    before = httpx.get(f"http://127.0.0.1:{ports['mlflow_port']}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": "made-before-up"}, timeout=10)
    assert before.status_code == 200, before.text
    endpoints = json.loads((root / ".langops" / "services" / "endpoints.json").read_text())
    assert endpoints["prefect_api_url"] == f"http://127.0.0.1:{ports['prefect_port']}/api"
    assert endpoints["worker_pid"] == pids["prefect-worker"]


@pytest.mark.services
def test_langops_commands_use_the_running_servers_unless_told_otherwise(services, monkeypatch):
    from langops.services import apply_endpoints

    root, params, _ = services
    loaded = load_params(root / "params.yaml")
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    apply_endpoints(loaded)
    assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{params['services']['prefect_port']}/api"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{params['services']['mlflow_port']}"
    assert loaded.tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    apply_endpoints(load_params(root / "params.yaml", ["tracking.uri=http://mlflow.example:5000"]))
    assert os.environ["PREFECT_API_URL"] == "http://prefect.example:4200/api"  # the user's choice wins
    assert "MLFLOW_TRACKING_URI" not in os.environ  # params.yaml names another MLflow: left to it


@pytest.mark.services
def test_the_training_deployment_runs_on_the_worker_and_registers_through_the_mlflow_server(completed_run):
    root, params, deploy_output, deployment, flow_run = completed_run
    api = f"http://127.0.0.1:{params['services']['prefect_port']}/api"
    mlflow = f"http://127.0.0.1:{params['services']['mlflow_port']}"

    # Both deployments, on the process pool, the training one nightly; the project has no flows/ folder,
    # so they run the installed package's flows, starting in the project folder.
    assert "langops-training-pipeline/langops-training" in deploy_output
    assert "cron 0 2 * * * UTC" in deploy_output
    assert deployment["work_pool_name"] == "langops"
    assert deployment["entrypoint"] == "langops.flows.pipeline.training_pipeline"
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(root.resolve())}}
    ]
    assert deployment["parameters"] == {"params_path": "params.yaml", "overrides": [], "dataset": None, "retraining": True}
    schedules = httpx.get(f"{api}/deployments/{deployment['id']}/schedules", timeout=30).json()
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in schedules] == [
        ("0 2 * * *", "UTC", True)
    ]
    sweep = httpx.get(f"{api}/deployments/name/langops-sweep/langops-sweep", timeout=30)
    assert sweep.status_code == 200, sweep.text
    assert sweep.json()["work_pool_name"] == "langops" and sweep.json()["schedules"] == []

    # The run went through the worker: its pool, a process id, and the worker's own log.
    assert flow_run["deployment_id"] == deployment["id"]
    assert (flow_run["work_pool_name"], flow_run["work_queue_name"]) == ("langops", "default")
    assert flow_run["infrastructure_pid"]
    worker_log = (root / ".langops" / "services" / "prefect-worker.log").read_text()
    assert f"Worker 'langops-worker' submitting flow run '{flow_run['id']}'" in worker_log

    task_runs = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}},
                           timeout=30).json()
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs} >= {
        "prepare", "validate", "train", "evaluate", "compress", "register", "promote-decide", "promote-record", "deploy"
    }
    assert all(t["state_type"] == "COMPLETED" for t in task_runs)
    assert ARTIFACT_KEYS <= set(flow_run_artifacts(flow_run["id"], api_url=api))

    # The version is in the registry the MLflow server serves, with its lineage.
    version = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/get",
                        params={"name": "langops-classifier", "version": "1"}, timeout=30).json()["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    for key in ("data_version", "git_commit", "params_hash"):
        assert tags.get(key), f"lineage tag {key} missing: {tags}"
    assert "champion" in version["aliases"]
    run = httpx.get(f"{mlflow}/api/2.0/mlflow/runs/get", params={"run_id": version["run_id"]}, timeout=30).json()
    assert run["run"]["info"]["status"] == "FINISHED"

    # The flow's deploy step started the model server; status now reports it serving the champion.
    status = langops(root, "status")
    assert re.search(r"^model-server\s+healthy\s+pid \d+.*version 1 \(champion\)", status.stdout, re.MULTILINE), status.stdout


@pytest.mark.services
def test_langops_run_in_the_project_uses_the_running_servers(completed_run):
    """No variable set in the shell: `langops run` finds the servers through the endpoints file."""
    root, params, *_ = completed_run
    prefect_port, mlflow_port = params["services"]["prefect_port"], params["services"]["mlflow_port"]
    result = langops(root, "run", "--set", "train.max_epochs=1", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    # not a temporary server (langops' or Prefect's own) but the running one
    assert "temporary Prefect server" not in output and "Starting temporary server" not in output
    flow_run_id = re.search(rf"View at http://127.0.0.1:{prefect_port}/runs/flow-run/([0-9a-f-]+)", output).group(1)
    artifacts = flow_run_artifacts(flow_run_id, api_url=f"http://127.0.0.1:{prefect_port}/api")
    summary = artifacts["pipeline-summary"]["data"]
    assert f"in `http://127.0.0.1:{mlflow_port}`" in summary  # MLflow through its server, not the SQLite file
    version = httpx.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/model-versions/get",
                        params={"name": "langops-classifier", "version": "2"}, timeout=30)
    assert version.status_code == 200, version.text


@pytest.mark.services
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (CI installs Debian's chromium)")
def test_the_uis_show_the_run_and_the_model_in_a_browser(completed_run, tmp_path):
    _, params, _, _, flow_run = completed_run
    prefect_page = f"http://127.0.0.1:{params['services']['prefect_port']}/runs/flow-run/{flow_run['id']}"
    mlflow_page = f"http://127.0.0.1:{params['services']['mlflow_port']}/#/models/langops-classifier"

    prefect_text = _rendered_text(prefect_page, tmp_path, must_show=flow_run["name"])
    for shown in (flow_run["name"], "Completed", "langops-training-pipeline", "langops-training", "Work Pool langops"):
        assert shown in prefect_text, prefect_text[:2000]
    mlflow_text = _rendered_text(mlflow_page, tmp_path, must_show="Version 1")
    for shown in ("langops-classifier", "Version 1", "champion", "data_version", "params_hash"):
        assert shown in mlflow_text, mlflow_text[:2000]

    shots = {"prefect-ui.png": prefect_page, "mlflow-ui.png": mlflow_page}
    for name, url in shots.items():
        _chromium(url, tmp_path, f"--screenshot={tmp_path / name}")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / name).stat().st_size > 20_000  # a rendered page, not a blank one
        if os.environ.get("LANGOPS_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(tmp_path / name, REPO / "docs" / name)


@pytest.mark.services
def test_down_stops_everything_and_leaves_no_process(completed_run):
    root, *_ = completed_run
    pids = set(_service_pids(root).values())
    model_pid = int((root / ".langops" / "server" / "server.pid").read_text())
    tree = [psutil.Process(pid) for pid in pids | {model_pid}]
    tree += [child for process in tree for child in process.children(recursive=True)]

    result = langops(root, "down")
    assert result.returncode == 0, result.stderr
    for name in ("prefect-worker", "model-server", "mlflow-server", "prefect-server"):
        assert re.search(rf"^{name}\s+(stopped|killed)", result.stdout, re.MULTILINE), result.stdout
    assert [p.pid for p in tree if _alive(p)] == []
    assert processes_of(root) == []
    assert not (root / ".langops" / "services" / "endpoints.json").exists()

    status = langops(root, "status")
    assert status.returncode == 1
    assert re.search(r"^prefect-server\s+down\b", status.stdout, re.MULTILINE), status.stdout
    assert langops(root, "down").stdout.count("was not running") == 4


@pytest.mark.services
def test_a_background_process_is_known_by_its_pid_file_and_stopped_with_what_it_started(tmp_path):
    """The one supervisor of `langops up`'s services and the model server: spawn, find, stop, kill, log tail."""
    from langops.processes import Background, Stopped

    marker = f"langops-test-{os.getpid()}"
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
              f"'{marker}']); print('up', flush=True); time.sleep(60)")
    server = Background(tmp_path, "server", marker=marker)
    process = server.spawn([sys.executable, "-c", parent, marker])
    _wait_for(lambda: "up" in server.log_file.read_text())
    child = psutil.Process(process.pid).children()[0]
    assert server.pid() == process.pid and server.pid_file.read_text() == f"{process.pid}\n"

    assert server.stop(timeout_s=10) == Stopped(process.pid, stopped=True, killed=False)
    assert not _alive(child) and not server.pid_file.exists()  # the child left behind was stopped too
    assert server.stop(timeout_s=10) == Stopped(None, stopped=False, killed=False)
    server.pid_file.write_text(f"{os.getpid()}\n")  # a stale file naming a process without the marker
    assert server.pid() is None and not server.stop(timeout_s=10).stopped and _alive(psutil.Process())

    stubborn = Background(tmp_path, "stubborn", marker=marker)
    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    process = stubborn.spawn([sys.executable, "-c", ignores_sigterm, marker])
    _wait_for(lambda: "up" in stubborn.log_file.read_text())
    running = psutil.Process(process.pid)
    assert stubborn.stop(timeout_s=0.5) == Stopped(process.pid, stopped=True, killed=True)
    assert not _alive(running)
    assert stubborn.log_tail() == f"\nlast lines of {stubborn.log_file}:\nup"


@pytest.mark.unit
def test_entrypoints_resolve_to_the_project_flows_or_the_installed_ones(tmp_path):
    from langops.services import ServiceError, resolve_entrypoint

    assert resolve_entrypoint("flows/pipeline.py:training_pipeline", REPO) == "flows/pipeline.py:training_pipeline"
    assert resolve_entrypoint("flows/pipeline.py:training_pipeline", tmp_path) == (
        "langops.flows.pipeline.training_pipeline"
    )
    with pytest.raises(ServiceError, match="flows/nightly.py"):
        resolve_entrypoint("flows/nightly.py:nightly", tmp_path)


@pytest.mark.unit
def test_deploy_without_a_server_or_with_a_bad_prefect_file_says_what_is_wrong(tmp_path, monkeypatch):
    from langops.config import ConfigError
    from langops.services import ServiceError, apply_deployments

    params = load_params(REPO / "params.yaml")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ServiceError, match="langops up"):
        apply_deployments(params, project_dir=tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(ServiceError, match="does not answer"):
        apply_deployments(params, project_dir=tmp_path)
    with pytest.raises(ConfigError, match="prefect_port and mlflow_port must differ"):
        load_params(REPO / "params.yaml", ["services.prefect_port=5000"])


# ---------------------------------------------------------------------------------------------- helpers


def _service_pids(root: Path) -> dict[str, int]:
    folder = root / ".langops" / "services"
    return {path.stem: int(path.read_text()) for path in sorted(folder.glob("*.pid"))}


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000",
        "--window-size=1400,900", "--hide-scrollbars", *args, url,
    ]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)


def _rendered_text(url: str, tmp_path: Path, *, must_show: str, attempts: int = 3) -> str:
    """The visible text of the page after its scripts ran (the served HTML holds none of it)."""
    text = ""
    for _ in range(attempts):
        dom = _chromium(url, tmp_path, "--dump-dom").stdout
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())
        if must_show in text:
            break
    return text

