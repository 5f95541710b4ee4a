"""`langops init --data FILE`: params written from the user's file, and what a run would say about the data."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from pipeline_helpers import REPO_PARAMS

from langops.config import load_params
from langops.project_init import InitError, init_project, render

pytestmark = pytest.mark.data


def write_export(path, rows_per_class=30, labels=("billing", "shipping", "technical"), **extra_columns):
    rows = [
        {"id": f"{label}-{i}", "message": f"my {label} problem number {i} needs a look", "category": label,
         **{name: value(i) for name, value in extra_columns.items()}}
        for label in labels
        for i in range(rows_per_class)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_new_folder_gets_params_for_its_file_and_a_clean_bill(tmp_path):
    source = write_export(tmp_path / "tickets.csv")

    result = init_project(source, params_path=tmp_path / "params.yaml")

    params = load_params(tmp_path / "params.yaml")
    assert params.data.source == str(source)
    assert (params.data.text_column, params.data.label_column) == ("message", "category")
    assert params.data.labels == ("billing", "shipping", "technical")
    assert result.data["source"] == "tickets.csv"  # relative to the params file, so the folder can move
    assert result.class_counts == {"billing": 30, "shipping": 30, "technical": 30}
    assert result.errors == ()
    text = render(result)
    assert "data.text_column   message  (named like a text column)" in text
    assert "validation passes on a dry run" in text and "next: langops run" in text


def test_columns_are_inferred_from_their_shape_when_names_do_not_say(tmp_path):
    frame = pd.DataFrame(
        {"k": range(60), "words": [f"a long piece of writing number {i} about things" for i in range(60)],
         "g": ["x", "y", "z"] * 20}
    )
    frame.to_csv(tmp_path / "odd.csv", index=False)

    result = init_project(tmp_path / "odd.csv", params_path=tmp_path / "params.yaml")

    assert (result.data["text_column"], result.data["label_column"]) == ("words", "g")
    assert result.reasons == {"text_column": "the column with the longest values",
                              "label_column": "the column with the fewest distinct values"}


def test_an_existing_params_file_is_kept_unless_forced_and_then_only_its_data_changes(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(REPO_PARAMS.read_text())
    source = write_export(tmp_path / "tickets.csv")

    with pytest.raises(InitError, match="exists; pass --force"):
        init_project(source, params_path=params_path)
    assert params_path.read_text() == REPO_PARAMS.read_text()

    init_project(source, params_path=params_path, force=True)

    before, after = yaml.safe_load(REPO_PARAMS.read_text()), yaml.safe_load(params_path.read_text())
    assert {k: v for k, v in after.items() if k != "data"} == {k: v for k, v in before.items() if k != "data"}
    assert after["data"]["label_column"] == "category"
    assert "# Every knob of the pipeline" in params_path.read_text()  # comments elsewhere survive


def test_a_split_column_and_a_cp1252_file_are_recognised(tmp_path):
    source = tmp_path / "legacy.csv"
    rows = ["text,label,part"] + [
        f"caf\u00e9 order {i} went wrong,{'billing' if (i // 4) % 2 else 'shipping'},{['train', 'dev', 'test', 'train'][i % 4]}"
        for i in range(200)
    ]
    source.write_bytes(("\n".join(rows) + "\n").encode("cp1252"))

    result = init_project(source, params_path=tmp_path / "params.yaml")

    assert result.data["encoding"] == "cp1252" and result.data["split_column"] == "part"
    assert any("reads as cp1252" in note for note in result.notes)
    assert result.errors == ()


def test_what_validation_would_refuse_is_shown_with_its_fix(tmp_path):
    source = tmp_path / "questions.jsonl"
    rows = [{"question": f"how do I do {label} thing {i}", "coarse": label} for label in ("DESC", "HUM") for i in range(40)]
    rows += [{"question": f"what does abbreviation {i} mean", "coarse": "ABBR"} for i in range(9)]
    rows += [{"question": "where is the one location question", "coarse": "LOC"}]
    source.write_text("\n".join(json.dumps(r) for r in rows))

    result = init_project(source, params_path=tmp_path / "params.yaml")

    (error,) = result.errors  # one row cannot be both learned and measured: the run would stop
    assert "classes with no row in train, or none in validation and test" in error and "'LOC'" in error
    assert "fix: a class with no train row cannot be learned" in error
    assert "validation would STOP a run on this data" in render(result)
    (thin,) = [w for w in result.warnings if "'ABBR'" in w]  # 9 rows: warned about, trains all the same
    assert "classes with fewer than 20 rows" in thin


def test_a_header_only_file_is_refused_for_having_no_rows_not_for_its_columns(tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\n")

    with pytest.raises(InitError, match=r"empty\.csv has a header but no data rows \(columns: \['text', 'label'\]\)"):
        init_project(tmp_path / "empty.csv", params_path=tmp_path / "params.yaml")
    assert not (tmp_path / "params.yaml").exists()
