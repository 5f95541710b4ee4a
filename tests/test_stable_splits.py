"""Splits that hold still as data grows, and manifests that remember what a model trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langops.config import DataConfig, PrepareConfig
from langops.io import SPLITS, read_json, read_split
from langops.tasks.prepare import SPLIT_CHANGES_FILE, prepare
from langops.text_hashes import TextManifest, canonical_text, split_by_hash, text_hashes


def splits_by_text(prepared_dir: Path) -> dict[str, str]:
    return {canonical_text(text): split for split in SPLITS for text in read_split(prepared_dir, split)["text"]}


def prepare_csv(frame: pd.DataFrame, tmp_path: Path, name: str, **prepare_options) -> Path:
    """Prepare ``frame`` as one CSV into the project's one prepared folder, as each new data version is."""
    source = tmp_path / f"{name}.csv"
    frame.to_csv(source, index=False)
    prepare(DataConfig(source=str(source)), PrepareConfig(**prepare_options), seed=0,
            out_dir=tmp_path / "prepared", report_dir=tmp_path / "reports")
    return tmp_path / "prepared"


@pytest.mark.unit
def test_hash_split_sizes_and_ends():
    texts = [f"ticket number {i}" for i in range(20_000)]
    splits = pd.Series(split_by_hash(texts, {"validation": 0.15, "test": 0.15}, seed=0))
    shares = splits.value_counts(normalize=True)
    assert shares["validation"] == pytest.approx(0.15, abs=0.01) and shares["test"] == pytest.approx(0.15, abs=0.01)
    # validation and test sit at opposite ends: a bigger test split takes texts from train only
    wider = pd.Series(split_by_hash(texts, {"validation": 0.15, "test": 0.25}, seed=0))
    assert (wider[splits == "validation"] == "validation").all() and (wider[splits == "test"] == "test").all()
    assert set(wider[(splits == "train") & (wider != "train")]) == {"test"}
    # only validation carved: the same texts as when both are
    alone = pd.Series(split_by_hash(texts, {"validation": 0.15}, seed=0))
    assert (alone[splits == "validation"] == "validation").all() and set(alone) == {"train", "validation"}


@pytest.mark.unit
def test_hash_split_is_one_function_of_the_canonical_text():
    assert split_by_hash(["Refund  please", " refund please"], {"test": 0.5}, seed=3) in (["train"] * 2, ["test"] * 2)
    other_seed = split_by_hash([f"t{i}" for i in range(1000)], {"test": 0.3}, seed=4)
    assert other_seed != split_by_hash([f"t{i}" for i in range(1000)], {"test": 0.3}, seed=3)
    with pytest.raises(ValueError, match="leave room for train"):
        split_by_hash(["a"], {"validation": 0.5, "test": 0.5}, seed=0)


@pytest.mark.unit
def test_a_manifest_knows_which_texts_it_holds_and_survives_a_round_trip(tmp_path):
    manifest = TextManifest.from_texts({"train": ["Where is my parcel?", "refund please"], "validation": ["hi there"]})
    loaded = TextManifest.load(manifest.save(tmp_path / "texts.parquet"))

    asked = text_hashes(["where is my  parcel?", "hi there", "something new"])
    seen = loaded.seen(asked)
    assert seen["train"].tolist() == [True, False, False] and seen["validation"].tolist() == [False, True, False]
    assert loaded.seen_any(asked).tolist() == [True, True, False]
    assert loaded.counts == {"train": 2, "validation": 1}
    with pytest.raises(FileNotFoundError, match="no training manifest"):
        TextManifest.load(tmp_path / "absent.parquet")


texts = st.text(alphabet="abcdefgh ", min_size=3, max_size=12).filter(lambda t: t.strip())
labelled_rows = st.lists(st.tuples(texts, st.sampled_from(["x", "y", "z"])), min_size=20, max_size=150)


@pytest.mark.data
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=labelled_rows, data=st.data())
def test_appended_rows_move_no_existing_text_between_splits(tmp_path_factory, rows, data):
    """Random datasets, then 10% appended: new texts, repeats of old ones and old texts with a new label."""
    tmp_path = tmp_path_factory.mktemp("grow")
    first = pd.DataFrame(rows, columns=["text", "label"])
    appended = []
    for _ in range(max(2, len(first) // 10)):
        kind = data.draw(st.sampled_from(["new", "repeat", "relabel"]))
        if kind == "new":
            appended.append((data.draw(texts) + " new", data.draw(st.sampled_from(["x", "y", "z"]))))
        else:
            text, label = first.iloc[data.draw(st.integers(0, len(first) - 1))]
            appended.append((text, label if kind == "repeat" else data.draw(st.sampled_from(["x", "y", "z"]))))
    grown = pd.concat([first, pd.DataFrame(appended, columns=["text", "label"])], ignore_index=True)

    before = splits_by_text(prepare_csv(first, tmp_path, "v1"))
    after = splits_by_text(prepare_csv(grown, tmp_path, "v2"))

    moved = {text: (before[text], after[text]) for text in before.keys() & after.keys() if before[text] != after[text]}
    assert moved == {}
    changes = read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE)
    assert changes["texts"]["changed"] == 0
    assert changes["texts"]["kept"] == len(before.keys() & after.keys())
    assert changes["texts"]["joined"] == len(after.keys() - before.keys())
    assert changes["relabelled"]["texts"] == changes["relabelled"]["kept_split"]


@pytest.mark.data
def test_the_report_says_what_changed_and_why_and_a_rerun_keeps_it(tmp_path):
    frame = pd.DataFrame({"text": [f"my order {i} never arrived" for i in range(400)], "label": ["a", "b"] * 200})
    prepare_csv(frame.head(300), tmp_path, "v1")
    first = read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE)
    assert first["previous_data_version"] is None and first["texts"]["joined"] == 300

    prepare_csv(frame, tmp_path, "v2")
    grown = read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE)
    assert grown["previous_data_version"] == first["data_version"]
    assert grown["texts"] == {"before": 300, "after": 400, "kept": 300, "joined": 100, "left": 0, "changed": 0}
    assert sum(grown["joined_by_split"].values()) == 100

    prepare_csv(frame, tmp_path, "v2")  # the same data again: the record of how it came to be stays
    assert read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE) == grown

    prepare_csv(frame, tmp_path, "v3", split_seed=1)
    reseeded = read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE)
    assert reseeded["texts"]["changed"] > 50
    assert reseeded["changed_by_reason"] == {"prepare.split_seed changed": reseeded["texts"]["changed"]}
    assert reseeded["changed_examples"][0]["reason"] == "prepare.split_seed changed"


@pytest.mark.data
def test_raising_demo_rows_grows_the_demo_and_keeps_every_split(tmp_path):
    def demo(rows: int) -> Path:
        prepare(DataConfig(demo_rows=rows), PrepareConfig(), seed=42, out_dir=tmp_path / "prepared",
                report_dir=tmp_path / "reports")
        return tmp_path / "prepared"

    before = splits_by_text(demo(600))
    after = splits_by_text(demo(660))

    assert before.items() <= after.items() and len(after) > len(before)
    changes = read_json(tmp_path / "reports" / SPLIT_CHANGES_FILE)
    assert changes["texts"]["changed"] == 0 and changes["texts"]["left"] == 0
    assert changes["texts"]["joined"] == len(after) - len(before)


@pytest.mark.unit
def test_the_manifest_hash_ignores_case_and_spacing():
    assert np.array_equal(text_hashes(["Refund please"]), text_hashes(["  refund   PLEASE "]))
