"""The train step on a tiny random BERT: outputs, LoRA config, how long it trains and why it stops, resume
and seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_RECIPE
from safetensors.torch import load_file

from langops.config import TrainConfig
from langops.tasks.train import length_grouped_batches, train


def _cfg(base, **overrides) -> TrainConfig:
    values = dict(base_model=str(base), max_epochs=2, batch_size=16, learning_rate=5e-3, max_length=32, num_threads=1,
                  **TINY_RECIPE)
    values.update(overrides)
    return TrainConfig(**values)


def _weights(model_dir):
    return load_file(model_dir / "model.safetensors")


@pytest.mark.model
def test_lora_training_writes_merged_model_adapter_and_labels(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]})
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    assert (result.model_dir / "config.json").is_file() and (result.model_dir / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == ["billing", "shipping", "technical"]
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.0)
    assert set(adapter["target_modules"]) == {"query", "value"}
    assert result.trainable_params < result.total_params / 5
    assert len(result.history) == result.epochs_run == 2
    assert result.stop_reason == "epoch ceiling" and not result.stopped_early
    # The merged model is a plain transformers model: no LoRA weights left in it.
    assert not any("lora" in k for k in _weights(result.model_dir))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "billing", "1": "shipping", "2": "technical"}


@pytest.mark.model
def test_full_fine_tune_learns_the_keywords(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, method="full", max_epochs=8, learning_rate=1e-2, early_stopping_patience=8)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    assert result.adapter_dir is None
    assert result.trainable_params == result.total_params
    assert result.best_val_macro_f1 > 0.6, result.history


@pytest.mark.model
def test_early_stopping_stops_when_validation_f1_stalls(tiny_base_model, prepared_dir, tmp_path):
    # No cool-down: patience ends the run at the evaluation that runs out of it, as plain early stopping.
    cfg = _cfg(tiny_base_model, max_epochs=5, learning_rate=1e-12, early_stopping_patience=1, cooldown_fraction=0)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    assert result.stopped_early and result.stop_reason == "patience"
    assert result.epochs_run == 2 and result.best_epoch == 1


@pytest.mark.model
def test_patience_begins_a_cool_down_and_the_run_stops_when_it_ends(tiny_base_model, prepared_dir, tmp_path, caplog):
    cfg = _cfg(tiny_base_model, max_epochs=10, learning_rate=1e-12, early_stopping_patience=2, cooldown_fraction=0.5)
    with caplog.at_level("INFO", logger="langops.tasks.train"):
        result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    # 8 steps an epoch; patience runs out at evaluation 3 (step 24), the cool-down takes half as many steps again
    assert result.stop_reason == "patience" and result.stopped_early
    assert [row["step"] for row in result.history] == [8, 16, 24, 32, 36]
    assert result.best_evaluation == 1 and result.steps == 36 and result.epochs_run == 4.5
    assert result.history[3]["learning_rate"] < result.history[2]["learning_rate"] * 0.5  # decaying to 0
    assert "the learning rate decays to 0 over the next 12 steps" in caplog.text
    assert "training stopped at step 36 (patience): its cool-down, begun at step 24, is over" in caplog.text


@pytest.mark.model
def test_the_cool_down_anneals_the_best_weights_not_those_that_stopped_improving(tiny_base_model, prepared_dir, tmp_path):
    checkpoints, kept = tmp_path / "ckpt", {}

    def keep_each_checkpoint(metrics, evaluation):
        newest = max(checkpoints.glob("step-*.pt"), key=lambda p: p.stat().st_mtime_ns)
        kept[evaluation] = torch.load(newest, map_location="cpu", weights_only=True)

    cfg = _cfg(tiny_base_model, method="full", learning_rate=1e-2, max_epochs=30, early_stopping_patience=2)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=checkpoints, seed=1,
                   on_evaluation=keep_each_checkpoint)

    assert result.stop_reason == "patience"
    began = next(row["evaluation"] for row in result.history if row["evaluation"] > result.best_evaluation
                 and kept[row["evaluation"]]["state"]["cooldown"] is not None)
    saved = kept[began]
    assert began > result.best_evaluation  # patience ran out two evaluations after the best one ...
    before = kept[began - 1]  # ... whose weights had moved on from the best ones
    assert any(not torch.equal(before["weights"][k], before["state"]["best_weights"][k]) for k in before["weights"])
    # the cool-down starts from the best weights (and a resumed run would too: they are what was saved)
    assert all(torch.equal(saved["weights"][k], saved["state"]["best_weights"][k]) for k in saved["weights"])


@pytest.mark.model
def test_max_steps_caps_optimizer_steps(tiny_base_model, prepared_dir, tmp_path):
    result = train(_cfg(tiny_base_model, max_steps=3), prepared_dir=prepared_dir, out_dir=tmp_path / "o",
                   checkpoint_dir=tmp_path / "c", seed=1)
    assert result.steps == 3 and result.epochs_run == pytest.approx(3 / 8)
    assert result.stop_reason == "step ceiling" and not result.stopped_early


@pytest.mark.model
def test_the_time_ceiling_stops_a_run_that_is_still_improving(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, max_epochs=50, max_minutes=1e-4)  # 6 ms: spent by the first evaluation
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "o", checkpoint_dir=tmp_path / "c", seed=1)
    assert result.stop_reason == "time ceiling" and not result.stopped_early
    assert len(result.history) == 1 and result.steps == 8
    assert result.train_loop_seconds >= 60 * 1e-4


@pytest.mark.model
def test_same_seed_gives_identical_weights(tiny_base_model, prepared_dir, tmp_path):
    runs = [
        train(_cfg(tiny_base_model, max_epochs=1, resume=False), prepared_dir=prepared_dir, out_dir=tmp_path / f"out{i}",
              checkpoint_dir=tmp_path / f"ckpt{i}", seed=7)
        for i in range(2)
    ]
    first, second = (_weights(r.model_dir) for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.model
@pytest.mark.parametrize(("eval_every_steps", "first_evaluation_epoch"), [(500, 1.0), (3, 3 / 8)],
                         ids=["at-an-epoch-end", "mid-epoch"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_ends_where_an_uninterrupted_one_does(
    tiny_base_model, prepared_dir, tmp_path, eval_every_steps, first_evaluation_epoch
):
    cfg = _cfg(tiny_base_model, max_epochs=3, early_stopping_patience=3, eval_every_steps=eval_every_steps)
    straight = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "straight", checkpoint_dir=tmp_path / "c1", seed=3)

    def crash_after_first_evaluation(metrics, evaluation):
        if evaluation == 1:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "c2", seed=3,
              on_evaluation=crash_after_first_evaluation)
    assert not (tmp_path / "resumed").exists()
    resumed = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "c2", seed=3)

    assert resumed.resumed_from_epoch == pytest.approx(first_evaluation_epoch)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    assert [h["val_macro_f1"] for h in resumed.history] == [h["val_macro_f1"] for h in straight.history]
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.model
def test_a_checkpoint_that_would_run_code_is_skipped_without_running_it(tiny_base_model, prepared_dir, tmp_path):
    checkpoints, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    checkpoints.mkdir()
    torch.save({"fingerprint": "any", "payload": _RunsCodeWhenUnpickled(marker)}, checkpoints / "step-0000999.pt")

    result = train(_cfg(tiny_base_model, max_epochs=1), prepared_dir=prepared_dir, out_dir=tmp_path / "out",
                   checkpoint_dir=checkpoints, seed=3)

    assert not marker.exists()
    assert result.resumed_from_epoch is None


@pytest.mark.model
def test_unknown_lora_target_module_is_named(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, lora={"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="q_proj"):
        train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "o", checkpoint_dir=tmp_path / "c", seed=1)


@pytest.mark.unit
def test_length_grouped_batches_cover_every_row_once_with_similar_lengths():
    import numpy as np

    lengths = list(np.random.default_rng(0).integers(1, 100, size=1000))
    batches = list(length_grouped_batches(lengths, 10, np.random.default_rng(1)))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 10  # random batches of 10 from 1..100 would spread ~80
