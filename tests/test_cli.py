"""The `langops` command: exit codes and messages a person (or `dvc repro`) sees."""

from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import tiny_project_params, write_bad_csv, write_params

from langops.logs import FILE_ONLY, ConsoleFilter, ConsoleFormatter


def _langops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "langops.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _log_file(stderr: str) -> Path:
    """The log file a failure names on the console."""
    match = re.search(r"^full log: (\S+\.log)", stderr, re.MULTILINE)
    assert match, stderr[-2000:]
    return Path(match.group(1))


@pytest.mark.unit
def test_a_bad_override_exits_2_naming_the_key(tmp_path):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))
    result = _langops("prepare", "--set", "train.lora.r=0", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.lora.r: Input should be greater than or equal to 1" in result.stderr


@pytest.mark.data
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
    # One block: what failed, the message once, where the traceback is; the traceback only in the log file.
    assert "langops validate failed:\ndata validation failed:" in result.stderr
    assert result.stderr.count("data validation failed") == 1 and "Traceback" not in result.stderr
    log = _log_file(result.stderr)
    assert log.parent == tmp_path / ".langops" / "logs" and log.name.startswith("validate-")
    assert "Traceback (most recent call last)" in log.read_text() and "DataValidationError" in log.read_text()


@pytest.mark.data
def test_a_missing_dataset_fails_at_once_before_any_server_starts(tmp_path):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))

    result = _langops("run", "--dataset", "missing.csv", cwd=tmp_path)

    assert result.returncode == 3
    assert f"langops run failed:\ndata source not found: {tmp_path / 'missing.csv'} (data.source)" in result.stderr
    assert "temporary Prefect server" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / ".langops" / "prefect").exists()  # no server, no database


BAD_SOURCES = {
    "binary.csv": (b"text,label\n\x00\x01\x02\xff\n", "looks binary, not a text table: NUL byte at offset 11 (line 2)"),
    "empty.csv": (b"", "is empty: no header and no rows"),
    "header-only.csv": (b"text,label\n", "has a header but no data rows"),
    "latin1.csv": ("text,label\ncaf\u00e9,a\n".encode("latin-1"), "is not valid utf-8: byte offset 14 (line 2"),
    "one-line.csv": (b"text,label," + b"x" * 300_000, "line 1: field larger than field limit (131072) (one field "
                     "runs past the CSV reader's limit"),
}


@pytest.mark.data
@pytest.mark.parametrize("command", ["run", "prepare"])
@pytest.mark.parametrize("name", sorted(BAD_SOURCES))
def test_an_unusable_data_file_is_named_with_its_problem_before_anything_heavy_loads(tmp_path, name, command):
    content, problem = BAD_SOURCES[name]
    (tmp_path / name).write_bytes(content)
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model", data={"source": name}))
    # In-process, so the test can see what the failure imported: torch alone costs seconds on a cold start.
    probe = ("import sys; from langops.cli import main; code = main(sys.argv[1:]); "
             "print('exit', code, 'torch' in sys.modules, 'prefect' in sys.modules)")

    result = subprocess.run([sys.executable, "-c", probe, command], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)

    assert result.stdout.strip() == "exit 3 False False", result.stderr[-2000:]
    assert f"langops {command} failed:\n{tmp_path / name} {problem}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.data
def test_init_writes_params_for_a_new_folder_and_shows_what_validation_would_say(tmp_path):
    rows = ["id,message,category"] + [f"{i},my order {i} is about {c},{c}" for c in ("billing", "shipping")
                                      for i in range(40)]
    rows += [f"{100 + i},rare thing {i},rare" for i in range(4)]
    rows += ["200,a lone question,lonely"]
    (tmp_path / "export.csv").write_text("\n".join(rows) + "\n")

    result = _langops("init", "--data", "export.csv", cwd=tmp_path)

    assert result.returncode == 3, result.stderr  # a run would stop on the 1-row class: said now
    assert "data.text_column   message" in result.stdout and "data.label_column  category" in result.stdout
    stop = result.stdout.split("validation would STOP a run on this data (1 problem)")[1]
    stop, warnings = stop.split("warnings (the run goes on")
    assert "'lonely'" in stop and "'rare'" not in stop
    assert "'rare'" in warnings  # 4 rows: a thin class, warned about, not refused
    params = (tmp_path / "params.yaml").read_text()
    assert "label_column: category" in params and "- rare" in params and "- lonely" in params
    again = _langops("init", "--data", "export.csv", cwd=tmp_path)
    assert again.returncode == 2 and "pass --force" in again.stderr


@pytest.mark.flow
def test_a_failed_run_prints_its_error_once_and_keeps_the_tracebacks_for_the_log_and_the_ui(tmp_path):
    """`langops run --dataset` on bad data: one block on the console; Prefect's failure reports, with their
    tracebacks, go to the log file and to Prefect's API (the UI), and to the console only with --verbose."""
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))  # data.source: demo
    bad = write_bad_csv(tmp_path / "bad.csv", "unknown_label")

    result = _langops("run", "--dataset", str(bad), cwd=tmp_path)

    console = result.stdout + result.stderr
    assert result.returncode == 3, console[-3000:]
    assert "langops run failed in step validate:\ndata validation failed:" in result.stderr
    assert console.count("data validation failed") == 1 and console.count("full report:") == 1
    assert "refunds" in console  # the --dataset file was the one validated
    assert "Traceback" not in console and "Task run failed with exception" not in console
    assert "Finished in state Failed" not in console
    assert "Beginning flow run" in console and "Finished in state Completed()" in console  # progress
    log = _log_file(result.stderr).read_text()
    assert "Task run failed with exception: DataValidationError" in log
    assert "Traceback (most recent call last)" in log and "ERROR langops.cli: langops run failed" in log
    with sqlite3.connect(tmp_path / ".langops" / "prefect" / "prefect.db") as db:
        api_logs = [m for (m,) in db.execute("SELECT message FROM log WHERE level >= ?", (logging.ERROR,))]
    assert any(m.startswith("Task run failed with exception") and "Traceback" in m for m in api_logs)

    verbose = _langops("run", "--dataset", str(bad), "--verbose", cwd=tmp_path)

    assert verbose.returncode == 3, verbose.stderr[-3000:]
    assert "Task run failed with exception" in verbose.stderr and "Traceback (most recent" in verbose.stderr
    assert "ERROR langops.cli: langops run failed" in verbose.stderr


@pytest.mark.services
def test_a_failed_sweep_reports_once_and_its_dask_workers_use_the_one_temporary_server(tmp_path):
    """Every trial fails on its Dask worker (no base model): the workers log into the sweep's file, not onto
    the console, and report to the sweep's temporary Prefect server instead of each starting one."""
    params = tiny_project_params(tmp_path, tmp_path / "no-model")
    params["sweep"].update({"grid": {"train.learning_rate": [0.01, 0.001]}, "n_workers": 2})
    write_params(tmp_path, params)

    result = _langops("sweep", cwd=tmp_path)

    console = result.stdout + result.stderr
    assert result.returncode == 1, console[-3000:]
    assert "langops sweep failed:\nno sweep trial completed (2 tried)" in result.stderr
    assert "Traceback" not in console and "Task run failed with exception" not in console
    assert console.count("starting a temporary Prefect server") == 1
    log = _log_file(result.stderr).read_text()
    pids = {int(line.split()[2]) for line in log.splitlines() if re.match(r"\d{4}-\d\d-\d\d \S+ \d+ [A-Z]+ ", line)}
    assert len(pids) == 3, pids  # the command and its two workers
    assert "Task run failed with exception" in log and "Traceback (most recent call last)" in log
    assert "Starting temporary server" not in log  # no worker started a server of its own


def _record(name: str, level: int, message: str, *, exc: bool = False, **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, message, None, sys.exc_info() if exc else None)
    record.__dict__.update(extra)
    return record


@pytest.mark.unit
def test_the_console_drops_prefect_failure_reports_and_tracebacks_but_not_progress():
    task, flow, info, error = "prefect.task_runs", "prefect.flow_runs", logging.INFO, logging.ERROR
    try:
        raise ValueError("bad")
    except ValueError:
        shown = [
            _record(task, info, "Finished in state Completed()"),
            _record(task, info, "Finished in state Cached(type=COMPLETED)"),
            _record(flow, error, "trial-01 (lr=0.1) failed: OSError"),  # a sweep's own line
            _record(task, info, "Task run failed with OSError: x - Retry 1/2 will start 5 second(s) ..."),
            _record("langops.pipeline", logging.WARNING, "something odd", exc=True),
        ]
        hidden = [
            _record(task, error, "Task run failed with exception: ValueError('bad')", exc=True),
            _record(task, error, "Finished in state Failed('Task run encountered an exception ...')"),
            _record(flow, error, "Encountered exception during execution: ValueError('bad')", exc=True),
            _record(flow, info, "Finished in state Failed('Flow run encountered an exception ...')"),
            _record(flow, info, "Finished in state Crashed('Execution was interrupted ...')"),
            _record("langops.cli", error, "langops run failed", exc=True, **{FILE_ONLY: True}),
        ]

    console = ConsoleFilter()
    assert all(console.filter(r) for r in shown)
    assert not any(console.filter(r) for r in hidden)
    odd = shown[-1]
    assert ConsoleFormatter("%(message)s").format(odd) == "something odd"  # its traceback is for the file
    assert "Traceback" in logging.Formatter("%(message)s").format(odd)


@pytest.mark.unit
def test_a_step_is_named_by_the_runner_its_error_came_from(tmp_path):
    from langops.config import load_params
    from langops.pipeline import failed_step, run_validate
    from langops.tasks.prepare import PrepareResult

    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))
    nothing = PrepareResult(out_dir=tmp_path / "never-prepared", rows={}, labels=(), data_version="")
    with pytest.raises(Exception) as failure:
        run_validate(load_params(tmp_path / "params.yaml"), nothing)

    assert failed_step(failure.value) == "validate"
    assert failed_step(ValueError("raised nowhere near a step")) is None


@pytest.mark.unit
def test_stop_without_a_server_says_so(tmp_path):
    write_params(tmp_path, tiny_project_params(tmp_path, tmp_path / "no-model"))
    result = _langops("stop", cwd=tmp_path)
    assert result.returncode == 0 and "no model server was running" in result.stdout
