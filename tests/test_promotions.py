"""Moving the champion: serialised, recorded, reversible — on a real MLflow SQLite store.

Model versions here are registered without training (a version pointing at an empty folder): the
aliases, the lock and the log do not care what the version holds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import prefect_harness

from langops.aliases import CHAMPION, PREVIOUS_CHAMPION
from langops.config import Params, parse_params
from langops.promotions import (
    ChampionLockTimeout,
    PromotionError,
    champion_lock,
    move_champion,
    read_evidence,
    read_history,
    rollback,
)
from langops.tracking import configure_mlflow, owner_tags

MODEL = "langops-classifier"


def project_params(root: Path, **sections: dict) -> Params:
    return parse_params({"project": {"state_dir": str(root / ".langops")}, **sections}).resolved(root)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables created once; each test starts from a copy (saves ~1 s each)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def registry_with_versions(root: Path, template: Path, count: int = 3) -> Params:
    """A project whose registry holds ``MODEL`` versions 1..count and no aliases."""
    from mlflow import MlflowClient

    params = project_params(root)
    params.project.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, params.project.state_dir / "mlflow.db")
    configure_mlflow(params)
    client = MlflowClient()
    client.create_registered_model(MODEL)
    source = root / "model-files"
    source.mkdir(exist_ok=True)
    for _ in range(count):
        client.create_model_version(MODEL, source=source.as_uri())
    return params


@pytest.fixture()
def registry(tmp_path, empty_mlflow_db) -> Params:
    return registry_with_versions(tmp_path, empty_mlflow_db)


def aliases() -> tuple[str | None, str | None]:
    from langops.pipeline import current_alias_version

    return current_alias_version(MODEL, CHAMPION), current_alias_version(MODEL, PREVIOUS_CHAMPION)


def promote(params: Params, version: str, *, actor: str = "pipeline", reason: str = "gate passed", **kw):
    return move_champion(
        params, model_name=MODEL, new_champion=version, event="promote", reason=reason, actor=actor, **kw
    )


# --- promotions and the log -------------------------------------------------------------------------


@pytest.mark.unit
def test_first_promotion_has_no_previous_champion(registry):
    event = promote(registry, "1", evidence={"macro_f1": 0.81})

    assert (event.event, event.from_version, event.to_version) == ("promote", None, "1")
    assert aliases() == ("1", None)


@pytest.mark.unit
def test_second_promotion_keeps_the_old_champion_as_previous(registry):
    promote(registry, "1")
    event = promote(registry, "2")

    assert (event.from_version, event.to_version) == ("1", "2")
    assert aliases() == ("2", "1")


@pytest.mark.unit
def test_history_lists_every_event_newest_first_with_its_evidence(registry):
    import numpy as np
    from mlflow import MlflowClient

    first = promote(registry, "1", actor="alice", reason="first model", evidence={"macro_f1": 0.81})
    second = promote(registry, "2", actor="bob", reason="beats v1", evidence={"macro_f1": np.float64(0.86)})

    history = read_history(registry, MODEL)

    assert history == [second, first]
    assert [(e.from_version, e.to_version, e.actor, e.reason) for e in history] == [
        ("1", "2", "bob", "beats v1"),
        (None, "1", "alice", "first model"),
    ]
    assert history[0].at > history[1].at
    assert read_evidence(registry, second.record_id)["macro_f1"] == pytest.approx(0.86)
    assert read_evidence(registry, first.record_id) == {
        "event": "promote", "from_version": None, "to_version": "1", "macro_f1": 0.81,
    }
    assert read_history(registry, MODEL, limit=1) == [second]
    assert read_history(registry, "another-model") == []
    tags = MlflowClient().get_model_version(MODEL, "2").tags
    assert tags["langops.champion_since"] == second.at
    assert tags["langops.last_event"] == f"promote {second.record_id}"


@pytest.mark.unit
def test_history_says_what_started_a_promotion(registry, capsys, monkeypatch):
    """A retraining started by a monitor event keeps the event and its drift report with the record."""
    from langops.cli import main

    promote(registry, "1", reason="first model")
    cause = "langops.monitor.drift: drift report reports/monitoring/20261128T180000Z, monitoring run 4f2a"
    promote(registry, "2", reason="beats v1", cause=cause)

    assert [e.cause for e in read_history(registry, MODEL)] == [cause, ""]
    (registry.project.state_dir.parent / "params.yaml").write_text(
        yaml.safe_dump({"project": {"state_dir": str(registry.project.state_dir)}}))
    monkeypatch.chdir(registry.project.state_dir.parent)
    assert main(["history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    promoted_v2 = next(i for i, line in enumerate(lines) if "1 → 2" in line)
    assert lines[promoted_v2 + 1].strip() == f"started by {cause}"
    assert "started by" not in "".join(lines[promoted_v2 + 2:])


@pytest.mark.unit
def test_the_log_is_an_mlflow_experiment_beside_the_pipeline_runs(registry):
    from mlflow import MlflowClient

    event = promote(registry, "1", actor="alice", reason="first model")

    run = MlflowClient().get_run(event.record_id)
    experiment = MlflowClient().get_experiment(run.info.experiment_id)
    assert experiment.name == "langops-promotions"
    assert experiment.artifact_location.startswith(registry.artifact_root())
    assert {k: v for k, v in run.data.tags.items() if k.startswith("langops.")} == {
        "langops.event": "promote", "langops.model_name": MODEL, "langops.from_version": "",
        "langops.to_version": "1", "langops.actor": "alice", "langops.reason": "first model",
        **owner_tags(),  # so that a later command can close the record if this process dies mid-move
    }
    assert run.info.status == "FINISHED"


@pytest.mark.unit
def test_a_decision_made_against_a_champion_that_has_since_moved_changes_nothing(registry):
    from langops.promotions import StaleDecision

    promote(registry, "1")
    promote(registry, "2")  # another promotion landed while the gate was comparing against version 1
    with pytest.raises(StaleDecision, match="decision was made against version 1"):
        promote(registry, "3", expected_champion="1")
    assert aliases() == ("2", "1")
    assert len(read_history(registry, MODEL)) == 2


@pytest.mark.unit
def test_a_decision_made_with_no_champion_is_stale_once_one_exists(registry):
    from langops.promotions import StaleDecision

    promote(registry, "1")
    with pytest.raises(StaleDecision):
        promote(registry, "2", expected_champion=None)
    assert aliases() == ("1", None)


@pytest.mark.unit
def test_promoting_the_current_champion_again_is_recorded_but_moves_nothing(registry):
    promote(registry, "1")
    promote(registry, "2")
    again = promote(registry, "2", reason="re-run of the same pipeline")

    assert (again.from_version, again.to_version, again.changed) == ("2", "2", False)
    assert aliases() == ("2", "1")
    assert len(read_history(registry, MODEL)) == 3


@pytest.mark.unit
def test_forcing_the_current_champion_is_recorded_as_a_forced_request_that_moved_nothing(registry, tmp_path):
    from langops.promotions import record_decision
    from langops.tasks.promote import already_champion

    promote(registry, "1")
    promote(registry, "2")
    decision = already_champion("2", registry.promote, force_reason="the on-call engineer re-pins it")

    assert record_decision(decision, params=registry, actor="alice") == "2"
    assert aliases() == ("2", "1")
    forced = read_history(registry, MODEL)[0]
    assert (forced.event, forced.from_version, forced.to_version, forced.actor, forced.changed) == (
        "force", "2", "2", "alice", False)
    assert "the on-call engineer re-pins it" in forced.reason
    record, report = decision.write(tmp_path, champion_after="2")
    assert "# Promotion decision: ALREADY CHAMPION (FORCED)" in report.read_text()
    assert json.loads(record.read_text())["force_reason"] == "the on-call engineer re-pins it"


@pytest.mark.unit
def test_a_bad_request_is_refused_before_anything_is_recorded(registry):
    promote(registry, "1")

    with pytest.raises(PromotionError, match="no version '9'"):
        promote(registry, "9")
    with pytest.raises(PromotionError, match="unknown promotion event 'deploy'"):
        move_champion(registry, model_name=MODEL, new_champion="2", event="deploy", reason="r", actor="a")
    with pytest.raises(PromotionError, match="needs a reason"):
        promote(registry, "2", reason="  ")

    assert aliases() == ("1", None)
    assert len(read_history(registry, MODEL)) == 1


# --- rollback ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_rollback_restores_the_previous_champion_and_a_second_rollback_undoes_it(registry):
    promote(registry, "1")
    promote(registry, "2")

    back = rollback(registry, model_name=MODEL, reason="v2 misroutes refunds", actor="oncall")

    assert (back.event, back.from_version, back.to_version) == ("rollback", "2", "1")
    assert aliases() == ("1", "2")
    assert read_evidence(registry, back.record_id)["rolled_back_from"] == "2"

    forth = rollback(registry, model_name=MODEL, reason="false alarm", actor="oncall")

    assert (forth.from_version, forth.to_version) == ("1", "2")
    assert aliases() == ("2", "1")
    assert [e.event for e in read_history(registry, MODEL)] == ["rollback", "rollback", "promote", "promote"]


@pytest.mark.unit
def test_rollback_without_a_previous_champion_is_refused_and_changes_nothing(registry):
    promote(registry, "1")

    with pytest.raises(PromotionError, match="has no 'previous_champion' alias \\(champion is version 1\\)"):
        rollback(registry, model_name=MODEL, reason="panic", actor="oncall")

    assert aliases() == ("1", None)
    assert len(read_history(registry, MODEL)) == 1


@pytest.mark.unit
def test_rollback_when_previous_champion_is_the_champion_is_refused(registry):
    from mlflow import MlflowClient

    promote(registry, "1")
    MlflowClient().set_registered_model_alias(MODEL, PREVIOUS_CHAMPION, "1")  # set by hand, outside langops

    with pytest.raises(PromotionError, match="are both version 1; nothing was changed"):
        rollback(registry, model_name=MODEL, reason="panic", actor="oncall")
    assert len(read_history(registry, MODEL)) == 1


# --- the lock ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_held_lock_makes_another_taker_time_out_naming_the_lock(registry):
    with champion_lock(registry, MODEL) as name:
        assert name == str(registry.project.state_dir / "locks" / f"{MODEL}.lock")
        taken = f"could not take the champion lock {name} within 0.2s"
        with pytest.raises(ChampionLockTimeout, match=taken), champion_lock(registry, MODEL, timeout_s=0.2):
            pass
    with champion_lock(registry, MODEL, timeout_s=0.2):  # free again once released
        pass


@pytest.mark.unit
def test_a_remote_tracking_store_without_a_prefect_server_is_refused(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = project_params(tmp_path, tracking={"uri": "https://mlflow.example.com"})
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(PromotionError, match="set PREFECT_API_URL"),
        champion_lock(params, MODEL),
    ):
        pass


@pytest.mark.flow
def test_a_remote_tracking_store_locks_with_a_one_slot_prefect_concurrency_limit(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    params = project_params(tmp_path, tracking={"uri": "https://mlflow.example.com"})
    with prefect_harness():
        with champion_lock(params, MODEL, timeout_s=10) as name:
            assert name == f"langops-champion-{MODEL}"
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(name)
            assert (limit.limit, limit.active, limit.active_slots) == (1, True, 1)
            taken = f"Prefect global concurrency limit '{name}'"
            with pytest.raises(ChampionLockTimeout, match=taken), champion_lock(params, MODEL, timeout_s=1):
                pass

        with get_client(sync_client=True) as client:  # someone widens the limit: the lock re-arms it
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=5))
        with champion_lock(params, MODEL, timeout_s=10), get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(name).limit == 1


@contextlib.contextmanager
def _no_lock(params, model_name=None, **_):
    yield "no lock"


def _promote_in_rounds(root: str, version: str, rounds: int, barrier, errors, locked: bool) -> None:
    """One racing process: promote ``version`` once per round, all processes starting together."""
    from langops import promotions

    if not locked:
        promotions.champion_lock = _no_lock
    params = project_params(Path(root))
    for round_no in range(rounds):
        barrier.wait(timeout=60)
        try:
            promotions.move_champion(
                params, model_name=MODEL, new_champion=version, event="promote",
                reason=f"round {round_no}", actor=f"racer-{version}",
            )
        except Exception as exc:
            errors.put(f"round {round_no}, version {version}: {exc!r}")
        barrier.wait(timeout=60)


def consistency_problems(params: Params, expected_events: int, racers: set[str]) -> list[str]:
    """What is wrong with the champion, previous_champion and the log; empty when they agree."""
    champion, previous = aliases()
    events = read_history(params, MODEL, limit=1000)[::-1]  # oldest first
    problems = []
    if champion not in racers:
        problems.append(f"champion is {champion}, not one of {sorted(racers)}")
    if len(events) != expected_events:
        problems.append(f"{len(events)} events logged, {expected_events} performed")
    if events and events[-1].to_version != champion:
        problems.append(f"the last event made {events[-1].to_version} champion, but champion is {champion}")
    for before, after in itertools.pairwise(events):
        if after.from_version != before.to_version:
            problems.append(f"event {after.record_id} moved from {after.from_version}, but the champion was "
                            f"{before.to_version}: two moves interleaved")
    last_change = next((e for e in reversed(events) if e.changed), None)
    if last_change is not None and previous != last_change.from_version:
        problems.append(f"previous_champion is {previous}, the last change was from {last_change.from_version}")
    if previous is not None and previous == champion:
        problems.append(f"previous_champion and champion are both {champion}")
    return problems


def race(params: Params, root: Path, *, rounds: int, locked: bool) -> list[str]:
    """Two processes promote versions 1 and 2 at the same moment, ``rounds`` times; the problems seen."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    errors = context.Queue()
    racers = [
        context.Process(target=_promote_in_rounds, args=(str(root), version, rounds, barrier, errors, locked))
        for version in ("1", "2")
    ]
    for process in racers:
        process.start()
    problems = []
    try:
        for round_no in range(rounds):
            barrier.wait(timeout=120)  # both racers ready: go
            barrier.wait(timeout=60)  # both racers done
            seen = consistency_problems(params, 2 * (round_no + 1), {"1", "2"})
            problems += [f"round {round_no}: {p}" for p in seen if not any(p in q for q in problems)]
    finally:
        for process in racers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    while not errors.empty():
        problems.append(errors.get())
    return problems


@pytest.mark.services
def test_two_processes_promoting_at_once_never_interleave(tmp_path, empty_mlflow_db):
    params = registry_with_versions(tmp_path, empty_mlflow_db, count=2)

    problems = race(params, tmp_path, rounds=20, locked=True)

    assert problems == []


# --- the command line -------------------------------------------------------------------------------


def langops(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "langops.cli", *args, "--params", str(root / "params.yaml")],
        cwd=root, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **(env or {})},
    )


def write_params_file(root: Path) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"project": {"state_dir": str(root / ".langops")}}))


@pytest.mark.unit
def test_cli_rollback_without_a_previous_champion_exits_1_and_says_why(registry, tmp_path):
    write_params_file(tmp_path)
    promote(registry, "1")

    result = langops(tmp_path, "rollback", "--reason", "panic")

    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot roll back langops-classifier: it has no 'previous_champion' alias" in result.stderr
    assert aliases() == ("1", None)


@pytest.mark.unit
def test_cli_rollback_then_history_shows_what_changed(registry, tmp_path):
    write_params_file(tmp_path)
    promote(registry, "1", actor="pipeline", reason="first model")
    promote(registry, "2", actor="pipeline", reason="beats v1")

    result = langops(tmp_path, "rollback", "--reason", "v2 misroutes refunds", env={"USER": "oncall-ana"})

    assert result.returncode == 0, result.stderr[-2000:]
    assert "champion is now version 1 (was 2); previous_champion is now version 2" in result.stdout
    assert "next poll (every 5s)" in result.stdout and "POST http://127.0.0.1:8765/reload" in result.stdout
    assert aliases() == ("1", "2")

    history = langops(tmp_path, "history", "--limit", "2")

    assert history.returncode == 0, history.stderr[-2000:]
    lines = history.stdout.splitlines()
    assert lines[0] == f"promotion history of {MODEL}, newest first"
    assert lines[1].split() == ["when", "event", "from", "→", "to", "actor", "reason"]
    assert lines[2].split()[1:] == ["rollback", "2", "→", "1", "oncall-ana", "v2", "misroutes", "refunds"]
    assert lines[3].split()[1:] == ["promote", "1", "→", "2", "pipeline", "beats", "v1"]
    assert len(lines) == 4


def _dead_owner() -> dict[str, str]:
    """Owner tags naming a process that has exited."""
    import psutil

    from langops.tracking import OWNER_PID, OWNER_STARTED

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    return {**owner_tags(), OWNER_PID: str(gone.pid), OWNER_STARTED: f"{started:.2f}"}


@pytest.mark.unit
def test_runs_left_running_by_a_killed_process_are_closed_with_the_reason_by_the_next_command(registry):
    from mlflow import MlflowClient

    from langops import tracking

    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.tracking.experiment).experiment_id
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, mlflow; from langops.tracking import owner_tags\n"
         f"mlflow.set_tracking_uri({registry.tracking_uri()!r})\n"
         f"run = mlflow.start_run(experiment_id={experiment!r}, tags=owner_tags())\n"
         "print(run.info.run_id, flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    orphan = killed.stdout.strip()
    assert killed.returncode == -9 and client.get_run(orphan).info.status == "RUNNING", killed.stderr[-2000:]
    alive = client.create_run(experiment, tags=tracking.owner_tags()).info.run_id  # this process: still working
    unowned = client.create_run(experiment).info.run_id  # nothing says whose it is

    tracking._swept_stores.clear()  # as in a new command
    configure_mlflow(registry)

    closed = client.get_run(orphan)
    assert closed.info.status == "KILLED"
    assert "died without ending this run; what it was doing did not finish" in closed.data.tags[tracking.END_REASON]
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(unowned).info.status == "RUNNING"


@pytest.mark.unit
def test_a_promotion_whose_process_died_after_moving_the_champion_shows_in_history(registry):
    """The alias moved, then the process died before closing its record: history must show the move."""
    from mlflow import MlflowClient

    from langops import tracking

    promote(registry, "1")
    client = MlflowClient()
    promotions = client.get_experiment_by_name(f"{registry.tracking.experiment}-promotions")
    assert promotions is not None
    record = client.create_run(promotions.experiment_id, tags={
        "langops.event": "promote", "langops.model_name": MODEL, "langops.from_version": "1",
        "langops.to_version": "2", "langops.actor": "pipeline", "langops.reason": "gate passed", **_dead_owner()})
    client.set_registered_model_alias(MODEL, CHAMPION, "2")
    unfinished = client.create_run(promotions.experiment_id, tags={
        "langops.event": "promote", "langops.model_name": MODEL, "langops.from_version": "2",
        "langops.to_version": "3", "langops.actor": "pipeline", "langops.reason": "gate passed", **_dead_owner()})

    tracking._swept_stores.clear()
    configure_mlflow(registry)

    assert client.get_run(record.info.run_id).info.status == "FINISHED"
    assert client.get_run(unfinished.info.run_id).info.status == "KILLED"
    assert [(event.from_version, event.to_version) for event in read_history(registry, MODEL)] == [
        ("1", "2"), (None, "1")]


@pytest.mark.unit
def test_the_gate_reads_the_last_shadow_window_of_the_challenger_beside_the_current_champion(registry):
    from langops.pipeline import shadow_evidence
    from langops.promotions import record_event
    from langops.serving.rollout import ModelStats, Window

    promote(registry, "1")
    crashing = Window(champion=ModelStats(requests=400, errors=0, p50_ms=4.0, p99_ms=9.0),
                      challenger=ModelStats(requests=400, errors=40, p50_ms=5.0, p99_ms=12.0), compared=360, agreed=350)
    for version, window in (("2", crashing), ("3", Window())):
        record_event(registry, model_name=MODEL, event="shadow-stop", from_version="1", to_version=version,
                     reason="enough traffic seen", actor="alice", evidence={"server": {"window": window.to_dict()}})

    judged = shadow_evidence(registry, "2", "1")
    assert judged is not None and judged.requests == 400
    checks = {name: passed for name, passed, _ in judged.checks}
    assert checks["error_rate"] is False and checks["p99_ms"] is True and checks["agreement"] is True
    assert shadow_evidence(registry, "2", "3") is None  # shadowed beside version 1: says nothing about 3
    assert shadow_evidence(registry, "4", "1") is None  # never shadowed
    assert all(passed is None for _, passed, _ in shadow_evidence(registry, "3", "1").checks)  # an empty window
