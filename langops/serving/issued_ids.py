"""The ids the server issued for scored texts, in one SQLite file every worker shares: what feedback may name.

A scored request gets an id from the server (``new_request_id``), whatever the client sent, and its texts
``<id>-<index>``. Each worker records ``(id, client's id, texts, time)`` here before it answers, so once a
client holds an id, any worker of the server on this machine, and the server after a restart, can tell
that it was issued and how many texts carry a client's id. Feedback is then checked against it: an id
the server never issued, or issued more than ``feedback_window_hours`` ago, is refused, and a client's id
that several scored texts carry is refused as ambiguous rather than joined to one of them.

With ``prediction_log_text: labelled`` (the default) the index also holds the request's texts, and only
here: a label that arrives within the window is written to the feedback log with its text, and the texts no
one labels are deleted with their row when the window ends (``secure_delete`` zeroes the freed pages, and
the write-ahead log is truncated after each prune, so the files keep no copy).

Writes are batched by a thread per worker (one transaction per batch; SQLite's WAL lets the workers write
and read side by side); a request waits for its own batch, which is one short transaction. The file is
bounded: rows older than the window, and all but the newest ``max_requests`` rows, are deleted as the
writer goes. The index is a guard, not a log: when it cannot be written (queue full, disk error) the
prediction is still answered, counted, and feedback for it is refused as unknown.

The same tables can live in the fleet's database instead of the file (``deploy.prediction_store``,
``langops.fleet_store``): then every replica of the server, on any machine, checks feedback against the ids
any of them issued. The code is the same through SQLAlchemy; only the lock a label claim takes differs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from langops import fleet_store
from langops.fleet_store import issued, labelled
from langops.prediction_records import split_text_id, text_id

logger = logging.getLogger(__name__)

INDEX_FILE = "issued-ids.sqlite3"  # in the prediction log folder (it matches neither log's file pattern)
WRITE_BATCH = 512  # requests written in one transaction at most
PRUNE_EVERY_S = 60.0
LISTED = 5  # text ids a lookup keeps of a name that names several
_STOP = object()


@dataclass(frozen=True)
class Lookup:
    """What one feedback id names among the ids issued within the window."""

    name: str
    texts: int  # scored texts it names: 1 is a match, 0 unknown, more ambiguous
    text_ids: tuple[str, ...]  # their issued ids (the first ``LISTED``)
    by_client_id: bool  # it is a client's id (its own X-Request-Id), not one the server issued
    text: str | None = None  # the one text it names, when the server kept the texts of its request

    @property
    def text_id(self) -> str | None:
        """The issued id of the one text it names, else None."""
        return self.text_ids[0] if self.texts == 1 else None


@dataclass
class _Entry:
    row: dict[str, object]
    written: Future[bool]


class IssuedIds:
    """The shared index of issued ids (see the module docstring), one instance per worker process.

    ``target`` is the index file (SQLite), or the fleet store's SQLAlchemy URL. The index is opened on first
    use, and again after a failure (a database that did not answer, a file that could not be opened), so a
    server started while its store is down checks feedback once the store answers.

    Raises:
        OSError: the index file's folder cannot be created.
    """

    def __init__(self, target: Path | str, *, window_hours: float, max_requests: int, queue_size: int) -> None:
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            url = fleet_store.sqlite_url(target)
        else:
            url = target
        self.where = str(target) if isinstance(target, Path) else fleet_store.redacted(target)
        self.window_s = window_hours * 3600
        self.max_requests = max_requests
        self._database = fleet_store.Database(url, fleet_store.INDEX_TABLES)
        self._sqlite = self._database.sqlite
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._write_forever, name="langops-issued-ids", daemon=True)
        self._thread.start()

    def add(self, request_id: str, client_request_id: str | None, texts: int | Sequence[str]) -> Future[bool] | None:
        """Queue one scored request, by its number of texts or by the texts themselves (kept until the window
        ends, for the feedback that names them); the future says whether it was written. None (nothing
        queued) when the writer is too far behind. Never blocks."""
        if isinstance(texts, int):
            count, body = texts, None
        else:
            count, body = len(texts), json.dumps(list(texts), ensure_ascii=False)
        entry = _Entry({"request_id": request_id, "client_request_id": client_request_id, "texts": count,
                        "issued_at": time.time(), "body": body}, Future())
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            return None
        return entry.written

    def lookup(self, names: Sequence[str], *, now: float | None = None) -> list[Lookup]:
        """What each name names among the ids issued in the window: an issued text id (``<id>-<index>``),
        an issued request id (all its texts), else a client's id (all texts of every request that sent it)
        or a client's ``<id>-<index>``.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the index cannot be read.
        """
        since = (time.time() if now is None else now) - self.window_s
        with self._database.engine().connect() as connection:
            return [_lookup(connection, name, since) for name in names]

    def claim_labels(self, labels: Sequence[tuple[str, str]], *, forced: Collection[str] = ()) -> list[tuple[str, str, str]]:
        """Record each ``(text id, label)`` as given, once per text: all or none, in one transaction.

        A text labelled before with another label is a conflict unless its id is in ``forced`` (then the new
        label replaces the old); the same label again is none (a client's retry). Returns the conflicts, as
        ``(text id, label given before, label sent)``; when there are any, nothing is recorded.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the index cannot be written.
        """
        now = time.time()
        with self._database.engine().connect().execution_options(immediate=True) as connection, connection.begin():
            # No other worker, process or replica claims between the check and the write.
            if not self._sqlite:
                connection.exec_driver_sql("LOCK TABLE labelled IN SHARE ROW EXCLUSIVE MODE")
            conflicts = []
            for name, label in labels:
                before = connection.execute(sa.select(labelled.c.label).where(labelled.c.text_id == name)).scalar()
                if before is not None and before != label and name not in forced:
                    conflicts.append((name, before, label))
            if not conflicts:
                insert = fleet_store.insert_for(connection)(labelled)
                connection.execute(
                    insert.on_conflict_do_update(index_elements=[labelled.c.text_id],
                                                 set_={"label": insert.excluded.label,
                                                       "labelled_at": insert.excluded.labelled_at}),
                    [{"text_id": name, "label": label, "labelled_at": now} for name, label in labels],
                )
        return conflicts

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer and close the connections."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._database.dispose()

    def _write_forever(self) -> None:
        last_prune = 0.0
        while True:
            batch: list[_Entry] = []
            stop = False
            entry = self._queue.get()
            while True:
                if entry is _STOP:
                    stop = True
                    break
                assert isinstance(entry, _Entry)
                batch.append(entry)
                if len(batch) >= WRITE_BATCH:
                    break
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self._prune()
            if stop:
                return

    def _write(self, batch: list[_Entry]) -> None:
        try:
            with self._database.engine().begin() as connection:
                insert = fleet_store.insert_for(connection)(issued).on_conflict_do_nothing()
                connection.execute(insert, [entry.row for entry in batch])
            written = True
        except sa.exc.SQLAlchemyError:
            logger.exception("could not record %d issued ids in %s: feedback naming them will be refused",
                             len(batch), self.where)
            written = False
        for entry in batch:
            if entry.written.set_running_or_notify_cancel():  # False: the request stopped waiting
                entry.written.set_result(written)

    def _prune(self) -> None:
        """Forget ids older than the window, and all but the newest ``max_requests``: the index stays bounded."""
        oldest = time.time() - self.window_s
        try:
            with self._database.engine().begin() as connection:
                connection.execute(sa.delete(issued).where(issued.c.issued_at < oldest))
                connection.execute(sa.delete(labelled).where(labelled.c.labelled_at < oldest))
                cutoff = (sa.select(issued.c.issued_at).order_by(issued.c.issued_at.desc())
                          .offset(self.max_requests).limit(1).scalar_subquery())
                connection.execute(sa.delete(issued).where(issued.c.issued_at <= cutoff))
            if self._sqlite:  # old copies of deleted texts leave the write-ahead log too
                with self._database.engine().connect() as connection:
                    connection.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sa.exc.SQLAlchemyError:
            logger.exception("could not prune the issued ids in %s", self.where)


def _lookup(db: sa.Connection, name: str, since: float) -> Lookup:
    parts = split_text_id(name)
    recent = issued.c.issued_at >= since
    if parts is not None:
        row = db.execute(sa.select(issued.c.texts, issued.c.body)
                         .where(issued.c.request_id == parts[0], recent)).first()
        if row is not None and parts[1] < row[0]:
            return Lookup(name, 1, (name,), by_client_id=False, text=_kept_text(row[1], parts[1]))
    row = db.execute(sa.select(issued.c.texts, issued.c.body).where(issued.c.request_id == name, recent)).first()
    if row is not None:
        return Lookup(name, row[0], tuple(text_id(name, index) for index in range(min(row[0], LISTED))),
                      by_client_id=False, text=_kept_text(row[1], 0) if row[0] == 1 else None)
    found: list[str] = []
    texts = 0
    single: str | None = None
    by_client = sa.select(issued.c.request_id, issued.c.texts, issued.c.body).order_by(issued.c.issued_at)
    for request_id, count, body in db.execute(by_client.where(issued.c.client_request_id == name, recent)):
        texts += count
        found += [text_id(request_id, index) for index in range(min(count, LISTED - len(found)))]
        single = _kept_text(body, 0)
    if parts is not None:
        for request_id, _count, body in db.execute(
            by_client.where(issued.c.client_request_id == parts[0], issued.c.texts > parts[1], recent)
        ):
            texts += 1
            if len(found) < LISTED:
                found.append(text_id(request_id, parts[1]))
            single = _kept_text(body, parts[1])
    return Lookup(name, texts, tuple(found), by_client_id=True, text=single if texts == 1 else None)


def _kept_text(body: str | None, index: int) -> str | None:
    """Text ``index`` of a request whose texts were kept, else None."""
    if body is None:
        return None
    texts = json.loads(body)
    return texts[index] if 0 <= index < len(texts) else None
