"""The `langops` command: exit codes and messages a person (or `dvc repro`) sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline_helpers import tiny_project_params, write_bad_csv, write_params


def _langops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "langops.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_bad_override_exits_2_naming_the_key(tmp_path):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))
    result = _langops("prepare", "--set", "train.lora.r=0", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.lora.r: Input should be greater than or equal to 1" in result.stderr


def test_prepare_then_validate_on_bad_data_exits_3_with_every_problem_listed(tmp_path):
    bad = write_bad_csv(tmp_path / "bad.csv", "unknown_label")
    params = tiny_project_params(tmp_path, tmp_path / "no-model", data={"source": str(bad)})
    write_params(tmp_path, params)

    assert _langops("prepare", cwd=tmp_path).returncode == 0
    result = _langops("validate", cwd=tmp_path)

    assert result.returncode == 3, result.stderr[-2000:]
    assert "data validation failed" in result.stderr and "refunds" in result.stderr
    assert (tmp_path / "reports" / "validation" / "report.md").is_file()
    assert not (tmp_path / "models").exists()


def test_stop_without_a_server_says_so(tmp_path):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))
    result = _langops("stop", cwd=tmp_path)
    assert result.returncode == 0 and "no model server was running" in result.stdout
