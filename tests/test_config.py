"""params.yaml loading: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from langops.config import ConfigError, load_params, parse_params

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_paths_resolve_against_the_params_folder():
    params = load_params(ROOT / "params.yaml")
    assert params.paths.prepared == ROOT / "data" / "prepared"
    assert params.project.state_dir == ROOT / ".langops"
    assert params.tracking_uri() == f"sqlite:///{ROOT / '.langops' / 'mlflow.db'}"


def test_overrides_parse_yaml_values():
    params = load_params(ROOT / "params.yaml", ["train.max_epochs=2", "train.lora.target_modules=[query]", "deploy.enabled=false"])
    assert params.train.max_epochs == 2
    assert params.train.lora.target_modules == ("query",)
    assert params.deploy.enabled is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "train.epochz: Extra inputs are not permitted (unknown key)"),
        ("train.lora.r=0", "train.lora.r: Input should be greater than or equal to 1"),
        ("train.method=qlora", "train.method: Input should be 'lora' or 'full'"),
        ("data.labels=[a]", "data.labels: Value error, declare at least two labels"),
        ("validate.min_text_chars=50", "min_text_chars must not exceed max_text_chars"),
        ("baseline.char_ngrams=[5, 2]", "baseline.char_ngrams: Value error, an n-gram range is (lower, upper)"),
        ("baseline.C=0", "baseline.C: Input should be greater than 0"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(override, message, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("validate:\n  max_text_chars: 10\n" if "min_text_chars" in override else "{}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(params_file, [override])


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_params(ROOT / "params.yaml", ["train.max_epochs"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_environment_tracking_uri_wins(monkeypatch, tmp_path):
    params = parse_params({}).resolved(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert params.tracking_uri() == "http://127.0.0.1:5000"


def test_configuring_one_project_does_not_capture_the_next_in_the_same_process(tmp_path):
    from langops.tracking import configure_mlflow

    first, second = (parse_params({}).resolved(tmp_path / name) for name in ("first", "second"))
    configure_mlflow(first)  # mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI, which params let win

    assert second.tracking_uri() == second.embedded_tracking_uri() != first.embedded_tracking_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_params_hash_changes_with_a_knob():
    a = parse_params({})
    b = parse_params({"train": {"max_epochs": 9}})
    assert a.section_hash() != b.section_hash()
    assert a.section_hash("data") == b.section_hash("data")


def test_params_hash_ignores_servers_paths_and_the_gate():
    a = parse_params({})
    b = parse_params({"services": {"mlflow_port": 5111}, "deploy": {"port": 9000}, "paths": {"trained": "elsewhere"},
                      "promote": {"min_absolute_change": 0.02}})
    assert a.section_hash() == b.section_hash()
    assert a.section_hash() != parse_params({"project": {"seed": 7}}).section_hash()


def test_the_services_section_of_params_yaml_holds_the_model_defaults():
    """Two places hold these defaults (params.yaml for users, the model for code): they must agree."""
    from langops.config import ServicesConfig

    assert load_params(ROOT / "params.yaml").services == ServicesConfig()


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key not in ("grid", "thresholds", "guards", "max_latency_ms", "severity"):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_params_yaml_writes_out_every_default_of_the_model_and_nothing_else():
    """params.yaml is where users read the knobs, the pydantic models are where code reads them: every key is
    in both, with the same value, so a default can't be changed in one and not the other."""
    import yaml

    from langops.config import Params

    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    assert _keys(written) == _keys(defaults)
    assert parse_params(written).model_dump(mode="json") == defaults


def test_a_bad_value_from_set_is_blamed_on_the_set_not_on_the_params_file(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as raised:
        load_params(params_file, ["train.learning_rate=fast", "train.max_steps=100"])
    message = str(raised.value)
    assert message.startswith(f"invalid {params_file} with --set train.learning_rate, train.max_steps:")
    assert "train.learning_rate: Input should be a valid number" in message
    assert "(got 'fast'), from --set train.learning_rate" in message
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)\n" in message + "\n"  # the file's own


def test_a_gate_check_set_to_null_is_off_as_if_left_out():
    params = load_params(ROOT / "params.yaml", ["promote.thresholds.baseline_margin=null", "promote.guards.ece=null"])
    assert "baseline_margin" not in params.promote.thresholds and "macro_f1" in params.promote.thresholds
    assert params.promote.guards == {"recall_*": 0.10}
