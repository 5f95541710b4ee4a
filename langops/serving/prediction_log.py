"""Sampled, size-bounded logs written off the request path: predictions and feedback.

Each scored text of a sampled request becomes one JSON line in ``predictions.jsonl`` (the schema is
``langops.prediction_records``'s); each feedback label one line in ``feedback.jsonl`` beside it. A file rotates at
``max_bytes`` and ``backups`` old files are kept, so the disk used is bounded. Requests only put entries
on a bounded queue; a background thread formats and writes them. When the writer falls behind, new
entries are refused and counted instead of slowing requests down (predictions are dropped; feedback is
answered 503, since the client can retry it).

With the fleet's store (``deploy.prediction_store``, ``langops.fleet_store``) the same lines go to its tables
instead: predictions through the same queue, in one transaction per batch, the table kept to its newest rows;
feedback written before the label is answered, so an accepted label is stored.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from langops.prediction_records import (
    FEEDBACK_FILE,
    Feedback,
    TextPolicy,
    feedback_lines,
    prediction_rows,
    utc_now,
)

if TYPE_CHECKING:
    from langops.fleet_store import Database
    from langops.onnx_model import Scores

LOG_FILE = "predictions.jsonl"
WRITE_BATCH_LINES = 2048  # lines written in one call (one transaction in the store) at most
PRUNE_EVERY_S = 60.0
_STOP = object()


@dataclass(frozen=True)
class PredictionLogConfig:
    directory: Path
    sample_rate: float
    text: TextPolicy
    max_bytes: int
    backups: int
    queue_size: int
    file_name: str = LOG_FILE
    store: str | None = None  # the fleet's database (``langops.fleet_store``) instead of the folder's files
    store_rows: int = 2_000_000  # prediction rows the store keeps, newest first


class JsonlLog:
    """A rotating JSONL file fed through a bounded queue by a writer thread.

    ``put`` queues a callable that returns the lines to write: formatting happens on the writer thread,
    so the request pays only for the queue.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backups: int,
        queue_size: int,
        on_written: Callable[[int], None] = lambda n: None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True,
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._writer = _QueuedWriter(self._emit, name=f"langops-log-{path.stem}", queue_size=queue_size,
                                     on_written=on_written)

    def put(self, make_lines: Callable[[], list[str]]) -> bool:
        """Queue lines to write; False (nothing queued) when the writer is too far behind. Never blocks."""
        return self._writer.put(make_lines)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._writer.close(timeout)
        self._handler.close()

    def _emit(self, lines: list[str]) -> None:
        for line in lines:
            self._handler.emit(logging.makeLogRecord({"msg": line, "args": None}))


class StoreLog:
    """A log table of the fleet's store (``langops.fleet_store``) fed like ``JsonlLog``: the writer thread
    inserts what is queued in one transaction, and keeps the table to its newest ``keep`` rows. A batch the
    store does not take (it is down) is counted as failed, and the next batch tries again."""

    def __init__(
        self,
        url: str,
        table: str,
        *,
        keep: int,
        queue_size: int,
        on_written: Callable[[int], None] = lambda n: None,
        on_failed: Callable[[int], None] = lambda n: None,
    ) -> None:
        from langops import fleet_store

        self._database = fleet_store.Database(url, fleet_store.LOG_TABLES)
        self._table = fleet_store.metadata.tables[table]
        self._keep = keep
        self._last_prune = 0.0
        self._writer = _QueuedWriter(self._insert, name=f"langops-store-{table}", queue_size=queue_size,
                                     on_written=on_written, on_failed=on_failed)

    def put(self, make_lines: Callable[[], list[str]]) -> bool:
        return self._writer.put(make_lines)

    def close(self, timeout: float = 10.0) -> None:
        self._writer.close(timeout)
        self._database.dispose()

    def _insert(self, lines: list[str]) -> None:
        from langops.fleet_store import append_lines, prune_log

        engine = self._database.engine()
        append_lines(engine, self._table, lines)
        if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = time.monotonic()
            prune_log(engine, self._table, keep=self._keep)


class _QueuedWriter:
    """A bounded queue of line makers and the thread that writes them, what is queued at once in one call."""

    def __init__(
        self,
        write: Callable[[list[str]], None],
        *,
        name: str,
        queue_size: int,
        on_written: Callable[[int], None] = lambda n: None,
        on_failed: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._write, self._on_written, self._on_failed = write, on_written, on_failed
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._write_forever, name=name, daemon=True)
        self._thread.start()

    def put(self, make_lines: Callable[[], list[str]]) -> bool:
        try:
            self._queue.put_nowait(make_lines)
        except queue.Full:
            return False
        return True

    def close(self, timeout: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _write_forever(self) -> None:
        while True:
            entry, lines, stop = self._queue.get(), [], False
            while True:
                if entry is _STOP:
                    stop = True
                    break
                try:
                    lines += entry()  # type: ignore[operator]
                except Exception:  # a bad record must not stop the writer
                    logging.getLogger(__name__).exception("could not format a log record")
                if len(lines) >= WRITE_BATCH_LINES:
                    break
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                try:
                    self._write(lines)
                    self._on_written(len(lines))
                except Exception:
                    logging.getLogger(__name__).exception("could not write %d log records", len(lines))
                    self._on_failed(len(lines))
            if stop:
                return


class PredictionLog:
    """Writes sampled prediction records off the request path; see the module docstring."""

    def __init__(
        self,
        config: PredictionLogConfig,
        *,
        on_dropped: Callable[[int], None] = lambda n: None,
        on_written: Callable[[int], None] = lambda n: None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._on_dropped = on_dropped
        self._rng = rng or random.Random()
        self._log: JsonlLog | StoreLog
        if config.store is not None:
            self._log = StoreLog(config.store, "prediction_log", keep=config.store_rows, queue_size=config.queue_size,
                                 on_written=on_written, on_failed=on_dropped)
        else:
            self._log = JsonlLog(config.directory / config.file_name, max_bytes=config.max_bytes,
                                 backups=config.backups, queue_size=config.queue_size, on_written=on_written)

    def record(
        self,
        *,
        request_id: str,
        client_request_id: str | None = None,
        endpoint: str,
        model_name: str,
        version: str,
        texts: Sequence[str],
        labels: Sequence[str],
        scores: Scores,
    ) -> None:
        """Queue one request's predictions if it is sampled; never blocks."""
        if self.config.sample_rate < 1.0 and self._rng.random() >= self.config.sample_rate:
            return
        at, texts, labels = utc_now(), list(texts), list(labels)

        def lines() -> list[str]:
            rows = prediction_rows(request_id=request_id, client_request_id=client_request_id, endpoint=endpoint,
                                   model_name=model_name, version=version, texts=texts, labels=labels, scores=scores,
                                   text_policy=self.config.text, time=at)
            return [json.dumps(row, ensure_ascii=False) for row in rows]

        if not self._log.put(lines):
            self._on_dropped(len(texts))

    def close(self, timeout: float = 10.0) -> None:
        self._log.close(timeout)


class FeedbackLog:
    """Feedback labels as ``{"time", "request_id", "label"}`` lines (and ``text`` where kept): in a JSONL file,
    off the request path, or in the fleet's store, written before the label is answered."""

    def __init__(self, log: JsonlLog | Database) -> None:
        self._log = log

    @classmethod
    def in_file(cls, path: Path, *, max_bytes: int, backups: int, queue_size: int) -> FeedbackLog:
        return cls(JsonlLog(path, max_bytes=max_bytes, backups=backups, queue_size=queue_size))

    @classmethod
    def in_store(cls, url: str) -> FeedbackLog:
        from langops.fleet_store import LOG_TABLES, Database

        return cls(Database(url, LOG_TABLES))

    def record(self, items: Sequence[Feedback]) -> bool:
        """Write the items (the store) or queue them (a file); False when the file's writer is too far behind
        (nothing queued).

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the store cannot be written.
        """
        at, items = utc_now(), list(items)
        if isinstance(self._log, JsonlLog):
            return self._log.put(lambda: feedback_lines(items, time=at))
        from langops.fleet_store import append_lines, feedback_log

        append_lines(self._log.engine(), feedback_log, feedback_lines(items, time=at))
        return True

    def close(self, timeout: float = 10.0) -> None:
        if isinstance(self._log, JsonlLog):
            self._log.close(timeout)
        else:
            self._log.dispose()


def feedback_file_name(workers: int, pid: int) -> str:
    """One file per worker process, as for predictions: rotation is not safe across processes."""
    return FEEDBACK_FILE if workers == 1 else f"feedback-{pid}.jsonl"
