"""The labels given through the server become the feedback dataset by themselves: one row per text with its
latest label, kept when the log rotates away, and versioned with DVC (also after a run killed in between)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from langops.config import FeedbackConfig
from langops.tasks.collect_feedback import FeedbackCollection, collect_feedback


def give_labels(log_dir: Path, labels: list[tuple[str, str, str]], *, file: str = "feedback.jsonl") -> None:
    """Feedback lines as the server writes them under ``prediction_log_text: labelled``: (time, text, label)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / file).open("a") as handle:
        for number, (time, text, label) in enumerate(labels):
            request_id = f"{abs(hash((time, text))):032x}"[:32] + f"-{number}"
            handle.write(json.dumps({"time": time, "request_id": request_id, "label": label, "text": text}) + "\n")


def collect(tmp_path: Path, **config: object) -> FeedbackCollection:
    cfg = FeedbackConfig(dataset=tmp_path / "data" / "raw" / "feedback.csv", **{"dvc": False, **config})
    return collect_feedback(cfg, logs=tmp_path / "log", text_column="ticket", label_column="topic",
                            record_dir=tmp_path / "reports" / "feedback")


def dataset(tmp_path: Path) -> list[tuple[str, str]]:
    return list(pd.read_csv(tmp_path / "data" / "raw" / "feedback.csv").itertuples(index=False, name=None))


@pytest.mark.unit
def test_labels_become_rows_once_and_a_later_label_relabels_its_text(tmp_path: Path) -> None:
    assert collect(tmp_path).md5 is None and not (tmp_path / "data").exists()  # no feedback yet: nothing written

    give_labels(tmp_path / "log", [("2026-12-01T10:00:00", "where is my parcel", "billing"),
                                   ("2026-12-01T11:00:00", "cancel my plan", "cancellation")])
    first = collect(tmp_path)
    assert (first.added, first.relabelled, first.rows) == (2, 0, 2)
    assert dataset(tmp_path) == [("where is my parcel", "billing"), ("cancel my plan", "cancellation")]
    assert list(pd.read_csv(tmp_path / "data" / "raw" / "feedback.csv").columns) == ["ticket", "topic"]
    assert (first.labelled_from, first.labelled_to) == ("2026-12-01T10:00:00", "2026-12-01T11:00:00")
    assert FeedbackCollection.load(tmp_path / "reports" / "feedback") == first

    written = (tmp_path / "data" / "raw" / "feedback.csv").stat().st_mtime_ns
    again = collect(tmp_path)
    assert (again.added, again.relabelled, again.md5, again.changed) == (0, 0, first.md5, False)
    assert (tmp_path / "data" / "raw" / "feedback.csv").stat().st_mtime_ns == written  # not rewritten

    give_labels(tmp_path / "log", [("2026-12-02T09:00:00", "where is my parcel", "shipping")])  # corrected
    corrected = collect(tmp_path)
    assert (corrected.added, corrected.relabelled, corrected.rows) == (0, 1, 2)
    assert dataset(tmp_path) == [("cancel my plan", "cancellation"), ("where is my parcel", "shipping")]
    assert "0 new and 1 relabelled texts" in corrected.describe()


@pytest.mark.unit
def test_rows_stay_when_their_log_file_rotated_away(tmp_path: Path) -> None:
    give_labels(tmp_path / "log", [("2026-12-01T10:00:00", "the app crashes", "technical")])
    collect(tmp_path)
    (tmp_path / "log" / "feedback.jsonl").unlink()  # rotated past prediction_log_backups
    give_labels(tmp_path / "log", [("2026-12-03T10:00:00", "refund please", "billing")])
    later = collect(tmp_path)
    assert (later.added, later.rows) == (1, 2)
    assert dataset(tmp_path) == [("the app crashes", "technical"), ("refund please", "billing")]


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.data
def test_a_changed_dataset_is_added_and_pushed_and_a_run_killed_before_dvc_add_is_versioned_next_time(
    tmp_path: Path,
) -> None:
    dvc(tmp_path, "init", "--no-scm", "-q")
    dvc(tmp_path, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    give_labels(tmp_path / "log", [("2026-12-01T10:00:00", "where is my parcel", "shipping")])
    first = collect(tmp_path, dvc=True)
    tracked = tmp_path / "data" / "raw" / "feedback.csv.dvc"
    assert first.versioned.startswith("dvc add + dvc push")
    assert yaml.safe_load(tracked.read_text())["outs"][0]["md5"] == first.md5
    assert [path.name for path in (tmp_path / "remote").rglob("*") if path.is_file()] == [first.md5[2:]]

    assert collect(tmp_path, dvc=True).versioned == "DVC already records it (feedback.csv.dvc)"

    # A run killed after it wrote the dataset and before `dvc add`: the file is ahead of its .dvc file.
    with (tmp_path / "data" / "raw" / "feedback.csv").open("a") as handle:
        handle.write("cancel my plan,cancellation\n")
    resumed = collect(tmp_path, dvc=True)
    assert (resumed.added, resumed.rows) == (0, 2) and resumed.versioned.startswith("dvc add + dvc push")
    assert yaml.safe_load(tracked.read_text())["outs"][0]["md5"] == resumed.md5 != first.md5
    dvc(tmp_path, "status", "-c", "-q")  # the remote holds what the .dvc file names


@pytest.mark.data
def test_a_failed_push_fails_the_collection_naming_the_command_and_keeps_the_dataset(tmp_path: Path) -> None:
    dvc(tmp_path, "init", "--no-scm", "-q")  # no remote configured
    give_labels(tmp_path / "log", [("2026-12-01T10:00:00", "where is my parcel", "shipping")])
    from langops.tasks.collect_feedback import FeedbackCollectionError

    with pytest.raises(FeedbackCollectionError, match=r"`dvc push .*feedback.csv.dvc` failed"):
        collect(tmp_path, dvc=True)
    assert dataset(tmp_path) == [("where is my parcel", "shipping")]
    assert collect(tmp_path, dvc=False).md5 is not None


@pytest.mark.unit
def test_collected_labels_no_training_reads_are_refused_at_load(tmp_path: Path) -> None:
    from langops.config import ConfigError, load_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"extra_sources": []}}))
    with pytest.raises(ConfigError, match=r"feedback.dataset '.*data/raw/feedback.csv' is not one of data.extra_sources"):
        load_params(params)
    assert load_params(params, ["feedback.collect=never"]).feedback.collect == "never"


@pytest.mark.unit
def test_a_dataset_without_the_data_columns_is_refused_naming_them(tmp_path: Path) -> None:
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "feedback.csv").write_text("text,label\nwhere is my parcel,shipping\n")
    give_labels(tmp_path / "log", [("2026-12-01T10:00:00", "cancel my plan", "cancellation")])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['ticket', 'topic'\].*it has \['text', 'label'\]"):
        collect(tmp_path)
    assert dataset(tmp_path) == [("where is my parcel", "shipping")]  # untouched
