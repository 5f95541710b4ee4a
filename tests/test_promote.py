"""The promotion gate's pure decision: every case spelled out."""

from __future__ import annotations

import pytest

from langops.config import PromoteConfig
from langops.tasks.promote import ModelEvidence, decide

POLICY = PromoteConfig(
    primary_metric="macro_f1", min_improvement=0.01, thresholds={"macro_f1": 0.7, "accuracy": 0.7},
    max_latency_ms=20.0, max_size_mb=50.0,
)


def evidence(version="2", macro_f1=0.85, accuracy=0.86, latency_ms=5.0, size_mb=20.0, parity=True) -> ModelEvidence:
    metrics = {k: v for k, v in {"macro_f1": macro_f1, "accuracy": accuracy}.items() if v is not None}
    return ModelEvidence(version=version, metrics=metrics, latency_ms=latency_ms, size_mb=size_mb, parity_passed=parity)


def test_first_model_passing_every_threshold_becomes_champion():
    decision = decide(evidence(), None, POLICY)
    assert decision.promote
    assert decision.champion_version is None
    assert "no champion yet" in decision.reason
    assert not any(c.name.startswith("beats_champion") for c in decision.checks)


def test_first_model_below_a_threshold_is_not_promoted_and_the_reason_names_the_metric():
    decision = decide(evidence(accuracy=0.5), None, POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == ["threshold:accuracy"]
    assert "0.5000 >= 0.7000" in decision.reason


def test_challenger_clearly_better_than_champion_is_promoted():
    decision = decide(evidence(macro_f1=0.90), evidence(version="1", macro_f1=0.85), POLICY)
    assert decision.promote
    assert decision.champion_version == "1"
    assert "beats champion version 1" in decision.reason


def test_improvement_smaller_than_the_margin_is_not_promoted():
    decision = decide(evidence(macro_f1=0.855), evidence(version="1", macro_f1=0.85), POLICY)
    assert not decision.promote
    assert "+0.0050 (needs >= +0.0100)" in decision.reason


def test_worse_challenger_leaves_champion():
    decision = decide(evidence(macro_f1=0.80), evidence(version="1", macro_f1=0.85), POLICY)
    assert not decision.promote and decision.failed[0].name == "beats_champion:macro_f1"


def test_a_tie_never_replaces_the_champion_even_with_zero_margin():
    policy = POLICY.model_copy(update={"min_improvement": 0.0})
    decision = decide(evidence(macro_f1=0.85), evidence(version="1", macro_f1=0.85), policy)
    assert not decision.promote
    assert "tie" in decision.reason


def test_absent_metric_fails_its_check_instead_of_passing_silently():
    decision = decide(evidence(accuracy=None), None, POLICY)
    assert not decision.promote
    assert "accuracy is absent" in decision.reason


def test_champion_without_the_primary_metric_is_an_explicit_failure():
    champion = ModelEvidence(version="1", metrics={"accuracy": 0.9})
    decision = decide(evidence(), champion, POLICY)
    assert not decision.promote
    assert "champion version 1 has no macro_f1" in decision.reason


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [("latency_ms", 25.0, "budget:latency_ms"), ("size_mb", 80.0, "budget:size_mb"), ("latency_ms", None, "budget:latency_ms")],
)
def test_budgets_on_the_shipped_model_are_enforced(field, value, check):
    decision = decide(evidence(**{field: value}), None, POLICY)
    assert not decision.promote
    assert [c.name for c in decision.failed] == [check]


def test_failed_parity_blocks_promotion():
    decision = decide(evidence(parity=False), None, POLICY)
    assert not decision.promote and decision.failed[0].name == "parity"


def test_every_failed_check_is_listed_in_one_reason():
    decision = decide(evidence(macro_f1=0.5, accuracy=0.5, latency_ms=99.0), evidence(version="1"), POLICY)
    names = {c.name for c in decision.failed}
    assert names == {"threshold:macro_f1", "threshold:accuracy", "budget:latency_ms", "beats_champion:macro_f1"}
    for name in names:
        assert name in decision.reason


def test_decision_serialises_for_the_record():
    decision = decide(evidence(), None, POLICY)
    record = decision.to_dict()
    assert record["promote"] is True and record["challenger_version"] == "2"
    assert {c["name"] for c in record["checks"]} >= {"parity", "threshold:macro_f1"}
    assert "| threshold:macro_f1 | pass |" in decision.to_markdown()
