"""The canary's pure parts: sticky, monotonic routing; the window's accounting; the verdict and each of its reasons."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from langops.config import ConfigError, RolloutConfig, parse_params
from langops.rollouts import Rollout
from langops.serving.rollout import (
    BUCKETS,
    ModelStats,
    RolloutWindow,
    Window,
    judge_canary,
    route_bucket,
    route_key,
    routes_to_challenger,
)

pytestmark = pytest.mark.unit

LIMITS = RolloutConfig(min_requests=100, min_comparisons=50, min_feedback=30, max_error_rate=0.01, max_p50_ms=100,
                       max_p99_ms=500, max_low_confidence_increase=0.1, min_agreement=0.9, max_accuracy_drop=0.02)
HEALTHY = ModelStats(requests=200, errors=0, texts=200, p50_ms=10.0, p99_ms=40.0, low_confidence_rate=0.1)
CHAMPION = ModelStats(requests=800, errors=0, texts=800, p50_ms=9.0, p99_ms=35.0, low_confidence_rate=0.08)


def window(challenger: ModelStats = HEALTHY, champion: ModelStats = CHAMPION, **overrides) -> Window:
    values = {"champion": champion, "challenger": challenger, "compared": 200, "agreed": 196}
    return Window(**{**values, **overrides})


def failed(verdict) -> list[str]:
    return [check.name for check in verdict.checks if check.passed is False]


# ---- routing


@given(st.text(max_size=200), st.floats(0, 100), st.floats(0, 100))
def test_stepping_up_keeps_everyone_already_on_the_challenger(key, a, b):
    low, high = sorted((a, b))
    if routes_to_challenger(key, low):
        assert routes_to_challenger(key, high)


@given(st.text(max_size=200))
def test_a_key_always_lands_in_the_same_bucket_and_the_ends_are_all_or_nothing(key):
    assert 0 <= route_bucket(key) < BUCKETS
    assert route_bucket(key) == route_bucket(key)
    assert not routes_to_challenger(key, 0)
    assert routes_to_challenger(key, 100)


def test_the_share_of_keys_routed_matches_the_percent():
    keys = [f"caller-{index}" for index in range(20_000)]
    for percent in (5, 25, 50):
        share = sum(routes_to_challenger(key, percent) for key in keys) / len(keys) * 100
        assert abs(share - percent) < 1.5


def test_a_route_header_wins_over_the_text_and_the_text_is_the_key_without_it():
    assert route_key("alice", ["a"]) == route_key("alice", ["b"])
    assert route_key(None, ["a"]) != route_key(None, ["b"])
    assert route_key(None, ["a"]) != route_key("a", ["x"])  # a header never collides with a text


# ---- the verdict


def test_a_healthy_challenger_with_a_full_window_passes_every_check():
    verdict = judge_canary(window(), LIMITS)
    assert verdict.outcome == "pass"
    assert failed(verdict) == []


def test_too_few_requests_waits_without_judging_latency():
    young = ModelStats(requests=20, texts=20, p50_ms=900.0, p99_ms=2000.0, low_confidence_rate=0.1)
    verdict = judge_canary(window(young, compared=20, agreed=20), LIMITS)
    assert verdict.outcome == "wait"
    assert {check.name: check.passed for check in verdict.checks}["p99_ms"] is None


def test_errors_beyond_the_windows_whole_budget_fail_before_the_window_fills():
    crashing = ModelStats(requests=5, errors=2, texts=3, p50_ms=5.0, p99_ms=5.0, low_confidence_rate=0.0)
    verdict = judge_canary(window(crashing, compared=0, agreed=0), LIMITS)
    assert verdict.outcome == "fail"
    assert failed(verdict) == ["error_rate"]
    assert "2 of 5 requests failed" in verdict.reasons[0]


def test_an_error_rate_within_the_limit_passes_but_above_it_fails():
    assert judge_canary(window(ModelStats(**{**HEALTHY.__dict__, "errors": 2})), LIMITS).outcome == "pass"
    assert failed(judge_canary(window(ModelStats(**{**HEALTHY.__dict__, "errors": 3})), LIMITS)) == ["error_rate"]


@pytest.mark.parametrize(("field", "value", "check"), [("p50_ms", 150.0, "p50_ms"), ("p99_ms", 800.0, "p99_ms")])
def test_a_slow_challenger_fails_on_its_latency(field, value, check):
    slow = ModelStats(**{**HEALTHY.__dict__, field: value})
    verdict = judge_canary(window(slow), LIMITS)
    assert verdict.outcome == "fail"
    assert failed(verdict) == [check]


def test_the_latency_ratio_to_the_champion_is_checked_only_when_set():
    slower = ModelStats(**{**HEALTHY.__dict__, "p99_ms": 140.0})  # 4x the champion's, under 500 ms
    assert judge_canary(window(slower), LIMITS).outcome == "pass"
    verdict = judge_canary(window(slower), LIMITS.model_copy(update={"max_p99_ratio": 2.0}))
    assert failed(verdict) == ["p99_ratio"]


def test_more_low_confidence_than_the_champion_fails():
    unsure = ModelStats(**{**HEALTHY.__dict__, "low_confidence_rate": 0.3})
    assert failed(judge_canary(window(unsure), LIMITS)) == ["low_confidence_increase"]


def test_disagreeing_with_the_champion_fails_naming_the_classes():
    verdict = judge_canary(window(compared=200, agreed=100, disagreements={"billing": 90, "other": 10}), LIMITS)
    assert failed(verdict) == ["agreement"]
    assert "50.00%" in verdict.reasons[0] and "billing" in verdict.reasons[0]


def test_agreement_on_too_few_texts_is_not_judged():
    verdict = judge_canary(window(compared=10, agreed=0), LIMITS)
    assert verdict.outcome == "pass"
    assert "10 of 50 texts" in next(check.detail for check in verdict.checks if check.name == "agreement")


def test_feedback_accuracy_is_judged_once_both_models_have_enough_labels():
    def labelled(stats, n, correct):
        return ModelStats(**{**stats.__dict__, "feedback": n, "feedback_correct": correct})

    worse = judge_canary(window(labelled(HEALTHY, 40, 28), labelled(CHAMPION, 40, 36)), LIMITS)
    assert failed(worse) == ["feedback_accuracy"]
    as_good = judge_canary(window(labelled(HEALTHY, 40, 36), labelled(CHAMPION, 40, 36)), LIMITS)
    assert as_good.outcome == "pass"
    too_few = judge_canary(window(labelled(HEALTHY, 10, 0), labelled(CHAMPION, 40, 36)), LIMITS)
    assert too_few.outcome == "pass"
    assert "10 challenger labels" in next(c.detail for c in too_few.checks if c.name == "feedback_accuracy")


def test_every_failed_check_is_listed():
    bad = ModelStats(requests=200, errors=50, texts=150, p50_ms=300.0, p99_ms=900.0, low_confidence_rate=0.9)
    verdict = judge_canary(window(bad, compared=150, agreed=10), LIMITS)
    assert failed(verdict) == ["error_rate", "p50_ms", "p99_ms", "low_confidence_increase", "agreement"]
    assert len(verdict.reasons) == 5


# ---- the window


def test_the_window_counts_both_models_and_joins_feedback_to_each_models_label():
    live = RolloutWindow(low_confidence=0.5)
    live.record_answers("champion", latency_ms=10, labels=["a", "b"], confidences=[0.9, 0.4], request_id="r1")
    live.record_answers("challenger", latency_ms=30, labels=["a", "a"], confidences=[0.8, 0.7], request_id="r1")
    live.record_comparison(["a", "b"], ["a", "a"], [0.9, 0.4], [0.8, 0.7])
    live.record_error("challenger", latency_ms=1000)
    live.record_feedback("r1-0", "a")
    live.record_feedback("r1-1", "b")
    live.record_feedback("unknown-0", "a")  # a text no model of this window scored
    seen = live.snapshot()
    assert (seen.champion.requests, seen.challenger.requests, seen.challenger.errors) == (1, 2, 1)
    assert seen.champion.low_confidence_rate == 0.5 and seen.challenger.low_confidence_rate == 0.0
    assert (seen.compared, seen.agreed, seen.disagreements) == (2, 1, {"b": 1})
    assert seen.confidence_shift == pytest.approx(0.1)
    assert (seen.champion.feedback, seen.champion.accuracy) == (2, 1.0)
    assert (seen.challenger.feedback, seen.challenger.accuracy) == (2, 0.5)


def test_feedback_on_a_text_either_model_trained_on_is_left_out_of_the_accuracy_comparison():
    live = RolloutWindow(low_confidence=0.5)
    trained_on = [True, False, False]  # the champion learnt the first text: it would win it on memory
    live.record_answers("champion", latency_ms=10, labels=["a", "b", "b"], confidences=[0.9] * 3, request_id="r1",
                        trained_on=trained_on)
    live.record_answers("challenger", latency_ms=10, labels=["b", "b", "a"], confidences=[0.9] * 3, request_id="r1",
                        trained_on=trained_on)
    for index, label in enumerate(["a", "b", "a"]):
        live.record_feedback(f"r1-{index}", label)

    seen = live.snapshot()
    assert (seen.champion.feedback, seen.challenger.feedback) == (2, 2)
    assert (seen.champion.accuracy, seen.challenger.accuracy) == (0.5, 1.0)
    assert seen.trained_on == 1 and Window.from_dict(seen.to_dict()).trained_on == 1
    verdict = judge_canary(seen, LIMITS.model_copy(update={"min_feedback": 2}))
    feedback = next(check for check in verdict.checks if check.name == "feedback_accuracy")
    assert "(1 texts a model trained on left out)" in feedback.detail


def test_a_request_of_one_text_can_be_named_by_its_own_id_in_feedback():
    live = RolloutWindow(low_confidence=0.5)
    live.record_answers("challenger", latency_ms=1, labels=["a"], confidences=[0.9], request_id="order-7")
    live.record_feedback("order-7", "b")
    assert live.snapshot().challenger.accuracy == 0.0


# ---- state and params


def test_the_rollout_tag_round_trips():
    rollout = Rollout(mode="canary", version="3", champion_version="2", steps=(5.0, 50.0), step=1,
                      started_at="t0", step_started_at="t1", rollout_id="abc")
    assert Rollout.from_tag(rollout.to_tag()) == rollout
    assert rollout.percent == 50.0 and rollout.last_step
    with pytest.raises(ValueError, match="unreadable"):
        Rollout.from_tag('{"mode": "canary"}')


@pytest.mark.parametrize(("steps", "message"), [([5, 5, 50], "must increase"), ([0, 50], r"percent in \(0, 100\]"),
                                                ([50, 150], r"percent in \(0, 100\]"), ([], "at least 1")])
def test_canary_steps_must_be_increasing_percents(steps, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"deploy": {"rollout": {"canary_steps": steps}}})


def test_a_bad_threshold_is_refused_with_its_key_named():
    with pytest.raises(ConfigError, match="deploy.rollout.min_agreement"):
        parse_params({"deploy": {"rollout": {"min_agreement": 1.5}}})


# ---- the fleet's window


def _worker(store: str, name: str, rollout: Rollout):
    """One server worker's rollout controller on the fleet's store, following ``rollout`` (no registry)."""
    from langops.serving.fleet_windows import FleetWindows
    from langops.serving.metrics import ServerMetrics
    from langops.serving.rollout import RolloutController

    fleet = FleetWindows(store, judge_every_s=60.0, worker=name)
    classifier = SimpleNamespace(labels=["billing", "shipping"], max_length=16)
    challenger = SimpleNamespace(classifier=classifier, name="langops-classifier", version=rollout.version)
    controller = RolloutController(LIMITS, champion=lambda: None, load=lambda version, threads: challenger, actions=None,
                                   metrics=ServerMetrics(), num_threads=1, max_batch_size=8, max_batch_tokens=512,
                                   max_wait_ms=1.0, max_queue=8, fleet=fleet)
    controller.rollout = rollout
    return controller


def test_every_worker_judges_the_fleets_window_and_feedback_counts_once_where_the_answer_was_given(tmp_path):
    from langops.prediction_records import Feedback
    from langops.serving.prediction_log import FeedbackLog

    store = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    rollout = Rollout(mode="canary", version="3", champion_version="2", steps=(5.0, 50.0), step=0,
                      started_at="t0", step_started_at="t0", rollout_id="r-1")
    here, there = _worker(store, "host-a:1", rollout), _worker(store, "host-b:2", rollout)
    for worker in (here, there):
        assert worker.judge_once().outcome == "wait"  # nothing measured yet; the feedback tail starts here
    for index in range(60):  # each worker answers 60 of the 120 challenger requests the step needs
        for worker, prefix in ((here, "a"), (there, "b")):
            worker.window.record_answers("challenger", latency_ms=5.0, labels=["billing"], confidences=[0.9],
                                         request_id=f"{prefix}{index}")
            worker.window.record_answers("champion", latency_ms=5.0, labels=["billing"], confidences=[0.9],
                                         request_id=None)
    alone = here.window.snapshot()
    assert alone.challenger.requests == 60 and judge_canary(alone, LIMITS).outcome == "wait"

    labels = FeedbackLog.in_store(store)  # what /feedback of any replica writes
    try:
        assert labels.record([Feedback("a0-0", "billing"), Feedback("b1-0", "shipping")])
    finally:
        labels.close()
    there.judge_once()
    verdict = here.judge_once()  # with the other worker's counts, written just before
    fleet = here.window.snapshot(here._fleet_others)
    assert fleet.challenger.requests == 120 and fleet.champion.requests == 120
    assert (fleet.challenger.feedback, fleet.challenger.feedback_correct) == (2, 1)  # each label once
    assert verdict.outcome == "pass"  # where each worker alone would still wait for evidence
    assert there.judge_once() is not None
    assert there.window.snapshot(there._fleet_others).challenger.requests == 120  # the same window there

    stepped = Rollout(mode="canary", version="3", champion_version="2", steps=(5.0, 50.0), step=1,
                      started_at="t0", step_started_at="t1", rollout_id="r-1")
    here.apply(stepped)  # a new step: a new window, and the other worker's counts of the old step are not its
    here.judge_once()
    assert here.window.snapshot(here._fleet_others).challenger.requests == 0
