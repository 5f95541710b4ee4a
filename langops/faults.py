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
    "validate:reported",  # the new report.md is written, validation.json is still the last run's
    "baseline:staged",  # the baseline's fits and metrics are in a temporary folder, the last run's still in place
    "train:checkpoint",  # the first checkpoint is on disk, the run's MLflow run is open
    "evaluate:staged",  # metrics and plots are in a temporary folder, the last run's still in place
    "distill:staged",  # the student is written to a temporary folder, not yet swapped in
    "compress:exported",  # the ONNX export exists in scratch space, nothing is in the output folder
    "register:logged",  # the model is logged to the run, no registry version exists
    "register:created",  # the version exists, not yet described nor READY-checked
    "promote:alias-moved",  # the champion alias moved, its promotion record is still RUNNING
    "deploy:spawned",  # the model server process started, not yet answering
)
# The points inside the long-running commands other than `langops run`, and inside the model server.
COMMAND_POINTS = (
    "sweep:trial-finished",  # one trial is trained and filed under the open sweep run, the others still train
    "monitor:sent",  # the retraining event is recorded as pending and handed to Prefect's events client, which
    # sends it in the background: it may be lost with the process
    "canary:stepped",  # the rollout tag names the next step, its canary-step record is still RUNNING
    "canary:promoted",  # the canary's version is champion, its rollout tag not yet cleared nor the record closed
)


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``$LANGOPS_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


CHALLENGER_FAULT_ENV = "LANGOPS_CHALLENGER_FAULT"
CHALLENGER_FAULTS = ("crash", "hang", "slow:<ms>")


def challenger_fault() -> str | None:
    """A fault for the challenger of a shadow or canary, from ``$LANGOPS_CHALLENGER_FAULT``: ``crash`` (every
    call raises), ``hang`` (every call blocks until the server stops) or ``slow:<ms>`` (every call waits first).

    It is applied after the challenger loaded and answered its smoke prediction, as a model that breaks on
    live traffic would; the tests and fire drills use it to show the champion's answers are not touched.
    Read when a challenger loads.

    Raises:
        ValueError: the variable holds something else.
    """
    fault = os.environ.get(CHALLENGER_FAULT_ENV) or None
    if fault is None or fault in ("crash", "hang"):
        return fault
    if fault.startswith("slow:"):
        try:
            float(fault.removeprefix("slow:"))
            return fault
        except ValueError:
            pass
    raise ValueError(f"${CHALLENGER_FAULT_ENV}={fault!r}: expected one of {', '.join(CHALLENGER_FAULTS)}")
