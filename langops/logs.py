"""Where a command's log records go: the console for the person watching, a file for the record.

Every ``langops`` command writes everything it logs, tracebacks included, to its own file under the
state folder, ``<state_dir>/logs/<command>-<YYYYmmdd-HHMMSS>-<pid>.log``: one file per invocation, so a
failure names the exact file that holds its traceback, and concurrent commands (a sweep beside a
``dvc repro``) never interleave their records. Only the newest ``LOG_FILES_KEPT`` files are kept.

Without ``--verbose`` the console shows progress (INFO and up) but no traceback, and none of Prefect's
own reports of a failed task or flow run ("Task run failed with exception ...", "Encountered exception
during execution ...", "Finished in state Failed(...)"): each repeats the error that the command prints
once, at the end. Prefect sends run logs to its API from handlers on its run loggers, not on the root
logger, so the Prefect UI keeps every record either way. With ``--verbose`` the console shows all of it.

The local Dask workers of a sweep log the same way, into the same file: the sweep starts them with
``langops.logs`` as a Dask preload (``dask_setup``), which reads the file and verbosity this module
leaves in the environment.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

LOG_DIR = "logs"
LOG_FILES_KEPT = 50
LOG_FILE_ENV = "LANGOPS_LOG_FILE"
VERBOSE_ENV = "LANGOPS_LOG_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"  # a sweep's workers write here too
CONSOLE_TIME = "%H:%M:%S"
FILE_ONLY = "langops_file_only"
"""``extra={FILE_ONLY: True}`` keeps a record off the console unless ``--verbose`` (e.g. a traceback)."""
INSTALLED = "langops_handler"  # marks the handlers installed here, replaced when logging is set up again
# Libraries that log every request or migration at INFO: WARNING and up only.
QUIET_LOGGERS = ("httpx", "urllib3", "alembic", "great_expectations", "mlflow.store.db.utils")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FAILED_STATE = re.compile(r"Finished in state (Failed|Crashed|TimedOut|Cancelled)\b")


class ConsoleFilter(logging.Filter):
    """Keep off the console what only repeats a failure the command reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        if record.name in RUN_LOGGERS:
            # Prefect's task and flow engines report a failure with its traceback, then once more in the
            # final state's message; a run's own lines (progress, a sweep's failed trial) carry neither.
            return not (record.exc_info or FAILED_STATE.match(record.getMessage()))
        return True


class ConsoleFormatter(logging.Formatter):
    """A record's message without its traceback: the traceback is in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def configure_logging(state_dir: Path, *, command: str, verbose: bool) -> Path:
    """Send this process's log records to the console and to a new log file for this command.

    Adds a console and a file handler to the root logger (replacing the ones an earlier call added), and
    leaves the file and verbosity in the environment for a sweep's Dask workers (``dask_setup``). Must
    run before Prefect is imported: Prefect then finds handlers on the root logger and leaves them there
    instead of installing its own console handler.

    Returns:
        The log file (created with its first record).
    """
    folder = Path(state_dir) / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _remove_old_logs(folder, keep=LOG_FILES_KEPT - 1)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    _install_handlers(path, verbose=verbose)
    os.environ[LOG_FILE_ENV] = str(path)
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    return path


def dask_setup(worker: Any) -> None:
    """Dask preload: a sweep's local worker logs like the command that started it, into the same file."""
    log_file = os.environ.get(LOG_FILE_ENV)
    if log_file:
        _install_handlers(Path(log_file), verbose=os.environ.get(VERBOSE_ENV) == "1")


def _install_handlers(path: Path, *, verbose: bool) -> None:
    console = logging.StreamHandler()  # stderr
    if verbose:
        console.setFormatter(logging.Formatter(FORMAT, CONSOLE_TIME))
    else:
        console.setFormatter(ConsoleFormatter(FORMAT, CONSOLE_TIME))
        console.addFilter(ConsoleFilter())
    record = logging.FileHandler(path, encoding="utf-8", delay=True)
    record.setFormatter(logging.Formatter(FILE_FORMAT))
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, INSTALLED, False)]:
        root.removeHandler(handler)
        handler.close()
    for handler in (console, record):
        setattr(handler, INSTALLED, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _remove_old_logs(folder: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` log files (another command may be deleting them too)."""
    for old in sorted(folder.glob("*.log"), key=_modified, reverse=True)[keep:]:
        old.unlink(missing_ok=True)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # deleted since the listing: it sorts last and its unlink is a no-op
        return 0.0
