"""Real data shapes through prepare and validate (no training): the files and datasets a new user brings.

Each case pins both the outcome (what was read, what passed, what stopped) and the message the user
gets, because for real data the message is the product: it must name the file, the line or the class,
and the change that would fix it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langops.config import DataConfig, PrepareConfig, ValidateConfig
from langops.io import SPLITS, read_json, read_split
from langops.tasks.prepare import HEAD_BYTES, PrepareError, check_source, prepare, split_by_text
from langops.tasks.validate import DataValidationError, validate

pytestmark = pytest.mark.data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULTS = ValidateConfig()


def run(tmp_path: Path, source, *, prepare_cfg: PrepareConfig | None = None, validate_cfg: ValidateConfig = DEFAULTS,
        **data):
    """prepare + validate with default params except those given; returns (prepare result, validation result)."""
    config = DataConfig(source=source if isinstance(source, dict) else str(source), **data)
    prepared = prepare(config, prepare_cfg or PrepareConfig(), seed=0, out_dir=tmp_path / "prepared")
    return prepared, validate(config, validate_cfg, prepared_dir=prepared.out_dir, report_dir=tmp_path / "report")


def all_rows(out_dir: Path) -> pd.DataFrame:
    return pd.concat([read_split(out_dir, split).assign(split=split) for split in SPLITS], ignore_index=True)


def tickets(n_per_class: int = 30, labels=("billing", "shipping", "technical")) -> list[tuple[str, str]]:
    return [(f"{label} question number {i}, please help", label) for label in labels for i in range(n_per_class)]


def write_csv_bytes(path: Path, rows: list[tuple[str, str]], *, header=("text", "label"), newline="\n",
                    encoding="utf-8", bom=False) -> Path:
    def cell(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n\r') else value

    lines = [",".join(header)] + [",".join(cell(v) for v in row) for row in rows]
    data = (newline.join(lines) + newline).encode(encoding)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


# ------------------------------------------------------------------------------------------ file shapes


def test_bom_crlf_and_quoted_newlines_are_read_as_written(tmp_path):
    rows = tickets()
    rows[0] = ("first line\r\nsecond line, with a comma and \"quotes\"", "billing")
    source = write_csv_bytes(tmp_path / "export.csv", rows, newline="\r\n", bom=True)

    prepared, result = run(tmp_path, source)

    data = all_rows(prepared.out_dir)
    assert len(data) == len(rows) and result.success
    assert 'first line second line, with a comma and "quotes"' in set(data["text"])  # the BOM did not eat the header
    rows_by_origin = dict(zip(data["source_row"], data["text"], strict=True))
    assert rows_by_origin["export.csv:2"].startswith("first line")
    assert rows_by_origin["export.csv:4"] == "billing question number 1, please help"  # record 1 spans lines 2-3


def test_cp1252_file_is_refused_with_the_offset_and_the_fix_then_read_when_declared(tmp_path):
    rows = tickets()
    rows[4] = ("caf\u00e9 bill was wrong \u2013 refund please", "billing")
    source = write_csv_bytes(tmp_path / "legacy.csv", rows, encoding="cp1252")

    with pytest.raises(PrepareError) as err:
        run(tmp_path, source)
    message = str(err.value)
    assert "legacy.csv is not valid utf-8" in message
    offset = source.read_bytes().index("\u00e9".encode("cp1252"))
    assert f"byte offset {offset} (line 6, column 4)" in message
    assert "0xe9 is '\u00e9'" in message and "set data.encoding: cp1252" in message

    prepared, result = run(tmp_path, source, encoding="cp1252")
    assert "caf\u00e9 bill was wrong \u2013 refund please" in set(all_rows(prepared.out_dir)["text"])


def test_tsv_quotes_are_text_not_field_delimiters(tmp_path):
    rows = tickets()
    rows[0] = ('"quoted" opening word swallows nothing', "billing")
    rows[1] = ('he said "hi and never closed it', "billing")
    source = tmp_path / "data.tsv"
    source.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))

    prepared, _ = run(tmp_path, source)

    texts = set(all_rows(prepared.out_dir)["text"])
    assert sum(prepared.rows.values()) == len(rows)
    assert {'"quoted" opening word swallows nothing', 'he said "hi and never closed it'} <= texts


def test_jsonl_with_extra_fields_and_a_broken_line(tmp_path):
    rows = [{"id": i, "text": t, "label": y, "meta": {"lang": "en"}} for i, (t, y) in enumerate(tickets())]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prepared, result = run(tmp_path, source)
    assert sum(prepared.rows.values()) == len(rows) and result.success

    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(json.dumps(r) for r in rows[:5]) + '\n{"text": "unterminated\n')
    with pytest.raises(PrepareError, match=r"broken\.jsonl line 6: not valid JSON"):
        run(tmp_path, broken)


def test_parquet_with_integer_and_categorical_labels(tmp_path):
    texts = [t for t, _ in tickets(40, labels=("a", "b"))]
    ints = pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    ints.to_parquet(tmp_path / "ints.parquet")
    categorical = ints.assign(label=pd.Categorical(ints["label"].map({0: "ham", 1: "spam"})))
    categorical.to_parquet(tmp_path / "cats.parquet")

    int_prep, _ = run(tmp_path / "i", tmp_path / "ints.parquet")
    cat_prep, _ = run(tmp_path / "c", tmp_path / "cats.parquet")

    assert int_prep.labels == ("0", "1")
    assert cat_prep.labels == ("ham", "spam")
    assert set(all_rows(int_prep.out_dir)["label"]) == {"0", "1"}


def test_labels_differing_in_case_or_spacing_are_reported_never_silently_merged(tmp_path):
    rows = tickets(30, labels=("billing", "Billing", "shipping"))
    rows = [(t, " shipping " if i % 2 and y == "shipping" else y) for i, (t, y) in enumerate(rows)]
    source = write_csv_bytes(tmp_path / "labels.csv", rows)

    prepared, result = run(tmp_path, source)

    assert prepared.labels == ("Billing", "billing", "shipping")  # case kept: two classes
    assert any("' shipping ' (15 rows)" in note for note in prepared.notes)  # spacing stripped, and said so
    (warning,) = [w for w in result.warnings if "labels that differ" in w]
    assert "labels that differ only in case or spacing" in warning and "'Billing' (30 rows)" in warning
    report = (tmp_path / "report" / "report.md").read_text()
    assert "labels stripped of surrounding whitespace: ' shipping ' (15 rows)" in report


def test_80_classes_of_30_rows_train_and_a_class_a_split_lacks_is_named(tmp_path):
    labels = [f"intent_{i:02d}" for i in range(77)] + ["reverted_card_payment?", "Refund_not_showing_up", "\U0001f4b3 card"]
    source = write_csv_bytes(tmp_path / "intents.csv", tickets(30, labels=labels))

    prepared, result = run(tmp_path, source)

    assert result.success and len(prepared.labels) == 80
    counts = read_json(prepared.out_dir / "summary.json")["class_counts"]
    assert len(counts["train"]) == 80
    for split in ("validation", "test"):  # each text lands in a split by its hash: a class may miss one
        missing = sorted(set(labels) - set(counts[split]))
        warned = [w for w in result.warnings if f"[{split}]" in w and "classes with no row in" in w]
        assert bool(missing) == bool(warned)
        assert all(f"{label!r}" in warned[0] for label in missing[:3])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary, not a text table: NUL byte at offset 8"),
        (b"", r"is empty: no header and no rows"),
        (b"text,label\n", r"has a header but no data rows"),
        (b"text,label\nfine ticket,billing\ntoo,many,fields\n", r"line 3: 3 fields where the header has 2"),
    ],
    ids=["binary", "empty", "header only", "ragged line"],
)
def test_unreadable_files_are_named_with_the_problem(tmp_path, content, problem):
    source = tmp_path / "bad.csv"
    source.write_bytes(content)
    with pytest.raises(PrepareError, match=rf"bad\.csv.*{problem}"):
        run(tmp_path, source)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary, not a text table"),
        (b"", r"is empty: no header and no rows"),
        (b"text,label\n", r"has a header but no data rows"),
        (b"body,label\nfine ticket,billing\n", r"column 'text' \(data.text_column\) not found in .*; columns present: \['body', 'label'\]"),
        ("text,label\ncaf\u00e9,billing\n".encode("cp1252"), r"is not valid utf-8: byte offset 14 \(line 2, column 4\)"),
    ],
    ids=["binary", "empty", "header only", "missing column", "cp1252"],
)
def test_check_source_refuses_from_the_start_of_the_file(tmp_path, content, problem):
    source = tmp_path / "bad.csv"
    source.write_bytes(content)
    with pytest.raises(PrepareError, match=problem):
        check_source(DataConfig(source=str(source)))


def test_check_source_reads_only_the_start_and_prepare_still_reads_every_line(tmp_path):
    rows = tickets(2000)
    source = write_csv_bytes(tmp_path / "big.csv", rows)
    source.write_bytes(source.read_bytes() + "late caf\u00e9,billing\n".encode("cp1252"))
    assert source.stat().st_size > HEAD_BYTES

    check_source(DataConfig(source=str(source)))  # the bad byte is past what it reads
    with pytest.raises(PrepareError, match=rf"line {len(rows) + 2}, column 9"):
        run(tmp_path, source)


# ------------------------------------------------------------------------------------------ data shapes


def sms_like(seed: int = 0) -> list[tuple[str, str]]:
    """Short messages, 13% spam, ~7% repeated texts, a few repeats with conflicting labels."""
    rng = random.Random(seed)
    rows = [(f"hey are we still on for {rng.choice(['lunch', 'tea', 'the game'])} at {i % 12 + 1} with {i}", "ham") for i in range(400)]
    rows += [(f"WIN a prize! text CLAIM to {80000 + i} now", "spam") for i in range(60)]
    rows += [("Ok", "ham")] * 6 + [("k", "ham")] * 3 + [("Ok lor", "ham")] * 4
    rows += [("call me", "ham"), ("call me", "ham"), ("call me", "spam")]  # conflicting, majority ham
    rows += [("free msg", "ham"), ("free msg", "spam")]  # conflicting, a tie
    rows += rows[:20]  # exact repeats
    rng.shuffle(rows)
    return rows


def test_sms_like_data_passes_on_defaults_with_warnings_and_no_leak(tmp_path):
    source = write_csv_bytes(tmp_path / "sms.csv", sms_like())

    prepared, result = run(tmp_path, source)

    assert result.success
    warned = {e["check"] for e in read_json(result.summary_path)["expectations"] if not e["success"]}
    assert warned == {"text_min_length", "duplicate_rate"}
    assert any("text shorter than 3 chars" in w and "validate.min_text_chars: 1" in w for w in result.warnings)
    data = all_rows(prepared.out_dir)
    texts_per_split = data.groupby("text")["split"].nunique()
    assert texts_per_split.max() == 1  # every copy of a text is in one split
    summary = read_json(prepared.out_dir / "summary.json")
    assert summary["label_conflicts"]["texts"] == 2 and summary["label_conflicts"]["rows_dropped"] == 3
    assert set(data.loc[data["text"] == "call me", "label"]) == {"ham"}
    assert "free msg" not in set(data["text"])
    assert any("2 texts occur with different labels" in note for note in prepared.notes)


def test_sms_like_conflicts_stop_the_run_when_asked_and_say_how_to_settle_them(tmp_path):
    source = write_csv_bytes(tmp_path / "sms.csv", sms_like())

    with pytest.raises(DataValidationError) as err:
        run(tmp_path, source, prepare_cfg=PrepareConfig(label_conflicts="fail"))

    message = str(err.value)
    assert "texts with more than one label" in message
    assert "'call me' labelled 'ham' x2, 'spam' x1" in message or "'free msg' labelled 'ham' x1, 'spam' x1" in message
    assert "fix: set prepare.label_conflicts: majority" in message


def test_blank_texts_are_never_settled_as_conflicts_or_merged_as_repeats(tmp_path):
    rows = tickets() + [("   ", "billing"), ("  ", "shipping"), ("\t", "technical"), (" ", "billing")]
    source = write_csv_bytes(tmp_path / "blanks.csv", rows)

    with pytest.raises(DataValidationError) as err:
        run(tmp_path, source, prepare_cfg=PrepareConfig(deduplicate=True))

    failed = [e for e in read_json(err.value.result.summary_path)["expectations"]
              if not e["success"] and e["check"] == "text_not_blank"]
    assert sum(e["unexpected_count"] for e in failed) == 4  # all four reach validate, none settled or merged


def test_deduplicate_keeps_one_copy_of_each_text(tmp_path):
    source = write_csv_bytes(tmp_path / "sms.csv", sms_like())
    prepared, result = run(tmp_path, source, prepare_cfg=PrepareConfig(deduplicate=True))
    data = all_rows(prepared.out_dir)
    assert not data["text"].duplicated().any() and result.success


def test_a_nine_row_class_is_a_warning_with_its_counts_and_the_run_goes_on(tmp_path):
    rows = tickets(60, labels=("DESC", "ENTY", "HUM")) + [(f"what does abbreviation {i} stand for", "ABBR") for i in range(9)]
    source = write_csv_bytes(tmp_path / "questions.csv", rows)

    prepared, result = run(tmp_path, source)

    counts = {split: int((read_split(prepared.out_dir, split)["label"] == "ABBR").sum()) for split in SPLITS}
    (warning,) = [w for w in result.warnings if "classes with fewer than 20 rows" in w]
    assert (f"'ABBR': {counts['train']} rows in train; 9 in all (train {counts['train']}, validation "
            f"{counts['validation']}, test {counts['test']})") in warning
    assert "their per-class test metrics and the gate's recall guard rest on few rows" in warning
    assert "or set validate.min_rows_per_class: " in warning


def test_user_splits_that_overlap_are_reported_then_dropped_from_train_when_asked(tmp_path):
    train_rows, test_rows = tickets(40), tickets(40)[::4]  # every 4th train text is also a test text
    files = {"train": write_csv_bytes(tmp_path / "train.csv", train_rows),
             "test": write_csv_bytes(tmp_path / "test.csv", test_rows)}
    source = {name: str(path) for name, path in files.items()}

    with pytest.raises(DataValidationError) as err:
        run(tmp_path / "a", source)
    message = str(err.value)
    assert "[test] column 'text': text also in train" in message
    assert "[test] column 'text': text also in validation" in message  # validation was carved from train
    assert "drop to drop them from train (validation is carved from it)" in message
    leaked = [e for e in read_json(err.value.result.summary_path)["expectations"] if not e["success"]]
    assert sum(e["unexpected_count"] for e in leaked) == len(test_rows)

    prepared, result = run(tmp_path / "b", source, prepare_cfg=PrepareConfig(split_overlap="drop"))
    assert result.success
    test = read_split(prepared.out_dir, "test")
    assert list(test["text"]) == [t for t, _ in test_rows]  # the user's test split, exactly
    assert not set(read_split(prepared.out_dir, "train")["text"]) & set(test["text"])
    assert read_json(prepared.out_dir / "summary.json")["split_overlap"]["rows_dropped"] == {"train": 30}


def test_a_folder_of_split_files_is_used_as_given_and_validation_is_carved_from_train(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_csv_bytes(folder / "train.csv", tickets(40))
    write_csv_bytes(folder / "test.csv", [(f"held out {t}", y) for t, y in tickets(10)])
    (folder / "README.md").write_text("not data")

    prepared, result = run(tmp_path, folder)

    assert result.success
    assert prepared.rows["test"] == 30 and prepared.rows["train"] + prepared.rows["validation"] == 120
    summary = read_json(prepared.out_dir / "summary.json")
    assert summary["splits_given"] == ["train", "test"] and summary["carved"] == {"validation": "train"}
    assert summary["source"] == {"train": "train.csv", "test": "test.csv"}


def test_a_split_column_names_each_rows_split(tmp_path):
    rows = [{"text": t, "label": y, "part": "dev" if i % 10 == 0 else ("test" if i % 10 == 1 else "train")}
            for i, (t, y) in enumerate(tickets(50))]
    source = tmp_path / "all.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))

    prepared, result = run(tmp_path, source, split_column="part")

    assert prepared.rows == {"train": 120, "validation": 15, "test": 15} and result.success

    rows[3]["part"] = "holdout"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(PrepareError, match=r"1 rows have no known split in column 'part'.*line 4: 'holdout'"):
        run(tmp_path, source, split_column="part")


def test_a_folder_without_a_train_file_says_what_it_needs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "everything.csv").write_text("text,label\n")
    with pytest.raises(PrepareError, match=r"has no train file: a data folder needs train\.<csv"):
        run(tmp_path, tmp_path / "data")


# ------------------------------------------------------------------------------- the split's guarantees


texts_with_labels = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "dd", "e e", "f", "g", "hh", "i", "j"]), st.sampled_from(["x", "y", "z"])),
    min_size=1,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=texts_with_labels, seed=st.integers(0, 1000))
def test_hash_split_never_puts_one_text_in_two_splits(rows, seed):
    frame = pd.DataFrame(rows, columns=["text", "label"])
    parts = split_by_text(frame, {"validation": 0.15, "test": 0.15}, seed=seed)
    again = split_by_text(frame.sample(frac=1, random_state=seed).reset_index(drop=True),  # any row order
                          {"validation": 0.15, "test": 0.15}, seed=seed)

    homes = {}
    for name, part in parts.items():
        for text in part["text"]:
            assert homes.setdefault(text, name) == name
        assert sorted(part["text"]) == sorted(again[name]["text"])
    assert sum(len(p) for p in parts.values()) == len(frame)


# --------------------------------------------------------------------------------------- public datasets


@pytest.mark.skipif(not (SHARED / "tweet_eval_emotion").is_dir(), reason="../shared/datasets/tweet_eval_emotion is not here")
def test_tweet_eval_folder_is_used_as_its_official_splits(tmp_path):
    prepared, result = run(tmp_path, SHARED / "tweet_eval_emotion")

    assert result.success and result.warnings == ()
    assert prepared.rows == {"train": 3257, "validation": 374, "test": 1421}
    assert prepared.labels == ("anger", "joy", "optimism", "sadness")
    test = read_split(prepared.out_dir, "test")
    official = pd.read_csv(SHARED / "tweet_eval_emotion" / "test.csv", keep_default_na=False)
    assert list(test["label"]) == list(official["label"])


@pytest.mark.skipif(not (SHARED / "sst2").is_dir(), reason="../shared/datasets/sst2 is not here")
def test_sst2_train_file_is_split_without_leaks(tmp_path):
    prepared, result = run(tmp_path, SHARED / "sst2" / "train.csv")

    assert result.success
    assert sum(prepared.rows.values()) == 67349 - 10  # five texts with tied labels are dropped
    data = all_rows(prepared.out_dir)
    assert data.groupby("text")["split"].nunique().max() == 1
    assert all("text shorter than 3 chars" in w for w in result.warnings)
