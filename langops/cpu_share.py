"""How many threads a compute step may use: its fair share of the CPUs this process may run on.

A torch process starts one intra-op thread per core of the machine, whatever else runs there. Two of them
on the same cores (a run beside a sweep, a run beside the test suite, two trainings on one laptop) then have
twice as many threads as cores, and OpenMP threads that spin while they wait for each other: each job ran
8.5 times slower than alone where a fair share is 2 times. So a compute step asks for its share:

- the CPUs it may use: its affinity mask, capped by a cgroup CPU quota (containers, Kubernetes limits);
- less the CPUs that other programs keep busy (the load average, without the langops jobs counted below);
- divided evenly among the langops jobs that are computing on this machine now, each of which leaves a claim
  file in a folder every user of the machine shares, and gives it back when it ends (a dead job's claim is
  ignored).

A job asks again while it runs (``CpuShare.refresh``), so the first of two jobs gives up half its threads
when the second starts, and takes them back when it ends. A number set in params is used as given.

OpenMP keeps its default wait policy (threads spin briefly at a barrier, then sleep). Sharing jobs run one
thread each, so none of their threads waits on another; a job alone with two threads trained the demo 16%
slower with ``OMP_WAIT_POLICY=PASSIVE`` (133.6 against 115.0 s per epoch on 2 cores, 30 steps each), so that
is left to the user's environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from langops.processes import process_alive

log = logging.getLogger(__name__)

CLAIMS_ENV = "LANGOPS_CPU_CLAIMS_DIR"
REFRESH_EVERY_S = 15.0


def claims_dir() -> Path:
    """The folder of claims, shared by every langops job on the machine (``$LANGOPS_CPU_CLAIMS_DIR`` to move it)."""
    return Path(os.environ.get(CLAIMS_ENV) or Path(tempfile.gettempdir()) / "langops-cpu-claims")


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup quota (at least one)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


@dataclass(frozen=True)
class Claim:
    """A computing langops job: its process, and the threads it runs with now."""

    pid: int
    started: float  # the process's creation time: a reused pid is not the same job
    threads: int


def other_claims(folder: Path | None = None) -> list[Claim]:
    """Claims of live jobs other than this process; files of dead jobs are removed on the way."""
    folder = folder or claims_dir()
    found = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            claim = Claim(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being written, or not ours: a claim file is replaced whole, so the next look reads it
        if claim.pid == os.getpid():
            continue
        if process_alive(claim.pid, claim.started):
            found.append(claim)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def fair_threads(usable: int, others: list[Claim], load: float | None, own_threads: int) -> int:
    """This job's share: the usable CPUs less those busy outside langops, split evenly among computing jobs.

    ``load`` is the 1-minute load average; it counts this job's threads and the other jobs' too, which are
    taken out so that only other programs' work is left (None where the system has no load average).
    """
    share = usable // (1 + len(others))
    if load is not None:  # whole cores only: the load average lags, and a core half busy still gives a thread
        busy_elsewhere = max(0.0, load - own_threads - sum(claim.threads for claim in others))
        share = min(share, usable - math.floor(busy_elsewhere))
    return max(1, min(share, usable))


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class CpuShare:
    """This job's claim on the machine's CPUs: use it as a context manager around the computing, call
    ``refresh`` now and then (it asks again at most every ``REFRESH_EVERY_S``); ``apply`` is given each new
    thread count (``torch.set_num_threads``)."""

    requested: int | None = None
    apply: Callable[[int], object] = lambda threads: None
    folder: Path = field(default_factory=claims_dir)
    threads: int = 0
    _checked: float = 0.0

    def __enter__(self) -> CpuShare:
        self.refresh(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._path().unlink()

    def _path(self) -> Path:
        return self.folder / f"{os.getpid()}.json"

    def refresh(self, *, force: bool = False) -> bool:
        """Ask for the share again; True when the thread count changed (and was applied)."""
        if not force and time.monotonic() - self._checked < REFRESH_EVERY_S:
            return False
        self._checked = time.monotonic()
        if self.requested:
            wanted = self.requested
        else:
            # Before its first share this process already runs (loading the model): one thread of the load is its own.
            wanted = fair_threads(usable_cpus(), other_claims(self.folder), _load_average(), max(self.threads, 1))
        changed = wanted != self.threads
        if changed:
            if self.threads:
                log.info("threads %d -> %d: other jobs on this machine started or ended", self.threads, wanted)
            self.threads = wanted
            self.apply(wanted)
        self._write()
        return changed

    def _write(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                self.folder.chmod(0o1777)  # every user's jobs share it; each removes only its own claims
            own = psutil.Process()
            staged = self.folder / f".{os.getpid()}.tmp"
            staged.write_text(json.dumps({"pid": own.pid, "started": own.create_time(), "threads": self.threads}))
            os.replace(staged, self._path())
        except OSError as exc:  # a read-only temp folder: the share still follows the load average
            log.debug("cannot write a CPU claim in %s: %s", self.folder, exc)

