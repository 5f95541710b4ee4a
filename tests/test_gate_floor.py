"""The gate's floor on real steps: a model that a linear model on n-grams matches is refused, and says so."""

from __future__ import annotations

import pytest
from pipeline_helpers import tiny_project_params, write_params

from langops.config import load_params
from langops.stages import STAGES, run_stage


@pytest.mark.model
def test_a_model_trained_for_one_step_is_refused_for_not_beating_the_baseline_with_both_figures(
    tmp_path, tiny_base_model
):
    """The floor on real steps: the baseline step, a one-step model compressed and registered, and the gate."""
    write_params(tmp_path, tiny_project_params(
        tmp_path, tiny_base_model,
        train={"max_steps": 1, "min_steps": 0, "warmup_steps": 0, "collapse_guard": {"action": "warn"}},
        compress={"min_label_agreement": 0.0, "max_fp32_logit_diff": 0.01, "latency_runs": 5,
                  "distill": {"enabled": False}},
        promote={"thresholds": {"macro_f1": 0.0, "accuracy": 0.0, "baseline_margin": 0.005}},
    ))
    params = load_params(tmp_path / "params.yaml")
    results = {stage.name: run_stage(stage.name, params) for stage in STAGES if stage.name != "deploy"}

    assert results["train"].result.steps == 1
    decision = results["promote"]
    assert not decision.promote and decision.champion_version is None  # no champion: the floor alone refuses
    (floor,) = decision.failed
    assert floor.name == "beats_baseline:macro_f1"
    model_f1, baseline_f1 = floor.value, floor.reference
    assert baseline_f1 == pytest.approx(results["baseline"].metrics["test"]["baseline"]["macro_f1"])
    assert model_f1 < baseline_f1
    assert floor.detail.startswith(f"{model_f1:.4f} vs TF-IDF + logistic regression {baseline_f1:.4f}: difference {model_f1 - baseline_f1:+.4f}")
    assert "does not beat a linear model on word and character n-grams" in floor.detail
    assert "beats_baseline:macro_f1" in decision.reason and f"{baseline_f1:.4f}" in decision.reason
