"""Moving a project folder: notice it, refuse to run on stale paths, and rewrite them on request.

The embedded MLflow store keeps absolute artifact paths (experiments, runs, logged models, model
versions), so after ``mv project elsewhere`` new runs would write their artifacts back under the old
path and every download would look there. The state folder records where it was created
(``location.json``); a command run from another place stops with one message that says what happened
and what to do, and ``langops relocate`` rewrites the store's paths to the new place.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from langops.config import ConfigError, Params
from langops.io import write_json

LOCATION_FILE = "location.json"
MLFLOW_DB = "mlflow.db"


class ProjectMovedError(ConfigError):
    """The state folder was created under another path and the embedded store still points there."""


@dataclass(frozen=True)
class Relocation:
    old_state_dir: Path
    new_state_dir: Path
    rewritten: dict[str, int]  # "table.column" -> rows changed


def check_location(params: Params) -> None:
    """Record where the state folder lives on first use; refuse a moved one whose MLflow store is embedded.

    Raises:
        ProjectMovedError: the state folder was created elsewhere; the message names both places and the fix.
    """
    state_dir = params.project.state_dir.resolve()
    recorded = recorded_state_dir(state_dir)
    if recorded == state_dir:
        return
    if recorded is None or not _embedded_store(params):  # first use, or moved before any path was stored
        if state_dir.is_dir():
            write_json(state_dir / LOCATION_FILE, {"state_dir": str(state_dir)})
        return
    raise ProjectMovedError(
        f"this project's state folder {state_dir} was created at {recorded}: the project was moved or copied. "
        f"Its MLflow store still points at artifacts under {recorded}, so nothing can run here until the "
        f"paths are rewritten: run `langops relocate` (or move the folder back)"
    )


def recorded_state_dir(state_dir: Path) -> Path | None:
    path = Path(state_dir) / LOCATION_FILE
    if not path.is_file():
        return None
    return Path(json.loads(path.read_text())["state_dir"])


def relocate(params: Params) -> Relocation:
    """Point the embedded MLflow store at the state folder's current place, and record that place.

    Every text value in the store that names the old folder (as a path or a ``file://`` URI) is rewritten
    in one transaction, so a crash leaves the store as it was. Prefect's database needs nothing: the
    pipeline hands it the results folder on every run.

    Raises:
        ConfigError: the project has no recorded place.
    """
    state_dir = params.project.state_dir.resolve()
    old = recorded_state_dir(state_dir)
    if old is None:
        raise ConfigError(f"{state_dir / LOCATION_FILE} not found: nothing records where this project was")
    rewritten: dict[str, int] = {}
    database = state_dir / MLFLOW_DB
    if old != state_dir and database.is_file():
        replacements = [(old.as_uri(), state_dir.as_uri()), (str(old), str(state_dir))]
        with sqlite3.connect(database) as connection:  # one transaction: committed whole, or not at all
            for table, column in _text_columns(connection):
                for before, after in replacements:
                    changed = connection.execute(
                        f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (before, after, before),
                    ).rowcount
                    if changed:
                        key = f"{table}.{column}"
                        rewritten[key] = rewritten.get(key, 0) + changed
        connection.close()  # the context manager commits; it does not close
    write_json(state_dir / LOCATION_FILE, {"state_dir": str(state_dir)})
    return Relocation(old_state_dir=old, new_state_dir=state_dir, rewritten=rewritten)


def _embedded_store(params: Params) -> bool:
    """The project has its own SQLite store (used directly, or served by ``langops up``'s MLflow server)."""
    return (params.project.state_dir / MLFLOW_DB).is_file()


def _text_columns(connection: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [
        (table, column)
        for table in tables
        for _, column, kind, *_ in connection.execute(f'PRAGMA table_info("{table}")')
        if any(word in (kind or "").upper() for word in ("CHAR", "TEXT", "CLOB"))
    ]
