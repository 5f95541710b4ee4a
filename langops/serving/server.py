"""Run the prediction server in this process: logging and uvicorn around ``create_app``."""

from __future__ import annotations

import logging

from langops.serving.app import ServerSettings, create_app

__all__ = ["ServerSettings", "serve"]


def serve(settings: ServerSettings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (what ``langops serve`` and ``python -m`` call).

    Shutdown waits up to 10 s for requests in flight, then stops the alias poller.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
