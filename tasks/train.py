"""Fine-tune a pretrained encoder for text classification: LoRA (peft) by default, full fine-tune as an option.

A plain training loop rather than ``transformers.Trainer``: every behaviour the pipeline relies on
(length-grouped dynamic padding, early stopping on validation macro-F1, a resumable checkpoint per
epoch, bf16 autocast on GPUs) is visible here and pinned by tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from langops.config import TrainConfig
from langops.io import read_split, write_labels
from langops.modeling import pad_batch, predict_logits, resolve_base_model, select_device, tokenize

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    steps: int
    stopped_early: bool
    resumed_from_epoch: int | None
    device: str
    precision: str
    trainable_params: int
    total_params: int
    seconds: float
    history: tuple[dict[str, float], ...] = field(default=())


def train(
    cfg: TrainConfig,
    *,
    prepared_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    seed: int,
    on_epoch_end: MetricsCallback | None = None,
) -> TrainResult:
    """Train on the prepared train split, early-stop on validation macro-F1, save the best model.

    Writes ``out_dir/model`` (merged model + tokenizer, loadable with ``from_pretrained``),
    ``out_dir/adapter`` (the LoRA adapter and its config, LoRA only) and ``out_dir/labels.json``. A checkpoint per epoch goes to ``checkpoint_dir``; with ``cfg.resume`` a run
    with the same config and data continues from the last one.

    Args:
        on_epoch_end: called with the epoch's metrics and the epoch number (e.g. ``mlflow.log_metrics``).
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    started = time.perf_counter()
    prepared_dir, out_dir, checkpoint_dir = Path(prepared_dir), Path(out_dir), Path(checkpoint_dir)
    labels = json.loads((prepared_dir / "labels.json").read_text())
    label_ids = {name: i for i, name in enumerate(labels)}
    train_df, val_df = read_split(prepared_dir, "train"), read_split(prepared_dir, "validation")

    seed_everything(seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device, cfg.precision)
    base = resolve_base_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_ids,
    )
    if cfg.method == "lora":
        model = _wrap_lora(model, cfg)
    model.to(device.torch_device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    train_ids = tokenize(tokenizer, train_df["text"].tolist(), cfg.max_length)
    train_y = np.array([label_ids[y] for y in train_df["label"]])
    steps_per_epoch = -(-len(train_ids) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    state = _LoopState()
    fingerprint = _fingerprint(cfg, prepared_dir, seed)
    resumed_from = None
    if cfg.resume:
        checkpoint = _latest_checkpoint(checkpoint_dir, fingerprint)
        if checkpoint is not None:
            state = _restore(checkpoint, model, optimizer, scheduler)
            resumed_from = state.epoch
            log.info("resuming from %s (epoch %d done)", checkpoint, state.epoch)
    else:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    while state.epoch < cfg.epochs and not state.finished:
        epoch = state.epoch + 1
        model.train()
        rng = np.random.default_rng(seed + epoch)
        batches = list(length_grouped_batches([len(x) for x in train_ids], cfg.batch_size, rng))
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", mininterval=1.0, leave=False, disable=None)
        for batch in bar:
            inputs = {k: v.to(device.torch_device) for k, v in pad_batch(tokenizer, [train_ids[i] for i in batch]).items()}
            target = torch.as_tensor(train_y[batch], device=device.torch_device)
            with torch.autocast(device.name, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None):
                logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.steps += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if state.steps >= total_steps:
                break
        bar.close()

        val_logits = predict_logits(
            model, tokenizer, val_df["text"].tolist(), batch_size=cfg.eval_batch_size,
            max_length=cfg.max_length, device=device,
        )
        val_y = np.array([label_ids[y] for y in val_df["label"]])
        val_pred = val_logits.argmax(axis=1)
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "val_loss": float(torch.nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_y)).item()),
            "val_accuracy": float((val_pred == val_y).mean()),
            "val_macro_f1": float(f1_score(val_y, val_pred, average="macro", labels=list(range(len(labels))), zero_division=0)),
            "learning_rate": float(scheduler.get_last_lr()[0]),
        }
        state.epoch = epoch
        state.history.append({"epoch": epoch, **metrics})
        if metrics["val_macro_f1"] > state.best_f1:
            state.best_f1, state.best_epoch, state.bad_epochs = metrics["val_macro_f1"], epoch, 0
            state.best_weights = _trainable_state(model)
        else:
            state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= cfg.early_stopping_patience
        state.finished = state.stopped_early or state.steps >= total_steps or epoch >= cfg.epochs
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
        _save_checkpoint(checkpoint_dir, fingerprint, state, model, optimizer, scheduler)
        if on_epoch_end is not None:
            on_epoch_end(metrics, epoch)

    model.load_state_dict(state.best_weights, strict=False)
    model_dir, adapter_dir = _save_outputs(model, tokenizer, labels, cfg, out_dir)
    return TrainResult(
        out_dir=out_dir,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        best_epoch=state.best_epoch,
        best_val_macro_f1=state.best_f1,
        epochs_run=state.epoch,
        steps=state.steps,
        stopped_early=state.stopped_early,
        resumed_from_epoch=resumed_from,
        device=device.name,
        precision=device.precision,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - started,
        history=tuple(state.history),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def length_grouped_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Shuffled batches whose members have similar lengths, so dynamic padding wastes little.

    Rows are shuffled, cut into mega-batches of 50 batches, sorted by length inside each, then the
    batches are shuffled: randomness for SGD, little padding for speed (as transformers'
    ``group_by_length``).
    """
    order = rng.permutation(len(lengths))
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega].tolist(), key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    for i in rng.permutation(len(batches)):
        yield batches[i]


def _wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in names]
    if missing:
        raise ValueError(f"train.lora.target_modules {missing} not found in {type(model).__name__}")
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    return get_peft_model(model, lora)


def _save_outputs(model, tokenizer, labels: list[str], cfg: TrainConfig, out_dir: Path) -> tuple[Path, Path | None]:
    """Write adapter, merged model, tokenizer and labels to a temp dir, then swap it into place."""
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    adapter_dir = None
    if cfg.method == "lora":
        model.save_pretrained(staging / "adapter")
        adapter_dir = out_dir / "adapter"
        model = model.merge_and_unload()
    model.to("cpu").save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    write_labels(staging, labels)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir / "model", adapter_dir


@dataclass
class _LoopState:
    epoch: int = 0
    steps: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    finished: bool = False
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _fingerprint(cfg: TrainConfig, prepared_dir: Path, seed: int) -> str:
    """Checkpoints are resumed only by a run with the same config, seed and data."""
    digest = hashlib.sha256(cfg.model_dump_json(exclude={"resume", "num_threads"}).encode())
    digest.update(str(seed).encode())
    for split in ("train", "validation", "labels"):
        path = prepared_dir / (f"{split}.json" if split == "labels" else f"{split}.parquet")
        digest.update(hashlib.md5(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _save_checkpoint(directory: Path, fingerprint: str, state: _LoopState, model, optimizer, scheduler) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{state.epoch:03d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "state": vars(state),
            "weights": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        },
        tmp,
    )
    tmp.replace(path)
    for old in sorted(directory.glob("epoch-*.pt"))[:-2]:
        old.unlink()


def _latest_checkpoint(directory: Path, fingerprint: str) -> Path | None:
    for path in sorted(directory.glob("epoch-*.pt"), reverse=True):
        try:
            if torch.load(path, map_location="cpu", weights_only=False)["fingerprint"] == fingerprint:
                return path
        except Exception as exc:  # a torn or foreign file is skipped, not fatal: say so and go on
            log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
    return None


def _restore(path: Path, model, optimizer, scheduler) -> _LoopState:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["weights"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    return _LoopState(**saved["state"])
