"""The distilled student: fewer layers taken from the fine-tuned model, trained on its logits, shipped in
its place and judged by the gate like any model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pipeline_helpers import tiny_project_params, write_params
from transformers import AutoModelForSequenceClassification

from langops.config import load_params
from langops.onnx_model import OnnxClassifier
from langops.stages import STAGES, run_stage
from langops.tasks.distill import BaselineFloor, distillation_loss, judge_against_baseline, make_student


@pytest.mark.model
def test_a_student_keeps_evenly_spaced_teacher_layers_with_their_weights(tiny_base_model):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_base_model, num_labels=3)
    student, kept = make_student(teacher, 1)
    assert kept == (1,) and student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    for name, weight in student.bert.encoder.layer[0].state_dict().items():
        assert torch.equal(weight, teacher.bert.encoder.layer[1].state_dict()[name]), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert len(teacher.bert.encoder.layer) == 2  # the teacher is left whole
    with pytest.raises(ValueError, match="compress.distill.layers must be between 1 and 1, got 2"):
        make_student(teacher, 2)


@pytest.mark.unit
def test_the_loss_is_zero_only_when_the_student_matches_teacher_and_labels():
    teacher = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    labels = torch.tensor([0, 1])
    matched = distillation_loss(teacher, teacher, labels, temperature=2.0, alpha=1.0)
    assert matched.item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-teacher, teacher, labels, temperature=2.0, alpha=1.0) > 1.0
    assert distillation_loss(teacher, teacher, labels, temperature=2.0, alpha=0.0) > 0  # hard labels alone


@pytest.mark.model
def test_the_student_ships_through_compress_register_and_the_gate(tmp_path, tiny_base_model):
    # A tiny random teacher's student may lose more than the default margin; here it ships whatever it scores.
    distill = {"enabled": True, "layers": 1, "max_epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "num_threads": 1,
               "max_val_drop": 1.0}
    write_params(tmp_path, tiny_project_params(
        tmp_path, tiny_base_model,
        compress={"min_label_agreement": 0.5, "max_fp32_logit_diff": 0.01, "latency_runs": 5, "distill": distill},
    ))
    params = load_params(tmp_path / "params.yaml")
    results = {stage.name: run_stage(stage.name, params) for stage in STAGES if stage.name != "deploy"}

    student = results["distill"]
    assert student.shipped and "within compress.distill.max_val_drop" in student.reason
    assert student.enabled and student.layers == 1 and student.teacher_layers == 2 and student.kept_layers == (1,)
    assert json.loads((params.paths.student / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    shipped = OnnxClassifier.load(results["compress"].out_dir)
    assert encoder_layers_shipped(results["compress"]) == 1
    # the shipped graph is the student's: smaller than the teacher's fp32 weights
    assert results["compress"].sizes_mb["fp32_onnx"] < results["train"].result.total_params * 4 / 1e6
    decision = results["promote"]
    assert decision.challenger_version == results["register"].version
    assert decision.promote, decision.reason  # the first model: the gate judged the student and passed it
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(params.register.model_name, results["register"].version).tags
    assert tags["calibration"] == f"the student's: {student.calibration}"  # the shipped model's, not the teacher's
    assert float(tags["calibration.temperature"]) == student.temperature
    assert float(tags["calibration.val_ece_uncalibrated"]) == student.val_ece_uncalibrated
    probabilities = shipped.predict_proba(["my card was charged twice"])
    assert np.isclose(probabilities.sum(), 1.0)


def _teacher_and_student_graphs(tmp_path, tiny_base_model, distill: dict, **sections):
    write_params(tmp_path, tiny_project_params(
        tmp_path, tiny_base_model,
        compress={"min_label_agreement": 0.5, "max_fp32_logit_diff": 0.01, "latency_runs": 5, "distill": distill},
        **sections,
    ))
    params = load_params(tmp_path / "params.yaml")
    return params, {name: run_stage(name, params) for name in ("prepare", "baseline", "train", "distill", "compress")}


def encoder_layers_shipped(compressed) -> int:
    """Attention nodes of the shipped fp32 graph: one per encoder layer once the graph is optimised."""
    import onnx

    from langops.onnx_model import FP32_MODEL_FILE

    graph = onnx.load(str(compressed.out_dir / FP32_MODEL_FILE)).graph
    return sum(node.op_type == "Attention" for node in graph.node)


@pytest.mark.model
def test_a_teacher_no_deeper_than_the_student_ships_itself_and_says_why(tmp_path, tiny_base_model, caplog):
    params, results = _teacher_and_student_graphs(tmp_path, tiny_base_model, {"layers": 3})  # enabled by default
    student = results["distill"]
    assert student.enabled and not student.shipped
    assert student.reason == ("the teacher has 2 encoder layers, no more than compress.distill.layers 3: "
                              "the teacher ships")
    assert "the teacher ships" in caplog.text
    assert not (params.paths.student / "model").exists()
    assert json.loads((params.paths.student / "distill.json").read_text())["reason"] == student.reason
    assert encoder_layers_shipped(results["compress"]) == 2  # the teacher's


@pytest.mark.model
def test_a_student_that_loses_more_than_the_margin_is_kept_out_and_the_teacher_ships(tmp_path, tiny_base_model):
    # One epoch at a learning rate that wrecks the student: far below a teacher trained for its task (4 epochs:
    # in 2 the tiny teacher still predicts one class, where a wrecked student can only tie it).
    distill = {"layers": 1, "max_epochs": 1, "batch_size": 16, "learning_rate": 0.5, "num_threads": 1,
               "max_val_drop": 0.0}
    params, results = _teacher_and_student_graphs(tmp_path, tiny_base_model, distill, train={"max_epochs": 4})
    student = results["distill"]
    assert student.val_macro_f1 < student.teacher_val_macro_f1, "the wrecked student should score below its teacher"
    assert not student.shipped and student.reason.endswith("beyond compress.distill.max_val_drop 0.0: the teacher ships")
    assert (params.paths.student / "model").is_dir()  # kept for a look, not shipped
    assert encoder_layers_shipped(results["compress"]) == 2  # the teacher's


@pytest.mark.unit
def test_a_student_must_beat_the_baselines_validation_predictions_by_the_margin_not_by_luck():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=400)
    baseline = np.where(rng.random(400) < 0.8, y, (y + 1) % 3)  # right on about 80% of rows
    floor = BaselineFloor(baseline, margin=0.005)

    far_ahead = np.where(rng.random(400) < 0.95, y, (y + 2) % 3)
    beats, baseline_f1, (low, _), verdict = judge_against_baseline(far_ahead, floor, y, 3)
    assert beats and low >= 0.005 and 0.75 < baseline_f1 < 0.85
    assert verdict.startswith(f"against the TF-IDF baseline's {baseline_f1:.4f} the difference is +")

    one_row_ahead = baseline.copy()
    one_row_ahead[np.flatnonzero(baseline != y)[0]] = y[np.flatnonzero(baseline != y)[0]]
    beats, _, (low, _), verdict = judge_against_baseline(one_row_ahead, floor, y, 3)
    assert not beats and low < 0.005  # ahead on the point value by one row: within the noise
    assert "does not beat it by promote.thresholds.baseline_margin 0.005" in verdict

    with pytest.raises(ValueError, match="the baseline scored 400 validation rows, the prepared split holds 399"):
        judge_against_baseline(far_ahead[:399], floor, y[:399], 3)


@pytest.mark.model
def test_a_student_that_does_not_beat_the_baseline_is_kept_out_and_the_teacher_ships(tmp_path, tiny_base_model):
    # Within any drop of its teacher, but a tiny random student cannot beat TF-IDF on the demo tickets.
    distill = {"layers": 1, "max_epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "num_threads": 1,
               "max_val_drop": 1.0}
    floor = {"thresholds": {"macro_f1": 0.0, "accuracy": 0.0, "baseline_margin": 0.005}}
    params, results = _teacher_and_student_graphs(tmp_path, tiny_base_model, distill, promote=floor)
    student, baseline = results["distill"], results["baseline"]
    assert not student.shipped
    assert student.baseline_val_macro_f1 == pytest.approx(baseline.metrics["validation"]["baseline"]["macro_f1"])
    assert student.val_macro_f1 < student.baseline_val_macro_f1
    assert "within compress.distill.max_val_drop 1.0" in student.reason
    assert (f"against the TF-IDF baseline's {student.baseline_val_macro_f1:.4f} the difference is "
            f"{student.val_macro_f1 - student.baseline_val_macro_f1:+.4f}") in student.reason
    assert student.reason.endswith("does not beat it by promote.thresholds.baseline_margin 0.005: the teacher ships")
    assert json.loads((params.paths.student / "distill.json").read_text())["baseline_interval"][0] < 0.005
    assert encoder_layers_shipped(results["compress"]) == 2  # the teacher's
