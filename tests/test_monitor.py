"""The monitor's decisions: which event a window asks for, the cool-down, and the feedback count."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from langops.config import parse_params
from langops.monitor import (
    EVENT_DRIFT,
    EVENT_FEEDBACK,
    count_feedback_since,
    decide_event,
    prediction_log_dir,
)

pytestmark = pytest.mark.unit

NOW = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)


def _decide(**changes):
    values = {"verdict": "ok", "accuracy_drops": {}, "accuracy_margin": 0.05, "feedback_labels": 0,
              "retrain_feedback_rows": 100, "last_emitted": None, "now": NOW, "cooldown_hours": 24.0}
    return decide_event(**{**values, **changes})


def test_an_ok_window_with_little_feedback_emits_nothing_and_says_why():
    decision = _decide(feedback_labels=99)
    assert decision.event is None and decision.suppressed is None
    assert "99 feedback labels" in decision.reasons[0] and "nothing emitted" in decision.reasons[0]


def test_drift_emits_the_drift_event():
    decision = _decide(verdict="drift")
    assert decision.event == EVENT_DRIFT
    assert decision.reasons == ("the verdict is drift",)


def test_an_accuracy_drop_past_the_margin_emits_drift_even_when_the_verdict_is_ok():
    assert _decide(accuracy_drops={"estimated_accuracy": 0.051}).event == EVENT_DRIFT
    assert _decide(accuracy_drops={"feedback_accuracy": 0.2}).event == EVENT_DRIFT
    assert _decide(accuracy_drops={"estimated_accuracy": 0.05}).event is None  # at the margin: not past it


def test_enough_feedback_emits_the_feedback_event_and_drift_wins_over_it():
    assert _decide(feedback_labels=100).event == EVENT_FEEDBACK
    both = _decide(verdict="drift", feedback_labels=150)
    assert both.event == EVENT_DRIFT
    assert any("150 feedback labels" in reason for reason in both.reasons)


def test_no_verdict_emits_nothing_whatever_else_holds():
    decision = _decide(verdict="no_verdict", accuracy_drops={"estimated_accuracy": 0.5}, feedback_labels=10_000)
    assert decision.event is None and decision.suppressed is None
    assert "no verdict" in decision.reasons[0]


def test_the_cool_down_holds_an_event_and_says_until_when():
    held = _decide(verdict="drift", last_emitted=NOW - timedelta(hours=23))
    assert held.event is None
    assert held.suppressed == EVENT_DRIFT
    assert held.next_allowed == (NOW + timedelta(hours=1)).isoformat()
    assert "cool-down" in held.reasons[-1]
    assert _decide(verdict="drift", last_emitted=NOW - timedelta(hours=24)).event == EVENT_DRIFT
    assert _decide(verdict="drift", last_emitted=NOW - timedelta(minutes=1), cooldown_hours=0).event == EVENT_DRIFT


def test_feedback_is_counted_once_per_text_and_only_after_the_last_training():
    feedback = pd.DataFrame({
        "request_id": ["a-0", "a-0", "b-0", "c-0", "d-0"],
        "label": ["x", "y", "x", "x", "x"],
        "time": ["2025-06-01T10:00:00+00:00", "2025-06-01T11:00:00+00:00", "2025-06-01T09:00:00+00:00",
                 "2025-05-31T00:00:00+00:00", "not a time"],
    })
    assert count_feedback_since(feedback, "2025-06-01T08:00:00+00:00") == 2
    assert count_feedback_since(feedback, "2025-01-01T00:00:00+00:00") == 3
    assert count_feedback_since(feedback.iloc[:0], "2025-01-01T00:00:00+00:00") == 0


def test_the_log_folder_defaults_to_the_deployed_servers(tmp_path):
    params = parse_params({"project": {"state_dir": ".langops"}}).resolved(tmp_path)
    assert prediction_log_dir(params) == tmp_path / ".langops" / "server" / "predictions"
    chosen = parse_params({"monitor": {"log_dir": "logs/served"}}).resolved(tmp_path)
    assert prediction_log_dir(chosen) == tmp_path / "logs" / "served"


def drifted_window(tmp_path):
    """A project with a 6-hour cool-down, its model, and a judged window that asks for the drift event."""
    from langops.monitor import MonitoredModel, WindowCheck

    params = parse_params({"project": {"state_dir": str(tmp_path / ".langops")},
                           "monitor": {"cooldown_hours": 6.0}}).resolved(tmp_path)
    model = MonitoredModel("langops-classifier", "1", tmp_path, last_registered=NOW.isoformat())
    (tmp_path / "report").mkdir()
    checked = WindowCheck(verdict="drift", reasons=("embeddings moved",), rows=300, report_dir=tmp_path / "report",
                          metrics={"rows": 300.0}, accuracy_drops={}, accuracy_margin=0.05, feedback_labels=0,
                          skipped_lines=0, markdown="")
    return params, model, checked


def test_two_monitor_runs_at_once_emit_one_event_the_other_is_held_by_the_cool_down(tmp_path):
    """The cool-down is read, judged and written under one lock: without it both runs read "no event yet"."""
    import threading
    import time

    from langops.monitor import decide_and_emit, log_report

    params, model, checked = drifted_window(tmp_path)
    run_ids = [log_report(params, model, checked) for _ in range(2)]
    emitted: list[str] = []

    def send(event):
        time.sleep(0.5)  # a slow event API: the window in which an unlocked second run would slip through
        emitted.append(event.event)
        return True

    results: dict[int, tuple] = {}

    def monitor_run(index: int) -> None:
        results[index] = decide_and_emit(params, model, checked, run_ids[index],
                                         now=datetime.now(timezone.utc), send=send)

    threads = [threading.Thread(target=monitor_run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert emitted == [EVENT_DRIFT]
    decisions = sorted((results[i][0] for i in range(2)), key=lambda d: d.event is None)
    assert decisions[0].event == EVENT_DRIFT and decisions[1].event is None
    assert decisions[1].suppressed == EVENT_DRIFT and "cool-down" in decisions[1].reasons[-1]


def test_an_event_prefect_did_not_confirm_stays_pending_and_the_next_run_sends_it_again_under_its_id(tmp_path):
    from langops.monitor import EMISSION_TAG, _client, decide_and_emit, log_report

    params, model, checked = drifted_window(tmp_path)
    sent: list = []

    def send_unconfirmed(event):  # the event left, or not; the process died before Prefect said it stored it
        sent.append(event)
        return False

    first_run = log_report(params, model, checked)
    decision, event_id = decide_and_emit(params, model, checked, first_run, now=NOW, send=send_unconfirmed)
    assert decision.event == EVENT_DRIFT and event_id == sent[0].id
    assert _client(params).get_run(first_run).data.tags[EMISSION_TAG] == "pending"

    def send(event):
        sent.append(event)
        return True

    second_run = log_report(params, model, checked)
    decision, event_id = decide_and_emit(params, model, checked, second_run, now=NOW, send=send)

    assert [event.id for event in sent] == [sent[0].id, sent[0].id]  # the same event, under the same id
    assert sent[1] == sent[0]
    assert decision.event is None and decision.suppressed == EVENT_DRIFT and event_id is None  # the cool-down holds
    assert _client(params).get_run(first_run).data.tags[EMISSION_TAG] == "sent"
