"""Command line of the prediction server: ``python -m langops.serving --settings FILE`` (or ``--model-uri URI``).

The deploy step hands the server its settings whole, as a file holding ``ServerSettings.model_dump_json()``.
For a person at a terminal every setting is also an option, made from the ``ServerSettings`` fields (their
names, help texts and defaults), so adding a setting there adds its option here; options override the file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from langops.serving.app import ServerSettings, parse_model_uri
from langops.serving.server import serve

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Build settings from a settings file and the options given (only those: the rest keep their defaults).

    Options are passed on as text and converted and checked by ``ServerSettings``, so a bad value is
    reported with the option's name. ``$MLFLOW_TRACKING_URI`` is used when neither names a tracking URI.
    """
    parser = argparse.ArgumentParser(
        prog="python -m langops.serving", description="Serve a langops classifier over HTTP."
    )
    parser.add_argument("--settings", type=Path, metavar="FILE",
                        help="JSON of every setting (what `langops deploy-model` writes); options override it")
    parser.add_argument("--model-uri", help="models:/<name>@<alias>, models:/<name>/<version> or a compressed dir")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=_help(name))
        else:
            parser.add_argument(flag, help=_help(name))
    args = parser.parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    settings_file, uri = given.pop("settings", None), given.pop("model_uri", None)
    try:
        values = _read_settings_file(settings_file) if settings_file is not None else {}
        if uri is not None:
            given.update(parse_model_uri(uri))
        values.update(given)
        if "tracking_uri" not in values and os.environ.get(TRACKING_URI_ENV):
            values["tracking_uri"] = os.environ[TRACKING_URI_ENV]
        return ServerSettings.model_validate(values)
    except ValidationError as exc:
        parser.error("; ".join(_describe(error) for error in exc.errors()))
    except ValueError as exc:
        parser.error(str(exc))


def _read_settings_file(path: Path) -> dict[str, Any]:
    """The settings in ``path`` as a mapping (checked with the options, so one error lists every problem).

    Raises:
        ValueError: the file is missing or is not a JSON object.
    """
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--settings {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"--settings {path}: expected a JSON object of settings, got {type(values).__name__}")
    return values


def _help(name: str) -> str:
    field = ServerSettings.model_fields[name]
    default = "" if field.default is None else f" (default: {field.default})"
    if name == "tracking_uri":
        default = f" (default: ${TRACKING_URI_ENV})"
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
