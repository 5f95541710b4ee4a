"""The prepare step: every input format, clear errors, deterministic stratified splits, bad rows kept."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from langops.config import DataConfig, PrepareConfig
from langops.io import SPLITS, read_json, read_labels, read_split
from langops.lineage import dvc_dir_md5, file_md5, git_commit
from langops.tasks import prepare as prepare_module
from langops.tasks.prepare import PrepareError, prepare

pytestmark = pytest.mark.data

LABELS = ("billing", "shipping", "technical")


def source_frame(rows_per_class: int = 20) -> pd.DataFrame:
    """Custom column names and an extra column, as a user's export would have."""
    rows = [
        {"ticket_id": f"{label}-{i}", "body": f"ticket {i} about {label} issue", "category": label}
        for label in LABELS
        for i in range(rows_per_class)
    ]
    return pd.DataFrame(rows)


def write_source(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def data_config(source: Path, **overrides) -> DataConfig:
    return DataConfig(
        source=str(source), text_column="body", label_column="category", labels=LABELS, **overrides
    )


def all_rows(out_dir: Path) -> pd.DataFrame:
    return pd.concat([read_split(out_dir, split) for split in SPLITS], ignore_index=True)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_with_custom_columns(tmp_path, suffix):
    source = write_source(source_frame(), tmp_path / f"tickets{suffix}")
    result = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "prepared")

    assert sum(result.rows.values()) == 60
    for split in SPLITS:
        assert list(read_split(result.out_dir, split).columns) == ["text", "label", "source_row"]
    rows = all_rows(result.out_dir)
    assert sorted(rows["text"]) == sorted(source_frame()["body"])
    assert result.labels == LABELS
    assert read_labels(result.out_dir) == list(LABELS)
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "labels.json",
        "summary.json",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]


def test_missing_file(tmp_path):
    with pytest.raises(PrepareError, match=r"not found: .*nope\.csv"):
        prepare(data_config(tmp_path / "nope.csv"), PrepareConfig(), seed=0, out_dir=tmp_path / "out")


def test_unsupported_format(tmp_path):
    source = tmp_path / "tickets.xlsx"
    source.write_text("x")
    with pytest.raises(PrepareError, match=r"unsupported data format '\.xlsx'"):
        prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "out")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_column_names_it_and_lists_present(tmp_path, suffix):
    source = write_source(source_frame(), tmp_path / f"tickets{suffix}")
    config = DataConfig(source=str(source), text_column="body", label_column="intent")
    with pytest.raises(PrepareError) as err:
        prepare(config, PrepareConfig(), seed=0, out_dir=tmp_path / "out")
    message = str(err.value)
    assert "'intent'" in message and "data.label_column" in message
    assert "['ticket_id', 'body', 'category']" in message
    assert not (tmp_path / "out").exists()


def test_split_is_sized_deterministic_and_salted_by_split_seed_only(tmp_path):
    source = write_source(source_frame(rows_per_class=400), tmp_path / "tickets.csv")
    cfg = PrepareConfig(validation_size=0.2, test_size=0.25)
    first = prepare(data_config(source), cfg, seed=3, out_dir=tmp_path / "a")
    other_project_seed = prepare(data_config(source), cfg, seed=4, out_dir=tmp_path / "b")
    other_split_seed = prepare(data_config(source), cfg.model_copy(update={"split_seed": 1}), seed=3, out_dir=tmp_path / "c")

    assert sum(first.rows.values()) == 1200
    for split, share in {"train": 0.55, "validation": 0.2, "test": 0.25}.items():
        counts = read_split(first.out_dir, split)["label"].value_counts()
        for label in LABELS:  # each class's share is binomial around the split's: 400 * share +- 4 sd
            assert abs(counts[label] - 400 * share) <= 4 * (400 * share * (1 - share)) ** 0.5
    for split in SPLITS:  # the project seed drives training, not the split
        pd.testing.assert_frame_equal(read_split(first.out_dir, split), read_split(other_project_seed.out_dir, split))
    assert other_split_seed.data_version != first.data_version
    assert set(read_split(other_split_seed.out_dir, "test")["text"]) != set(read_split(first.out_dir, "test")["text"])


def test_normalises_text_and_labels(tmp_path):
    frame = source_frame()
    frame.loc[0, "body"] = "  Cafe\u0301   refund\t\nplease  "
    frame["category"] = " " + frame["category"] + " "
    source = write_source(frame, tmp_path / "tickets.parquet")

    plain = all_rows(prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "p").out_dir)
    lower = all_rows(
        prepare(data_config(source), PrepareConfig(lowercase=True), seed=0, out_dir=tmp_path / "l").out_dir
    )

    assert "Caf\u00e9 refund please" in set(plain["text"])
    assert "caf\u00e9 refund please" in set(lower["text"])
    assert set(plain["label"]) == set(LABELS)


def test_keeps_bad_rows_for_validate(tmp_path):
    frame = source_frame()
    frame.loc[0, "body"] = None
    frame.loc[1, "body"] = "   "
    frame.loc[2, "category"] = "refunds"
    frame.loc[3, "body"] = "NA"
    source = write_source(frame, tmp_path / "tickets.csv")

    rows = all_rows(prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "out").out_dir)

    assert len(rows) == len(frame)
    assert rows["text"].isna().sum() == 1  # null stays null, not the string "None" or "nan"
    assert (rows["text"] == "").sum() == 1  # blank collapses to empty, still there for validate
    assert (rows["label"] == "refunds").sum() == 1
    assert (rows["text"] == "NA").sum() == 1  # a literal "NA" ticket is text, not a missing value


def test_deduplicate_drops_exact_repeats_but_never_nulls(tmp_path):
    frame = source_frame()
    frame.loc[1, "body"] = frame.loc[0, "body"] + "   "  # equal once whitespace is normalised
    frame.loc[[2, 3], "body"] = None
    source = write_source(frame, tmp_path / "tickets.parquet")

    kept = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "kept")
    deduped = prepare(
        data_config(source), PrepareConfig(deduplicate=True), seed=0, out_dir=tmp_path / "dedup"
    )

    assert sum(kept.rows.values()) == 60
    assert sum(deduped.rows.values()) == 59
    assert all_rows(deduped.out_dir)["text"].isna().sum() == 2
    assert read_json(deduped.out_dir / "summary.json")["duplicates_dropped"] == 1


def test_tiny_classes_go_to_train_first_then_test(tmp_path):
    rare = [{"ticket_id": "x", "body": "lonely ticket", "category": "rare"}]
    pair = [{"ticket_id": f"y{i}", "body": f"paired ticket {i}", "category": "pair"} for i in range(2)]
    frame = pd.concat([source_frame(), pd.DataFrame(rare + pair)], ignore_index=True)
    source = write_source(frame, tmp_path / "tickets.csv")
    result = prepare(
        DataConfig(source=str(source), text_column="body", label_column="category"),
        PrepareConfig(),
        seed=0,
        out_dir=tmp_path / "out",
    )
    counts = read_json(result.out_dir / "summary.json")["class_counts"]
    assert counts["train"]["rare"] == 1 and "rare" not in counts["validation"] and "rare" not in counts["test"]
    assert counts["train"]["pair"] == 1 and counts["test"]["pair"] == 1 and "pair" not in counts["validation"]
    assert result.labels == ("billing", "pair", "rare", "shipping", "technical")  # undeclared: sorted labels seen


def test_demo_source_writes_only_the_splits(tmp_path):
    data = DataConfig(source="demo", labels=("billing", "shipping", "account"), demo_rows=120)
    result = prepare(data, PrepareConfig(), seed=5, out_dir=tmp_path / "out")

    assert sum(result.rows.values()) == 120
    assert set(all_rows(result.out_dir)["label"]) == {"billing", "shipping", "account"}
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "labels.json",
        "summary.json",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    summary = read_json(result.out_dir / "summary.json")
    assert summary["source"] == "demo" and summary["seed"] == 5
    assert summary["rows"] == result.rows
    assert sum(summary["class_counts"]["train"].values()) == result.rows["train"]


def test_summary_records_source_hash_not_location(tmp_path):
    source = write_source(source_frame(), tmp_path / "tickets.csv")
    result = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=tmp_path / "out")
    summary = read_json(result.out_dir / "summary.json")
    assert summary["source"] == "tickets.csv"
    assert summary["source_md5"] == hashlib.md5(source.read_bytes()).hexdigest()


def test_rerun_replaces_the_whole_folder(tmp_path):
    source = write_source(source_frame(), tmp_path / "tickets.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.parquet").write_text("old")
    result = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=out)
    assert not (out / "stale.parquet").exists()
    assert sum(result.rows.values()) == 60
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_failure_leaves_previous_outputs_untouched(tmp_path, monkeypatch):
    source = write_source(source_frame(), tmp_path / "tickets.csv")
    out = tmp_path / "out"
    before = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=out)

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_labels", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(data_config(source), PrepareConfig(), seed=1, out_dir=out)

    assert dvc_dir_md5(out) == before.data_version
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_file_md5_and_git_commit(tmp_path):
    target = tmp_path / "f.txt"
    target.write_bytes(b"hello\r\n")
    assert file_md5(target) == hashlib.md5(b"hello\r\n").hexdigest()

    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_commit(repo) is None  # not a repository
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_commit(repo) is None  # no commit yet
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert git_commit(repo) == head
    (repo / "untracked.txt").write_text("x")
    assert git_commit(repo) == head
    (repo / "a.txt").write_text("2")
    assert git_commit(repo) == f"{head}-dirty"


def test_dvc_dir_md5_rejects_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        dvc_dir_md5(tmp_path / "f")


def test_data_version_equals_what_dvc_add_writes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    source = write_source(source_frame(), tmp_path / "tickets.csv")
    result = prepare(data_config(source), PrepareConfig(), seed=0, out_dir=repo / "prepared")
    nested = result.out_dir / "nested" / "deeper"
    nested.mkdir(parents=True)
    (nested / "notes.txt").write_bytes(b"line one\r\nline two\r\n")  # DVC 3 does not rewrite CRLF

    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "prepared"], cwd=repo, check=True)

    (out,) = yaml.safe_load((repo / "prepared.dvc").read_text())["outs"]
    assert out["md5"] == dvc_dir_md5(result.out_dir)
    assert out["nfiles"] == 6


def test_extra_sources_are_split_like_the_source_and_a_missing_one_is_noted(tmp_path):
    source = write_source(source_frame(rows_per_class=40), tmp_path / "tickets.csv")
    feedback = source_frame(rows_per_class=20).assign(body=lambda f: "production " + f["body"])
    extra = write_source(feedback, tmp_path / "feedback.csv")
    cfg = PrepareConfig(validation_size=0.2, test_size=0.25)
    without = prepare(data_config(source, extra_sources=()), cfg, seed=3, out_dir=tmp_path / "a")
    grown = prepare(data_config(source, extra_sources=(str(extra), str(tmp_path / "later.csv"))), cfg, seed=3,
                    out_dir=tmp_path / "b")

    assert sum(grown.rows.values()) == sum(without.rows.values()) + len(feedback)
    production = {split: read_split(grown.out_dir, split)["text"].str.startswith("production").sum() for split in SPLITS}
    assert sum(production.values()) == 60 and all(production.values())  # split with the source's rows
    for split in SPLITS:  # the source's rows stay where they were; the new ones are dealt by their hash
        assert set(read_split(without.out_dir, split)["text"]) <= set(read_split(grown.out_dir, split)["text"])
    assert "data.extra_sources: added feedback.csv (60 rows); not there yet: later.csv" in grown.notes
    summary = read_json(grown.out_dir / "summary.json")
    assert summary["extra_sources"] == {"feedback.csv": {"md5": file_md5(extra), "rows": 60}, "later.csv": "missing"}
    assert "extra_sources" not in read_json(without.out_dir / "summary.json")  # unchanged data version without them


def test_an_extra_row_whose_text_a_given_split_holds_joins_that_split(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    frame = source_frame(rows_per_class=30)
    write_source(frame.iloc[::2], folder / "train.csv")
    write_source(frame.iloc[1::2], folder / "test.csv")
    repeated_test_text = frame.iloc[1:2].assign(category="billing")
    new = source_frame(rows_per_class=10).assign(body=lambda f: "new " + f["body"])
    extra = write_source(pd.concat([repeated_test_text, new]), tmp_path / "feedback.csv")

    result = prepare(data_config(folder, extra_sources=(str(extra),)), PrepareConfig(), seed=1, out_dir=tmp_path / "out")

    splits = {split: read_split(result.out_dir, split) for split in SPLITS}
    assert (splits["test"]["text"] == frame.iloc[1]["body"]).sum() == 2  # beside its copy: no leak into train
    assert not set(splits["train"]["text"]) & set(splits["test"]["text"])
    assert all(splits[split]["text"].str.startswith("new").any() for split in SPLITS)
