"""Local services for one project: a Prefect server and worker, an MLflow server, and the model server.

``langops up`` starts them detached on ``services.host`` (pid files and logs under
``<state_dir>/services/``) over the project's own state: Prefect's database in ``PREFECT_HOME``
(``<state_dir>/prefect``) and MLflow's SQLite store and artifact folder, the same ones the pipeline
uses without servers, so runs made before ``up`` show in both UIs. It records the URLs in
``<state_dir>/services/endpoints.json``; while the servers live, every ``langops`` command reads that
file (``apply_endpoints``) and talks to them, unless ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` are
already set or ``tracking.uri`` names another MLflow.

Without them, ``langops run`` and ``langops sweep`` start a temporary Prefect server for their own
process and wait for it (``start_temporary_prefect_server``); it stops when the command ends.

``langops deploy`` applies the deployments declared in ``prefect.yaml`` (``apply_deployments``).
Nothing here imports Prefect or MLflow at module level: ``apply_endpoints`` runs before Prefect is
imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from langops.config import Params
from langops.processes import POLL_INTERVAL_S, Background, is_process, reap_helpers_on_exit, write_atomic

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

SERVICES_DIR = "services"
ENDPOINTS_FILE = "endpoints.json"
PREFECT_SERVER = "prefect-server"
MLFLOW_SERVER = "mlflow-server"
PREFECT_WORKER = "prefect-worker"
MODEL_SERVER = "model-server"
# The deployments' entrypoints name flow files relative to the project (`flows/<name>.py:<flow>`); a
# project without its own flows/ runs the same files installed as the package `langops.flows`.
FLOWS_FOLDER = "flows"
INSTALLED_FLOWS_PACKAGE = "langops.flows"
SOURCE_ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"\{\{\s*\$?(\w+)\s*\}\}")

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service could not be started, stopped or reached; the message says which and why."""


class PortInUseError(ServiceError):
    """A port a service needs is taken by something that is not this project's service."""


class TemporaryServerError(ServiceError):
    """A run's temporary Prefect server did not answer within ``services.temporary_server_timeout_s``."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    url: str | None
    healthy: bool
    detail: str


@dataclass(frozen=True)
class Endpoints:
    """What ``up`` wrote and ``apply_endpoints`` reads: the servers' URLs and pids."""

    prefect_api_url: str
    prefect_ui_url: str
    mlflow_tracking_uri: str
    prefect_pid: int
    mlflow_pid: int
    worker_pid: int
    work_pool: str
    worker_name: str


@dataclass(frozen=True)
class StopResult:
    name: str
    pid: int | None
    stopped: bool
    killed: bool


@dataclass(frozen=True)
class UpResult:
    statuses: list[ServiceStatus]
    started: list[str]
    notes: list[str]


@dataclass(frozen=True)
class DeploymentApplied:
    """A deployment as the Prefect server holds it after ``apply_deployments``."""

    name: str
    flow_name: str
    entrypoint: str
    work_pool: str
    schedules: list[str]


@dataclass(frozen=True)
class _Service:
    """One detached server process this module manages by pid file."""

    name: str
    port: int | None
    command: list[str]
    env: dict[str, str]


# ----------------------------------------------------------------------------------------------- paths


def services_dir(params: Params) -> Path:
    return params.project.state_dir / SERVICES_DIR


def prefect_url(params: Params) -> str:
    return f"http://{_client_host(params.services.host)}:{params.services.prefect_port}"


def mlflow_url(params: Params) -> str:
    return f"http://{_client_host(params.services.host)}:{params.services.mlflow_port}"


def worker_name(params: Params) -> str:
    return f"{params.services.work_pool}-worker"


# ------------------------------------------------------------------------------------------ endpoints


def read_endpoints(state_dir: Path) -> Endpoints | None:
    """The endpoints ``up`` recorded, or None when there are none or the servers are gone."""
    path = Path(state_dir) / SERVICES_DIR / ENDPOINTS_FILE
    try:
        endpoints = Endpoints(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not (is_process(endpoints.prefect_pid, "prefect") and is_process(endpoints.mlflow_pid, "mlflow")):
        return None
    return endpoints


def apply_endpoints(params: Params) -> Endpoints | None:
    """Point this process at the running services: ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI``.

    A variable the user already set wins, and ``MLFLOW_TRACKING_URI`` is only set when the project uses
    the embedded store (``tracking.uri: null``): the local MLflow server serves exactly that store.
    Cheap (one small file, two pid checks), so every command can call it before importing Prefect.
    """
    endpoints = read_endpoints(params.project.state_dir)
    if endpoints is None:
        return None
    os.environ.setdefault("PREFECT_API_URL", endpoints.prefect_api_url)
    if params.tracking.uri is None:
        os.environ.setdefault("MLFLOW_TRACKING_URI", endpoints.mlflow_tracking_uri)
    return endpoints


# ----------------------------------------------------------------------------------- temporary server


def start_temporary_prefect_server(params: Params) -> str | None:
    """Start the temporary Prefect server this process's flows will use, now, and wait for it.

    With no Prefect API configured (no ``PREFECT_API_URL``, no ``langops up``) Prefect starts a temporary
    server when a flow first needs one and gives it ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
    (20 s). A first start creates and migrates the SQLite database in ``PREFECT_HOME``, which on two busy
    cores takes longer, so a first run could die before its first step. This starts Prefect's own server
    object, the one instance every Prefect client in this process reuses, up front and waits
    ``services.temporary_server_timeout_s`` for it. Prefect stops it when the process exits; so that a
    SIGTERM (a cancelled CI job, ``timeout``, ``kill``) does not orphan it, this process answers SIGTERM
    by exiting through ``SystemExit``, which runs the exit handlers that Python's default action skips
    (Prefect's flow engine hands a SIGTERM on to it after marking its run crashed). A SIGKILL runs no
    handler at all; ``reap_helpers_on_exit`` takes the server down then.

    Returns:
        The server's API URL; None when a Prefect API is configured or temporary servers are switched off
        (``PREFECT_SERVER_EPHEMERAL_ENABLED``), and nothing was started.

    Raises:
        TemporaryServerError: the server did not answer in time; the message names the setting to raise.
    """
    return begin_temporary_prefect_server(params).wait()


@dataclass
class TemporaryServerStart:
    """A temporary Prefect server starting in a background thread; ``wait`` for its URL (None: none needed)."""

    thread: threading.Thread | None = None
    url: str | None = None
    error: BaseException | None = None
    timeout_s: float = 0.0
    default_s: float = 0.0

    def wait(self) -> str | None:
        """The server's API URL once it answers.

        Raises:
            TemporaryServerError: it did not answer within ``services.temporary_server_timeout_s``.
        """
        if self.thread is None:
            return None
        self.thread.join()
        if isinstance(self.error, RuntimeError):
            raise TemporaryServerError(
                f"the temporary Prefect server did not answer within {self.timeout_s:g} s "
                f"(services.temporary_server_timeout_s): raise it, e.g. --set "
                f"services.temporary_server_timeout_s={max(2 * self.timeout_s, self.default_s):g}, or keep a "
                f"server running with `langops up`. Prefect said: {self.error}"
            ) from self.error
        if self.error is not None:
            raise self.error
        return self.url


def begin_temporary_prefect_server(params: Params) -> TemporaryServerStart:
    """``start_temporary_prefect_server`` without the wait: the server boots (about 9 s on 2 cores) while this
    process goes on loading the flow it will run (torch, transformers: as long again); ``wait()`` before the
    flow starts."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return TemporaryServerStart()
    from prefect.server.api.server import SubprocessASGIServer  # imported here: in a thread it holds the GIL

    timeout_s = params.services.temporary_server_timeout_s
    default_s = type(params.services).model_fields["temporary_server_timeout_s"].default
    log.info(
        "starting a temporary Prefect server for this run (a first start creates its database in %s; "
        "waiting up to %g s; `langops up` keeps one running)", settings.home, timeout_s,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    reap_helpers_on_exit()  # so that a SIGKILLed run does not leave its server behind
    starting = TemporaryServerStart(timeout_s=timeout_s, default_s=default_s)

    def start() -> None:
        prefect_log = logging.getLogger("prefect")
        level = prefect_log.level
        prefect_log.setLevel(logging.WARNING)  # the line above replaces Prefect's "Starting temporary server"
        started = time.perf_counter()
        try:
            server = start_subprocess_prefect_server(SubprocessASGIServer, timeout_s)
        except BaseException as exc:
            starting.error = exc
            return
        finally:
            prefect_log.setLevel(level)
        if server.server_process is not None:
            reap_helpers_on_exit(server.server_process.pid)  # named, not only seen: it dies with this process
        starting.url = server.api_url
        log.info("temporary Prefect server up at %s after %.1f s", server.api_url, time.perf_counter() - started)

    starting.thread = threading.Thread(target=start, name="langops-temporary-prefect-server", daemon=True)
    starting.thread.start()
    return starting


TEMPORARY_SERVER_ATTEMPTS = 3


def start_subprocess_prefect_server(
    server_class: type[SubprocessASGIServer], timeout_s: float
) -> SubprocessASGIServer:
    """Start Prefect's subprocess server, the instance its clients in this process reuse, within ``timeout_s``.

    Prefect's own start retries a refused connection only. A reset one (a port that another process took
    between Prefect choosing it and the server binding it, answering for a moment and then going away)
    ends its start with ``httpx.ReadError``; this starts the server again on a newly chosen port, up to
    ``TEMPORARY_SERVER_ATTEMPTS`` times within the same deadline. A server that fails for good is stopped
    (Prefect would leave it running until this process exits).
    """
    deadline = time.monotonic() + timeout_s
    attempt = 1
    while True:
        server = server_class()  # a new instance each time: a stopped one leaves Prefect's registry
        try:
            server.start(timeout=max(deadline - time.monotonic(), 0.1))
            return server
        except httpx.TransportError as exc:
            server.stop()
            if attempt == TEMPORARY_SERVER_ATTEMPTS or time.monotonic() >= deadline:
                raise
            log.warning("the temporary Prefect server on %s did not answer (%s: %s); starting it on another "
                        "port", server.address, type(exc).__name__, exc)
        except BaseException:
            server.stop()
            raise
        attempt += 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------- up


def start_services(params: Params) -> UpResult:
    """Start whatever of the Prefect server, MLflow server, worker and model server is not running.

    Services already running are left alone (``up`` twice is harmless). Ports are checked before
    anything starts; if a service then fails to become healthy, the services this call started are
    stopped again, so nothing is left half up.

    Returns:
        The status of every service after the call, the ones this call started, and notes (why the
        model server did not start).

    Raises:
        PortInUseError: a port is held by another process (the port, service and param are named).
        ServiceError: a service exited or did not become healthy within ``services.start_timeout_s``
            (with the tail of its log).
    """
    cfg = params.services
    folder = services_dir(params)
    folder.mkdir(parents=True, exist_ok=True)
    (params.project.state_dir / "prefect").mkdir(parents=True, exist_ok=True)
    servers = [_prefect_server(params), _mlflow_server(params)]
    _check_ports(params, [s for s in servers if _running_pid(folder, s.name) is None])

    started: list[str] = []
    deadline = time.monotonic() + cfg.start_timeout_s
    try:
        for service in servers:
            if _running_pid(folder, service.name) is None:
                _spawn(folder, service)
                started.append(service.name)
        _wait_healthy(folder, PREFECT_SERVER, lambda: _prefect_healthy(params), deadline)
        _wait_healthy(folder, MLFLOW_SERVER, lambda: _mlflow_healthy(params), deadline)
        ensure_work_pool(f"{prefect_url(params)}/api", cfg.work_pool)
        if _running_pid(folder, PREFECT_WORKER) is None:
            _spawn(folder, _prefect_worker(params))
            started.append(PREFECT_WORKER)
        _wait_healthy(folder, PREFECT_WORKER, lambda: _worker_online(params), deadline)
    except BaseException:
        for name in reversed(started):
            _stop_service(folder, name, cfg.stop_timeout_s)
        raise
    _write_endpoints(params)
    model_started, notes = _start_model_server(params)
    if model_started:
        started.append(MODEL_SERVER)
    return UpResult(statuses=service_status(params), started=started, notes=notes)


def ensure_work_pool(api_url: str, name: str) -> bool:
    """Create the ``process`` work pool ``name`` if missing; True when created.

    Raises:
        ServiceError: a pool of that name exists with another type (a process worker cannot serve it).
    """
    from prefect.workers.process import ProcessWorker

    with httpx.Client(base_url=api_url, timeout=30, trust_env=False) as client:
        existing = client.get(f"/work_pools/{name}")
        if existing.status_code == 200:
            if existing.json()["type"] != "process":
                raise ServiceError(
                    f"work pool {name!r} exists with type {existing.json()['type']!r}, not 'process'; "
                    "set services.work_pool to another name"
                )
            return False
        reply = client.post(
            "/work_pools/",
            json={"name": name, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template(),
                  "description": "langops flows, run as local processes by `langops up`'s worker"},
        )
        if reply.status_code not in (200, 201):
            raise ServiceError(f"could not create work pool {name!r}: {reply.status_code} {reply.text[:300]}")
    return True


def _prefect_server(params: Params) -> _Service:
    cfg = params.services
    return _Service(
        name=PREFECT_SERVER,
        port=cfg.prefect_port,
        command=[sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host,
                 "--port", str(cfg.prefect_port), "--analytics-off"],
        # The UI (a browser app) calls the API at PREFECT_UI_API_URL, which defaults to port 4200.
        env={**_prefect_env(params, api_url=f"{prefect_url(params)}/api"),
             "PREFECT_UI_API_URL": f"{prefect_url(params)}/api", "PREFECT_UI_URL": prefect_url(params)},
    )


def _mlflow_server(params: Params) -> _Service:
    cfg = params.services
    return _Service(
        name=MLFLOW_SERVER,
        port=cfg.mlflow_port,
        command=[sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", params.embedded_tracking_uri(),
                 # New experiments get the same local artifact folder as the embedded store; clients on
                 # this machine read and write it directly, and the UI reads it through the server.
                 "--default-artifact-root", params.artifact_root(), "--no-serve-artifacts",
                 "--host", cfg.host, "--port", str(cfg.mlflow_port), "--workers", "1"],
        # No job runner: it serves GenAI jobs langops does not use, and adds processes to every start.
        env={**{k: v for k, v in _base_env().items() if not k.startswith("MLFLOW_")},
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )


def _prefect_worker(params: Params) -> _Service:
    env = _prefect_env(params, api_url=f"{prefect_url(params)}/api")
    # Flow runs are children of the worker and inherit this: they track to the local MLflow server
    # unless params.yaml names another one (tracking.uri wins over nothing but the env var).
    if params.tracking.uri is None:
        env["MLFLOW_TRACKING_URI"] = mlflow_url(params)
    return _Service(
        name=PREFECT_WORKER,
        port=None,
        command=[sys.executable, "-m", "prefect", "worker", "start", "--pool", params.services.work_pool,
                 "--type", "process", "--name", worker_name(params)],
        env=env,
    )


def _prefect_env(params: Params, *, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in _base_env().items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    env["PREFECT_HOME"] = str((params.project.state_dir / "prefect").resolve())
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _check_ports(params: Params, services: list[_Service]) -> None:
    """Fail before anything starts when a port is taken, naming the port, the service and the param."""
    keys = {PREFECT_SERVER: "services.prefect_port", MLFLOW_SERVER: "services.mlflow_port"}
    problems = [
        f"port {s.port} on {params.services.host} ({s.name}, {keys[s.name]}) is already in use"
        f"{_holder(s.port)}"
        for s in services
        if s.port is not None and not _port_free(params.services.host, s.port)
    ]
    if params.deploy.port in (params.services.prefect_port, params.services.mlflow_port):
        problems.append(f"deploy.port {params.deploy.port} is also a services port")
    if problems:
        raise PortInUseError(
            "cannot start the local services, nothing was started:\n  " + "\n  ".join(problems)
            + "\nstop what holds the port or choose another one in params.yaml (or --set KEY=PORT)"
        )


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _holder(port: int) -> str:
    """`` by pid N (cmd)`` for the process listening on ``port``, when the OS tells us."""
    import psutil

    try:
        for conn in psutil.net_connections("inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
    except (psutil.Error, OSError):
        pass
    return ""


def _spawn(folder: Path, service: _Service) -> int:
    """Start ``service`` detached (it outlives this command), with its pid file and log."""
    return _process(folder, service.name).spawn(service.command, env=service.env).pid


def _wait_healthy(folder: Path, name: str, check, deadline: float) -> None:
    last = "no answer yet"
    while time.monotonic() < deadline:
        if _running_pid(folder, name) is None:
            raise ServiceError(f"{name} exited while starting{_process(folder, name).log_tail()}")
        healthy, last = check()
        if healthy:
            return
        time.sleep(POLL_INTERVAL_S)
    raise ServiceError(
        f"{name} did not become healthy in time (services.start_timeout_s); last check: {last}"
        f"{_process(folder, name).log_tail()}"
    )


def _write_endpoints(params: Params) -> None:
    folder = services_dir(params)
    endpoints = Endpoints(
        prefect_api_url=f"{prefect_url(params)}/api",
        prefect_ui_url=prefect_url(params),
        mlflow_tracking_uri=mlflow_url(params),
        prefect_pid=_running_pid(folder, PREFECT_SERVER) or 0,
        mlflow_pid=_running_pid(folder, MLFLOW_SERVER) or 0,
        worker_pid=_running_pid(folder, PREFECT_WORKER) or 0,
        work_pool=params.services.work_pool,
        worker_name=worker_name(params),
    )
    write_atomic(folder / ENDPOINTS_FILE, json.dumps(asdict(endpoints), indent=2) + "\n")


def _start_model_server(params: Params) -> tuple[bool, list[str]]:
    """Serve the champion if there is one and no server answers yet: (started now, why not).

    A model server problem (no champion yet, its port taken) does not undo the other services: they
    are useful without it, and the pipeline's deploy step starts the server once a model is promoted.
    """
    from langops.serving.registry import ModelSource, ModelSourceError
    from langops.tasks.deploy import SERVER_DIR, DeploymentError, deploy

    if not params.deploy.enabled:
        return False, ["model server not started: deploy.enabled is false"]
    if _model_server_ready(params)[0]:
        return False, []
    tracking_uri = params.tracking.uri or mlflow_url(params)
    model = params.register.model_name
    source = ModelSource(tracking_uri, model, cache_dir=params.project.state_dir / SERVER_DIR)
    try:
        champion = source.current_version()
    except ModelSourceError:
        return False, [f"model server not started: {model} has no champion yet (the pipeline's deploy step starts it)"]
    try:
        result = deploy(params.deploy, tracking_uri=tracking_uri, model_name=model, expected_version=champion,
                        state_dir=params.project.state_dir, stop_timeout_s=params.services.stop_timeout_s,
                        experiment=params.tracking.experiment)
    except DeploymentError as exc:
        return False, [f"model server not started: {exc}"]
    return result.started, []


# --------------------------------------------------------------------------------------------- status


def service_status(params: Params) -> list[ServiceStatus]:
    """Each service: its pid, URL, and whether it answers its health check right now."""
    folder = services_dir(params)
    checks = {
        PREFECT_SERVER: (prefect_url(params), lambda: _prefect_healthy(params)),
        MLFLOW_SERVER: (mlflow_url(params), lambda: _mlflow_healthy(params)),
        PREFECT_WORKER: (None, lambda: _worker_online(params)),
    }
    statuses = []
    for name, (url, check) in checks.items():
        pid = _running_pid(folder, name)
        if pid is None:
            statuses.append(ServiceStatus(name, None, url, False, "not running"))
            continue
        healthy, detail = check()
        statuses.append(ServiceStatus(name, pid, url, healthy, detail))
    statuses.append(_model_server_status(params))
    return statuses


def _prefect_healthy(params: Params) -> tuple[bool, str]:
    return _http_ok(f"{prefect_url(params)}/api/health", "API and UI answer")


def _mlflow_healthy(params: Params) -> tuple[bool, str]:
    return _http_ok(f"{mlflow_url(params)}/health", f"tracking and registry on {params.embedded_tracking_uri()}")


def _worker_online(params: Params) -> tuple[bool, str]:
    """The worker is healthy when the Prefect server lists it ONLINE in its pool (it heartbeats)."""
    pool = params.services.work_pool
    try:
        reply = httpx.post(f"{prefect_url(params)}/api/work_pools/{pool}/workers/filter", json={}, timeout=5,
                           trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"Prefect server unreachable: {exc!r}"
    if reply.status_code != 200:
        return False, f"work pool {pool!r}: {reply.status_code} {reply.text[:200]}"
    workers = {w["name"]: w.get("status") for w in reply.json()}
    status = workers.get(worker_name(params))
    if status == "ONLINE":
        return True, f"polling work pool {pool!r} as {worker_name(params)!r}"
    return False, f"{worker_name(params)!r} is {status or 'not registered yet'} in work pool {pool!r}"


def _model_server_status(params: Params) -> ServiceStatus:
    from langops.tasks.deploy import server_url

    url = server_url(params.deploy.host, params.deploy.port)
    pid = _model_server_pid(params)
    if not params.deploy.enabled:
        return ServiceStatus(MODEL_SERVER, pid, url, False, "deploy.enabled is false: not started by up")
    ready, detail = _model_server_ready(params)
    if pid is None and not ready:
        detail = "not running: `langops up` or the pipeline's deploy step starts it when there is a champion"
    return ServiceStatus(MODEL_SERVER, pid, url, ready, detail)


def _model_server_ready(params: Params) -> tuple[bool, str]:
    from langops.tasks.deploy import auth_headers, server_url

    url = server_url(params.deploy.host, params.deploy.port)
    headers = auth_headers(params.deploy)  # the server requires the token on /ready and /version when it is set
    try:
        ready = httpx.get(f"{url}/ready", headers=headers, timeout=5, trust_env=False)
        version = (
            httpx.get(f"{url}/version", headers=headers, timeout=5, trust_env=False).json()
            if ready.status_code == 200 else {}
        )
    except (httpx.HTTPError, ValueError) as exc:
        return False, f"no answer: {type(exc).__name__}"
    if ready.status_code != 200:
        return False, f"/ready answered {ready.status_code}"
    return True, f"serving {version.get('model_name')} version {version.get('version')} ({version.get('alias')})"


def _model_server_pid(params: Params) -> int | None:
    from langops.tasks.deploy import server_process

    return server_process(params.project.state_dir).pid()


def _http_ok(url: str, detail: str) -> tuple[bool, str]:
    try:
        reply = httpx.get(url, timeout=5, trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"no answer at {url}: {type(exc).__name__}"
    return (True, detail) if reply.status_code == 200 else (False, f"{url} answered {reply.status_code}")


# ----------------------------------------------------------------------------------------------- down


def stop_services(params: Params) -> list[StopResult]:
    """Stop the worker, the model server, MLflow and Prefect (that order): SIGTERM, then SIGKILL.

    Each service is stopped with its whole process tree (servers spawn workers; the worker spawns
    flow runs). Pid files and the endpoints file are removed, so commands stop using the servers.
    """
    from langops.tasks.deploy import server_process

    folder = services_dir(params)
    timeout = params.services.stop_timeout_s
    (folder / ENDPOINTS_FILE).unlink(missing_ok=True)
    results = [_stop_service(folder, PREFECT_WORKER, timeout)]
    model_server = server_process(params.project.state_dir).stop(timeout)
    results.append(StopResult(MODEL_SERVER, model_server.pid, model_server.stopped, model_server.killed))
    results += [_stop_service(folder, name, timeout) for name in (MLFLOW_SERVER, PREFECT_SERVER)]
    return results


def _stop_service(folder: Path, name: str, timeout_s: float) -> StopResult:
    stopped = _process(folder, name).stop(timeout_s)
    return StopResult(name, stopped.pid, stopped.stopped, stopped.killed)


# ---------------------------------------------------------------------------------------- deployments


def apply_deployments(params: Params, *, project_dir: Path, prefect_file: Path | None = None) -> list[DeploymentApplied]:
    """Create or update the deployments declared in ``prefect.yaml`` on the running Prefect server.

    ``prefect_file`` defaults to the project's own ``prefect.yaml``, else the one beside the langops
    sources. Its ``{{ $LANGOPS_PROJECT_DIR }}`` (the pull step's working directory: the folder holding
    ``params.yaml``) and ``{{ $LANGOPS_WORK_POOL }}`` (``services.work_pool``) are filled in, and an
    entrypoint ``flows/<name>.py:<flow>`` whose file the project lacks becomes the installed module
    ``langops.flows.<name>.<flow>``. Each deployment is then upserted through Prefect's client with the
    flow's parameter schema, as ``prefect deploy`` would (whose 3.8 release fails after the first
    deployment of a file when the work pool has a worker: it reads the pool's workers with a request
    the server rejects).

    Raises:
        ServiceError: no Prefect server answers, the prefect file, a flow or a placeholder value is
            missing, or a schedule is neither ``cron`` nor ``interval``.
    """
    project_dir = Path(project_dir).resolve()
    api_url = (os.environ.get("PREFECT_API_URL") or "").rstrip("/")
    if not api_url:
        raise ServiceError("no Prefect server to deploy to: start one with `langops up` (or set PREFECT_API_URL)")
    healthy, detail = _http_ok(f"{api_url}/health", "")
    if not healthy:
        raise ServiceError(f"the Prefect server at {api_url} does not answer ({detail}); is `langops up` running?")
    source = prefect_file or next(
        (p for p in (project_dir / "prefect.yaml", SOURCE_ROOT / "prefect.yaml") if p.is_file()), None
    )
    if source is None or not Path(source).is_file():
        raise ServiceError(f"no prefect.yaml found (looked for {prefect_file or project_dir / 'prefect.yaml'})")
    raw = yaml.safe_load(Path(source).read_text()) or {}
    config = _fill_placeholders(
        raw, {"LANGOPS_PROJECT_DIR": str(project_dir), "LANGOPS_WORK_POOL": params.services.work_pool}, source
    )
    deployments = config.get("deployments") or []
    if not deployments:
        raise ServiceError(f"{source} declares no deployments")
    ensure_work_pool(api_url, params.services.work_pool)
    for spec in deployments:
        _apply_deployment(api_url, spec, pull_steps=spec.get("pull", config.get("pull")) or [],
                          project_dir=project_dir, source=Path(source))
    return read_deployments(api_url, [d["name"] for d in deployments])


def _apply_deployment(api_url: str, spec: dict[str, Any], *, pull_steps: list[dict[str, Any]], project_dir: Path,
                      source: Path) -> None:
    """Upsert one deployment: the flow (loaded for its name and parameter schema), pool, schedules."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.callables import parameter_schema

    name = spec.get("name")
    if not name or not spec.get("entrypoint"):
        raise ServiceError(f"{source}: every deployment needs a name and an entrypoint, got {spec}")
    entrypoint = resolve_entrypoint(spec["entrypoint"], project_dir)
    loadable = str(project_dir / entrypoint) if ":" in entrypoint else entrypoint
    flow = load_flow_from_entrypoint(loadable, use_placeholder_flow=False)
    schedules = []
    for item in spec.get("schedules") or []:
        if "cron" in item:
            schedule = CronSchedule(cron=item["cron"], timezone=item.get("timezone") or "UTC")
        elif "interval" in item:
            schedule = IntervalSchedule(interval=item["interval"], timezone=item.get("timezone") or "UTC")
        else:
            raise ServiceError(f"{source}: deployment {name!r} has a schedule that is neither cron nor interval: {item}")
        schedules.append(DeploymentScheduleCreate(schedule=schedule, active=item.get("active", True)))
    triggers = deployment_triggers(spec, source)
    pool = spec.get("work_pool") or {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name(flow.name),
            name=name,
            entrypoint=entrypoint,
            work_pool_name=pool.get("name"),
            work_queue_name=pool.get("work_queue_name"),
            job_variables=pool.get("job_variables") or {},
            parameters=spec.get("parameters") or {},
            parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
            enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            description=spec.get("description") or flow.description,
            tags=spec.get("tags") or [],
            schedules=schedules,
            pull_steps=pull_steps,
            paused=spec.get("paused", False),
        )
        # As `prefect deploy` does: the deployment's automations are replaced by the ones its triggers declare.
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
        for trigger in triggers:
            trigger.set_deployment_id(deployment_id)
            client.create_automation(trigger.as_automation())


def deployment_triggers(spec: dict[str, Any], source: Path) -> list[Any]:
    """The ``triggers:`` of a deployment in ``prefect.yaml``, validated as Prefect's deployment triggers.

    Raises:
        ServiceError: a trigger is not a valid Prefect trigger (the message names the deployment and why).
    """
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(DeploymentTriggerTypes)
    triggers = []
    for number, item in enumerate(spec.get("triggers") or [], start=1):
        try:
            triggers.append(adapter.validate_python({"name": f"{spec.get('name')}__automation_{number}", **item}))
        except ValidationError as exc:
            raise ServiceError(f"{source}: deployment {spec.get('name')!r}, trigger {number}: {exc}") from exc
    return triggers


def _fill_placeholders(value: Any, values: dict[str, str], source: Path) -> Any:
    """``{{ $NAME }}`` replaced from ``values``; any other ``{{ ... }}`` is an error that names it."""
    if isinstance(value, dict):
        return {k: _fill_placeholders(v, values, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(v, values, source) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ServiceError(f"{source}: unknown placeholder {match.group(0)!r}; known: {sorted(values)}")
        return values[key]

    return PLACEHOLDER.sub(fill, value)


def read_deployments(api_url: str, names: list[str]) -> list[DeploymentApplied]:
    """The named deployments as the Prefect server has them (flow, entrypoint, pool, schedules)."""
    with httpx.Client(base_url=api_url, timeout=30, trust_env=False) as client:
        reply = client.post("/deployments/filter", json={"deployments": {"name": {"any_": names}}})
        reply.raise_for_status()
        applied = []
        for deployment in sorted(reply.json(), key=lambda d: names.index(d["name"])):
            flow = client.get(f"/flows/{deployment['flow_id']}").json()
            schedules = [
                f"cron {s['schedule']['cron']} {s['schedule'].get('timezone') or 'UTC'}"
                + ("" if s.get("active", True) else " (paused)")
                if "cron" in s["schedule"] else json.dumps(s["schedule"])
                for s in deployment.get("schedules", [])
            ]
            applied.append(DeploymentApplied(deployment["name"], flow["name"], deployment["entrypoint"],
                                             deployment["work_pool_name"], schedules))
    return applied


def resolve_entrypoint(entrypoint: str, project_dir: Path) -> str:
    """``flows/x.py:f`` as is when the project has that file, else the installed ``langops.flows.x.f``.

    Raises:
        ServiceError: neither the project nor the installed package has the flow file.
    """
    import importlib.util

    path, sep, func = entrypoint.rpartition(":")
    if not sep or (project_dir / path).is_file():
        return entrypoint
    relative = Path(path)
    if relative.parent == Path(FLOWS_FOLDER) and relative.suffix == ".py":
        module = f"{INSTALLED_FLOWS_PACKAGE}.{relative.stem}"
        if importlib.util.find_spec(module) is not None:
            return f"{module}.{func}"
    raise ServiceError(f"entrypoint {entrypoint!r}: {project_dir / path} does not exist and langops has no such flow")


# -------------------------------------------------------------------------------------------- helpers


def _process(folder: Path, name: str) -> Background:
    """The supervised process of service ``name``: its pid file and log in ``folder``, recognised by its command."""
    return Background(folder, name, marker="mlflow" if name == MLFLOW_SERVER else "prefect")


def _running_pid(folder: Path, name: str) -> int | None:
    return _process(folder, name).pid()


def _client_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def exports(endpoints: Endpoints) -> dict[str, Any]:
    """The variables a shell (or another tool) exports to use the running services."""
    return {"PREFECT_API_URL": endpoints.prefect_api_url, "MLFLOW_TRACKING_URI": endpoints.mlflow_tracking_uri}
