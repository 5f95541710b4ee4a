"""Small file helpers shared by the steps: atomic JSON, the prepared splits and the label map."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("train", "validation", "test")
TEXT = "text"
LABEL = "label"
LABELS_FILE = "labels.json"


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def staging_dir(target: Path) -> Path:
    """A new empty folder beside ``target`` to write its next contents into, before ``swap_in``.

    Its name carries this process's pid. Folders that dead processes left beside ``target`` (killed while
    writing, or between the two renames of a swap) are removed first, so a crash leaves debris only until
    the next write; those of live processes are left alone.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = leftover.name.removeprefix(f".{target.name}.").partition("-")
        pid = rest.partition("-")[0]
        if kind in ("staging", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``staging`` folder with two renames; the old folder is parked
    beside it and deleted last, so a reader finds the old folder or the new one, never a mix."""
    target = Path(target)
    if not target.exists():
        staging.rename(target)
        return
    parked = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    target.rename(parked)
    try:
        staging.rename(target)
    except BaseException:
        parked.rename(target)
        raise
    shutil.rmtree(parked)


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: paths and unknown objects become strings, numpy values numbers/lists.

    For writers that take no ``default=`` hook (``mlflow.log_dict``) and for records that must never fail
    to serialise.
    """

    def fallback(item: Any) -> Any:
        return item.tolist() if hasattr(item, "tolist") else str(item)

    return json.loads(json.dumps(value, default=fallback))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def split_path(prepared_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.parquet"


def read_split(prepared_dir: Path, split: str) -> pd.DataFrame:
    """One prepared split with columns ``text`` and ``label`` (label names, not ids)."""
    path = split_path(prepared_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"prepared split missing: {path} (run the prepare step first)")
    return pd.read_parquet(path)


def read_test_rows(prepared_dir: Path, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Test texts and their label ids; a label the model was not trained on is an error, not a miss.

    Raises:
        ValueError: the test split holds labels outside ``labels``, or is empty.
    """
    test = read_split(prepared_dir, "test")
    unknown = sorted(set(test[LABEL]) - set(labels))
    if unknown:
        raise ValueError(f"test split holds labels the model does not know: {unknown}")
    if test.empty:
        raise ValueError(f"test split in {prepared_dir} is empty: nothing to score")
    index = {label: i for i, label in enumerate(labels)}
    return test[TEXT].tolist(), test[LABEL].map(index).to_numpy(dtype=int)


def write_labels(directory: Path, labels: list[str]) -> Path:
    return write_json(Path(directory) / LABELS_FILE, list(labels))


def read_labels(directory: Path) -> list[str]:
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"label map missing: {path}")
    return list(read_json(path))
