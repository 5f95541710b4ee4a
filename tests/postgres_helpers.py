"""Throwaway team backends for tests: a PostgreSQL cluster from Debian's packages, and server processes.

PostgreSQL refuses to run as root, so ``initdb``, ``pg_ctl`` and ``psql`` run as the ``postgres``
system user (created by the Debian package) through ``runuser``. The cluster lives in a folder under
``/tmp`` owned by that user: pytest's own temp folders are private to root and unreachable for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pipeline_helpers import free_port

POSTGRES_SYSTEM_USER = "postgres"
START_TIMEOUT_S = 120.0


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (path.parent / "pg_ctl").is_file() and path.parent.parent.name.isdigit()
    ]
    return max(candidates, key=lambda path: int(path.parent.name), default=None)


def postgres_unavailable_reason() -> str | None:
    """Why a PostgreSQL cluster cannot be started here, or None when it can."""
    if postgres_bin_dir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    if shutil.which("runuser") is None:
        return "runuser (util-linux) is needed to run PostgreSQL as its own system user"
    try:
        import pwd

        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        return f"no {POSTGRES_SYSTEM_USER!r} system user (the Debian postgresql package creates it)"
    return None


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster on 127.0.0.1 with one login role that owns the test databases."""

    root: Path
    bin_dir: Path
    port: int
    user: str
    password: str
    databases: tuple[str, ...]

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str, driver: str) -> str:
        """SQLAlchemy URL of ``database`` over TCP, e.g. driver ``postgresql+psycopg2``."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one query, read over TCP with the login role's password, as any client would."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall()
        finally:
            connection.close()


def _as_postgres(*command: str | Path, timeout: float = START_TIMEOUT_S) -> str:
    result = subprocess.run(
        ["runuser", "-u", POSTGRES_SYSTEM_USER, "--", *map(str, command)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{Path(str(command[0])).name} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


@contextmanager
def running_postgres(
    databases: Sequence[str], *, user: str = "langops", password: str = "langops-test-password"
) -> Iterator[PostgresCluster]:
    """A fresh cluster with ``databases`` owned by ``user``; stopped and deleted when the block ends.

    Durability is switched off (``fsync``, ``synchronous_commit``): the cluster is thrown away anyway.
    """
    import pwd

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError(postgres_unavailable_reason())
    account = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    root = Path(tempfile.mkdtemp(prefix="langops-pg-"))
    os.chown(root, account.pw_uid, account.pw_gid)
    cluster = PostgresCluster(
        root=root, bin_dir=bin_dir, port=free_port(), user=user, password=password, databases=tuple(databases)
    )
    data = root / "data"
    started = False
    try:
        _as_postgres("mkdir", "-p", cluster.socket_dir)
        _as_postgres(
            bin_dir / "initdb",
            "-D",
            data,
            "--username=postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        )
        options = (
            f"-h 127.0.0.1 -p {cluster.port} -k {cluster.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _as_postgres(
            bin_dir / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-o", options, "-w", "start"
        )
        started = True
        psql = [
            bin_dir / "psql",
            "-h",
            cluster.socket_dir,
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-d",
            "postgres",
        ]
        _as_postgres(*psql, "-c", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        for database in databases:
            _as_postgres(*psql, "-c", f"CREATE DATABASE {database} OWNER {user}")
        yield cluster
    finally:
        if started:
            _as_postgres(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class ServerProcess:
    """A server started as a child process, and where its output goes."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@contextmanager
def running_server_process(
    command: Sequence[str | Path],
    *,
    url: str,
    health_path: str,
    env: Mapping[str, str],
    log_path: Path,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[ServerProcess]:
    """Start ``command`` in its own process group, wait until ``url + health_path`` answers 200, and
    stop the whole group (the server and any workers it forked) when the block ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(part) for part in command],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(process=process, url=url, log_path=log_path)
    try:
        _wait_healthy(server, health_path, timeout_s)
        yield server
    finally:
        _stop_group(process)


def _wait_healthy(server: ServerProcess, health_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.url} exited with {server.process.returncode} before it was healthy:\n"
                    + server.log_tail()
                )
            try:
                if client.get(server.url + health_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.url}{health_path} not healthy after {timeout_s:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.5)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, give it 20 s, then SIGKILL whatever is left of the group
    (worker processes can outlive a leader that exited)."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)
