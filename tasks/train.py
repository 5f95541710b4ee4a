"""Fine-tune a pretrained encoder for text classification: LoRA (peft) by default, full fine-tune as an option.

A plain training loop rather than ``transformers.Trainer``: every behaviour the pipeline relies on
(length-grouped dynamic padding, a length that follows validation macro-F1 with a warmup-stable-decay
learning rate (``langops.schedule``), a resumable checkpoint per evaluation, a temperature folded only
when it calibrates held-out rows (``langops.calibration``), bf16 autocast on GPUs) is visible here and
pinned by tests.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) the same loop trains data-parallel: one process per device
(NCCL on GPUs, gloo on CPU), the model wrapped in ``DistributedDataParallel``, each optimiser step's
length-grouped global batch of ``batch_size × world_size`` rows split across the ranks. Rank 0 evaluates,
its metrics and clock decide when to stop for everyone, and it is the only one to write checkpoints and
the model.
``launch_torchrun`` starts such a run from a plain process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from langops.calibration import Calibration, choose_temperature, fold_temperature
from langops.config import TrainConfig
from langops.cpu_share import CpuShare
from langops.faults import crash_point
from langops.io import LABEL, TEXT, read_labels, read_split, staging_dir, swap_in, write_labels
from langops.metrics import expected_calibration_error, softmax
from langops.modeling import Device, pad_batch, predict_logits, resolve_base_model, select_device, tokenize
from langops.schedule import DIVERGING, EPOCH_CEILING, PATIENCE, TIME_CEILING, Cooldown, Schedule

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    best_epoch: float  # epochs trained at the evaluation whose weights are the model
    best_val_macro_f1: float
    epochs_run: float  # passes over the training split, the last one perhaps partial
    steps: int
    stopped_early: bool  # by patience (or a diverging loss), not by a ceiling
    resumed_from_epoch: float | None
    device: str
    precision: str
    trainable_params: int
    total_params: int
    seconds: float
    world_size: int  # data-parallel processes (1: no process group)
    effective_batch_size: int  # rows per optimiser step: batch_size × world_size
    history: tuple[dict[str, float], ...] = field(default=())  # one row per evaluation
    max_length: int = 128  # tokens per text the model was trained with (``train.max_length``, resolved)
    stop_reason: str = ""  # patience | step ceiling | epoch ceiling | time ceiling | training loss rising
    best_step: int = 0
    best_evaluation: int = 0  # its row in ``history`` (1-based) and its MLflow step
    train_loop_seconds: float = 0.0  # what the time ceiling counts: the loop, over resumed sessions too
    temperature: float = 1.0  # folded into the head: 1.0 when the cross-fit check refused one
    temperature_fitted: float | None = None  # fitted on every validation row, folded or not
    temperature_folded: bool = False
    calibration: str = ""  # the decision and its evidence, in words
    val_ece_uncalibrated: float | None = None  # validation ECE of the model's own probabilities
    val_ece_cross_fitted: float | None = None  # each half of validation scored with the other half's temperature
    val_ece: float | None = None  # the shipped model's validation ECE
    learning_rate: float | None = None  # the encoder's rate of the run that produced the model
    attempts: int = 1  # runs it took (a collapsed run is retried with smaller learning rates)
    class_weights: tuple[float, ...] | None = None  # the loss weights per label, when imbalance asked for them

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> TrainResult:
        """Rebuild the result from its JSON form (``train.json``), as a launcher reads back its ranks' work."""
        values = {f.name: summary[f.name] for f in fields(cls) if f.name in summary}
        for name in ("out_dir", "model_dir", "adapter_dir"):
            values[name] = None if values.get(name) is None else Path(values[name])
        values["history"] = tuple(values.get("history", ()))
        return cls(**values)


class TrainingCollapsedError(RuntimeError):
    """Training produced a model that predicts one class for every validation row."""


class DistributedTrainingError(RuntimeError):
    """A torchrun launch failed; the message carries torchrun's failure summary (which rank, and why)."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun launch; rank 0 of 1 for a plain process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun (or another launcher that sets WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info() -> RankInfo:
    """Read the ranks torchrun sets in the environment."""
    if "WORLD_SIZE" not in os.environ:
        return RankInfo()
    return RankInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        launched=True,
    )


def resolve_devices(cfg: TrainConfig) -> int:
    """How many data-parallel processes ``train.devices`` asks for on this machine.

    ``auto`` is every visible GPU when training on CUDA and 1 otherwise. A number is taken as given
    (on CPU it starts that many gloo processes, which is how the distributed path is tested), but a
    CUDA run cannot ask for more processes than there are GPUs.

    Raises:
        ValueError: ``train.devices`` names more GPUs than are visible.
    """
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.devices == "auto":
        return max(torch.cuda.device_count(), 1) if cuda else 1
    if cuda and cfg.devices > torch.cuda.device_count():
        raise ValueError(f"train.devices is {cfg.devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    return cfg.devices


def train(
    cfg: TrainConfig,
    *,
    prepared_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    seed: int,
    on_evaluation: MetricsCallback | None = None,
) -> TrainResult:
    """Train on the prepared train split while validation macro-F1 improves, save the best model.

    How long it trains follows validation (``langops.schedule``): evaluations at least once per epoch,
    a cool-down of the learning rate once ``early_stopping_patience`` evaluations bring no better
    macro-F1 or a ceiling (``max_steps``, ``max_epochs``, ``max_minutes``) comes near; the result's
    ``stop_reason`` says which. A temperature is folded into the head only when it lowers validation ECE
    on rows it was not fitted on (``langops.calibration``); ``calibration`` says what was decided and why.

    Writes ``out_dir/model`` (merged model + tokenizer, loadable with ``from_pretrained``),
    ``out_dir/adapter`` (the LoRA adapter and its config, LoRA only) and ``out_dir/labels.json``. A
    checkpoint per evaluation goes to ``checkpoint_dir``; with ``cfg.resume`` a run with the same config
    and data continues from the last one, mid-epoch included.

    Under torchrun with ``WORLD_SIZE`` > 1 every rank calls this; it joins the process group, trains
    data-parallel with an effective batch of ``cfg.batch_size × WORLD_SIZE`` rows per step, and leaves
    the group when done or failed. Only rank 0 writes files and calls ``on_evaluation``; every rank
    returns the same result.

    Args:
        on_evaluation: called with each evaluation's metrics (step and epoch included) and its number,
            1, 2, ... (e.g. ``mlflow.log_metrics``).
    """
    ranks = rank_info()
    guard = cfg.collapse_guard
    attempt_cfg, attempt = cfg, 1
    while True:
        try:
            result = _train_on_device(attempt_cfg, ranks, prepared_dir=prepared_dir, out_dir=out_dir,
                                      checkpoint_dir=checkpoint_dir, seed=seed, on_evaluation=on_evaluation)
            return replace(result, attempts=attempt)
        except _Collapsed as collapsed:
            smaller = attempt_cfg.model_copy(update=_smaller_rates(attempt_cfg, guard.lr_factor))
            message = collapsed.describe(attempt_cfg)
            if guard.action == "retry" and attempt <= guard.retries:
                log.warning("%s; retrying with train.learning_rate %.3g (attempt %d of %d)",
                            message, smaller.learning_rate, attempt + 1, guard.retries + 1)
                attempt_cfg, attempt = smaller, attempt + 1
                continue
            raise TrainingCollapsedError(
                f"{message}. fix: set train.learning_rate: {smaller.learning_rate:.3g}"
                + (f" and train.head_learning_rate: {smaller.head_learning_rate:.3g}" if smaller.head_learning_rate else "")
                + ", or check that the labels follow from the texts (train.collapse_guard.action: warn keeps such a model)"
            ) from None


def _train_on_device(cfg: TrainConfig, ranks: RankInfo, **kwargs: Any) -> TrainResult:
    with CpuShare(cfg.num_threads, apply=torch.set_num_threads) as cpu:
        log.info("%d CPU threads (%s)", cpu.threads, "train.num_threads" if cfg.num_threads else
                 "this job's share of the CPUs it may use; langops/cpu_share.py")
        if not ranks.distributed:
            return _train(cfg, ranks=ranks, device=select_device(cfg.device, cfg.precision), cpu=cpu, **kwargs)
        with _process_group(cfg, ranks) as device:
            return _train(cfg, ranks=ranks, device=device, cpu=cpu, **kwargs)


def _smaller_rates(cfg: TrainConfig, factor: float) -> dict[str, float | None]:
    head = cfg.head_learning_rate * factor if cfg.head_learning_rate is not None else None
    return {"learning_rate": cfg.learning_rate * factor, "head_learning_rate": head}


class _Collapsed(Exception):
    """The best model of a run predicts one class for every validation row (or the run diverged to that)."""

    def __init__(self, label: str, val_macro_f1: float, diverged: bool) -> None:
        super().__init__(label)
        self.label, self.val_macro_f1, self.diverged = label, val_macro_f1, diverged

    def describe(self, cfg: TrainConfig) -> str:
        why = ", its training loss rising" if self.diverged else ""
        return (f"training collapsed to predicting {self.label!r} for every row{why} (validation macro-F1 "
                f"{self.val_macro_f1:.3f}, the majority-class baseline) at train.learning_rate {cfg.learning_rate:.3g}")


def _train(
    cfg: TrainConfig,
    *,
    prepared_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    seed: int,
    on_evaluation: MetricsCallback | None,
    ranks: RankInfo,
    device: Device,
    cpu: CpuShare,
) -> TrainResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    prepared_dir, out_dir, checkpoint_dir = Path(prepared_dir), Path(out_dir), Path(checkpoint_dir)
    labels = read_labels(prepared_dir)
    label_ids = {name: i for i, name in enumerate(labels)}
    train_df, val_df = read_split(prepared_dir, "train"), read_split(prepared_dir, "validation")

    seed_everything(seed)
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

    max_length = resolve_max_length(cfg, tokenizer, train_df[TEXT].tolist())
    train_ids = tokenize(tokenizer, train_df[TEXT].tolist(), max_length)
    train_y = np.array([label_ids[y] for y in train_df[LABEL]])
    class_weights = loss_weights(cfg, train_y, len(labels))
    if ranks.is_main:
        log.info("max_length %d tokens%s; class weights %s", max_length,
                 " (99th percentile of the training texts)" if cfg.max_length == "auto" else "",
                 "none" if class_weights is None else [round(w, 3) for w in class_weights])
    loss_weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=device.torch_device)
    effective_batch_size = cfg.batch_size * ranks.world_size
    lengths = [len(x) for x in train_ids]
    # Every epoch has as many batches (only their order changes): the schedule is set from the first one's.
    schedule = Schedule.from_config(cfg, len(rank_batches(lengths, cfg.batch_size, np.random.default_rng(seed),
                                                          rank=ranks.rank, world_size=ranks.world_size)))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), weight_decay=cfg.weight_decay)
    base_rates = [group["lr"] for group in optimizer.param_groups]

    val_y = np.array([label_ids[y] for y in val_df[LABEL]])
    state = _LoopState()
    fingerprint = _fingerprint(cfg, prepared_dir, seed, ranks.world_size)
    resumed_from = None
    if cfg.resume:
        checkpoint = _latest_checkpoint(checkpoint_dir, fingerprint)
        if checkpoint is not None:
            state = _restore(checkpoint, model, optimizer)
            resumed_from = state.epochs_done(schedule.batches_per_epoch)
            if ranks.is_main:
                log.info("resuming from %s (step %d, epoch %.2f done)", checkpoint, state.steps, resumed_from)
    elif ranks.is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    net = model
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Frozen (non-LoRA) weights get no gradient hooks; every trainable weight is used in each forward.
        net = DistributedDataParallel(model, device_ids=[device.torch_device.index] if device.name == "cuda" else None)
        if ranks.is_main:
            log.info("data-parallel on %d %s processes: %d rows per device, %d per optimiser step",
                     ranks.world_size, device.name, cfg.batch_size, effective_batch_size)
    if ranks.is_main:
        log.info("schedule: %s", schedule.describe())

    session_started, session_steps = time.perf_counter(), state.steps
    losses: list[float] = []  # since the last evaluation
    while not state.finished:
        epoch = state.epoch + 1
        net.train()
        batches = rank_batches(lengths, cfg.batch_size, np.random.default_rng(seed + epoch), rank=ranks.rank,
                               world_size=ranks.world_size)
        bar = tqdm(total=len(batches), initial=state.position, desc=f"epoch {epoch}", unit="batch", mininterval=1.0,
                   leave=False, disable=None if ranks.is_main else True)
        for position, batch in enumerate(batches[state.position:], start=state.position + 1):
            cooldown = schedule.cooldown_for(state.steps, state.cooldown)
            if cooldown is not state.cooldown and ranks.is_main:
                log.info("%s is near: the learning rate decays to 0 over the last %d steps", _ceiling_name(schedule),
                         cooldown.steps)
            state.cooldown = cooldown
            factor = schedule.lr_factor(state.steps, state.cooldown)
            for group, rate in zip(optimizer.param_groups, base_rates):
                group["lr"] = rate * factor
            inputs = {k: v.to(device.torch_device) for k, v in pad_batch(tokenizer, [train_ids[i] for i in batch]).items()}
            target = torch.as_tensor(train_y[batch], device=device.torch_device)
            with torch.autocast(device.name, dtype=device.autocast_dtype, enabled=device.autocast_dtype is not None):
                logits = net(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), target, weight=loss_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cpu.refresh()  # another job on this machine started or ended: take the new share
            state.steps += 1
            state.epoch, state.position = (epoch, 0) if position == len(batches) else (epoch - 1, position)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{base_rates[0] * factor:.2g}")
            if not schedule.evaluates_at(position, state.steps, state.cooldown):
                continue

            train_loss = _mean_over_ranks(losses, ranks, device)
            losses = []
            val_logits = None
            shared: list[Any] = [None, 0.0, 0.0]
            if ranks.is_main:
                val_logits = predict_logits(model, tokenizer, val_df[TEXT].tolist(), batch_size=cfg.eval_batch_size,
                                            max_length=max_length, device=device)
                spent = time.perf_counter() - session_started
                shared = [_validation_metrics(val_logits, val_y, len(labels), train_loss=train_loss,
                                              learning_rate=base_rates[0] * factor),
                          state.seconds_before + spent, spent / max(state.steps - session_steps, 1)]
            if ranks.distributed:  # rank 0's evaluation and clock are every rank's: one decision for all
                torch.distributed.broadcast_object_list(shared, src=0)
            metrics, seconds, seconds_per_step = shared
            row = {"evaluation": len(state.history) + 1, "step": state.steps,
                   "epoch": round(state.epochs_done(len(batches)), 4), **metrics}
            state.history.append(row)
            if metrics["val_macro_f1"] > state.best_f1:
                state.best_f1, state.best_evaluation, state.bad_evaluations = metrics["val_macro_f1"], row["evaluation"], 0
                state.best_predicted_classes = int(metrics["val_predicted_classes"])
                state.best_weights = _trainable_state(model)  # on every rank: a cool-down may rewind to them
                if ranks.is_main:
                    state.best_val_logits = val_logits  # what calibration is decided on, without scoring it again
            else:
                state.bad_evaluations += 1
            state.diverged = _diverging(state.history, state.bad_evaluations, cfg.collapse_guard.loss_rise_evaluations)
            verdict = schedule.after_evaluation(steps=state.steps, bad_evaluations=state.bad_evaluations,
                                                seconds=seconds, seconds_per_step=seconds_per_step,
                                                cooldown=state.cooldown, diverged=state.diverged)
            state.seconds = seconds
            rewound = verdict.cooldown is not None and state.best_evaluation != row["evaluation"]
            if rewound:  # anneal the best weights, not the ones that stopped improving after them
                model.load_state_dict(state.best_weights, strict=False)
            if verdict.cooldown is not None:
                state.cooldown = verdict.cooldown
            if verdict.stop is not None:
                state.finished, state.stop_reason = True, verdict.stop
            if ranks.is_main:
                log.info("evaluation %d (step %d, epoch %.2f): %s", row["evaluation"], row["step"], row["epoch"],
                         {k: float(f"{v:.4g}") for k, v in metrics.items()})
                if verdict.cooldown is not None:
                    log.info("%s: the learning rate decays to 0 over the next %d steps%s, then training stops",
                             _why(verdict.cooldown.reason, state, schedule), verdict.cooldown.steps,
                             f", from the weights of the best evaluation, {state.best_evaluation}" if rewound else "")
                if verdict.stop is not None:
                    cooled = state.cooldown is not None and state.steps >= state.cooldown.end
                    log.info("training stopped at step %d (%s): %s; the best evaluation, %d (step %d), is the model",
                             state.steps, verdict.stop,
                             f"its cool-down, begun at step {state.cooldown.start}, is over" if cooled
                             else _why(verdict.stop, state, schedule),
                             state.best_evaluation, state.history[state.best_evaluation - 1]["step"])
                _save_checkpoint(checkpoint_dir, fingerprint, state, model, optimizer)
                if on_evaluation is not None:
                    on_evaluation({k: v for k, v in row.items() if k != "evaluation"}, row["evaluation"])
            if state.finished:
                break
            net.train()
        bar.close()

    model_dir, adapter_dir = out_dir / "model", (out_dir / "adapter" if cfg.method == "lora" else None)
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in model.parameters())
    if state.best_predicted_classes == 1 and len(np.unique(val_y)) > 1:
        collapsed = _Collapsed(labels[int(np.bincount(val_y).argmax())], state.best_f1, state.diverged)
        if cfg.collapse_guard.action != "warn":
            raise collapsed  # every rank decides alike: the metrics were shared
        if ranks.is_main:
            log.warning("%s; train.collapse_guard.action is warn: keeping the model", collapsed.describe(cfg))
    calibration = Calibration(reason="no temperature folded (T = 1): train.calibrate is false")
    if ranks.is_main:
        model.load_state_dict(state.best_weights, strict=False)
        best_logits = state.best_val_logits
        if best_logits is None:  # restored from a checkpoint written before the logits were kept in it
            best_logits = predict_logits(model, tokenizer, val_df[TEXT].tolist(), batch_size=cfg.eval_batch_size,
                                         max_length=max_length, device=device)
        if cfg.calibrate:
            calibration = choose_temperature(best_logits, val_y, seed=seed)
        else:
            ece = expected_calibration_error(softmax(best_logits), val_y)
            calibration = replace(calibration, ece_uncalibrated=ece, ece_shipped=ece)
        log.info("calibration: %s", calibration.reason)
        tokenizer.model_max_length = max_length  # the saved tokenizer truncates where training did
        model_dir, adapter_dir = _save_outputs(model, tokenizer, labels, cfg, out_dir,
                                               temperature=calibration.temperature, max_length=max_length)
    if ranks.distributed:
        torch.distributed.barrier()  # every rank returns once the model is on disk
    best = state.history[state.best_evaluation - 1]
    return TrainResult(
        out_dir=out_dir,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        best_epoch=best["epoch"],
        best_val_macro_f1=state.best_f1,
        epochs_run=round(state.epochs_done(schedule.batches_per_epoch), 4),
        steps=state.steps,
        stopped_early=state.stop_reason in (PATIENCE, DIVERGING),
        resumed_from_epoch=resumed_from,
        device=device.name,
        precision=device.precision,
        trainable_params=trainable_params,
        total_params=total_params,
        seconds=time.perf_counter() - started,
        history=tuple(state.history),
        world_size=ranks.world_size,
        effective_batch_size=effective_batch_size,
        max_length=max_length,
        stop_reason=state.stop_reason,
        best_step=int(best["step"]),
        best_evaluation=state.best_evaluation,
        train_loop_seconds=state.seconds,
        temperature=calibration.temperature,
        temperature_fitted=calibration.fitted_temperature,
        temperature_folded=calibration.folded,
        calibration=calibration.reason,
        val_ece_uncalibrated=calibration.ece_uncalibrated,
        val_ece_cross_fitted=calibration.ece_cross_fitted,
        val_ece=calibration.ece_shipped,
        learning_rate=cfg.learning_rate,
        class_weights=class_weights,
    )


def _validation_metrics(val_logits: np.ndarray, val_y: np.ndarray, num_labels: int, *, train_loss: float,
                        learning_rate: float) -> dict[str, float]:
    val_pred = val_logits.argmax(axis=1)
    return {
        "train_loss": train_loss,
        "val_loss": float(torch.nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_y)).item()),
        "val_accuracy": float((val_pred == val_y).mean()),
        "val_macro_f1": float(f1_score(val_y, val_pred, average="macro", labels=list(range(num_labels)), zero_division=0)),
        "learning_rate": float(learning_rate),
        "val_predicted_classes": float(len(np.unique(val_pred))),
    }


def _why(reason: str, state: _LoopState, schedule: Schedule) -> str:
    """A stop or cool-down reason in words, for the log."""
    if reason == PATIENCE:
        return (f"validation macro-F1 has not beaten {state.best_f1:.4f} (evaluation {state.best_evaluation}) for "
                f"{state.bad_evaluations} evaluations")
    if reason == DIVERGING:
        return "the training loss rose at each of the last evaluations"
    if reason == TIME_CEILING:
        limit = schedule.max_seconds / 60
        if state.seconds / 60 >= limit:
            return f"train.max_minutes {limit:g} reached ({state.seconds / 60:.1f} min)"
        return (f"train.max_minutes {limit:g} is near: {state.seconds / 60:.1f} min spent, too few left for another "
                f"{schedule.evaluation_interval} steps and a cool-down at this pace")
    return f"{_ceiling_name(schedule)} reached"


def _ceiling_name(schedule: Schedule) -> str:
    if schedule.ceiling is not None and schedule.ceiling[1] == EPOCH_CEILING:
        return f"the epoch ceiling, train.max_epochs {schedule.max_epochs},"
    return f"the step ceiling, train.max_steps {schedule.max_steps},"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def rank_batches(
    lengths: list[int], batch_size: int, rng: np.random.Generator, *, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's share of one epoch: a list of batches, one per optimiser step.

    Every rank draws the same length-grouped global batches of ``batch_size × world_size`` rows from
    the same ``rng`` state and keeps every ``world_size``-th row of each, starting at its rank. So the
    ranks' rows are disjoint, together they are the whole epoch, and every rank takes the same number
    of steps (a rank short of batches would leave the others waiting in a collective). Only a last
    global batch with fewer rows than ranks is topped up by repeating its own rows. With one rank
    this is ``length_grouped_batches`` unchanged.
    """
    if world_size == 1:
        return list(length_grouped_batches(lengths, batch_size, rng))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    shards = []
    for batch in length_grouped_batches(lengths, batch_size * world_size, rng):
        if len(batch) < world_size:
            batch = [batch[i % len(batch)] for i in range(world_size)]
        shards.append(batch[rank::world_size])
    return shards


def launch_torchrun(nproc: int, command: list[str]) -> None:
    """Run ``torchrun --standalone --nproc-per-node nproc <command>`` and wait for it.

    The ranks' output is passed through to stderr as it comes. torchrun stops every rank as soon as
    one fails, so a crash never leaves the others hanging in a collective.

    Raises:
        DistributedTrainingError: a rank failed; the message holds torchrun's summary naming the
            rank, its exit code and (for ranks running ``train``) its traceback.
    """
    tail: deque[str] = deque(maxlen=400)
    # torchrun keeps the ranks' error files in its log dir and never removes it: give it one that goes.
    with tempfile.TemporaryDirectory(prefix="langops-torchrun-") as log_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={log_dir}", *command]
        log.info("launching %d processes: %s", nproc, shlex.join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line)
            returncode = proc.wait()
        except BaseException:
            proc.terminate()  # torchrun passes the signal on to its ranks
            proc.wait()
            raise
    if returncode != 0:
        raise DistributedTrainingError(
            f"torchrun with {nproc} processes exited with code {returncode}:\n{_failure_summary(list(tail))}"
        )


def _failure_summary(lines: list[str]) -> str:
    """torchrun's closing failure report (first failed rank up front) when there is one, else the last lines."""
    starts = [i for i, line in enumerate(lines) if "Failures:" in line]
    if not starts:
        return "".join(lines[-60:]).rstrip()
    report = lines[max(starts[-1] - 2, 0):]
    root = [i for i, line in enumerate(report) if line.startswith("Root Cause")]
    ranks = [line.split(":", 1)[1].strip() for line in report[root[-1]:] if line.strip().startswith("rank ")] if root else []
    first = f"first failure: rank {ranks[0]}\n" if ranks else ""
    return first + "".join(report).rstrip()


@contextlib.contextmanager
def _process_group(cfg: TrainConfig, ranks: RankInfo) -> Iterator[Device]:
    """Join the torchrun process group on this rank's device; always leave it, and record a failure."""
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    device = select_device(cfg.device, cfg.precision)
    if device.name == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible for {ranks.world_size} ranks"
            )
        device = Device(torch.device("cuda", ranks.local_rank), device.autocast_dtype)
        torch.cuda.set_device(device.torch_device)
    backend = "nccl" if device.name == "cuda" else "gloo"
    on_sigterm = _StopOnSigterm() if threading.current_thread() is threading.main_thread() else None
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if on_sigterm else None
    failed = False
    try:
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,
                                device_id=device.torch_device if device.name == "cuda" else None)
        yield device
    except BaseException as exc:
        failed = True
        if on_sigterm:
            on_sigterm.unwinding = True
        if isinstance(exc, Exception):
            # torchrun reads this file to name the failing rank and show its traceback in its summary.
            ErrorHandler().record_exception(exc)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if on_sigterm and not failed:
            signal.signal(signal.SIGTERM, previous_handler)


class _StopOnSigterm:
    """SIGTERM handler for a rank: torchrun sends SIGTERM to every rank once one fails.

    The first one raises ``SystemExit`` so the rank unwinds (rank 0 closes its MLflow run as failed)
    instead of dying mid-write; once the rank is unwinding a failure, further ones are ignored, so the
    handler stays in place after a failure. torchrun still kills a rank that hangs after its grace period.
    """

    unwinding = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.unwinding:
            self.unwinding = True
            raise SystemExit(f"rank stopped by signal {signum}: another rank failed or the launch was cancelled")


def _mean_over_ranks(losses: list[float], ranks: RankInfo, device: Device) -> float:
    """The epoch's mean training loss over every rank's steps (this rank's alone without a group)."""
    if not ranks.distributed:
        return float(np.mean(losses)) if losses else float("nan")
    totals = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device.torch_device)
    torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else float("nan")


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


def _save_outputs(
    model, tokenizer, labels: list[str], cfg: TrainConfig, out_dir: Path, *, temperature: float, max_length: int
) -> tuple[Path, Path | None]:
    """Write adapter, merged model (its head divided by the temperature), tokenizer and labels to a temp
    dir, then swap it into place."""
    staging = staging_dir(out_dir)
    adapter_dir = None
    if cfg.method == "lora":
        model.save_pretrained(staging / "adapter")
        adapter_dir = out_dir / "adapter"
        model = model.merge_and_unload()
    fold_temperature(model, temperature)
    model.config.update({"langops_temperature": temperature, "langops_max_length": max_length})
    model.to("cpu").save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    write_labels(staging, labels)
    swap_in(staging, out_dir)
    return out_dir / "model", adapter_dir


# ------------------------------------------------------------------------------------------- the recipe


def resolve_max_length(cfg: TrainConfig, tokenizer, texts: list[str]) -> int:
    """``train.max_length``, or with ``auto`` the 99th percentile of the texts' token counts (special
    tokens included), rounded up to a multiple of 8 and at most ``max_length_cap``: short texts train and
    serve on short sequences, and at most 1 text in 100 is cut."""
    if cfg.max_length != "auto":
        return cfg.max_length
    limit = min(cfg.max_length_cap, getattr(tokenizer, "model_max_length", cfg.max_length_cap) or cfg.max_length_cap)
    sample = texts if len(texts) <= 20_000 else random.Random(0).sample(texts, 20_000)
    counts = [len(ids) for ids in tokenizer(sample, truncation=True, max_length=limit)["input_ids"]]
    p99 = int(np.percentile(counts, 99)) if counts else limit
    return int(min(limit, max(16, -(-p99 // 8) * 8)))


def loss_weights(cfg: TrainConfig, train_y: np.ndarray, num_labels: int) -> tuple[float, ...] | None:
    """Inverse-frequency loss weights (mean 1 over the training rows, at most 10x the most common class),
    when ``class_weights`` asks for them; ``auto`` does when the largest class is 3x the smallest."""
    counts = np.bincount(train_y, minlength=num_labels).astype(float)
    present = counts[counts > 0]
    if cfg.class_weights == "none" or (cfg.class_weights == "auto" and present.max() < 3 * present.min()):
        return None
    weights = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
    weights = np.minimum(weights, 10 * weights[counts.argmax()])
    return tuple(float(w) for w in weights / (weights @ counts / counts.sum()))


HEAD_MODULES = ("classifier", "score")  # the freshly initialised head of a sequence-classification model


def parameter_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable weights, the new head at ``head_learning_rate`` and the encoder at ``learning_rate``:
    a head that starts from random needs larger steps than adapters on pretrained weights."""
    head, encoder = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if any(part in HEAD_MODULES for part in name.split(".")) else encoder).append(param)
    head_lr = cfg.head_learning_rate or cfg.learning_rate
    return [g for g in ({"params": encoder, "lr": cfg.learning_rate}, {"params": head, "lr": head_lr}) if g["params"]]


def _diverging(history: list[dict[str, float]], bad_evaluations: int, evaluations: int) -> bool:
    """The training loss rose at each of the last ``evaluations`` evaluations and validation macro-F1 improved at
    none of them. A noisy loss at a constant learning rate, while validation still improves, is no divergence."""
    losses = [h["train_loss"] for h in history[-(evaluations + 1):]]
    rising = len(losses) == evaluations + 1 and all(b > a for a, b in zip(losses, losses[1:]))
    return rising and bad_evaluations >= evaluations


@dataclass
class _LoopState:
    epoch: int = 0  # epochs done
    position: int = 0  # batches done in the epoch under way
    steps: int = 0
    seconds: float = 0.0  # in the training loop, over every resumed session
    best_f1: float = -1.0
    best_evaluation: int = 0
    bad_evaluations: int = 0
    cooldown: Cooldown | None = None
    stop_reason: str = ""
    finished: bool = False
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best_predicted_classes: int = 0  # distinct labels the best model predicts on the validation split
    best_val_logits: np.ndarray | None = None  # the best model's validation logits (rank 0)
    diverged: bool = False

    def __post_init__(self) -> None:
        self.seconds_before = self.seconds  # the clock of the sessions before this one (0 unless resumed)

    def epochs_done(self, batches_per_epoch: int) -> float:
        return self.epoch + self.position / batches_per_epoch


def _trainable_state(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _fingerprint(cfg: TrainConfig, prepared_dir: Path, seed: int, world_size: int = 1) -> str:
    """Checkpoints are resumed only by a run with the same config, seed, data and number of ranks."""
    digest = hashlib.sha256(cfg.model_dump_json(exclude={"resume", "num_threads", "devices"}).encode())
    digest.update(str(seed).encode())
    if world_size > 1:  # other ranks, other shards and steps; one process keeps its fingerprint as before
        digest.update(f"world_size={world_size}".encode())
    for split in ("train", "validation", "labels"):
        path = prepared_dir / (f"{split}.json" if split == "labels" else f"{split}.parquet")
        digest.update(hashlib.md5(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _save_checkpoint(directory: Path, fingerprint: str, state: _LoopState, model, optimizer) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{state.steps:07d}.pt"
    tmp = path.with_suffix(".tmp")
    # Only tensors and plain Python values, so resuming can load with torch.load(weights_only=True):
    # a checkpoint file never gets to run code.
    logits = state.best_val_logits
    numpy_rng = np.random.get_state()
    torch.save(
        {
            "fingerprint": fingerprint,
            "state": {**{f.name: getattr(state, f.name) for f in fields(state)},
                      "cooldown": None if state.cooldown is None else asdict(state.cooldown),
                      "best_val_logits": None if logits is None else torch.from_numpy(logits)},
            "weights": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [numpy_rng[0], torch.from_numpy(numpy_rng[1].astype(np.int64)), *numpy_rng[2:]],
                "python": random.getstate(),
            },
        },
        tmp,
    )
    tmp.replace(path)
    crash_point("train:checkpoint")
    # keep the two written last: an older run's higher step numbers must not outlive this run's own
    for old in sorted(directory.glob("step-*.pt"), key=lambda p: p.stat().st_mtime_ns)[:-2]:
        old.unlink()


def _latest_checkpoint(directory: Path, fingerprint: str) -> Path | None:
    for path in sorted(directory.glob("step-*.pt"), reverse=True):
        try:
            if torch.load(path, map_location="cpu", weights_only=True)["fingerprint"] == fingerprint:
                return path
        except Exception as exc:  # a torn or foreign file is skipped, not fatal: say so and go on
            log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
    return None


def _restore(path: Path, model, optimizer) -> _LoopState:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["weights"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    name, keys, *rest = saved["rng"]["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(saved["rng"]["python"])
    state = saved["state"]
    logits, cooldown = state["best_val_logits"], state["cooldown"]
    return _LoopState(**{**state, "best_val_logits": None if logits is None else logits.numpy(),
                         "cooldown": None if cooldown is None else Cooldown(**cooldown)})
