"""Command line of the prediction server: ``python -m langops.serving --model-uri URI ...``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from langops.serving.app import ServerSettings, parse_model_uri
from langops.serving.server import serve

# Every setting is an option; types come from here, help texts and defaults from ServerSettings.
_OPTION_TYPES: dict[str, Any] = {
    "model_name": str, "alias": str, "version": str, "model_dir": Path, "host": str, "port": int,
    "workers": int, "poll_seconds": float, "num_threads": int, "max_batch_size": int, "max_wait_ms": float,
    "max_queue": int, "max_request_texts": int, "max_text_chars": int, "max_body_bytes": int,
    "retry_after_s": int, "shutdown_timeout_s": float, "auth_token_env": str, "prediction_log_dir": Path,
    "prediction_log_sample_rate": float, "prediction_log_max_bytes": int, "prediction_log_backups": int,
    "prediction_log_queue": int, "cache_dir": Path,
}


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
    parser.add_argument("--model-uri", help="models:/<name>@<alias>, models:/<name>/<version> or a compressed dir")
    for name, kind in _OPTION_TYPES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=_help(name))
    parser.add_argument("--prediction-log-hash-texts", action=argparse.BooleanOptionalAction,
                        help=_help("prediction_log_hash_texts"))
    args = parser.parse_args(argv)
    values = {key: value for key, value in vars(args).items() if value is not None}
    uri = values.pop("model_uri", None)
    try:
        if uri is not None:
            values.update(parse_model_uri(uri))
        return ServerSettings(**values)
    except ValidationError as exc:
        parser.error("; ".join(_describe(error) for error in exc.errors()))
    except ValueError as exc:
        parser.error(str(exc))


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
