"""Where the server's prediction log, feedback and issued ids live: files on one machine, or one database
that a whole fleet shares.

By default (``deploy.prediction_store: null``) each server keeps them in its prediction log folder: rotating
JSONL files per worker and a SQLite index of issued ids. Replicas on different machines (or pods with their
own disks) then each see only their own traffic: feedback sent to one cannot name a prediction another made,
and the monitor reads one replica's window. With a database URL (``deploy.prediction_store``, or
``$LANGOPS_PREDICTION_STORE``, which wins and keeps a password out of params.yaml: ``ServerConfig.prediction_store_url``) every replica, worker,
the monitor, the feedback export and the retraining run read and write the same tables, through SQLAlchemy:

- ``prediction_log`` and ``feedback_log``: one row per JSON line the files would hold (``record``, the same
  schema, ``langops.prediction_records``), with its ``time`` and an increasing ``id`` for order;
- ``issued`` and ``labelled``: the ids the fleet issued (with the texts kept for feedback) and the labels
  claimed, as in the SQLite index (``langops.serving.issued_ids``, which runs on either);
- ``rollout_windows``: each worker's counts for the canary step in progress, so that every worker judges the
  fleet's window (``langops.serving.fleet_windows``).

PostgreSQL is the database meant here (``postgresql+psycopg2://user:password@host/db``); any SQLAlchemy URL
works, so a SQLite file stands in for it in tests. The tables are created when missing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from langops.prediction_records import LoggedLine

logger = logging.getLogger(__name__)

SCHEMA_LOCK_KEY = 7_316_022  # PostgreSQL advisory lock held while the tables are created
BUSY_TIMEOUT_S = 10.0  # how long a SQLite connection waits for another process's transaction
READ_CHUNK = 5000  # rows fetched per round trip when reading a log

metadata = sa.MetaData()
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only

prediction_log = sa.Table(
    "prediction_log", metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("time", sa.String(40), nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),
)
feedback_log = sa.Table(
    "feedback_log", metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("time", sa.String(40), nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),
)
issued = sa.Table(
    "issued", metadata,
    sa.Column("request_id", sa.String(80), primary_key=True),
    sa.Column("client_request_id", sa.String(80)),
    sa.Column("texts", sa.Integer, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text),
    sa.Index("issued_by_client", "client_request_id"),
    sa.Index("issued_by_time", "issued_at"),
)
labelled = sa.Table(
    "labelled", metadata,
    sa.Column("text_id", sa.String(90), primary_key=True),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("labelled_at", sa.Float, nullable=False),
)
rollout_windows = sa.Table(
    "rollout_windows", metadata,
    sa.Column("worker", sa.String(300), primary_key=True),  # <host>:<pid>
    sa.Column("rollout_id", sa.String(80), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("counts", sa.Text, nullable=False),
)
LOG_TABLES = (prediction_log, feedback_log)
INDEX_TABLES = (issued, labelled)
ROLLOUT_TABLES = (rollout_windows, feedback_log)


def redacted(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<an unparsable database URL>"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class Database:
    """An engine on ``url`` whose ``tables`` are created on first use, and again until that succeeds: a server
    starts, and serves, while its store is down, and uses it once it answers.

    SQLite runs in WAL mode (one process writes while others read), waits ``BUSY_TIMEOUT_S`` for another's
    transaction, zeroes what it deletes (``secure_delete``: a pruned text leaves no copy in a free page), and
    starts a transaction with ``BEGIN IMMEDIATE`` when the connection's ``immediate`` option is set.
    """

    def __init__(self, url: str, tables: tuple[sa.Table, ...]) -> None:
        parsed = sa.make_url(url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        if self.sqlite:
            self._engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
            event.listen(self._engine, "connect", _sqlite_pragmas)
            event.listen(self._engine, "begin", _sqlite_begin)
        else:
            self._engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        self._tables = tables
        self._created = False
        self._lock = threading.Lock()

    def engine(self) -> sa.Engine:
        """The engine, its tables created.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database cannot be reached or its tables created.
        """
        if not self._created:
            with self._lock:
                if not self._created:
                    self._create_tables()
                    self._created = True
        return self._engine

    def dispose(self) -> None:
        self._engine.dispose()

    def _create_tables(self) -> None:
        """One process at a time: workers and replicas start together, and two ``CREATE TABLE`` of one name
        at once fail on PostgreSQL."""
        with self._engine.connect().execution_options(immediate=True) as connection, connection.begin():
            if not self.sqlite:
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            metadata.create_all(connection, tables=list(self._tables))
            if self.sqlite and issued in self._tables:
                columns = {column["name"] for column in sa.inspect(connection).get_columns("issued")}
                if "body" not in columns:  # an index written before the server kept texts
                    connection.exec_driver_sql("ALTER TABLE issued ADD COLUMN body TEXT")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    connection.isolation_level = None  # SQLAlchemy's "begin" event below starts the transactions
    cursor = connection.cursor()
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process, not of the OS
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """WAL mode, kept in the file once set. Setting it on a new file while another connection holds a
    transaction fails at once with "database is locked" (SQLite's busy timeout does not wait for it), as when
    workers open a new index together: retried for ``BUSY_TIMEOUT_S``."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(connection: sa.Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get("immediate") else "BEGIN")


class StoreLogs:
    """The prediction log and feedback of a fleet, read from its database (the files' ``LogFiles``' twin)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return redacted(self.url)

    def exists(self) -> bool:
        return True

    def prediction_lines(self) -> Iterator[LoggedLine]:
        return self._lines(prediction_log)

    def feedback_lines(self) -> Iterator[LoggedLine]:
        return self._lines(feedback_log)

    def imported_to(self) -> str:
        return f"the feedback_log table of {self}"

    def add_feedback(self, lines: list[str]) -> None:
        """Append feedback lines (``langops feedback import``) in one transaction."""
        database = Database(self.url, LOG_TABLES)
        try:
            append_lines(database.engine(), feedback_log, lines)
        finally:
            database.dispose()

    def _lines(self, table: sa.Table) -> Iterator[LoggedLine]:
        database = Database(self.url, LOG_TABLES)
        try:
            engine = database.engine()
            last = 0
            while True:
                with engine.connect() as connection:
                    rows = connection.execute(
                        sa.select(table.c.id, table.c.record).where(table.c.id > last).order_by(table.c.id)
                        .limit(READ_CHUNK)
                    ).all()
                for row_id, record in rows:
                    yield LoggedLine(f"{table.name} row {row_id}", record)
                if len(rows) < READ_CHUNK:
                    return
                last = rows[-1][0]
        finally:
            database.dispose()


def insert_for(connection: sa.Connection) -> Any:
    """The ``insert`` of the connection's dialect, which has ``on_conflict_do_nothing``/``_do_update``."""
    name = connection.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"the prediction store runs on PostgreSQL or SQLite, not {name}")
    return insert


def append_lines(engine: sa.Engine, table: sa.Table, lines: list[str]) -> None:
    """Insert JSON lines into a log table in one transaction, each with the ``time`` it carries."""
    if not lines:
        return
    rows = [{"time": _time_of(line), "record": line} for line in lines]
    with engine.begin() as connection:
        connection.execute(sa.insert(table), rows)


def prune_log(engine: sa.Engine, table: sa.Table, *, keep: int) -> int:
    """Delete all but the newest ``keep`` rows of a log table; returns the rows deleted."""
    with engine.begin() as connection:
        newest = connection.execute(sa.select(sa.func.max(table.c.id))).scalar()
        if newest is None or newest <= keep:
            return 0
        return connection.execute(sa.delete(table).where(table.c.id <= newest - keep)).rowcount


def _time_of(line: str) -> str:
    try:
        value = json.loads(line).get("time")
    except (json.JSONDecodeError, AttributeError):
        value = None
    return value if isinstance(value, str) else ""
