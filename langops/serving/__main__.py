"""Command line of the prediction server: ``python -m langops.serving --model-name NAME ...``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from langops.serving.app import ServerSettings
from langops.serving.server import serve


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Build settings from the command line.

    Only the options given are passed on, and help texts come from the settings' fields, so each
    default and description is written once, in ``ServerSettings``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m langops.serving", description="Serve a langops classifier over HTTP."
    )
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help=_help("tracking_uri") + " (default: $MLFLOW_TRACKING_URI)")
    for name, kind in [
        ("model_name", str), ("alias", str), ("model_dir", Path), ("host", str), ("port", int),
        ("poll_seconds", float), ("num_threads", int), ("max_batch", int), ("max_text_chars", int),
        ("cache_dir", Path),
    ]:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=_help(name))
    args = parser.parse_args(argv)
    try:
        return ServerSettings(**{key: value for key, value in vars(args).items() if value is not None})
    except ValidationError as exc:
        parser.error("; ".join(_describe(error) for error in exc.errors()))


def _help(name: str) -> str:
    field = ServerSettings.model_fields[name]
    default = "" if field.default is None else f" (default: {field.default})"
    return f"{field.description}{default}"


def _describe(error: Any) -> str:
    """A settings error phrased with the option's name, as the user typed it."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message
    return "--" + "-".join(map(str, error["loc"])).replace("_", "-") + f": {message}"


def main(argv: list[str] | None = None) -> None:
    serve(parse_settings(argv))


if __name__ == "__main__":
    main()
