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
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from langops.prediction_records import split_text_id, text_id

logger = logging.getLogger(__name__)

INDEX_FILE = "issued-ids.sqlite3"  # in the prediction log folder (it matches neither log's file pattern)
WRITE_BATCH = 512  # requests written in one transaction at most
PRUNE_EVERY_S = 60.0
BUSY_TIMEOUT_S = 10.0  # how long a connection waits for another worker's transaction
LISTED = 5  # text ids a lookup keeps of a name that names several
_STOP = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (
    request_id TEXT PRIMARY KEY,
    client_request_id TEXT,
    texts INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    body TEXT
);
CREATE INDEX IF NOT EXISTS issued_by_client ON issued (client_request_id) WHERE client_request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS issued_by_time ON issued (issued_at);
CREATE TABLE IF NOT EXISTS labelled (
    text_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    labelled_at REAL NOT NULL
);
"""


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
    row: tuple[str, str | None, int, float, str | None]
    written: Future[bool]


class IssuedIds:
    """The shared index of issued ids (see the module docstring), one instance per worker process.

    Raises:
        sqlite3.Error, OSError: the file cannot be created or opened (a corrupt file, a read-only folder).
    """

    def __init__(self, path: Path, *, window_hours: float, max_requests: int, queue_size: int) -> None:
        self.path = Path(path)
        self.window_s = window_hours * 3600
        self.max_requests = max_requests
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reader = _connect(self.path)
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._writer = _connect(self.path)
        self._labels = _connect(self.path)
        self._labels_lock = threading.Lock()
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
        entry = _Entry((request_id, client_request_id, count, time.time(), body), Future())
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
            sqlite3.Error: the file cannot be read.
        """
        since = (time.time() if now is None else now) - self.window_s
        with self._read_lock:
            return [self._lookup(name, since) for name in names]

    def claim_labels(self, labels: Sequence[tuple[str, str]], *, forced: Collection[str] = ()) -> list[tuple[str, str, str]]:
        """Record each ``(text id, label)`` as given, once per text: all or none, in one transaction.

        A text labelled before with another label is a conflict unless its id is in ``forced`` (then the new
        label replaces the old); the same label again is none (a client's retry). Returns the conflicts, as
        ``(text id, label given before, label sent)``; when there are any, nothing is recorded.

        Raises:
            sqlite3.Error: the file cannot be written.
        """
        now = time.time()
        with self._labels_lock, self._labels:
            self._labels.execute("BEGIN IMMEDIATE")  # no other worker claims between the check and the write
            conflicts = []
            for name, label in labels:
                row = self._labels.execute("SELECT label FROM labelled WHERE text_id = ?", (name,)).fetchone()
                if row is not None and row[0] != label and name not in forced:
                    conflicts.append((name, row[0], label))
            if not conflicts:
                self._labels.executemany("INSERT OR REPLACE INTO labelled VALUES (?, ?, ?)",
                                         [(name, label, now) for name, label in labels])
        return conflicts

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer and close the file."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        with self._read_lock:
            self._reader.close()
        with self._labels_lock:
            self._labels.close()

    def _lookup(self, name: str, since: float) -> Lookup:
        db, parts = self._reader, split_text_id(name)
        if parts is not None:
            row = db.execute("SELECT texts, body FROM issued WHERE request_id = ? AND issued_at >= ?",
                             (parts[0], since)).fetchone()
            if row is not None and parts[1] < row[0]:
                return Lookup(name, 1, (name,), by_client_id=False, text=_kept_text(row[1], parts[1]))
        row = db.execute("SELECT texts, body FROM issued WHERE request_id = ? AND issued_at >= ?",
                         (name, since)).fetchone()
        if row is not None:
            return Lookup(name, row[0], tuple(text_id(name, index) for index in range(min(row[0], LISTED))),
                          by_client_id=False, text=_kept_text(row[1], 0) if row[0] == 1 else None)
        found: list[str] = []
        texts = 0
        single: str | None = None
        for request_id, count, body in db.execute(
            "SELECT request_id, texts, body FROM issued WHERE client_request_id = ? AND issued_at >= ? "
            "ORDER BY issued_at", (name, since),
        ):
            texts += count
            found += [text_id(request_id, index) for index in range(min(count, LISTED - len(found)))]
            single = _kept_text(body, 0)
        if parts is not None:
            for request_id, body in db.execute(
                "SELECT request_id, body FROM issued WHERE client_request_id = ? AND texts > ? AND issued_at >= ? "
                "ORDER BY issued_at", (parts[0], parts[1], since),
            ):
                texts += 1
                if len(found) < LISTED:
                    found.append(text_id(request_id, parts[1]))
                single = _kept_text(body, parts[1])
        return Lookup(name, texts, tuple(found), by_client_id=True, text=single if texts == 1 else None)

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
                self._writer.close()
                return

    def _write(self, batch: list[_Entry]) -> None:
        try:
            with self._writer:
                self._writer.executemany("INSERT OR IGNORE INTO issued VALUES (?, ?, ?, ?, ?)",
                                         [entry.row for entry in batch])
            written = True
        except sqlite3.Error:
            logger.exception("could not record %d issued ids in %s: feedback naming them will be refused",
                             len(batch), self.path)
            written = False
        for entry in batch:
            if entry.written.set_running_or_notify_cancel():  # False: the request stopped waiting
                entry.written.set_result(written)

    def _prune(self) -> None:
        """Forget ids older than the window, and all but the newest ``max_requests``: the file stays bounded."""
        try:
            with self._writer:
                self._writer.execute("DELETE FROM issued WHERE issued_at < ?", (time.time() - self.window_s,))
                self._writer.execute("DELETE FROM labelled WHERE labelled_at < ?", (time.time() - self.window_s,))
                self._writer.execute("DELETE FROM issued WHERE rowid <= (SELECT MAX(rowid) FROM issued) - ?",
                                     (self.max_requests,))
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # old copies of deleted texts go too
        except sqlite3.Error:
            logger.exception("could not prune the issued ids in %s", self.path)


def _kept_text(body: str | None, index: int) -> str | None:
    """Text ``index`` of a request whose texts were kept, else None."""
    if body is None:
        return None
    texts = json.loads(body)
    return texts[index] if 0 <= index < len(texts) else None


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode (workers read while one writes), its schema created if missing; an index
    written before the server kept texts gains the column."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process, not of the OS
        db.execute("PRAGMA secure_delete=ON")  # a pruned text is overwritten, not left in a free page
        db.executescript(_SCHEMA)
        if "body" not in {column[1] for column in db.execute("PRAGMA table_info(issued)")}:
            try:
                with db:
                    db.execute("ALTER TABLE issued ADD COLUMN body TEXT")
            except sqlite3.OperationalError as exc:  # another worker added it first
                if "duplicate column" not in str(exc):
                    raise
    except BaseException:
        db.close()
        raise
    return db
