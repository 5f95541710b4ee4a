"""The team stack's files (infra/): the invariants a broken edit would silently lose.

There is no container engine in CI, so the compose stack itself is not started here. These tests parse
the compose file the way compose interpolates it (``${VAR:-default}``, ``${VAR:?error}``, ``$$``),
check what must hold for every service, and check the client side against the real consumers: langops'
own config and CLI parser, Prefect's settings, and Prefect's work-pool schema and template renderer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ is a literal $.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
ONE_SHOT_JOBS = {"create-buckets"}
CLIENTS = {"prefect-worker", "model-server"}


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over a parsed YAML tree; a missing required variable raises."""
    if isinstance(node, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value or ""

    return _VARIABLE.sub(substitute, node)


def compose_variables() -> set[str]:
    return {m.group("name") for m in _VARIABLE.finditer(COMPOSE.read_text()) if m.group("name")}


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict[str, Any]:
    """The compose file as `docker compose --env-file infra/.env.example` would see it."""
    return interpolate(raw_compose, read_env_file(ENV_EXAMPLE))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping, so anchors can be merged"
    return {k: str(v) for k, v in env.items()}


@pytest.mark.unit
def test_every_service_is_health_checked_or_a_one_shot_job_that_others_wait_for(compose):
    services = compose["services"]
    assert {
        "postgres",
        "minio",
        "create-buckets",
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "model-server",
    } <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT_JOBS:
            assert service.get("restart") == "no" and "healthcheck" not in service, name
            waiters = [s for s in services.values() if s.get("depends_on", {}).get(name)]
            assert waiters and all(
                w["depends_on"][name]["condition"] == "service_completed_successfully" for w in waiters
            ), name
        else:
            check = service.get("healthcheck")
            assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOT_JOBS else "service_healthy"
            assert rule == {"condition": expected}, f"{name} -> {dependency}: {rule}"


@pytest.mark.unit
def test_the_worker_and_the_model_server_start_only_once_their_backends_are_healthy(compose):
    services = compose["services"]
    assert services["prefect-worker"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "prefect-server": {"condition": "service_healthy"},
    }
    assert services["model-server"]["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "create-buckets": {"condition": "service_completed_successfully"},
    }
    assert services["prefect-server"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["create-buckets"]["depends_on"]["minio"] == {"condition": "service_healthy"}


@pytest.mark.unit
def test_published_ports_bind_loopback_unless_the_env_file_says_otherwise(raw_compose):
    required = {
        name: "x"
        for name in (
            "POSTGRES_PASSWORD",
            "MLFLOW_DB_PASSWORD",
            "PREFECT_DB_PASSWORD",
            "LANGOPS_DB_PASSWORD",
            "MINIO_ROOT_USER",
            "MINIO_ROOT_PASSWORD",
        )
    }
    for env in (read_env_file(ENV_EXAMPLE), required):  # the example file, and no PUBLISH_ADDRESS at all
        services = interpolate(raw_compose, env)["services"]
        published = [(name, port) for name, s in services.items() for port in s.get("ports", [])]
        assert {name for name, _ in published} == {"minio", "mlflow", "prefect-server", "model-server"}
        for name, port in published:
            assert isinstance(port, str) and port.count(":") == 2, (
                f"{name}: publish as HOST_IP:PORT:PORT: {port}"
            )
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
    assert "postgres" not in {name for name, _ in published}
    assert read_env_file(ENV_EXAMPLE)["PUBLISH_ADDRESS"] == "127.0.0.1"


@pytest.mark.unit
def test_secrets_have_no_defaults_and_compose_names_the_missing_one(raw_compose):
    env = read_env_file(ENV_EXAMPLE)
    for secret in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "LANGOPS_DB_PASSWORD",
                   "MINIO_ROOT_PASSWORD"):
        assert re.search(r"\$\{" + secret + r":\?[^}]+\}", COMPOSE.read_text()), f"{secret} must be required"
        with pytest.raises(KeyError, match=secret):
            interpolate(raw_compose, {k: v for k, v in env.items() if k != secret})


@pytest.mark.unit
def test_every_variable_of_the_compose_file_is_documented_in_the_env_example_and_vice_versa():
    documented = read_env_file(ENV_EXAMPLE)
    used = compose_variables()
    assert used - set(documented) == set(), "used in docker-compose.yml but missing from .env.example"
    assert set(documented) - used == set(), "in .env.example but not used by docker-compose.yml"
    commented = False  # each variable is explained by a comment in its paragraph
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip():
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            assert commented, f"no comment explains {line!r}"


@pytest.mark.unit
def test_clients_find_the_services_through_the_variables_langops_and_prefect_read(compose, monkeypatch):
    from prefect.settings import Settings

    from langops.config import load_params

    services = compose["services"]
    for name in CLIENTS:
        env = _env(services[name])
        command = " ".join(map(str, services[name]["command"]))
        assert "http://" not in command and "://" not in command.replace("models:/", ""), (
            f"{name} gets an endpoint from its command line, not from its environment: {command}"
        )
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        assert load_params(REPO / "params.yaml").tracking_uri() == "http://mlflow:5000"

    worker = _env(services["prefect-worker"])
    monkeypatch.setenv("PREFECT_API_URL", worker["PREFECT_API_URL"])
    assert Settings().api.url == "http://prefect-server:4200/api"  # the variable Prefect (and the lock) reads
    assert worker["LANGOPS_WORK_POOL"] == "langops-process" and worker["LANGOPS_PROJECT_DIR"] == "/app"
    command = services["prefect-worker"]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert (
        command[command.index("--pool") + 1] == "langops-process"
        and command[command.index("--type") + 1] == "process"
    )
    # The tracking server holds the object-store keys; the model server needs none (artifacts are proxied).
    mlflow = services["mlflow"]
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(_env(mlflow))
    assert not {k for k in _env(services["model-server"]) if k.startswith("AWS_")}
    assert "mlflow" in _env(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


@pytest.mark.unit
def test_the_servers_use_postgres_and_the_object_store(compose):
    services = compose["services"]
    mlflow = services["mlflow"]["command"][-1]
    assert '--backend-store-uri "postgresql+psycopg2://mlflow:$' in mlflow
    assert '--serve-artifacts --artifacts-destination "s3://$' in mlflow
    prefect_db = _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://prefect:") and prefect_db.endswith(
        "@postgres:5432/prefect"
    )
    init = services["postgres"]["volumes"][1].split(":")[0]
    assert (INFRA / init).resolve() == INFRA / "postgres" / "init-databases.sh"
    buckets = services["create-buckets"]["command"][0]
    assert 'mc mb --ignore-existing "store/$MLFLOW_BUCKET"' in buckets and '"store/$DVC_BUCKET"' in buckets
    named = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or source.startswith("./"), f"unnamed volume {volume}"


@pytest.mark.unit
def test_the_model_server_commands_parse_with_the_langops_cli(compose):
    """The compose and Kubernetes model servers run a command line that `langops serve` accepts."""
    from langops.cli import _parser

    k8s = next(
        d for d in yaml.safe_load_all((K8S / "model-server.yaml").read_text()) if d["kind"] == "Deployment"
    )
    k8s_args = k8s["spec"]["template"]["spec"]["containers"][0]["args"]
    for command in (compose["services"]["model-server"]["command"], k8s_args):
        assert command[0] == "langops"
        args = _parser().parse_args(command[1:])
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8765
        assert args.model_uri == "models:/langops-classifier@champion"


def _store_url(value: str) -> sqlalchemy.URL:
    """A compose value with its ``${VAR:?...}`` interpolations filled in, parsed as SQLAlchemy would."""
    return sqlalchemy.make_url(re.sub(r"\$\{[^}]*\}", "filled-in", value))


@pytest.mark.unit
def test_the_model_server_and_the_flow_runs_share_one_prediction_store_in_compose(compose, monkeypatch):
    """The model server writes its prediction log, feedback and issued ids to the store; the worker's flow runs
    (monitor, the retraining run's feedback collection) read it: one database, which the init script creates."""
    from langops.config import load_params
    from langops.fleet_store import StoreLogs
    from langops.monitor import prediction_logs

    services = compose["services"]
    server_store = services["model-server"]["environment"]["LANGOPS_PREDICTION_STORE"]
    assert services["prefect-worker"]["environment"]["LANGOPS_PREDICTION_STORE"] == server_store
    url = _store_url(server_store)
    assert (url.get_backend_name(), url.host, url.database, url.username) == ("postgresql", "postgres", "langops",
                                                                              "langops")
    assert "postgres" in services["model-server"]["depends_on"]
    assert "LANGOPS_DB_PASSWORD" in services["postgres"]["environment"]
    init = (INFRA / "postgres" / "init-databases.sh").read_text()
    assert "CREATE ROLE langops LOGIN PASSWORD :'langops_password';" in init
    assert "CREATE DATABASE langops OWNER langops;" in init
    assert re.search(r"^LANGOPS_DB_PASSWORD=\S+$", (INFRA / ".env.example").read_text(), re.MULTILINE)
    monkeypatch.setenv("LANGOPS_PREDICTION_STORE", str(url))  # what the monitor reads in the worker's flow runs
    assert isinstance(prediction_logs(load_params(REPO / "params.yaml")), StoreLogs)


@pytest.mark.unit
def test_every_kubernetes_replica_and_flow_run_reads_the_prediction_store_secret():
    """Two model-server replicas on their own emptyDir share nothing but the store; the flow-run jobs (monitor,
    retraining) get the same secret."""
    deployment = next(d for d in yaml.safe_load_all((K8S / "model-server.yaml").read_text())
                      if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": "langops-prediction-store"}} in container["envFrom"]  # required, not optional
    secret = next(d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
                  if d["metadata"]["name"] == "langops-prediction-store")
    assert _store_url(secret["stringData"]["LANGOPS_PREDICTION_STORE"]).get_backend_name() == "postgresql"
    job = json.loads((K8S / "base-job-template.json").read_text())["job_configuration"]["job_manifest"]
    (job_container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": "langops-prediction-store", "optional": True}} in job_container["envFrom"]


@pytest.mark.unit
def test_the_image_pins_cpu_torch_like_the_makefile_and_copies_what_exists():
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile_torch = re.search(
        r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE
    ).group(1)
    assert f"ARG TORCH_SPEC={makefile_torch}" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'pip install ".[s3]"' in dockerfile
    kept = {
        line[1:]
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in kept, f"COPY {source}: excluded by Dockerfile.dockerignore"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^s3 = \["dvc-s3[^"]*", "boto3[^"]*"\]$', pyproject, re.MULTILINE)


@pytest.mark.unit
def test_the_kubernetes_manifests_parse_and_probe_the_model_server(tmp_path):
    documents = {path.name: list(yaml.safe_load_all(path.read_text())) for path in K8S.glob("*.yaml")}
    assert set(documents) == {
        "namespace-and-config.yaml",
        "secret.example.yaml",
        "prefect-worker.yaml",
        "model-server.yaml",
    }
    kinds = {(doc["kind"], doc["metadata"]["name"]) for docs in documents.values() for doc in docs}
    assert {
        ("ConfigMap", "langops-endpoints"),
        ("Secret", "langops-s3"),
        ("Secret", "langops-prediction-store"),
        ("Deployment", "prefect-worker"),
        ("Deployment", "langops-model-server"),
        ("Service", "langops-model-server"),
    } <= kinds
    for docs in documents.values():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "langops", doc["metadata"]["name"]

    config = next(d for d in documents["namespace-and-config.yaml"] if d["kind"] == "ConfigMap")["data"]
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"} <= set(config)
    assert config["PREFECT_API_URL"].endswith("/api")

    server = next(d for d in documents["model-server.yaml"] if d["kind"] == "Deployment")
    container = server["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ports["http"] == int(container["args"][container["args"].index("--port") + 1])
    assert container["envFrom"] == [{"configMapRef": {"name": "langops-endpoints"}},
                                    {"secretRef": {"name": "langops-prediction-store"}}]
    service = next(d for d in documents["model-server.yaml"] if d["kind"] == "Service")
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]

    worker = next(d for d in documents["prefect-worker.yaml"] if d["kind"] == "Deployment")
    worker_container = worker["spec"]["template"]["spec"]["containers"][0]
    assert (
        worker_container["args"][:3] == ["prefect", "worker", "start"]
        and "kubernetes" in worker_container["args"]
    )
    assert worker_container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"


@pytest.mark.unit
def test_the_work_pool_template_is_accepted_by_prefect_and_renders_cpu_and_gpu_jobs():
    """Prefect's own work-pool schema accepts the template, and its renderer fills in the job: the
    langops image, endpoints from the ConfigMap and Secret, and a GPU only when a deployment asks."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "base-job-template.json").read_text())
    WorkPoolCreate(name="langops-kubernetes", type="kubernetes", base_job_template=template)
    properties = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}

    def render(**job_variables: Any) -> dict[str, Any]:
        job = apply_values(template["job_configuration"], {**defaults, **job_variables})
        return job["job_manifest"]["spec"]["template"]["spec"]

    cpu = render()
    container = cpu["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 0}
    assert container["envFrom"] == [
        {"configMapRef": {"name": "langops-endpoints"}},
        {"secretRef": {"name": "langops-s3"}},
        {"secretRef": {"name": "langops-prediction-store", "optional": True}},
    ]
    assert container["image"].endswith("/langops:latest") and defaults["namespace"] == "langops"

    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    gpu = render(
        gpu_limit=1, node_selector={"pool": "gpu"}, tolerations=[toleration], image="reg/langops:gpu"
    )
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"pool": "gpu"} and gpu["tolerations"] == [toleration]
    assert gpu["containers"][0]["image"] == "reg/langops:gpu"


@pytest.mark.unit
@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed",
)
def test_docker_compose_accepts_the_file():
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.services
def test_the_postgres_init_script_creates_one_database_and_role_per_service():
    """Run infra/postgres/init-databases.sh as the postgres image would, on a real PostgreSQL."""
    from postgres_helpers import POSTGRES_SYSTEM_USER, postgres_unavailable_reason, running_postgres

    if reason := postgres_unavailable_reason():
        pytest.skip(reason)
    import psycopg2

    with running_postgres([], user="tester") as cluster:  # not the "langops" role the script creates
        script = INFRA / "postgres" / "init-databases.sh"
        env = {
            "POSTGRES_USER": "postgres",
            "PGHOST": str(cluster.socket_dir),
            "PGPORT": str(cluster.port),
            "MLFLOW_DB_PASSWORD": "mlflow-pw",
            "PREFECT_DB_PASSWORD": "prefect-pw",
            "LANGOPS_DB_PASSWORD": "langops-pw",
            "PATH": f"{cluster.bin_dir}:/usr/bin:/bin",
        }
        result = subprocess.run(
            [
                "runuser",
                "-u",
                POSTGRES_SYSTEM_USER,
                "--",
                "env",
                *(f"{k}={v}" for k, v in env.items()),
                "sh",
                str(script),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

        def connect(role: str, password: str, database: str):
            return psycopg2.connect(
                host="127.0.0.1", port=cluster.port, user=role, password=password, dbname=database
            )

        for role, password in (("mlflow", "mlflow-pw"), ("prefect", "prefect-pw"), ("langops", "langops-pw")):
            with connect(role, password, role) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT current_user, pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                    (role,),
                )
                assert cur.fetchone() == (role, role)
                cur.execute("CREATE TABLE owned (id int)")
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect("mlflow", "wrong", "mlflow")
        with (
            connect("mlflow", "mlflow-pw", "prefect") as conn,
            conn.cursor() as cur,
            pytest.raises(psycopg2.errors.InsufficientPrivilege),
        ):
            cur.execute("SELECT * FROM owned")  # the prefect role's table
        from langops.fleet_store import LOG_TABLES, Database

        store = Database(f"postgresql+psycopg2://langops:langops-pw@127.0.0.1:{cluster.port}/langops", LOG_TABLES)
        try:
            with store.engine().connect() as connection:  # the model server's role creates the store's tables
                assert connection.execute(sqlalchemy.text("SELECT count(*) FROM prediction_log")).scalar() == 0
        finally:
            store.dispose()

        missing = subprocess.run(
            ["sh", str(script)], check=False, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
        )
        assert missing.returncode != 0 and "MLFLOW_DB_PASSWORD" in missing.stderr
