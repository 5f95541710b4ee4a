"""Distil the fine-tuned model into a student with fewer layers, for devices where every millisecond counts.

The student is the teacher with every other encoder layer dropped (its remaining layers, embeddings, pooler
and head start from the teacher's fine-tuned weights, as DistilBERT starts from BERT), then trained on the
training texts to match the teacher's logits (softened by ``temperature``) and the true labels, for as long as
its validation macro-F1 improves (the train step's rule, ``langops.schedule``). It is calibrated like the teacher and written in the train step's layout, so compress, the gate and the server
take it as they take any trained model: the gate judges it as the model that ships.

The student ships only when it holds up: the teacher must have more encoder layers than the student would,
the student's validation macro-F1 must be within ``max_val_drop`` of the teacher's, and, given a
``BaselineFloor``, it must beat the TF-IDF baseline's validation predictions by the gate's margin (the lower
bound of the paired bootstrap interval, as the gate judges the shipped model on test). Otherwise, or with
``compress.distill.enabled`` false, the teacher ships, and ``distill.json`` and the log say why.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from langops.calibration import choose_temperature, fold_temperature
from langops.config import DistillConfig
from langops.cpu_share import CpuShare
from langops.faults import crash_point
from langops.io import (
    LABEL,
    TEXT,
    read_json,
    read_labels,
    read_split,
    staging_dir,
    swap_in,
    write_json,
    write_labels,
)
from langops.modeling import load_trained_classifier, pad_batch, predict_logits, tokenize
from langops.schedule import Schedule
from langops.tasks.train import length_grouped_batches, seed_everything

log = logging.getLogger(__name__)

SUMMARY_FILE = "distill.json"
MODEL_DIR = "model"


@dataclass(frozen=True)
class BaselineFloor:
    """The baseline's validation predictions, which a student must beat by ``margin`` to ship: the lower bound
    of the paired bootstrap interval of student − baseline validation macro-F1 (``promote.thresholds.
    baseline_margin``, ``promote.confidence`` and ``promote.bootstrap_samples``, as the gate's floor)."""

    predictions: np.ndarray  # label ids, one per validation row in the prepared file's order
    margin: float
    confidence: float = 0.95
    bootstrap_samples: int = 2000


@dataclass(frozen=True)
class DistillResult:
    out_dir: Path
    enabled: bool
    shipped: bool = False  # the student is the model compress takes; else the teacher
    reason: str = ""  # why the student ships, or why the teacher does
    layers: int | None = None  # the student's encoder layers
    teacher_layers: int | None = None
    kept_layers: tuple[int, ...] = ()  # which teacher layers the student started from
    steps: int = 0
    stop_reason: str = ""  # patience or a ceiling, as the train step's (langops.schedule)
    teacher_val_macro_f1: float | None = None
    val_macro_f1: float | None = None
    baseline_val_macro_f1: float | None = None  # the baseline the student had to beat, when there was a floor
    baseline_interval: tuple[float, float] | None = None  # student − baseline, paired bootstrap on validation
    temperature: float = 1.0  # the student's calibration, folded into its head (1.0: none folded)
    calibration: str = ""  # why that temperature: it must lower validation ECE on rows it was not fitted on
    val_ece_uncalibrated: float | None = None  # the student's own probabilities on validation
    val_ece_cross_fitted: float | None = None  # each half of validation scored with the other half's temperature
    seconds: float = 0.0

    @property
    def model_dir(self) -> Path:
        return self.out_dir / MODEL_DIR

    @classmethod
    def load(cls, out_dir: Path) -> DistillResult:
        path = Path(out_dir) / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the distill step first")
        summary = read_json(path)
        summary["kept_layers"] = tuple(summary.get("kept_layers", ()))
        if summary.get("baseline_interval") is not None:
            summary["baseline_interval"] = tuple(summary["baseline_interval"])
        summary.setdefault("shipped", summary["enabled"])  # written before students could be refused
        return cls(**{**summary, "out_dir": Path(out_dir)})


def distill(
    cfg: DistillConfig, *, trained_dir: Path, prepared_dir: Path, out_dir: Path, max_length: int, seed: int,
    baseline_floor: BaselineFloor | None = None,
) -> DistillResult:
    """Train the student and write it (``model/``, ``labels.json``, ``distill.json``) to ``out_dir``; with a
    ``baseline_floor`` it ships only if it also beats the baseline on the validation rows."""
    out_dir = Path(out_dir)
    if not cfg.enabled:
        return _teacher_ships(out_dir, enabled=False, reason="compress.distill.enabled is false")
    with CpuShare(cfg.num_threads, apply=torch.set_num_threads) as cpu:
        return _distill(cfg, cpu, trained_dir=trained_dir, prepared_dir=prepared_dir, out_dir=out_dir,
                        max_length=max_length, seed=seed, baseline_floor=baseline_floor)


def _distill(
    cfg: DistillConfig, cpu: CpuShare, *, trained_dir: Path, prepared_dir: Path, out_dir: Path, max_length: int,
    seed: int, baseline_floor: BaselineFloor | None,
) -> DistillResult:
    started = time.perf_counter()
    seed_everything(seed)
    labels = read_labels(trained_dir)
    label_ids = {name: i for i, name in enumerate(labels)}
    teacher, tokenizer = load_trained_classifier(Path(trained_dir) / "model")
    too_shallow = _why_no_student(teacher, cfg.layers)
    if too_shallow:
        return _teacher_ships(out_dir, enabled=True, reason=too_shallow)
    train_df, val_df = read_split(prepared_dir, "train"), read_split(prepared_dir, "validation")
    val_y = np.array([label_ids[y] for y in val_df[LABEL]])

    texts = train_df[TEXT].tolist()
    teacher_logits = torch.from_numpy(predict_logits(teacher, tokenizer, texts, batch_size=cfg.batch_size * 2,
                                                     max_length=max_length))
    teacher_val_f1 = _macro_f1(predict_logits(teacher, tokenizer, val_df[TEXT].tolist(), max_length=max_length),
                               val_y, len(labels))
    student, kept = make_student(teacher, cfg.layers)
    train_ids = tokenize(tokenizer, texts, max_length)
    train_y = torch.as_tensor([label_ids[y] for y in train_df[LABEL]])

    lengths = [len(x) for x in train_ids]
    # The train step's rule for how long to train (langops.schedule); every epoch has as many batches.
    schedule = Schedule.from_config(cfg, len(list(length_grouped_batches(lengths, cfg.batch_size,
                                                                         np.random.default_rng(seed)))))
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    best_f1, best_state, steps, epoch, bad_evaluations = -1.0, None, 0, 0, 0
    cooldown, stop_reason, loop_started = None, None, time.perf_counter()
    while stop_reason is None:
        epoch += 1
        student.train()
        batches = list(length_grouped_batches(lengths, cfg.batch_size, np.random.default_rng(seed + epoch)))
        for position, batch in enumerate(tqdm(batches, desc=f"distil epoch {epoch}", unit="batch", mininterval=1.0,
                                              leave=False), start=1):
            cooldown = schedule.cooldown_for(steps, cooldown)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * schedule.lr_factor(steps, cooldown)
            inputs = pad_batch(tokenizer, [train_ids[i] for i in batch])
            logits = student(**inputs).logits
            loss = distillation_loss(logits, teacher_logits[batch], train_y[batch], cfg.temperature, cfg.alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cpu.refresh()
            steps += 1
            if not schedule.evaluates_at(position, steps, cooldown):
                continue
            val_f1 = _macro_f1(predict_logits(student, tokenizer, val_df[TEXT].tolist(), max_length=max_length),
                               val_y, len(labels))
            log.info("distil step %d (epoch %.2f): validation macro-F1 %.4f (teacher %.4f)", steps,
                     epoch - 1 + position / len(batches), val_f1, teacher_val_f1)
            if val_f1 > best_f1:
                best_f1, best_state, bad_evaluations = val_f1, copy.deepcopy(student.state_dict()), 0
            else:
                bad_evaluations += 1
            seconds = time.perf_counter() - loop_started
            verdict = schedule.after_evaluation(steps=steps, bad_evaluations=bad_evaluations, seconds=seconds,
                                                seconds_per_step=seconds / steps, cooldown=cooldown)
            if verdict.cooldown is not None and bad_evaluations:  # anneal the best weights, as the train step does
                student.load_state_dict(best_state)
            cooldown = verdict.cooldown or cooldown
            if verdict.stop is not None:
                stop_reason = verdict.stop
                log.info("distil stopped at step %d (%s)", steps, stop_reason)
                break
            student.train()
    student.load_state_dict(best_state)
    student_val_logits = predict_logits(student, tokenizer, val_df[TEXT].tolist(), max_length=max_length)
    calibration = choose_temperature(student_val_logits, val_y, seed=seed)
    log.info("distil calibration: %s", calibration.reason)
    fold_temperature(student, calibration.temperature)

    drop = teacher_val_f1 - best_f1
    shipped = drop <= cfg.max_val_drop
    reason = (f"the student's validation macro-F1 {best_f1:.4f} is {abs(drop):.4f} "
              f"{'below' if drop >= 0 else 'above'} the teacher's {teacher_val_f1:.4f}, "
              f"{'within' if shipped else 'beyond'} compress.distill.max_val_drop "
              f"{cfg.max_val_drop}")
    baseline_f1 = interval = None
    if baseline_floor is not None:
        beats, baseline_f1, interval, against = judge_against_baseline(
            student_val_logits.argmax(axis=1), baseline_floor, val_y, len(labels))
        shipped = shipped and beats
        reason += f"; {against}"
    reason += "" if shipped else ": the teacher ships"
    (log.info if shipped else log.warning)("distil: %s", reason)
    result = DistillResult(
        out_dir=out_dir, enabled=True, shipped=shipped, reason=reason,
        layers=cfg.layers, teacher_layers=teacher.config.num_hidden_layers,
        kept_layers=kept, steps=steps, stop_reason=stop_reason, teacher_val_macro_f1=teacher_val_f1,
        val_macro_f1=best_f1, baseline_val_macro_f1=baseline_f1, baseline_interval=interval,
        temperature=calibration.temperature, calibration=calibration.reason,
        val_ece_uncalibrated=calibration.ece_uncalibrated, val_ece_cross_fitted=calibration.ece_cross_fitted,
        seconds=time.perf_counter() - started,
    )
    _save(student, tokenizer, labels, result)
    return result


def judge_against_baseline(
    student_pred: np.ndarray, floor: BaselineFloor, y_true: np.ndarray, num_labels: int
) -> tuple[bool, float, tuple[float, float], str]:
    """Whether the student's validation predictions beat the baseline's by the floor's margin, the baseline's
    macro-F1, the interval of the difference, and the verdict in words."""
    from langops.tasks.promote import paired_bootstrap_interval

    theirs = np.asarray(floor.predictions, dtype=np.int64)
    if theirs.shape != y_true.shape:
        raise ValueError(f"the baseline scored {theirs.shape[0]} validation rows, the prepared split holds "
                         f"{y_true.shape[0]}: run the baseline step again")
    ours_f1, theirs_f1 = _macro_f1_of(student_pred, y_true, num_labels), _macro_f1_of(theirs, y_true, num_labels)
    low, high = paired_bootstrap_interval("macro_f1", y_true, np.asarray(student_pred), theirs, num_labels,
                                          samples=floor.bootstrap_samples, confidence=floor.confidence)
    beats = low >= floor.margin and ours_f1 > theirs_f1
    verdict = (f"against the TF-IDF baseline's {theirs_f1:.4f} the difference is {ours_f1 - theirs_f1:+.4f}, "
               f"{floor.confidence:.0%} interval [{low:+.4f}, {high:+.4f}]: "
               + ("beats" if beats else "does not beat") + f" it by promote.thresholds.baseline_margin {floor.margin}")
    return beats, theirs_f1, (low, high), verdict


def make_student(teacher: torch.nn.Module, layers: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A copy of ``teacher`` keeping ``layers`` of its encoder layers, evenly spaced and ending with its last.

    Raises:
        ValueError: ``layers`` is not fewer than the teacher's.
    """
    encoder = _encoder_layers(teacher)
    if not 1 <= layers < len(encoder):
        raise ValueError(f"compress.distill.layers must be between 1 and {len(encoder) - 1}, got {layers}")
    step = len(encoder) / layers
    kept = tuple(sorted({round(len(encoder) - 1 - i * step) for i in range(layers)}))
    student = copy.deepcopy(teacher)
    encoder_of_student = getattr(student, student.base_model_prefix, student).encoder
    encoder_of_student.layer = torch.nn.ModuleList([encoder_of_student.layer[i] for i in kept])
    student.config.num_hidden_layers = len(kept)
    return student, kept


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``alpha`` × KL(teacher ‖ student) at ``temperature`` (scaled by its square, as Hinton et al.) plus
    (1 − ``alpha``) × cross-entropy with the true labels."""
    soft = torch.nn.functional.kl_div(
        torch.log_softmax(student_logits / temperature, dim=-1),
        torch.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    ) * temperature**2
    return alpha * soft + (1 - alpha) * torch.nn.functional.cross_entropy(student_logits, target)


def _why_no_student(teacher: torch.nn.Module, layers: int) -> str:
    """Why ``teacher`` cannot give a ``layers``-layer student, or "" when it can."""
    try:
        depth = len(_encoder_layers(teacher))
    except ValueError as exc:
        return f"{exc}: the teacher ships"
    if layers >= depth:
        return (f"the teacher has {depth} encoder layers, no more than compress.distill.layers {layers}: "
                "the teacher ships")
    return ""


def _teacher_ships(out_dir: Path, *, enabled: bool, reason: str) -> DistillResult:
    """No student: only the summary is written, saying why."""
    if enabled:
        log.warning("distil: %s", reason)
    shutil.rmtree(out_dir, ignore_errors=True)
    result = DistillResult(out_dir=out_dir, enabled=enabled, shipped=False, reason=reason)
    write_json(out_dir / SUMMARY_FILE, _summary(result))
    return result


def _encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no encoder.layer list to take a student from")
    return layers


def _macro_f1_of(predicted: np.ndarray, y: np.ndarray, num_labels: int) -> float:
    return float(f1_score(y, predicted, labels=list(range(num_labels)), average="macro", zero_division=0))


def _macro_f1(logits: np.ndarray, y: np.ndarray, num_labels: int) -> float:
    return _macro_f1_of(logits.argmax(axis=1), y, num_labels)


def _summary(result: DistillResult) -> dict:
    summary = {k: v for k, v in vars(result).items() if k != "out_dir"}
    summary["kept_layers"] = list(result.kept_layers)
    return summary


def _save(student: torch.nn.Module, tokenizer, labels: list[str], result: DistillResult) -> None:
    """Write the student in the train step's layout into a sibling folder, then swap it into place."""
    staging = staging_dir(result.out_dir)
    (staging / MODEL_DIR).mkdir()
    student.config.update({"langops_temperature": result.temperature})
    student.save_pretrained(staging / MODEL_DIR)
    tokenizer.save_pretrained(staging / MODEL_DIR)
    write_labels(staging, labels)
    write_json(staging / SUMMARY_FILE, _summary(result))
    crash_point("distill:staged")
    swap_in(staging, result.out_dir)
