"""Deploy: make the local model server serve the champion version the promote step chose.

The server follows the ``champion`` alias by itself; this step makes that happen now and proves it.
A running langops server is told to reload; otherwise one is started detached, so it outlives the
pipeline, with its pid and log under ``<state_dir>/server``. Either way the step returns only once the
server reports the expected version as loaded and answering, and fails with the reason otherwise.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from langops.config import DeployConfig
from langops.serving.app import SERVICE
from langops.serving.registry import ModelSource, ModelSourceError
from langops.aliases import CHAMPION

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

SERVER_DIR = "server"
PID_FILE = "server.pid"
LOG_FILE = "server.log"
LOG_TAIL_LINES = 40
POLL_INTERVAL_S = 0.25


class DeploymentError(RuntimeError):
    """The server could not be made to serve the expected version; the message says why."""


@dataclass(frozen=True)
class DeploymentResult:
    url: str
    version: str
    pid: int | None
    started: bool


def deploy(
    cfg: DeployConfig, *, tracking_uri: str, model_name: str, expected_version: str, state_dir: Path
) -> DeploymentResult:
    """Make the server at ``cfg.host:cfg.port`` serve ``expected_version`` of ``model_name@champion``.

    Returns:
        The server's URL, the version it serves, its pid (None when this step did not start it and
        no pid file names it) and whether this call started it.

    Raises:
        DeploymentError: the alias does not name ``expected_version``; the port is held by something
            that is not a langops server, or by one serving another model; the server refused the
            version or did not serve it within ``cfg.start_timeout_s`` (with the tail of its log).
    """
    server_dir = Path(state_dir) / SERVER_DIR
    source = ModelSource(tracking_uri, model_name, alias=CHAMPION, cache_dir=server_dir / "models")
    _check_alias(source, expected_version)
    url = server_url(cfg.host, cfg.port)
    deadline = time.monotonic() + cfg.start_timeout_s
    with httpx.Client(base_url=url, timeout=5.0, trust_env=False, headers=auth_headers(cfg)) as client:
        if not _langops_server_answers(client):
            return _start_and_wait(cfg, source, client, url, expected_version, server_dir, deadline)
        _check_follows_champion(client, model_name)
        log.info("a langops server answers at %s; asking it to reload %s@%s", url, model_name, CHAMPION)
        _reload(client, deadline)
        _wait_for_version(client, expected_version, deadline, log_path=server_dir / LOG_FILE)
    return DeploymentResult(url=url, version=expected_version, pid=_running_pid(server_dir), started=False)


def stop_server(state_dir: Path, *, timeout_s: float = 15.0) -> bool:
    """Stop the server named by ``<state_dir>/server/server.pid``: SIGTERM, wait, SIGKILL if it hangs.

    The pid is checked to belong to a langops server first, so a stale pid file never kills an
    unrelated process that reused the pid. The pid file is removed in every case.

    Returns:
        True when a running server was stopped.
    """
    import psutil

    pid_file = Path(state_dir) / SERVER_DIR / PID_FILE
    process = _server_process(pid_file)
    pid_file.unlink(missing_ok=True)
    if process is None:
        return False
    process.terminate()
    try:
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        log.warning("server pid %s ignored SIGTERM for %.0f s; killing it", process.pid, timeout_s)
        process.kill()
        process.wait(timeout_s)
    log.info("stopped the model server (pid %s)", process.pid)
    return True


def server_url(host: str, port: int) -> str:
    """The URL a local client uses: a wildcard bind address is reached through loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _check_alias(source: ModelSource, expected_version: str) -> None:
    """Fail at once, rather than after the start timeout, when the alias names another version."""
    try:
        current = source.current_version()
    except ModelSourceError as exc:
        raise DeploymentError(str(exc)) from exc
    if current != expected_version:
        raise DeploymentError(
            f"{source.model_name}@{source.alias} names version {current}, not the expected {expected_version}"
        )


def _langops_server_answers(client: httpx.Client) -> bool:
    """Whether a langops server answers ``/health``; False when nothing listens on the port.

    Raises:
        DeploymentError: something listens but is not a langops server.
    """
    try:
        response = client.get("/health", timeout=3.0)
    except httpx.ConnectError:
        return False
    except httpx.HTTPError as exc:
        raise DeploymentError(
            f"{client.base_url} is taken by something that is not a langops server: {exc!r}"
        ) from exc
    body = _json_or_none(response)
    if response.status_code != 200 or not isinstance(body, dict) or body.get("service") != SERVICE:
        raise DeploymentError(
            f"{client.base_url} is taken by something that is not a langops server "
            f"(GET /health answered {response.status_code}: {response.text[:200]!r}); "
            "stop it or set deploy.port to a free port"
        )
    return True


def _check_follows_champion(client: httpx.Client, model_name: str) -> None:
    """A running server is only reused when reloading it can reach the champion of this model."""
    info = client.get("/version").json()
    if (info.get("source"), info.get("model_name"), info.get("alias")) != ("registry", model_name, CHAMPION):
        raise DeploymentError(
            f"the langops server at {client.base_url} serves {info.get('source')} model "
            f"{info.get('model_name')!r} (alias {info.get('alias')!r}), not {model_name}@{CHAMPION}; "
            "stop it (`langops stop`) or set deploy.port to a free port"
        )


def _reload(client: httpx.Client, deadline: float) -> None:
    response = client.post("/reload", timeout=max(deadline - time.monotonic(), 1.0))
    if response.status_code != 200:
        detail = (_json_or_none(response) or {}).get("detail", response.text[:500])
        raise DeploymentError(f"the server at {client.base_url} did not reload: {detail}")


def _start_and_wait(
    cfg: DeployConfig,
    source: ModelSource,
    client: httpx.Client,
    url: str,
    expected_version: str,
    server_dir: Path,
    deadline: float,
) -> DeploymentResult:
    """Start a detached server and wait until it serves the version; stop it again if it never does."""
    pid_file, log_path = server_dir / PID_FILE, server_dir / LOG_FILE
    if _server_process(pid_file) is not None:
        raise DeploymentError(
            f"the server started earlier (pid {pid_file.read_text().strip()}, log {log_path}) is running but "
            f"does not answer at {url}; stop it with `langops stop`"
        )
    server_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "langops.serving",
        "--tracking-uri", source.tracking_uri,
        "--model-name", source.model_name,
        "--alias", source.alias,
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--poll-seconds", str(cfg.poll_seconds),
        "--cache-dir", str(source.cache_dir),
        *server_options(cfg, server_dir),
    ]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # SIGINT to the pipeline's terminal must not stop the server
        )
    _write_pid(pid_file, process.pid)
    log.info("started the model server (pid %s) at %s; log: %s", process.pid, url, log_path)
    try:
        _wait_for_version(client, expected_version, deadline, log_path=log_path, process=process)
    except BaseException:
        _terminate(process)
        pid_file.unlink(missing_ok=True)
        raise
    return DeploymentResult(url=url, version=expected_version, pid=process.pid, started=True)


def auth_headers(cfg: DeployConfig) -> dict[str, str]:
    """The bearer token the server will require when ``cfg.auth_token_env`` is set (it inherits the variable)."""
    token = os.environ.get(cfg.auth_token_env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def server_options(cfg: DeployConfig, server_dir: Path) -> list[str]:
    """The ``deploy:`` tuning (batching, limits, auth, prediction log) as server command-line options."""
    from langops.serving.app import deploy_tuning

    options: list[str] = []
    for name, value in deploy_tuning(cfg, server_dir=server_dir).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            options.append(flag if value else flag.replace("--", "--no-", 1))
        elif value is not None:
            options += [flag, str(value)]
    return options


def _wait_for_version(
    client: httpx.Client,
    expected_version: str,
    deadline: float,
    *,
    log_path: Path,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``/version`` until it names ``expected_version``: reported only once loaded and answering.

    Raises:
        DeploymentError: the server exited, refused the version, or the deadline passed.
    """
    last_seen = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DeploymentError(
                f"the model server exited with code {process.returncode} before serving version "
                f"{expected_version}{_log_tail(log_path)}"
            )
        try:
            info = client.get("/version").json()
        except httpx.TransportError as exc:
            last_seen = f"no answer: {exc!r}"
        else:
            if info.get("version") == expected_version:
                return
            if expected_version in info.get("refused", {}):
                raise DeploymentError(
                    f"the server refused version {expected_version}: {info['refused'][expected_version]}"
                    f"{_log_tail(log_path)}"
                )
            last_seen = f"serving version {info.get('version')}"
        time.sleep(POLL_INTERVAL_S)
    raise DeploymentError(
        f"the server at {client.base_url} did not serve version {expected_version} in time "
        f"(deploy.start_timeout_s); last seen: {last_seen}{_log_tail(log_path)}"
    )


def _log_tail(log_path: Path) -> str:
    if not log_path.is_file():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return f"\nlast lines of {log_path}:\n" + "\n".join(lines)


def _terminate(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def _write_pid(pid_file: Path, pid: int) -> None:
    """Write the pid file atomically, so a reader never sees it half written."""
    tmp = pid_file.with_name(f".{pid_file.name}.tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pid_file)


def _server_process(pid_file: Path) -> psutil.Process | None:
    """The live langops server named by ``pid_file``, or None (no file, dead, or a reused pid)."""
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DeploymentError(f"{pid_file} does not hold a pid: {pid_file.read_text()[:100]!r}") from exc
    try:
        process = psutil.Process(pid)
        is_server = "langops.serving" in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's: not our server
        return None
    return process if is_server else None


def _running_pid(server_dir: Path) -> int | None:
    process = _server_process(server_dir / PID_FILE)
    return process.pid if process is not None else None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
