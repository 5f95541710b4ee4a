"""A sampled, size-bounded log of predictions for monitoring to read later.

Each scored text becomes one JSON line (time, endpoint, model version, the text or its sha256, label,
probabilities) in ``predictions.jsonl`` under the log folder; the file rotates at ``max_bytes`` and
``backups`` old files are kept, so the disk used is bounded. Requests only put records on a bounded
queue; a background thread writes them. When the writer falls behind, new records are dropped and
counted instead of slowing requests down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

LOG_FILE = "predictions.jsonl"
_STOP = object()


@dataclass(frozen=True)
class PredictionLogConfig:
    directory: Path
    sample_rate: float
    hash_texts: bool
    max_bytes: int
    backups: int
    queue_size: int
    file_name: str = LOG_FILE


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
        self._on_written = on_written
        self._rng = rng or random.Random()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_size)
        config.directory.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            config.directory / config.file_name, maxBytes=config.max_bytes, backupCount=config.backups,
            encoding="utf-8", delay=True,
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._thread = threading.Thread(target=self._write_forever, name="langops-prediction-log", daemon=True)
        self._thread.start()

    def record(
        self,
        *,
        endpoint: str,
        model_name: str,
        version: str,
        texts: Sequence[str],
        labels: Sequence[str],
        probs: np.ndarray,
    ) -> None:
        """Queue one request's predictions if it is sampled; never blocks."""
        if self.config.sample_rate < 1.0 and self._rng.random() >= self.config.sample_rate:
            return
        entry = (endpoint, model_name, version, list(texts), list(labels), probs)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._on_dropped(len(texts))

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
                lines = self._lines(entry)  # type: ignore[arg-type]
                for line in lines:
                    self._handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
                self._on_written(len(lines))
            except Exception:  # a bad record must not stop the writer
                logging.getLogger(__name__).exception("could not write a prediction log record")

    def _lines(self, entry: tuple[str, str, str, list[str], list[str], np.ndarray]) -> list[str]:
        endpoint, model_name, version, texts, labels, probs = entry
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for text, row in zip(texts, probs, strict=True):
            record: dict[str, object] = {"time": now, "endpoint": endpoint, "model_name": model_name,
                                         "version": version}
            if self.config.hash_texts:
                record["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            else:
                record["text"] = text
            record["label"] = labels[int(row.argmax())]
            record["probabilities"] = {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)}
            lines.append(json.dumps(record, ensure_ascii=False))
        return lines
