"""Background processes that one langops command starts and a later one finds, checks and stops.

The local services of ``langops up`` and the model server of the deploy step are each one process in
its own session (so it outlives the command that started it), with ``<name>.pid`` and ``<name>.log`` in
a folder. A pid file is trusted only while the process it names is alive and its command line carries
the process's marker, so a stale file never points at an unrelated process that reused the pid.
Stopping sends SIGTERM, waits the caller's timeout (``services.stop_timeout_s``), then takes down what
the process left behind (uvicorn or flow-run children) and SIGKILLs whatever still ignores SIGTERM.

The helpers a command starts for itself alone (its temporary Prefect server, Dask workers) are the
opposite: they must die with it, even when it dies by SIGKILL and runs no exit handler. ``reap_helpers_on_exit``
starts a watcher process that does that.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

LOG_TAIL_LINES = 40  # lines of a process's log quoted in an error
POLL_INTERVAL_S = 0.25  # how often a wait for a process (exit, health, a version) checks again
LEFTOVER_TIMEOUT_S = 5.0  # the most a child left behind by a stopped process gets after its own SIGTERM
REAPER_SNAPSHOT_S = 0.5  # how often the reaper notes the helpers it would have to take down

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stopped:
    """What ``Background.stop`` did: the pid it found (None: nothing of ours ran), whether SIGKILL was needed."""

    pid: int | None
    stopped: bool
    killed: bool


@dataclass(frozen=True)
class Background:
    """One detached process: ``<folder>/<name>.pid`` and ``.log``; ``marker`` is part of its command line."""

    folder: Path
    name: str
    marker: str

    @property
    def pid_file(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.name}.log"

    def spawn(self, command: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own session (SIGINT to this terminal misses it), writing to the log file.

        The log is started afresh and the pid file written atomically, so a reader never sees half a pid.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("w") as log_file:
            process = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, start_new_session=True,
            )
        write_atomic(self.pid_file, f"{process.pid}\n")
        return process

    def pid(self) -> int | None:
        """The pid in the pid file while that process lives and is ours (the marker is in its command line)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if is_process(pid, self.marker) else None

    def stop(self, timeout_s: float) -> Stopped:
        """SIGTERM the process, wait ``timeout_s``, then stop what it left behind; SIGKILL what ignores SIGTERM.

        The whole process tree is stopped (servers spawn workers, the Prefect worker spawns flow runs), the
        process first so that it can shut its own children down. The pid file is removed in every case.
        """
        import psutil

        pid = self.pid()
        try:
            if pid is None:
                return Stopped(None, False, False)
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return Stopped(pid, False, False)
            _signal(root, signal.SIGTERM)
            psutil.wait_procs([root], timeout=timeout_s)
            leftovers = [process for process in tree if _running(process)]
            for process in leftovers:
                _signal(process, signal.SIGTERM)
            _, alive = psutil.wait_procs(leftovers, timeout=min(timeout_s, LEFTOVER_TIMEOUT_S))
            for process in alive:
                log.warning("%s: pid %s ignored SIGTERM; killing it", self.name, process.pid)
                _signal(process, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=LEFTOVER_TIMEOUT_S)
            return Stopped(pid, True, bool(alive))
        finally:
            self.pid_file.unlink(missing_ok=True)

    def log_tail(self) -> str:
        """The last lines of the log, ready to append to an error message ('' when there is no log)."""
        if not self.log_file.is_file():
            return ""
        lines = self.log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"\nlast lines of {self.log_file}:\n" + "\n".join(lines)


def is_process(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live process (not a zombie) whose command line mentions ``marker``."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and any(marker in part for part in process.cmdline())
    except (psutil.Error, ValueError):
        return False


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a rename, so a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` runs and is the one created at ``started`` (a reused pid is another process)."""
    import psutil

    try:
        return pid > 0 and abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def _running(process: psutil.Process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(process: psutil.Process, signum: int) -> None:
    import psutil

    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


_reaper: subprocess.Popen[bytes] | None = None


def reap_helpers_on_exit(*helper_pids: int) -> None:
    """Make this process's helpers die with it, however it dies.

    A watcher process in its own session holds the read end of a pipe whose write end only this process
    has; it starts on the first call. It takes down, when the pipe reaches end-of-file (this process
    exited, normally or by SIGKILL), the helpers named here (a later call can name more) and the
    descendants it saw in this process's session, which it notes every ``REAPER_SNAPSHOT_S``: SIGTERM,
    then SIGKILL after ``LEFTOVER_TIMEOUT_S``. Processes started in their own session (the model server,
    ``langops up`` services) are meant to outlive the command and are left alone unless named.
    """
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "langops.processes", "--reap-helpers-of", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    if helper_pids:
        assert _reaper.stdin is not None
        _reaper.stdin.write("".join(f"{pid}\n" for pid in helper_pids).encode())
        _reaper.stdin.flush()


def _reap_helpers_of(parent_pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(parent_pid)
        session = os.getsid(parent_pid)
    except (psutil.Error, OSError):
        return
    named: list[psutil.Process] = []  # captured at once: their start times tell a reused pid apart later
    parent_gone = threading.Event()

    def read_names() -> None:
        for line in sys.stdin.buffer:  # ends at end-of-file: the parent is gone
            try:
                named.append(psutil.Process(int(line)))
            except (ValueError, psutil.Error):
                continue
        parent_gone.set()

    threading.Thread(target=read_names, daemon=True).start()
    seen: list[psutil.Process] = []
    while not parent_gone.wait(REAPER_SNAPSHOT_S):
        try:
            seen = [child for child in parent.children(recursive=True) if _in_session(child, session)]
        except Exception:  # a short-lived child ended mid-listing, or the parent did: keep the last snapshot
            if not parent.is_running():
                break
    running = [helper for helper in {*named, *seen} if _running(helper)]  # is_running checks the start time
    for helper in running:
        _signal(helper, signal.SIGTERM)
    _, alive = psutil.wait_procs(running, timeout=LEFTOVER_TIMEOUT_S)
    for helper in alive:
        _signal(helper, signal.SIGKILL)


def _in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session
    except OSError:
        return False


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reap-helpers-of"] and len(sys.argv) == 3:
        _reap_helpers_of(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m langops.processes --reap-helpers-of PID")
