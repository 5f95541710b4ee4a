"""Cache keys of the flow's steps: what changes them, what does not, and when a cached result is stale."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pipeline_helpers import tiny_project_params, write_params

from langops.config import load_params
from langops.stage_cache import outputs_intact, stage_key, write_stamp
from langops.stages import stage

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, **overrides):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model", **overrides))
    params = load_params(tmp_path / "params.yaml")
    prepared = params.paths.prepared
    prepared.mkdir(parents=True)
    (prepared / "train.csv").write_text("text,label\nmy card was charged twice,billing\n")
    return params


def test_the_key_follows_params_and_content_but_not_timestamps(tmp_path):
    params = _project(tmp_path)
    train = stage("train")
    key = stage_key(train, params)
    assert stage_key(train, params) == key

    data = params.paths.prepared / "train.csv"
    os.utime(data, (1_000_000, 1_000_000))  # touched, same bytes
    assert stage_key(train, params) == key

    assert stage_key(train, load_params(tmp_path / "params.yaml", ["train.max_epochs=5"])) != key
    assert stage_key(train, load_params(tmp_path / "params.yaml", ["compress.num_threads=2"])) == key
    assert stage_key(train, load_params(tmp_path / "params.yaml", ["validate.min_text_chars=2"])) == key
    data.write_text("text,label\nmy parcel never came,shipping\n")
    assert stage_key(train, params) != key


def test_a_stamp_holds_only_while_the_outputs_are_as_the_run_left_them(tmp_path):
    params = _project(tmp_path)
    validate = stage("validate")
    key = stage_key(validate, params)
    assert not outputs_intact(validate, params, key)  # never ran

    report = params.paths.validation / "validation.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"success": true}')
    write_stamp(validate, params, key)
    assert outputs_intact(validate, params, key)
    assert not outputs_intact(validate, params, "another-key")

    report.write_text('{"success": false}')  # rewritten, e.g. by `dvc repro` with other params
    assert not outputs_intact(validate, params, key)
    write_stamp(validate, params, key)
    report.unlink()
    assert not outputs_intact(validate, params, key)


def test_a_registration_is_reused_only_while_its_version_exists(tmp_path):
    params = _project(tmp_path)
    for name in ("compressed", "trained", "student"):
        getattr(params.paths, name).mkdir(parents=True)
        (getattr(params.paths, name) / "model.bin").write_bytes(b"weights")
    register = stage("register")
    registration = register.outs[0].path(params)
    registration.parent.mkdir(parents=True)
    registration.write_text('{"version": "3"}')
    key = stage_key(register, params)
    write_stamp(register, params, key)

    assert outputs_intact(register, params, key, still_valid=lambda: True)
    assert not outputs_intact(register, params, key, still_valid=lambda: False)


def test_the_tracking_store_is_part_of_the_key_of_steps_that_write_to_it(tmp_path, monkeypatch):
    params = _project(tmp_path)
    train, validate = stage("train"), stage("validate")
    train_key, validate_key = stage_key(train, params), stage_key(validate, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert stage_key(train, params) != train_key
    assert stage_key(validate, params) == validate_key


def test_prepare_is_run_again_when_an_extra_source_appears_or_changes(tmp_path):
    feedback = tmp_path / "data" / "raw" / "feedback.csv"
    params = _project(tmp_path, data={"extra_sources": [str(feedback)]})
    prepare = stage("prepare")
    before = stage_key(prepare, params)  # not exported yet: prepare skips it
    feedback.parent.mkdir(parents=True)
    feedback.write_text("text,label\nmy parcel never came,shipping\n")
    exported = stage_key(prepare, params)
    feedback.write_text("text,label\nmy parcel never came,shipping\nI was charged twice,billing\n")
    assert len({before, exported, stage_key(prepare, params)}) == 3
