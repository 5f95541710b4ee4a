"""Sampled, size-bounded JSONL logs written off the request path: predictions and feedback.

Each scored text of a sampled request becomes one JSON line in ``predictions.jsonl`` (the schema is
``langops.prediction_records``'s); each feedback label one line in ``feedback.jsonl`` beside it. A file rotates at
``max_bytes`` and ``backups`` old files are kept, so the disk used is bounded. Requests only put entries
on a bounded queue; a background thread formats and writes them. When the writer falls behind, new
entries are refused and counted instead of slowing requests down (predictions are dropped; feedback is
answered 503, since the client can retry it).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import random
import threading
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
    from langops.onnx_model import Scores

LOG_FILE = "predictions.jsonl"
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
        self._on_written = on_written
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True,
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._thread = threading.Thread(target=self._write_forever, name=f"langops-log-{path.stem}", daemon=True)
        self._thread.start()

    def put(self, make_lines: Callable[[], list[str]]) -> bool:
        """Queue lines to write; False (nothing queued) when the writer is too far behind. Never blocks."""
        try:
            self._queue.put_nowait(make_lines)
        except queue.Full:
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._handler.close()

    def _write_forever(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is _STOP:
                return
            try:
                lines = entry()  # type: ignore[operator]
                for line in lines:
                    self._handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
                self._on_written(len(lines))
            except Exception:  # a bad record must not stop the writer
                logging.getLogger(__name__).exception("could not write a log record")


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
        time, texts, labels = utc_now(), list(texts), list(labels)

        def lines() -> list[str]:
            rows = prediction_rows(request_id=request_id, client_request_id=client_request_id, endpoint=endpoint,
                                   model_name=model_name, version=version, texts=texts, labels=labels, scores=scores,
                                   text_policy=self.config.text, time=time)
            return [json.dumps(row, ensure_ascii=False) for row in rows]

        if not self._log.put(lines):
            self._on_dropped(len(texts))

    def close(self, timeout: float = 10.0) -> None:
        self._log.close(timeout)


class FeedbackLog:
    """Feedback labels as ``{"time", "request_id", "label"}`` lines in ``feedback.jsonl``, off the request path."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int, queue_size: int) -> None:
        self._log = JsonlLog(path, max_bytes=max_bytes, backups=backups, queue_size=queue_size)

    def record(self, items: Sequence[Feedback]) -> bool:
        """Queue the items; False when the writer is too far behind (nothing queued)."""
        time, items = utc_now(), list(items)
        return self._log.put(lambda: feedback_lines(items, time=time))

    def close(self, timeout: float = 10.0) -> None:
        self._log.close(timeout)


def feedback_file_name(workers: int, pid: int) -> str:
    """One file per worker process, as for predictions: rotation is not safe across processes."""
    return FEEDBACK_FILE if workers == 1 else f"feedback-{pid}.jsonl"
