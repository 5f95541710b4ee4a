"""Collect the labels given through the server into the feedback dataset, and version it with DVC.

A retraining run starts here (``flows/pipeline.py``) so that it learns what the served model met, with no
person exporting anything. The labels the server wrote (each with its text, ``prediction_log_text:
labelled``) are joined as ``langops feedback export`` joins them, then merged into ``feedback.dataset``, one
row per text with its latest label: the dataset only grows, so labels whose log file rotated away are kept.
The file is replaced whole (written beside it, then renamed), and when it differs from what DVC last
recorded it is ``dvc add``-ed and pushed to the project's remote, so the data version a model trains on is
one DVC can fetch again. A run killed between the two finds the file ahead of its ``.dvc`` and versions it
then.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import yaml

from langops.config import FeedbackConfig
from langops.io import write_json
from langops.lineage import file_md5
from langops.prediction_records import LabelledTexts, Logs, NoTextsKept, as_logs, labelled_texts

log = logging.getLogger(__name__)

RECORD_FILE = "collection.json"
DVC_TIMEOUT_S = 600


class FeedbackCollectionError(OSError):
    """The dataset was written but could not be versioned (``dvc add`` or ``dvc push`` failed: DVC's lock held
    by another run, the remote unreachable). An OSError, so the flow retries it: a rerun versions the same file."""


@dataclass(frozen=True)
class FeedbackCollection:
    """What one collection left in the feedback dataset."""

    dataset: str
    rows: int  # texts in the dataset now
    added: int  # texts new to it
    relabelled: int  # texts it held with another label
    md5: str | None  # of the dataset file, as DVC records it; None while there is none
    labelled_from: str | None  # the earliest and latest time of the feedback lines read
    labelled_to: str | None
    versioned: str  # what DVC did, in words

    @property
    def changed(self) -> bool:
        return self.added + self.relabelled > 0

    def describe(self) -> str:
        if self.md5 is None:
            return f"feedback: no labelled production texts yet; {self.dataset} not written"
        span = f", labelled {self.labelled_from} to {self.labelled_to}" if self.labelled_from else ""
        return (f"feedback: {self.added} new and {self.relabelled} relabelled texts; {self.dataset} holds "
                f"{self.rows} (md5 {self.md5}{span}); {self.versioned}")

    @classmethod
    def load(cls, record_dir: Path) -> FeedbackCollection | None:
        path = Path(record_dir) / RECORD_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def collect_feedback(
    cfg: FeedbackConfig, *, logs: Logs | Path, text_column: str, label_column: str, record_dir: Path
) -> FeedbackCollection:
    """Merge the server's labelled texts into ``cfg.dataset`` and version it; the record goes to ``record_dir``.

    Args:
        logs: the server's prediction log and feedback: its folder, or the fleet's store.
        text_column, label_column: the dataset's column names (``data.text_column``, ``data.label_column``),
            as for every other source.

    Raises:
        FeedbackCollectionError: ``dvc add`` or ``dvc push`` failed (the dataset itself is complete).
    """
    dataset = Path(cfg.dataset)
    held = _read_dataset(dataset, text_column, label_column)
    exported = _export(as_logs(logs))
    merged = dict(held)
    added = relabelled = 0
    for text, label in dict(exported.rows if exported else []).items():  # a text's latest label
        if text not in merged:
            added += 1
        elif merged[text] != label:
            relabelled += 1
            del merged[text]  # re-inserted at the end: rows stay in the order their latest label came
        merged[text] = label
    if added or relabelled:
        _write_dataset(dataset, merged, text_column, label_column)
    md5 = file_md5(dataset) if dataset.is_file() else None
    versioned = _version(dataset, md5) if cfg.dvc else "DVC versioning off (feedback.dvc: false)"
    collection = FeedbackCollection(
        dataset=str(dataset), rows=len(merged), added=added, relabelled=relabelled, md5=md5,
        labelled_from=exported.first_label_at if exported else None,
        labelled_to=exported.last_label_at if exported else None, versioned=versioned,
    )
    write_json(Path(record_dir) / RECORD_FILE, asdict(collection))
    log.info(collection.describe())
    return collection


def _read_dataset(path: Path, text_column: str, label_column: str) -> dict[str, str]:
    """Raises: ValueError: the file lacks the data's text or label column."""
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in (text_column, label_column) if column not in frame.columns]
    if missing:
        raise ValueError(f"feedback.dataset {path} lacks the column(s) {missing} (data.text_column, "
                         f"data.label_column); it has {list(frame.columns)}")
    return dict(zip(frame[text_column], frame[label_column], strict=True))


def _export(logs: Logs) -> LabelledTexts | None:
    """The labelled texts in the server's logs (``langops feedback export``'s rows); None when there are none."""
    if not logs.exists():
        return None
    try:
        found = labelled_texts(logs)
    except FileNotFoundError:
        return None
    except NoTextsKept as exc:
        log.warning("feedback: %s", exc)
        return None
    if found.ambiguous:
        log.warning("feedback: %d labels left out: their id names several logged texts", len(found.ambiguous))
    return found


def _write_dataset(path: Path, rows: dict[str, str], text_column: str, label_column: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two runs at once never share one
    pd.DataFrame({text_column: list(rows), label_column: list(rows.values())}).to_csv(partial, index=False)
    partial.replace(path)


def _version(dataset: Path, md5: str | None) -> str:
    """``dvc add`` and ``dvc push`` the dataset when its ``.dvc`` file does not record these bytes."""
    if md5 is None:
        return "nothing to version"
    root = next((folder for folder in dataset.parents if (folder / ".dvc").is_dir()), None)
    if root is None:
        return "not versioned: no DVC repository above it"
    tracked = dataset.with_name(dataset.name + ".dvc")
    if tracked.is_file() and _recorded_md5(tracked) == md5:
        return f"DVC already records it ({tracked.name})"
    for command in (["add", str(dataset)], ["push", str(tracked)]):
        done = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=root, capture_output=True, text=True,
                              timeout=DVC_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise FeedbackCollectionError(
                f"{dataset} holds the collected feedback, but `dvc {' '.join(command)}` failed (exit "
                f"{done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
            )
    return f"dvc add + dvc push ({tracked.name})"


def _recorded_md5(tracked: Path) -> str | None:
    try:
        outs = yaml.safe_load(tracked.read_text()).get("outs") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return outs[0].get("md5") if outs and isinstance(outs[0], dict) else None
