"""Deploy: make the local model server serve the champion version the promote step chose, as ``deploy:`` says.

The server follows the ``champion`` alias by itself; this step makes that happen now and proves it.
A running langops server that runs with the wanted settings (it reports their fingerprint on
``/version``) is told to reload. One that runs with other settings (a changed ``deploy.*`` value) is
stopped and started again with the new ones, and the step says which settings changed. Otherwise a
server is started detached, so it outlives the pipeline, with its settings file, pid and log under
``<state_dir>/server``. Either way the step returns only once the server reports the expected version
as loaded and answering, and fails with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from langops.aliases import CHAMPION
from langops.config import DeployConfig, ServerConfig, ServicesConfig
from langops.faults import crash_point
from langops.processes import POLL_INTERVAL_S, Background, write_atomic
from langops.serving.app import SERVER_DIR, SERVICE, ServerSettings
from langops.serving.registry import ModelSource, ModelSourceError

log = logging.getLogger(__name__)

SERVER_NAME = "server"  # <state_dir>/server/server.pid and server.log
PID_FILE = f"{SERVER_NAME}.pid"
SETTINGS_FILE = "settings.json"  # the settings the server was started with, beside its pid file
SERVER_MODULE = "langops.serving"  # what the server runs as; in its command line, it marks a pid as ours
STOP_TIMEOUT_S = ServicesConfig.model_fields["stop_timeout_s"].default  # when services.stop_timeout_s is not passed


class DeploymentError(RuntimeError):
    """The server could not be made to serve the expected version; the message says why."""


@dataclass(frozen=True)
class DeploymentResult:
    """Where the server answers, the version it serves, and what this call did to it.

    ``started``: this call started the server process; ``restarted``: it stopped one running with other
    settings first. ``settings_changed`` names each setting that differs (``name: old → new``); it is also
    set, with ``restarted`` False, for a server this step did not start and so left running as it is.
    """

    url: str
    version: str
    pid: int | None
    started: bool
    restarted: bool = False
    settings_changed: tuple[str, ...] = ()


def deploy(
    cfg: DeployConfig,
    *,
    tracking_uri: str,
    model_name: str,
    expected_version: str,
    state_dir: Path,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    experiment: str = "langops",
) -> DeploymentResult:
    """Make the server at ``cfg.host:cfg.port`` serve ``expected_version`` of ``model_name@champion``, as ``cfg`` says.

    Args:
        cfg: the ``deploy:`` section: the server's settings, and how long to wait for it.
        tracking_uri, model_name: the registry and model whose champion is served.
        expected_version: the version the alias must name (what the promote step decided).
        state_dir: the project's state folder; the server's files go to ``<state_dir>/server``.
        stop_timeout_s: SIGTERM grace before SIGKILL when a server is restarted (``services.stop_timeout_s``).
        experiment: ``tracking.experiment``: the server logs a canary's steps to ``<experiment>-promotions``.

    Returns:
        The server's URL, the version it serves, its pid (None when this step did not start it and
        no pid file names it), whether this call started it, and whether and why it restarted one.

    Raises:
        DeploymentError: the alias does not name ``expected_version``; the port is held by something
            that is not a langops server, or by one serving another model; the server refused the
            version or did not serve it within ``cfg.start_timeout_s`` (with the tail of its log).
    """
    server = server_process(state_dir)
    wanted = ServerSettings.from_deploy(
        cfg, state_dir=state_dir, tracking_uri=tracking_uri, model_name=model_name, alias=CHAMPION,
        experiment=experiment,
    )
    source = ModelSource(tracking_uri, model_name, alias=CHAMPION, cache_dir=wanted.cache_dir)
    _check_alias(source, expected_version)
    url = server_url(cfg.host, cfg.port)
    deadline = time.monotonic() + cfg.start_timeout_s
    with httpx.Client(base_url=url, timeout=5.0, trust_env=False, headers=auth_headers(cfg)) as client:
        if _langops_server_answers(client):
            info = _check_follows_champion(client, model_name)
            kept = _kept_settings(server)
            changes = settings_changes(info, wanted, kept=kept)
            # The server this step started, unless its settings file puts it on another port.
            pid = server.pid() if kept is None or kept.port == cfg.port else None
            if not changes or pid is None:
                if changes:
                    log.warning(
                        "the langops server at %s runs with other settings than deploy: asks for (%s), but "
                        "this step did not start it (%s names no server on that port), so it cannot restart "
                        "it: reloading it as it is; stop it and deploy again to apply them",
                        url, "; ".join(changes), server.pid_file,
                    )
                log.info("a langops server answers at %s; asking it to reload %s@%s", url, model_name, CHAMPION)
                _reload(client, deadline)
                _wait_for_version(client, expected_version, deadline, server=server)
                return DeploymentResult(url=url, version=expected_version, pid=pid, started=False,
                                        settings_changed=changes)
        else:
            changes = _changes_of_a_silent_server(server, wanted, url)
        if changes:
            log.info("deploy: the model server's settings changed (%s); restarting it (pid %s) with the new "
                     "ones", "; ".join(changes), server.pid())
            server.stop(stop_timeout_s)
            deadline = time.monotonic() + cfg.start_timeout_s
        return _start_and_wait(server, wanted, client, url, expected_version, deadline, changes=changes,
                               stop_timeout_s=stop_timeout_s)


def server_process(state_dir: Path) -> Background:
    """The background model server of the deploy step: pid file and log under ``<state_dir>/server``."""
    return Background(Path(state_dir) / SERVER_DIR, SERVER_NAME, marker=SERVER_MODULE)


def stop_server(state_dir: Path, *, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server named by ``<state_dir>/server/server.pid``: SIGTERM, wait, SIGKILL if it hangs.

    The pid is checked to belong to a langops server first, so a stale pid file never kills an
    unrelated process that reused the pid. The pid file is removed in every case.

    Returns:
        True when a running server was stopped.
    """
    stopped = server_process(state_dir).stop(timeout_s)
    if stopped.stopped:
        log.info("stopped the model server (pid %s)", stopped.pid)
    return stopped.stopped


def settings_changes(
    info: Mapping[str, Any], wanted: ServerSettings, *, kept: ServerSettings | None
) -> tuple[str, ...]:
    """What differs between a running server's settings and ``wanted``, as ``name: old → new``; () when equal.

    ``info`` is the server's ``/version`` answer: the fingerprint of all its settings and the values of
    its ``ServerConfig`` part. ``kept`` is the settings file this step started it with, which names the
    rest (model, registry, folders) when its fingerprint is the running one.
    """
    running = info.get("settings_fingerprint")
    if running == wanted.fingerprint():
        return ()
    if running is None:
        return ("settings unknown: the server does not report them (an older langops started it)",)
    before: dict[str, Any] = {}
    if kept is not None and kept.fingerprint() == running:  # the file it was started with names everything
        before = kept.model_dump(mode="json")
    before.update(info.get("settings") or {})
    changes = _differences(before, wanted)
    if changes:
        return changes
    unreported = ", ".join(name for name in ServerSettings.model_fields if name not in ServerConfig.model_fields)
    return (f"one of {unreported} (the server does not report these, and deploy has no record of them)",)


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


def _check_follows_champion(client: httpx.Client, model_name: str) -> dict[str, Any]:
    """A running server is only reused when reloading it can reach the champion of this model.

    Returns:
        Its ``/version`` answer (which also reports its settings).
    """
    info = client.get("/version").json()
    if (info.get("source"), info.get("model_name"), info.get("alias")) != ("registry", model_name, CHAMPION):
        raise DeploymentError(
            f"the langops server at {client.base_url} serves {info.get('source')} model "
            f"{info.get('model_name')!r} (alias {info.get('alias')!r}), not {model_name}@{CHAMPION}; "
            "stop it (`langops stop`) or set deploy.port to a free port"
        )
    return info


def _reload(client: httpx.Client, deadline: float) -> None:
    response = client.post("/reload", timeout=max(deadline - time.monotonic(), 1.0))
    if response.status_code != 200:
        detail = (_json_or_none(response) or {}).get("detail", response.text[:500])
        raise DeploymentError(f"the server at {client.base_url} did not reload: {detail}")


def _changes_of_a_silent_server(server: Background, wanted: ServerSettings, url: str) -> tuple[str, ...]:
    """Nothing answers at ``url``: the settings changes that explain why the server this step started is not there.

    Returns:
        () when no server of ours runs; the changes from its settings file (a new port, say) when one does.

    Raises:
        DeploymentError: the server this step started runs with the wanted settings but does not answer.
    """
    if server.pid() is None:
        return ()
    kept = _kept_settings(server)
    changes = _differences(kept.model_dump(mode="json"), wanted) if kept is not None else ()
    if not changes:
        raise DeploymentError(
            f"the server started earlier (pid {server.pid()}, log {server.log_file}) is running but "
            f"does not answer at {url}; stop it with `langops stop`"
        )
    return changes


def _start_and_wait(
    server: Background,
    settings: ServerSettings,
    client: httpx.Client,
    url: str,
    expected_version: str,
    deadline: float,
    *,
    changes: tuple[str, ...],
    stop_timeout_s: float,
) -> DeploymentResult:
    """Start a detached server with ``settings`` and wait until it serves the version; stop it if it never does.

    The server gets its settings whole, from the settings file kept beside its pid file.
    """
    server.folder.mkdir(parents=True, exist_ok=True)
    settings_file = server.folder / SETTINGS_FILE
    write_atomic(settings_file, settings.model_dump_json(indent=2) + "\n")
    process = server.spawn([sys.executable, "-m", SERVER_MODULE, "--settings", str(settings_file)])
    crash_point("deploy:spawned")
    log.info("%s the model server (pid %s) at %s; log: %s", "restarted" if changes else "started", process.pid,
             url, server.log_file)
    try:
        _wait_for_version(client, expected_version, deadline, server=server, process=process)
    except BaseException:
        server.stop(stop_timeout_s)
        process.poll()  # reap it if it had exited already
        raise
    return DeploymentResult(url=url, version=expected_version, pid=process.pid, started=True,
                            restarted=bool(changes), settings_changed=changes)


def auth_headers(cfg: DeployConfig) -> dict[str, str]:
    """The bearer token the server will require when ``cfg.auth_token_env`` is set (it inherits the variable)."""
    token = os.environ.get(cfg.auth_token_env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _wait_for_version(
    client: httpx.Client,
    expected_version: str,
    deadline: float,
    *,
    server: Background,
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
                f"{expected_version}{server.log_tail()}"
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
                    f"{server.log_tail()}"
                )
            last_seen = f"serving version {info.get('version')}"
        time.sleep(POLL_INTERVAL_S)
    raise DeploymentError(
        f"the server at {client.base_url} did not serve version {expected_version} in time "
        f"(deploy.start_timeout_s); last seen: {last_seen}{server.log_tail()}"
    )


def _kept_settings(server: Background) -> ServerSettings | None:
    """The settings this step last started the server with, or None (no file, or one of an older layout)."""
    try:
        return ServerSettings.model_validate_json((server.folder / SETTINGS_FILE).read_text())
    except (OSError, ValidationError):
        return None


def _differences(before: Mapping[str, Any], wanted: ServerSettings) -> tuple[str, ...]:
    """``name: old → new`` for each setting of ``wanted`` whose value in ``before`` (JSON values) differs."""
    return tuple(
        f"{name}: {json.dumps(before[name])} → {json.dumps(value)}"
        for name, value in wanted.model_dump(mode="json").items()
        if name in before and before[name] != value
    )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
