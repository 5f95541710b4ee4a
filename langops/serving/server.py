"""Run the prediction server in this process: logging and uvicorn around ``create_app``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from langops.serving.app import SETTINGS_ENV, ServerSettings, create_app
from langops.serving.metrics import MULTIPROCESS_ENV
from langops.serving.protocol import HeaderDeadlineProtocol

__all__ = ["ServerSettings", "serve"]


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """What uvicorn is given for ``settings``: bind address, shutdown grace, and the h11 protocol with a
    deadline on request headers (its timeout is a class setting: one per process, as each server is)."""
    HeaderDeadlineProtocol.header_read_timeout_s = settings.header_read_timeout_s
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "access_log": False,  # one log line per request would cost more than scoring a short text
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "http": HeaderDeadlineProtocol,  # used whether or not httptools is installed
    }


def serve(settings: ServerSettings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (what ``langops serve`` and ``python -m`` call).

    On SIGTERM the socket stops accepting, requests in flight (and batches already queued) finish
    within ``shutdown_timeout_s``, then the alias poller and prediction log stop. With ``workers > 1``
    uvicorn starts that many processes, each building the app from the settings it inherits whole, as the
    same JSON the deploy step's settings file holds, in ``LANGOPS_SERVER_SETTINGS`` (an import string is
    the only way to hand an app to its workers), and writing its metrics to a folder they share (``/metrics``
    of any worker is the server's).
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = uvicorn_options(settings)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    # One /metrics for all workers: each writes its values to this folder, and any of them reads them all.
    metrics_dir = tempfile.mkdtemp(prefix="langops-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_dir
    try:
        uvicorn.run("langops.serving.app:app_from_env", factory=True, workers=settings.workers, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
