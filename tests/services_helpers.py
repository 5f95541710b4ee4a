"""Running the CLI as a user would against `langops up`'s real services, and leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

LANGOPS = Path(sys.executable).parent / "langops"


def langops(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI in ``root`` as a user would, with no Prefect/MLflow settings inherited from the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.run(
        [str(LANGOPS), *args], check=False, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def ok_json(reply: httpx.Response):
    assert reply.status_code in (200, 201), f"{reply.request.method} {reply.url}: {reply.status_code} {reply.text[:1000]}"
    return reply.json()


def processes_of(root: Path) -> list[str]:
    """Live processes whose command line or environment names this project's state folder.

    The MLflow and model servers name it on their command line; the Prefect server, the worker and
    the flow runs it spawns carry it in ``PREFECT_HOME``.
    """
    state = str(root / ".langops")
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            mentions = state in cmdline or any(state in value for value in process.environ().values())
        except psutil.Error:
            continue
        if mentions and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{process.info['pid']}: {cmdline[:200]}")
    return found


def down_and_kill_leftovers(root: Path) -> None:
    """Teardown that cannot leave servers behind: `langops down`, then SIGKILL whatever survived."""
    folder = root / ".langops" / "services"
    pids = [int(p.read_text()) for p in folder.glob("*.pid")] if folder.is_dir() else []
    try:
        langops(root, "down", timeout=120)
    finally:
        for pid in pids:
            try:
                process = psutil.Process(pid)
                for leftover in [*process.children(recursive=True), process]:
                    leftover.kill()
            except psutil.NoSuchProcess:
                pass
        for line in processes_of(root):
            try:
                psutil.Process(int(line.split(":")[0])).kill()
            except psutil.NoSuchProcess:
                pass
