"""The temporary Prefect server `langops run` starts when no server is configured: a first start on busy
cores, a limit too short for it, and a SIGTERM while it runs."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pipeline_helpers import tiny_project_params, write_bad_csv, write_params

WAITING = "starting a temporary Prefect server for this run"
BUSY_PROCESSES = 2  # one per core of the CI machine
SERVER_APP = "prefect.server.api.server:create_app"


def _user_env() -> dict[str, str]:
    """A user's shell in a new project: no Prefect server configured, and Prefect's own startup limit cut
    to 1 s, so a run must not depend on it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "1"
    return env


def _langops_run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "langops.cli", "run", *args], cwd=root, env=_user_env(),
                          capture_output=True, text=True, timeout=600, check=False)


def _temporary_servers(prefect_home: Path) -> list[int]:
    """Pids of live temporary Prefect servers over ``prefect_home``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = process.info["cmdline"] or []
            if SERVER_APP in command and process.environ().get("PREFECT_HOME") == str(prefect_home):
                found.append(process.pid)
        except psutil.Error:  # gone since the listing, or not ours to read
            continue
    return found


@pytest.fixture()
def bad_data_project(tmp_path) -> Path:
    """A new project whose run stops at validate: it gets past the server and needs no model."""
    bad = write_bad_csv(tmp_path / "bad.csv", "unknown_label")
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model", data={"source": str(bad)}))
    return tmp_path


@pytest.mark.services
def test_a_first_run_on_busy_cores_waits_for_its_new_server_and_gets_to_work(bad_data_project):
    root = bad_data_project
    assert not (root / ".langops").exists()  # a brand-new state folder: the server creates its database
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_PROCESSES)]
    try:
        result = _langops_run(root)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()

    console = result.stdout + result.stderr
    assert result.returncode == 3, console[-3000:]  # the bad data stopped it: every step before ran
    assert console.count(WAITING) == 1 and "waiting up to 300 s" in console
    up = re.search(r"temporary Prefect server up at http://127\.0\.0\.1:\d+/api after ([\d.]+) s", console)
    assert up, console[-3000:]
    assert "Beginning flow run" in console and "langops run failed in step validate" in console
    assert (root / ".langops" / "prefect" / "prefect.db").is_file()
    assert "Starting temporary server" not in console  # no second server; Prefect's own line not repeated
    assert not _temporary_servers(root / ".langops" / "prefect")  # it stopped with the run


@pytest.mark.flow
def test_a_server_that_misses_its_limit_fails_the_run_naming_the_setting_and_is_stopped(bad_data_project):
    root = bad_data_project

    result = _langops_run(root, "--set", "services.temporary_server_timeout_s=0.5")

    assert result.returncode == 1, result.stderr[-3000:]
    assert "langops run failed:\nthe temporary Prefect server did not answer within 0.5 s " in result.stderr
    assert "(services.temporary_server_timeout_s): raise it, e.g. --set " \
           "services.temporary_server_timeout_s=300" in result.stderr
    assert "Traceback" not in result.stderr and "RuntimeError" not in result.stderr
    assert not (root / "data" / "prepared").exists()  # no step ran
    assert not _temporary_servers(root / ".langops" / "prefect")


@pytest.mark.flow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_run_takes_its_server_with_it(bad_data_project, signum):
    """SIGTERM as a cancelled CI job or `timeout` sends it; SIGKILL as the OOM killer or `kill -9` does."""
    root = bad_data_project
    run = subprocess.Popen([sys.executable, "-m", "langops.cli", "run"], cwd=root, env=_user_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stderr is not None
        seen = []
        for line in run.stderr:
            seen.append(line)
            if "temporary Prefect server up at" in line:
                break
        assert len(_temporary_servers(root / ".langops" / "prefect")) == 1, "".join(seen)[-3000:]
        run.send_signal(signum)
        run.wait(timeout=60)  # not reading to EOF: an orphaned server would hold the pipe open
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stderr.close()

    assert run.returncode == (128 + signal.SIGTERM if signum == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.monotonic() + 30  # a SIGKILLed run's reaper notices at once and gives SIGTERM 5 s
    while _temporary_servers(root / ".langops" / "prefect") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _temporary_servers(root / ".langops" / "prefect")


@pytest.mark.unit
def test_the_reaper_takes_down_a_killed_commands_helpers_but_not_its_detached_servers(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "from langops.processes import reap_helpers_on_exit\n"
        "reap_helpers_on_exit()\n"
        "helper = subprocess.Popen(['sleep', '300'])\n"
        "detached = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "named = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "reap_helpers_on_exit(named.pid)\n"
        "print(helper.pid, detached.pid, named.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    command = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    helper, detached, named = (psutil.Process(int(pid)) for pid in command.stdout.readline().split())
    try:
        time.sleep(1.5)  # the reaper notes the helpers it sees every 0.5 s
        command.kill()
        command.wait()

        psutil.wait_procs([helper, named], timeout=20)
        for process in (helper, named):  # seen in the command's session, or named though detached
            assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        assert detached.is_running() and detached.status() != psutil.STATUS_ZOMBIE
    finally:
        for process in (helper, detached, named):
            if process.is_running():
                process.kill()
        command.stdout.close()


class ResettingListener:
    """A port held by a process that takes each connection and drops it with a reset, as a server does
    when it dies with requests waiting."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.resets = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:  # closed
                return
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
            self.resets += 1


@pytest.mark.flow
def test_a_temporary_server_whose_port_resets_connections_starts_again_on_another(tmp_path, monkeypatch, caplog):
    from prefect.server.api.server import SubprocessASGIServer

    from langops.services import start_subprocess_prefect_server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    taken = ResettingListener()
    ports = iter([taken.port])
    choose = SubprocessASGIServer.find_available_port
    monkeypatch.setattr(SubprocessASGIServer, "find_available_port",
                        lambda self: next(ports, None) or choose(self))  # Prefect's first choice: the taken port
    server = None
    try:
        with caplog.at_level(logging.WARNING, logger="langops.services"):
            server = start_subprocess_prefect_server(SubprocessASGIServer, 120)

        assert taken.resets >= 1  # Prefect's health check met the reset
        assert server.port != taken.port
        assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
        assert SubprocessASGIServer() is server  # the instance Prefect's clients in this process reuse
        assert f"the temporary Prefect server on http://127.0.0.1:{taken.port} did not answer (" in caplog.text
        assert "starting it on another port" in caplog.text
    finally:
        if server is not None:
            server.stop()
        taken.sock.close()
