"""The train step on a tiny random BERT: outputs, LoRA config, early stopping, resume and seeds."""

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
    values = dict(base_model=str(base), epochs=2, batch_size=16, learning_rate=5e-3, max_length=32, num_threads=1,
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
    # The merged model is a plain transformers model: no LoRA weights left in it.
    assert not any("lora" in k for k in _weights(result.model_dir))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "billing", "1": "shipping", "2": "technical"}


@pytest.mark.model
def test_full_fine_tune_learns_the_keywords(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, method="full", epochs=8, learning_rate=1e-2, early_stopping_patience=8)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    assert result.adapter_dir is None
    assert result.trainable_params == result.total_params
    assert result.best_val_macro_f1 > 0.6, result.history


@pytest.mark.model
def test_early_stopping_stops_when_validation_f1_stalls(tiny_base_model, prepared_dir, tmp_path):
    cfg = _cfg(tiny_base_model, epochs=5, learning_rate=1e-12, early_stopping_patience=1)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", seed=1)

    assert result.stopped_early
    assert result.epochs_run == 2 and result.best_epoch == 1


@pytest.mark.model
def test_max_steps_caps_optimizer_steps(tiny_base_model, prepared_dir, tmp_path):
    result = train(_cfg(tiny_base_model, max_steps=3), prepared_dir=prepared_dir, out_dir=tmp_path / "o",
                   checkpoint_dir=tmp_path / "c", seed=1)
    assert result.steps == 3 and result.epochs_run == 1


@pytest.mark.model
def test_same_seed_gives_identical_weights(tiny_base_model, prepared_dir, tmp_path):
    runs = [
        train(_cfg(tiny_base_model, epochs=1, resume=False), prepared_dir=prepared_dir, out_dir=tmp_path / f"out{i}",
              checkpoint_dir=tmp_path / f"ckpt{i}", seed=7)
        for i in range(2)
    ]
    first, second = (_weights(r.model_dir) for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.model
def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_ends_where_an_uninterrupted_one_does(
    tiny_base_model, prepared_dir, tmp_path
):
    cfg = _cfg(tiny_base_model, epochs=3, early_stopping_patience=3)
    straight = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "straight", checkpoint_dir=tmp_path / "c1", seed=3)

    def crash_after_first_epoch(metrics, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "c2", seed=3,
              on_epoch_end=crash_after_first_epoch)
    assert not (tmp_path / "resumed").exists()
    resumed = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "c2", seed=3)

    assert resumed.resumed_from_epoch == 1
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
    torch.save({"fingerprint": "any", "payload": _RunsCodeWhenUnpickled(marker)}, checkpoints / "epoch-009.pt")

    result = train(_cfg(tiny_base_model, epochs=1), prepared_dir=prepared_dir, out_dir=tmp_path / "out",
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
