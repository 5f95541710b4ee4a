"""The promotion gate's pure decision: significance on paired rows, guards, budgets and every edge case."""

from __future__ import annotations

import numpy as np
import pytest

from langops.config import PromoteConfig
from langops.tasks.promote import (
    ComparedRows,
    ModelEvidence,
    decide,
    paired_bootstrap_interval,
    with_approval,
)

pytestmark = pytest.mark.unit

LABELS = ("billing", "shipping", "technical")
POLICY = PromoteConfig(
    primary_metric="macro_f1",
    min_absolute_change=0.01,
    thresholds={"macro_f1": 0.5, "accuracy": 0.5},
    guards={"ece": 0.05, "recall_*": 0.15},
    max_latency_ms={"batch1_p50": 20.0, "batch32_p95": 500.0},
    max_size_mb=50.0,
    bootstrap_samples=1000,
)
FAST = {
    "latency_ms": {"batch1_p50": 5.0, "batch32_p95": 200.0},
    "size_mb": 20.0,
    "servable": True,
    "servable_detail": "loaded in a fresh process and answered 32 texts",
}


def gold(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(LABELS), rows)


def predictions(y_true: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on a chosen share of rows, wrong (next class) on the rest."""
    wrong = np.random.default_rng(seed).permutation(len(y_true))[: round((1 - accuracy) * len(y_true))]
    y_pred = y_true.copy()
    y_pred[wrong] = (y_pred[wrong] + 1) % len(LABELS)
    return y_pred


def evidence(version, y_true, y_pred, *, confidence=None, **extra) -> ModelEvidence:
    """Evidence from hard predictions, with ``confidence`` on the predicted class (default: calibrated)."""
    if confidence is None:
        confidence = max(float(np.mean(y_true == y_pred)), 0.34)
    probs = np.full((len(y_true), len(LABELS)), (1 - confidence) / (len(LABELS) - 1))
    probs[np.arange(len(y_true)), y_pred] = confidence
    return ModelEvidence.from_probabilities(version, LABELS, y_true, probs, **{**FAST, **extra})


def test_first_model_passing_every_absolute_check_becomes_champion():
    y = gold(300)
    decision = decide(evidence("1", y, predictions(y, 0.8, 1)), None, POLICY)
    assert decision.promote
    assert decision.reason == "no champion yet and every absolute check passes"
    assert not any(c.name.startswith(("beats_champion", "guard")) for c in decision.checks)


def test_first_model_below_a_threshold_is_refused_with_the_metric_named():
    y = gold(300)
    decision = decide(evidence("1", y, predictions(y, 0.4, 1)), None, POLICY)
    assert not decision.promote
    assert {c.name for c in decision.failed} == {"threshold:accuracy", "threshold:macro_f1"}


def test_clear_improvement_on_many_rows_is_promoted_with_its_interval():
    y = gold(3000)
    decision = decide(evidence("2", y, predictions(y, 0.90, 1)), evidence("1", y, predictions(y, 0.80, 2)), POLICY)
    assert decision.promote, decision.reason
    primary = next(c for c in decision.checks if c.name == "beats_champion:macro_f1")
    low, high = primary.interval
    assert 0.01 < low < primary.value - primary.reference < high


def test_higher_point_metric_is_not_promoted_when_the_interval_is_too_wide():
    y = gold(60)
    champion_pred = predictions(y, 0.80, 2)
    challenger_pred = champion_pred.copy()
    fixed = np.flatnonzero(champion_pred != y)[:2]  # the challenger gets two more rows right
    challenger_pred[fixed] = y[fixed]
    decision = decide(evidence("2", y, challenger_pred), evidence("1", y, champion_pred), POLICY)

    primary = next(c for c in decision.checks if c.name == "beats_champion:macro_f1")
    assert primary.value > primary.reference + POLICY.min_absolute_change  # better on points, beyond the margin
    assert primary.interval[0] < POLICY.min_absolute_change  # but not beyond noise
    assert not decision.promote and "interval" in decision.reason


def test_better_in_float_but_worse_after_int8_is_refused_because_the_gate_judges_what_ships():
    y = gold(2000)
    champion = evidence("1", y, predictions(y, 0.85, 2))
    torch_better = evidence("2", y, predictions(y, 0.92, 3))  # the uncompressed challenger
    int8_worse = evidence("2", y, predictions(y, 0.83, 4))  # the same challenger after quantisation
    assert decide(torch_better, champion, POLICY).promote
    decision = decide(int8_worse, champion, POLICY)
    assert not decision.promote
    assert decision.failed[0].name == "beats_champion:macro_f1"


def test_identical_predictions_are_a_tie_and_never_promote():
    y = gold(500)
    same = predictions(y, 0.8, 1)
    decision = decide(evidence("2", y, same), evidence("1", y, same), POLICY.model_copy(update={"min_absolute_change": 0.0}))
    assert not decision.promote and "tie" in decision.reason


def test_guard_metric_regression_blocks_an_otherwise_better_model():
    y = gold(3000)
    champion = evidence("1", y, predictions(y, 0.80, 2))
    overconfident = evidence("2", y, predictions(y, 0.90, 1), confidence=0.999)
    decision = decide(overconfident, champion, POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == ["guard:ece"]


def test_one_class_recall_collapsing_is_caught_by_the_per_class_guard():
    y = gold(3000)
    champion_pred = predictions(y, 0.70, 2)
    challenger_pred = y.copy()
    shipping = np.flatnonzero(y == 1)
    challenger_pred[shipping[: len(shipping) // 2]] = 0  # half of shipping now called billing
    decision = decide(evidence("2", y, challenger_pred), evidence("1", y, champion_pred), POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == ["guard:recall_shipping"]


def test_accuracy_as_primary_also_needs_mcnemar_to_reject():
    policy = POLICY.model_copy(update={"primary_metric": "accuracy", "min_absolute_change": 0.0})
    y = gold(3000)
    decision = decide(evidence("2", y, predictions(y, 0.90, 1)), evidence("1", y, predictions(y, 0.80, 2)), policy)
    mcnemar = next(c for c in decision.checks if c.name == "mcnemar:accuracy")
    assert mcnemar.passed and mcnemar.value < 1e-6 and decision.promote


def test_a_new_label_set_is_never_promoted_automatically_and_the_decision_says_how_to_ship_it():
    y = gold(300)
    old_labels = ("billing", "shipping", "refunds?", "account")
    champion = ModelEvidence(version="1", labels=old_labels)  # served other classes: not scored on these rows

    decision = decide(evidence("2", y, predictions(y, 0.95, 1)), champion, POLICY)

    assert not decision.promote
    (check,) = [c for c in decision.checks if not c.passed]
    assert check.name == "same_labels"
    assert "champion version 1 serves another label set: 1 new ('technical'); 2 gone ('account', 'refunds?')" in check.detail
    assert "`langops promote --force REASON`" in check.detail
    assert decide(evidence("2", y, predictions(y, 0.95, 1)), champion, POLICY, force_reason="new intents").promote


def test_champion_without_an_evaluation_is_an_explicit_failure():
    y = gold(300)
    decision = decide(evidence("2", y, predictions(y, 0.9, 1)), ModelEvidence(version="1"), POLICY)
    assert not decision.promote
    assert "champion version 1 has no evaluation" in decision.reason


def test_models_scored_on_different_rows_are_not_compared():
    y = gold(300)
    other = gold(300, seed=5)
    decision = decide(evidence("2", y, predictions(y, 0.9, 1)), evidence("1", other, predictions(other, 0.5, 2)), POLICY)
    assert not decision.promote and decision.failed[0].name == "same_rows"


def test_absent_metric_fails_its_check_instead_of_passing_silently():
    policy = POLICY.model_copy(update={"thresholds": {"weighted_f1": 0.5}})
    y = gold(300)
    decision = decide(evidence("1", y, predictions(y, 0.9, 1)), None, policy)
    assert not decision.promote and "weighted_f1 is absent" in decision.reason


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"latency_ms": {"batch1_p50": 25.0, "batch32_p95": 200.0}}, "budget:latency_ms:batch1_p50"),
        ({"latency_ms": {"batch1_p50": 5.0, "batch32_p95": 900.0}}, "budget:latency_ms:batch32_p95"),
        ({"latency_ms": {"batch1_p50": 5.0}}, "budget:latency_ms:batch32_p95"),
        ({"size_mb": 80.0}, "budget:size_mb"),
        ({"parity_passed": False}, "parity"),
        ({"servable": False, "servable_detail": "fresh process failed: no model.onnx"}, "servable"),
        ({"servable": None}, "servable"),
    ],
)
def test_budgets_and_parity_of_the_shipped_model_are_enforced(extra, check):
    y = gold(300)
    decision = decide(evidence("1", y, predictions(y, 0.9, 1), **extra), None, POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == [check]


def test_force_promotes_with_a_recorded_reason_and_refuses_a_blank_one():
    y = gold(300)
    worse = evidence("2", y, predictions(y, 0.6, 1))
    champion = evidence("1", y, predictions(y, 0.9, 2))
    decision = decide(worse, champion, POLICY, force_reason="hotfix for a legal label change")
    assert decision.promote and decision.forced
    assert decision.reason.startswith("forced (hotfix for a legal label change) despite:")
    assert decision.failed  # the failed checks stay on record
    with pytest.raises(ValueError, match="needs a reason"):
        decide(worse, champion, POLICY, force_reason="  ")


def test_bootstrap_interval_is_deterministic_and_centred_on_the_difference():
    y = gold(1000)
    ours, theirs = predictions(y, 0.9, 1), predictions(y, 0.8, 2)
    first = paired_bootstrap_interval("accuracy", y, ours, theirs, 3, samples=500, confidence=0.95)
    assert first == paired_bootstrap_interval("accuracy", y, ours, theirs, 3, samples=500, confidence=0.95)
    assert first[0] < 0.1 < first[1]


def test_decision_serialises_for_the_record():
    y = gold(300)
    decision = decide(evidence("1", y, predictions(y, 0.9, 1)), None, POLICY)
    record = decision.to_dict()
    assert record["promote"] is True and record["challenger_version"] == "1" and record["forced"] is False
    assert {c["name"] for c in record["checks"]} >= {"parity", "threshold:macro_f1", "budget:size_mb"}
    assert "| threshold:macro_f1 | pass |" in decision.to_markdown()


def test_a_length_slice_that_regresses_blocks_promotion_and_a_small_one_is_only_reported():
    y = gold(3000)
    lengths = np.where(np.arange(3000) < 2000, 40, 150)  # 2000 short texts, 1000 long ones
    lengths[:10] = 500  # a tiny slice of very long texts
    champion_pred = predictions(y, 0.80, 2)
    challenger_pred = y.copy()  # perfect on short texts ...
    long_rows = np.flatnonzero(lengths == 150)
    challenger_pred[long_rows] = champion_pred[long_rows]
    worse = long_rows[np.flatnonzero(champion_pred[long_rows] == y[long_rows])[:150]]
    challenger_pred[worse] = (y[worse] + 1) % 3  # ... but 15 points worse on long ones
    challenger_pred[:10] = (y[:10] + 1) % 3  # and wrong on every tiny-slice row

    decision = decide(evidence("2", y, challenger_pred, text_lengths=tuple(lengths)),
                      evidence("1", y, champion_pred), POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == ["slice:length_120_199"]
    tiny = next(c for c in decision.checks if c.name == "slice:length_200_up")
    assert tiny.passed and "reported, not gated" in tiny.detail


def test_a_reviewer_can_stop_a_passing_challenger_and_the_answer_is_recorded():
    y = gold(300)
    passing = decide(evidence("1", y, predictions(y, 0.9, 1)), None, POLICY)

    rejected = with_approval(passing, approved=False, reviewer="carol", comment="wait for the holiday freeze")
    assert not rejected.promote
    assert rejected.reason.startswith("rejected by carol: wait for the holiday freeze")
    assert rejected.failed[-1].name == "approval"
    assert rejected.to_dict()["approval"] == {"approved": False, "reviewer": "carol", "comment": "wait for the holiday freeze"}

    approved = with_approval(passing, approved=True, reviewer="carol")
    assert approved.promote and approved.checks[-1].passed and approved.reason == passing.reason


def _shadowed(**checks):
    """Shadow evidence whose checks are ``name=(passed, detail)``."""
    from langops.tasks.promote import ShadowEvidence

    return ShadowEvidence(record_id="f00dfeed" * 4, requests=400,
                          checks=tuple((name, passed, detail) for name, (passed, detail) in checks.items()))


def test_a_shadow_window_that_failed_live_blocks_a_challenger_the_test_split_favours():
    y = gold(3000)
    better, champion = evidence("2", y, predictions(y, 0.90, 1)), evidence("1", y, predictions(y, 0.80, 2))
    shadow = _shadowed(error_rate=(False, "error rate 4.00% (16 of 400 requests failed or timed out) exceeds 1.00%"),
                       p99_ms=(True, "p99_ms 80 ms within 500 ms"),
                       agreement=(False, "agreement with the champion 81.00% on 400 texts below 90.00%"),
                       feedback_accuracy=(None, "feedback accuracy not judged: 3 champion and 4 challenger labels"))

    decision = decide(better, champion, POLICY, shadow=shadow)

    assert not decision.promote
    assert [c.name for c in decision.failed] == ["shadow:error_rate"]
    assert "shadow record f00dfeed, 400 mirrored requests" in decision.reason
    names = {c.name: c for c in decision.checks}
    assert names["shadow:p99_ms"].passed and "shadow:feedback_accuracy" not in names  # not judged: left out
    assert names["shadow:agreement"].passed and "reported, not gated" in names["shadow:agreement"].detail
    assert decide(better, champion, POLICY, shadow=_shadowed(p99_ms=(True, "p99_ms 80 ms within 500 ms"))).promote


def test_a_shadow_window_too_small_to_judge_is_reported_not_gated():
    y = gold(3000)
    shadow = _shadowed(error_rate=(None, "0 errors in 12 requests; judged at 200"))
    decision = decide(evidence("2", y, predictions(y, 0.90, 1)), evidence("1", y, predictions(y, 0.80, 2)), POLICY,
                      shadow=shadow)
    assert decision.promote
    (note,) = [c for c in decision.checks if c.name.startswith("shadow")]
    assert note.name == "shadow" and "too few to judge anything" in note.detail


# --------------------------------------------------------------- rows neither model trained on


def test_rows_the_champion_trained_on_are_removed_before_the_two_are_compared():
    y = gold(1000)
    trained_on = np.arange(1000) < 600  # the grown data moved 600 of the champion's training texts to test
    champion_pred = predictions(y, 0.80, 2)
    champion_pred[trained_on] = y[trained_on]  # it remembers them
    challenger_pred = predictions(y, 0.90, 1)
    compared = ComparedRows(keep=tuple(~trained_on), removed={"champion version 1's train split": 600})

    on_every_row = decide(evidence("2", y, challenger_pred), evidence("1", y, champion_pred), POLICY)
    on_unseen_rows = decide(evidence("2", y, challenger_pred), evidence("1", y, champion_pred), POLICY, compared=compared)

    assert not on_every_row.promote  # the champion's memory wins on the rows it trained on
    assert on_unseen_rows.promote
    primary = next(c for c in on_unseen_rows.checks if c.name == "beats_champion:macro_f1")
    assert primary.reference < 0.85  # the champion's score on texts it never saw
    assert on_unseen_rows.compared_rows == {"test_rows": 1000, "compared": 400, "without_manifest": [],
                                            "removed": {"champion version 1's train split": 600}}
    record = next(c for c in on_unseen_rows.checks if c.name == "compared_rows")
    assert record.passed and ("400 of 1000 test rows (removed as trained on: 600 in champion version 1's train split)"
                              in record.detail)
    assert "compared on: 400 of 1000 test rows (removed as trained on: 600" in on_unseen_rows.to_markdown()


def test_too_few_unseen_rows_is_a_refusal_with_the_fix_and_forcing_still_records_the_rows():
    y = gold(1000)
    compared = ComparedRows(keep=tuple(np.arange(1000) < 60), removed={"champion version 1's train split": 940})
    better, champion = evidence("2", y, predictions(y, 0.95, 1)), evidence("1", y, predictions(y, 0.80, 2))

    decision = decide(better, champion, POLICY, compared=compared)

    assert not decision.promote
    assert [c.name for c in decision.failed] == ["compared_rows"]
    assert "fewer than promote.min_compared_rows (100), too few to judge" in decision.reason
    assert "langops promote --force REASON" in decision.reason
    assert not any(c.name.startswith("beats_champion") for c in decision.checks)
    forced = decide(better, champion, POLICY, compared=compared, force_reason="new labels, reviewed by hand")
    assert forced.promote and forced.compared_rows["compared"] == 60


def test_a_champion_without_a_manifest_is_compared_on_every_row_and_the_record_says_so():
    y = gold(500)
    compared = ComparedRows(keep=(True,) * 500, without_manifest=("1",))
    decision = decide(evidence("2", y, predictions(y, 0.95, 1)), evidence("1", y, predictions(y, 0.80, 2)), POLICY,
                      compared=compared)
    assert decision.promote
    record = next(c for c in decision.checks if c.name == "compared_rows")
    assert "version 1 has no training manifest" in record.detail


def test_the_recall_guard_of_a_class_with_few_compared_rows_is_reported_not_gated():
    y = gold(3000)
    y[y == 2] = 0
    y[:40] = 2  # a thin class: 40 test rows
    champion_pred = predictions(y, 0.85, 2)
    challenger_pred = predictions(y, 0.95, 1)
    thin = np.flatnonzero(y == 2)
    champion_pred[thin], challenger_pred[thin] = 2, 0  # the challenger misses every row of the thin class

    decision = decide(evidence("2", y, challenger_pred), evidence("1", y, champion_pred), POLICY)
    guard = next(c for c in decision.checks if c.name == "guard:recall_technical")
    assert guard.passed and "on 40 rows of the class (reported, not gated" in guard.detail
    strict = POLICY.model_copy(update={"min_class_rows": 40})
    assert "guard:recall_technical" in [c.name for c in decide(evidence("2", y, challenger_pred),
                                                                 evidence("1", y, champion_pred), strict).failed]


# --------------------------------------------------------------- the floor: the TF-IDF baseline


def test_a_challenger_that_does_not_beat_the_baseline_beyond_noise_is_refused_with_both_figures():
    y = gold(1000)
    baseline = evidence("TF-IDF + logistic regression", y, predictions(y, 0.85, 3))
    policy = POLICY.model_copy(update={"thresholds": {**POLICY.thresholds, "baseline_margin": 0.005}})

    level = decide(evidence("1", y, predictions(y, 0.86, 1)), None, policy, baseline=baseline)
    ahead = decide(evidence("1", y, predictions(y, 0.95, 1)), None, policy, baseline=baseline)

    assert not level.promote and [c.name for c in level.failed] == ["beats_baseline:macro_f1"]
    assert "0.8595 vs TF-IDF + logistic regression 0.8494" in level.reason and "lower bound needs >= +0.0050" in level.reason
    assert "train.method: full" in level.reason
    assert ahead.promote
    floor = next(c for c in ahead.checks if c.name == "beats_baseline:macro_f1")
    assert floor.value > floor.reference and floor.interval[0] >= 0.005


def test_without_a_margin_there_is_no_floor_and_without_a_baseline_a_margin_refuses():
    y = gold(300)
    no_floor = POLICY.model_copy(update={"thresholds": {"macro_f1": 0.5}})
    assert not any(c.name.startswith("beats_baseline") for c in decide(evidence("1", y, y), None, no_floor).checks)
    floor = POLICY.model_copy(update={"thresholds": {"baseline_margin": 0.0}})
    missing = decide(evidence("1", y, y), None, floor)
    assert not missing.promote and "run the baseline step" in missing.reason
    other_rows = decide(evidence("1", y, y), None, floor, baseline=evidence("baseline", gold(300, seed=9), y))
    assert "scored on other test rows" in other_rows.reason


def test_a_negative_baseline_margin_still_needs_the_model_ahead_and_says_so():
    y = gold(1000)
    baseline = evidence("TF-IDF + logistic regression", y, predictions(y, 0.90, 3))
    tie_allowed = POLICY.model_copy(update={"thresholds": {**POLICY.thresholds, "baseline_margin": -1.0}})
    behind = decide(evidence("1", y, predictions(y, 0.80, 1)), None, tie_allowed, baseline=baseline)
    assert not behind.promote and "lower bound needs >= -1.0000, and a point difference above 0" in behind.reason
