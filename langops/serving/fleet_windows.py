"""The canary's window across a fleet: what every worker of every replica measured, judged as one.

Each worker of a server measures the requests it answers (``RolloutWindow``). Alone, N workers would judge N
different windows, and a label sent to one worker would never count for the answer another gave. With the
fleet's store (``langops.fleet_store``) each worker, before it judges, (1) reads the feedback the fleet took
since it last looked and counts the labels that name answers it gave, (2) writes its counts for the step in
progress to ``rollout_windows``, and (3) judges its own counts plus those every other worker wrote for the same
rollout step within ``FRESH_JUDGEMENTS`` judge periods (a stopped worker's counts age out). Feedback is then
counted once, by the worker that gave the answer. Every worker acts on the same evidence; the registry's
compare-and-set (``langops.rollouts``) lets one step, roll back or promote, and the others follow.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from langops import fleet_store
from langops.fleet_store import feedback_log, rollout_windows
from langops.prediction_records import LoggedLine, read_records
from langops.serving.rollout import WindowCounts

logger = logging.getLogger(__name__)

FRESH_JUDGEMENTS = 5  # another worker's counts count while written within this many judge periods


@dataclass
class FleetWindows:
    """One worker's link to the fleet's canary windows in the store."""

    url: str
    judge_every_s: float
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _feedback_seen: int | None = None

    def __post_init__(self) -> None:
        self._database = fleet_store.Database(self.url, fleet_store.ROLLOUT_TABLES)

    def new_feedback(self) -> list[tuple[str, str]]:
        """``(text id, label)`` of the feedback the fleet took since the last call (none on the first call: a
        worker counts labels from its start on)."""
        engine = self._database.engine()
        with engine.connect() as connection:
            if self._feedback_seen is None:
                self._feedback_seen = connection.execute(sa.select(sa.func.max(feedback_log.c.id))).scalar() or 0
                return []
            rows = connection.execute(sa.select(feedback_log.c.id, feedback_log.c.record)
                                      .where(feedback_log.c.id > self._feedback_seen).order_by(feedback_log.c.id)).all()
        if rows:
            self._feedback_seen = rows[-1][0]
        return [(item["request_id"], item["label"])
                for item in read_records(LoggedLine(f"feedback_log row {row_id}", record) for row_id, record in rows)
                if isinstance(item.get("request_id"), str) and isinstance(item.get("label"), str)]

    def exchange(self, rollout_id: str, step: int, counts: WindowCounts) -> list[WindowCounts]:
        """Write this worker's counts; return the other workers' fresh counts for the same rollout step."""
        now = time.time()
        engine = self._database.engine()
        row = {"worker": self.worker, "rollout_id": rollout_id, "step": step, "updated_at": now,
               "counts": counts.to_json()}
        with engine.begin() as connection:
            insert = fleet_store.insert_for(connection)(rollout_windows)
            connection.execute(insert.on_conflict_do_update(index_elements=[rollout_windows.c.worker],
                                                            set_={key: insert.excluded[key] for key in row
                                                                  if key != "worker"}), [row])
            others = connection.execute(sa.select(rollout_windows.c.counts).where(
                rollout_windows.c.worker != self.worker, rollout_windows.c.rollout_id == rollout_id,
                rollout_windows.c.step == step,
                rollout_windows.c.updated_at >= now - FRESH_JUDGEMENTS * self.judge_every_s,
            )).scalars().all()
        return [WindowCounts.from_json(raw) for raw in others]

    def close(self) -> None:
        self._database.dispose()
