"""Flow runs whose process died: each in-process run names its process in a tag; the next command marks the
runs of dead processes Crashed.

A flow run started by ``langops run``, ``monitor`` or ``sweep`` runs in that command's process. When the
process is SIGKILLed (the OOM killer, ``kill -9``, a power cut) nothing is left to tell Prefect, and its flow
and task runs stay "Running" in the project's Prefect database for ever: ``langops up`` and the UI show them
running. Prefect's workers report the runs they started; runs without a worker have nobody. So each such
command tags its runs with its host, process id and start time (``langops.process:<host>:<pid>:<started>``),
and the next such command on that host marks every run still Running or Pending whose process is gone as
Crashed, with its running task runs, saying why.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from langops.processes import process_alive

log = logging.getLogger(__name__)

PROCESS_TAG_PREFIX = "langops.process:"
CRASHED_MESSAGE = "the process running it ({process}) died without ending it (killed?); marked by the next run"


def process_tag(pid: int | None = None) -> str:
    """This process (or ``pid``) as a tag: host, pid and creation time, so that a reused pid is not taken for it."""
    process = psutil.Process(pid)
    return f"{PROCESS_TAG_PREFIX}{socket.gethostname()}:{process.pid}:{int(process.create_time())}"


@contextlib.contextmanager
def runs_tagged_with_this_process() -> Iterator[None]:
    """Flow and task runs created in this block carry ``process_tag()``."""
    from prefect import tags

    with tags(process_tag()):
        yield


@dataclass(frozen=True)
class TaggedProcess:
    host: str
    pid: int
    started: int

    @classmethod
    def parse(cls, tag: str) -> TaggedProcess | None:
        try:
            host, pid, started = tag.removeprefix(PROCESS_TAG_PREFIX).rsplit(":", 2)
            return cls(host, int(pid), int(started))
        except ValueError:
            return None

    def alive(self) -> bool:
        return process_alive(self.pid, self.started)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def mark_dead_runs_crashed() -> list[str]:
    """Mark Crashed the Running or Pending flow runs (and their running task runs) of dead processes on this
    host, in the Prefect API this process talks to; the names of the flow runs marked."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING]
    marked = []
    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))))
        for run in runs:
            owners = [TaggedProcess.parse(tag) for tag in run.tags if tag.startswith(PROCESS_TAG_PREFIX)]
            owner = next((o for o in owners if o is not None), None)
            if owner is None or owner.host != host or owner.alive():
                continue
            message = CRASHED_MESSAGE.format(process=owner)
            tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))))
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append(run.name)
    if marked:
        log.warning("marked %d flow run(s) Crashed whose process died without ending them: %s",
                    len(marked), ", ".join(marked))
    return marked


def tidy_dead_runs() -> None:
    """``mark_dead_runs_crashed``, never failing the command that calls it: the API's error is logged."""
    try:
        mark_dead_runs_crashed()
    except Exception as exc:  # a tidy-up: a server that cannot answer it will fail the run itself, with its error
        log.warning("could not look for flow runs left Running by dead processes: %s", exc)
