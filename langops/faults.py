"""Crash points: the places where the crash-consistency tests kill a run, as a power cut or the OOM killer would.

``LANGOPS_CRASH_AT=<point>`` makes the process SIGKILL itself when it reaches that point: no exception, no
``finally``, no exit handler runs. Each point sits in a window where a crash could leave state half-written
(a staged folder not yet swapped in, a model logged but not registered, an alias moved but its record not
closed), so the tests can check that the next run repairs or ignores what the dead one left. Unset, a
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_AT_ENV = "LANGOPS_CRASH_AT"

# The points inside steps; every stage also has "before:<stage>" and "after:<stage>" (flows/pipeline.py).
STEP_POINTS = (
    "prepare:staged",  # the splits are written to a temporary folder, not yet swapped in
    "train:checkpoint",  # the first checkpoint is on disk, the run's MLflow run is open
    "compress:exported",  # the ONNX export exists in scratch space, nothing is in the output folder
    "register:logged",  # the model is logged to the run, no registry version exists
    "register:created",  # the version exists, not yet described nor READY-checked
    "promote:alias-moved",  # the champion alias moved, its promotion record is still RUNNING
    "deploy:spawned",  # the model server process started, not yet answering
)


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``$LANGOPS_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
