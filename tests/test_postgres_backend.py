"""The whole pipeline, run as a user runs it, against team servers on a real PostgreSQL.

An MLflow tracking server (PostgreSQL backend store, proxied artifacts) and a Prefect server (PostgreSQL
database) run as separate processes, and ``langops run`` reaches them only through
``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL``, as a laptop pointed at the team's servers would. The
rows are then read straight from PostgreSQL, so a silent fallback to an embedded SQLite store fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pipeline_helpers import DEMO_LABELS, flow_run_artifacts, free_port, tiny_project_params, write_params
from postgres_helpers import postgres_unavailable_reason, running_postgres, running_server_process

from langops.config import load_params
from langops.lineage import dvc_dir_md5

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(postgres_unavailable_reason() is not None, reason=postgres_unavailable_reason() or ""),
]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
MODEL = "langops-classifier"
PIPELINE_TIMEOUT_S = 600


def _server_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MLflow/Prefect endpoint that could leak into a server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


def _compose_allowed_hosts() -> str:
    """The MLFLOW_ALLOWED_HOSTS the team stack starts MLflow with (infra/.env.example)."""
    for line in (REPO / "infra" / ".env.example").read_text().splitlines():
        if line.startswith("MLFLOW_ALLOWED_HOSTS="):
            return line.partition("=")[2]
    raise AssertionError("MLFLOW_ALLOWED_HOSTS is not set in infra/.env.example")


@pytest.fixture(scope="module")
def postgres():
    with running_postgres(["mlflow", "prefect"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        BIN / "mlflow",
        "server",
        "--backend-store-uri",
        postgres.url("mlflow", "postgresql+psycopg2"),
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with running_server_process(
        command,
        url=f"http://127.0.0.1:{port}",
        health_path="/health",
        # As in infra/docker-compose.yml: no server-side (GenAI) job runners, and the Host headers it answers.
        env=_server_env(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_SERVER_ALLOWED_HOSTS=_compose_allowed_hosts()
        ),
        log_path=root / "server.log",
    ) as server:
        yield server, root / "artifacts"


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = _server_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("prefect", "postgresql+asyncpg"),
        PREFECT_SERVER_UI_ENABLED="false",
    )
    command = [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with running_server_process(
        command,
        url=f"http://127.0.0.1:{port}",
        health_path="/api/health",
        env=env,
        log_path=home / "server.log",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server, prefect_server, tmp_path_factory, tiny_base_model):
    """``langops run`` in a fresh project folder whose only link to the servers is two variables."""
    mlflow, _ = mlflow_server
    root = tmp_path_factory.mktemp("team-project")
    write_params(root, tiny_project_params(root, tiny_base_model))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(
        MLFLOW_TRACKING_URI=mlflow.url,
        PREFECT_API_URL=f"{prefect_server.url}/api",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "langops.cli", "run"],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=PIPELINE_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"langops run failed ({result.returncode}):\n{result.stderr[-6000:]}\n"
        f"--- MLflow server log ---\n{mlflow.log_tail()}\n"
        f"--- Prefect server log ---\n{prefect_server.log_tail()}"
    )
    return root, result


def _mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    server, _ = mlflow_server
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def test_the_version_is_registered_with_lineage_and_made_champion_on_the_tracking_server(
    pipeline_run, mlflow_server
):
    root, result = pipeline_run
    params = load_params(root / "params.yaml")
    client = _mlflow_client(mlflow_server)

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.status == "READY"
    assert champion.tags["data_version"] == dvc_dir_md5(params.paths.prepared)
    assert champion.tags["params_hash"] == params.section_hash()
    assert champion.tags["git_commit"]  # "unknown" here: the project folder is not a git work tree
    assert f"{MODEL} version 1 (promoted to champion)" in result.stdout
    assert f"MLflow run       {champion.run_id}" in result.stdout
    # The model's files went through the server's artifact proxy to its destination, not to the project.
    _, artifacts = mlflow_server
    assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert any(artifacts.rglob("*.onnx")), "no ONNX file under the server's --artifacts-destination"
    assert not (root / ".langops" / "mlflow.db").exists() and not (root / ".langops" / "mlartifacts").exists()
    # The promotion was recorded in the shared log, under the Prefect-held champion lock.
    promotions = client.get_experiment_by_name("langops-promotions")
    records = client.search_runs([promotions.experiment_id], filter_string="attributes.status = 'FINISHED'")
    assert [r.data.tags["langops.to_version"] for r in records] == ["1"]


def test_the_flow_run_completed_with_its_tasks_and_artifacts_on_the_prefect_server(
    pipeline_run, prefect_server
):
    api = f"{prefect_server.url}/api"
    with httpx.Client(base_url=api, trust_env=False, timeout=30) as http:
        flow_runs = http.post("/flow_runs/filter", json={}).json()
        assert [(r["name"] != "", r["state_type"]) for r in flow_runs] == [(True, "COMPLETED")]
        flow_run_id = flow_runs[0]["id"]
        flow = http.get(f"/flows/{flow_runs[0]['flow_id']}").json()
        assert flow["name"] == "langops-training-pipeline"

        task_runs = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        # A task run is named after its task plus a short random suffix: "train-a1b".
        states = {run["name"].rsplit("-", 1)[0]: run["state_type"] for run in task_runs}
        expected = {
            "prepare",
            "validate",
            "train",
            "evaluate",
            "compress",
            "register",
            "promote-decide",
            "promote-record",
        }
        assert expected <= set(states), sorted(states)
        assert {states[name] for name in expected} == {"COMPLETED"}

        artifacts = flow_run_artifacts(flow_run_id, api_url=api)
        keys = set(artifacts)
        assert {"validation-report", "test-metrics", "promotion-decision", "pipeline-summary"} <= keys, keys
        assert "version 1: promoted to champion" in artifacts["pipeline-summary"]["data"]


def test_the_rows_are_in_postgresql(pipeline_run, postgres):
    """Read the databases directly: the servers really stored everything in PostgreSQL."""
    assert postgres.query("mlflow", "SELECT name FROM registered_models") == [(MODEL,)]
    assert postgres.query("mlflow", "SELECT name, version FROM model_versions") == [(MODEL, 1)]
    assert postgres.query(
        "mlflow",
        "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'",
        (MODEL,),
    ) == [(1,)]
    assert (
        postgres.query("mlflow", "SELECT value FROM model_version_tags WHERE key = 'params_hash'")[0][0]
        == load_params(pipeline_run[0] / "params.yaml").section_hash()
    )

    flow_runs = postgres.query(
        "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id"
    )
    assert [(name, str(state)) for name, state in flow_runs] == [("langops-training-pipeline", "COMPLETED")]
    assert postgres.query("prefect", "SELECT count(*) FROM task_run")[0][0] >= 8
    assert postgres.query("prefect", "SELECT count(*) FROM artifact WHERE key = 'pipeline-summary'") == [(1,)]
    # The champion lock on a shared store is a one-slot global concurrency limit on the Prefect server.
    assert postgres.query(
        "prefect",
        'SELECT "limit", active_slots FROM concurrency_limit_v2 WHERE name = %s',
        (f"langops-champion-{MODEL}",),
    ) == [(1, 0)]


def test_the_model_server_serves_the_champion_from_the_tracking_server(pipeline_run, mlflow_server, tmp_path):
    """What the team stack's model server runs: the champion, found and downloaded through MLflow only."""
    root, _ = pipeline_run
    mlflow, _ = mlflow_server
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(MLFLOW_TRACKING_URI=mlflow.url, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "langops.cli",
        "serve",
        "--params",
        str(root / "params.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-uri",
        f"models:/{MODEL}@champion",
    ]
    with (
        running_server_process(
            command,
            url=f"http://127.0.0.1:{port}",
            health_path="/ready",
            env=env,
            log_path=tmp_path / "serve.log",
        ) as server,
        httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        reply = http.post("/predict", json={"texts": ["I was charged twice this month"]})
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Model-Version"] == "1"
        assert reply.json()["predictions"][0]["label"] in DEMO_LABELS


def test_the_compose_worker_command_creates_its_process_pool_and_reports_healthy(prefect_server, tmp_path):
    """The worker of infra/docker-compose.yml, started with its own command line and health check port."""
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    worker = compose["services"]["prefect-worker"]
    command = [
        part.replace("${PREFECT_WORK_POOL:-langops-process}", "langops-process") for part in worker["command"]
    ]
    health_port = free_port()
    env = _server_env(
        PREFECT_API_URL=f"{prefect_server.url}/api",
        PREFECT_HOME=str(tmp_path / "worker-home"),
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
        PREFECT_WORKER_WEBSERVER_PORT=str(health_port),
    )
    command[0] = str(BIN / command[0])
    with running_server_process(
        command,
        url=f"http://127.0.0.1:{health_port}",
        health_path="/health",
        env=env,
        log_path=tmp_path / "worker.log",
    ):
        # The health server answers as soon as the worker starts; the pool and its heartbeat follow.
        deadline = time.monotonic() + 60
        while True:
            pool = httpx.get(f"{prefect_server.url}/api/work_pools/langops-process", timeout=30)
            workers = httpx.post(
                f"{prefect_server.url}/api/work_pools/langops-process/workers/filter", json={}, timeout=30
            )
            if pool.status_code == 200 and workers.status_code == 200 and workers.json():
                break
            assert time.monotonic() < deadline, f"no pool or worker after 60 s: {pool.text} {workers.text}"
            time.sleep(0.5)
        assert pool.json()["type"] == "process"
        assert workers.json()[0]["status"] == "ONLINE"


def test_the_kubernetes_work_pool_is_created_as_the_infra_readme_says(prefect_server, tmp_path):
    template = REPO / "infra" / "k8s" / "base-job-template.json"
    env = _server_env(PREFECT_API_URL=f"{prefect_server.url}/api", PREFECT_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [
            BIN / "prefect",
            "work-pool",
            "create",
            "langops-kubernetes",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(template),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pool = httpx.get(f"{prefect_server.url}/api/work_pools/langops-kubernetes", timeout=30).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(template.read_text())


def test_the_tracking_server_answers_containers_that_call_it_by_its_service_name(mlflow_server):
    """Inside the compose network clients send ``Host: mlflow:5000``; MLflow's DNS-rebinding protection
    refuses names it was not given, so the stack's allowed hosts must include it (and nothing else)."""
    server, _ = mlflow_server
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    for host, status in (("mlflow:5000", 200), ("127.0.0.1:5000", 200), ("attacker.example", 403)):
        assert httpx.get(search, headers={"Host": host}, timeout=30).status_code == status, host
