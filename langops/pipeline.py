"""The adapters between the project's params and the steps: one per stage of ``langops.stages``.

Each adapter takes ``Params`` and the results of the stages it needs, calls its step in ``tasks/`` with the
step's config section and paths, has the tracking adapter (``langops.tracking``) record the result in
MLflow, and returns the step's result. In the Prefect flow the results pass from adapter to adapter; a
stage run on its own (``langops <step>``, what ``dvc repro`` calls) gets them loaded from the outputs the
earlier stages left (``langops.stages.run_stage``). Either way the same adapter does the same work.

The MLflow run is opened by ``run_train``; its id travels in the ``TrainRecord`` to the stages that log
into the same run.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from langops import tracking
from langops.aliases import CHAMPION
from langops.config import Params
from langops.io import jsonable, read_json, read_split, read_test_rows, write_json
from langops.lineage import git_commit
from langops.promotions import current_alias_version, record_decision
from langops.tasks import baseline as baseline_step
from langops.tasks.baseline import BaselineResult
from langops.tasks.collect_feedback import FeedbackCollection, collect_feedback
from langops.tasks.compress import REFERENCE_FILE, CompressionResult, compress
from langops.tasks.distill import BaselineFloor, DistillResult, distill
from langops.tasks.evaluate import EvaluationResult, evaluate
from langops.tasks.prepare import SUMMARY_FILE, PrepareResult, prepare
from langops.tasks.promote import (
    BASELINE_MARGIN,
    BASELINE_NAME,
    ComparedRows,
    Decision,
    ModelEvidence,
    ShadowEvidence,
    already_champion,
    decide,
    with_approval,
)
from langops.tasks.register import RegistrationResult, ShippedCalibration, register
from langops.tasks.train import TrainResult, launch_torchrun, rank_info, resolve_devices, train
from langops.tasks.validate import DataValidationError, ValidationResult, validate

log = logging.getLogger(__name__)

TRAIN_RECORD = "train.json"  # beside the trained model: its MLflow run, lineage and training result
DEPLOYMENT_RECORD = "deployment.json"
NO_APPROVER = "nobody"


def run_collect_feedback(params: Params) -> FeedbackCollection:
    """Merge the deployed server's labelled texts into ``feedback.dataset`` and version it (a retraining run's
    first step; not a DVC stage: it reads live logs, and what it writes is a data source)."""
    from langops.monitor import prediction_logs

    return collect_feedback(params.feedback, logs=prediction_logs(params), text_column=params.data.text_column,
                            label_column=params.data.label_column, record_dir=params.paths.feedback)


def nothing_new(params: Params, prepared: PrepareResult) -> str | None:
    """Why training would learn nothing the champion did not (its data version and params are these), else None."""
    from mlflow import MlflowClient

    tracking.configure_mlflow(params)
    model = params.register.model_name
    champion = current_alias_version(model, CHAMPION)
    if champion is None:
        return None
    tags = MlflowClient().get_model_version(model, champion).tags
    if tags.get("data_version") != prepared.data_version or tags.get("params_hash") != params.section_hash():
        return None
    return (f"nothing new to learn: the champion, {model} version {champion}, was trained on this data version "
            f"({prepared.data_version}) with these params, and no new feedback came; training skipped")


def training_feedback(params: Params, prepared: PrepareResult) -> str | None:
    """The lineage entry of the feedback dataset a model learns from: file, md5, rows and when it was labelled."""
    dataset = Path(params.feedback.dataset)
    summary = prepared.out_dir / SUMMARY_FILE
    found = (read_json(summary).get("extra_sources") or {}).get(dataset.name) if summary.is_file() else None
    if not isinstance(found, dict):
        return None
    collected = FeedbackCollection.load(params.paths.feedback)
    span = (f", labelled {collected.labelled_from} to {collected.labelled_to}"
            if collected is not None and collected.md5 == found["md5"] and collected.labelled_from else "")
    return f"{dataset.name} md5 {found['md5']}: {found['rows']} rows{span}"


def run_prepare(params: Params) -> PrepareResult:
    result = prepare(params.data, params.prepare, seed=params.project.seed, out_dir=params.paths.prepared,
                     report_dir=params.paths.prepare_report)
    log.info("prepared %s rows into %s (data version %s)", result.rows, result.out_dir, result.data_version)
    for note in result.notes:
        log.info("prepare: %s", note)
    return result


def run_validate(params: Params, prepared: PrepareResult) -> ValidationResult:
    """Run the expectation suite, then compare the data with the champion's; raises ``DataValidationError``
    (with the report written) on bad data, or on drift from the champion's data when params say so."""
    result = validate(params.data, params.validate, prepared_dir=prepared.out_dir, report_dir=params.paths.validation,
                      prepare_notes=prepared.notes)
    for warning in result.warnings:
        log.warning("validate: %s", warning)
    if result.warnings:
        log.warning("validate: %d warnings, the run goes on; full report: %s", len(result.warnings), result.report_path)
    compared = compare_with_champion(params, prepared)
    if compared is not None and compared.verdict == "drift":
        reasons = "; ".join(compared.reasons)
        where = params.paths.validation / CHAMPION_DRIFT_REPORT
        if params.validate.champion_drift == "error":
            raise DataValidationError(f"the training data drifted from the champion's (validate.champion_drift is "
                                      f"error): {reasons}; report: {where}", result)
        log.warning("validate: the training data drifted from the champion's: %s; report: %s", reasons, where)
    return result


CHAMPION_DRIFT_REPORT = "champion-drift.md"


def compare_with_champion(params: Params, prepared: PrepareResult) -> Any:
    """The training split against the champion's reference set (its test split as registered), or None when
    there is nothing to compare: no champion yet, a champion compressed before reference sets existed, or
    ``validate.champion_drift: off``. The report goes beside the validation report.

    The champion embeds a sample of the new training texts, so both sides are seen by the same model.
    """
    import pandas as pd

    from langops.monitor import MonitorError, find_model
    from langops.monitoring import TRUE_LABEL, compare_training_data
    from langops.onnx_model import OnnxClassifier
    from langops.processes import write_atomic

    if params.validate.champion_drift == "off":
        return None
    try:
        champion = find_model(params)
    except MonitorError as exc:
        log.info("validate: nothing to compare the data with: %s", exc)
        return None
    reference_file = champion.compressed_dir / REFERENCE_FILE
    if not reference_file.is_file():
        log.info("validate: champion %s has no %s (compressed before reference sets): no comparison",
                 champion.version, REFERENCE_FILE)
        return None
    reference = pd.read_parquet(reference_file)
    train = read_split(prepared.out_dir, "train")
    sample = train.sample(n=min(len(train), params.validate.champion_drift_rows), random_state=params.project.seed)
    texts = sample["text"].tolist()
    scores = OnnxClassifier.load(champion.compressed_dir).score(texts)
    embeddings = list(scores.embeddings) if scores.embeddings is not None else [None] * len(texts)
    current = pd.DataFrame({TRUE_LABEL: sample["label"].to_numpy(), "text_chars": [len(t) for t in texts],
                            "embedding": embeddings})
    labels = sorted(set(reference[TRUE_LABEL].dropna()) | set(current[TRUE_LABEL]))
    report = compare_training_data(reference, current, params.monitor, labels=labels)
    heading = f"Training data against champion {champion.model_name} v{champion.version}'s"
    write_atomic(params.paths.validation / CHAMPION_DRIFT_REPORT, report.to_markdown(heading))
    log.info("validate: training data against champion v%s's: %s", champion.version, report.verdict)
    return report


def run_baseline(params: Params, prepared: PrepareResult) -> BaselineResult:
    """Fit the TF-IDF + logistic-regression baseline on the prepared splits: what evaluate and the gate set the
    model beside. It records nothing in MLflow itself (no run is open yet); evaluate logs its figures."""
    result = baseline_step.baseline(params.baseline, prepared=prepared, out_dir=params.paths.baseline)
    log.info("baseline: %s, fit twice and scored in %.1f s", result.description, result.seconds)
    return result


@dataclass(frozen=True)
class TrainRecord:
    """A trained model and where it is recorded: its MLflow run and lineage (``run_id`` is empty on a
    torchrun rank other than 0, which records nothing)."""

    run_id: str
    lineage: dict[str, str]
    result: TrainResult

    @classmethod
    def load(cls, trained_dir: Path) -> TrainRecord:
        """The record ``run_train`` left beside the model (for a later stage run on its own)."""
        path = Path(trained_dir) / TRAIN_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the train step first")
        summary = read_json(path)
        return cls(run_id=summary["run_id"], lineage=summary["lineage"], result=TrainResult.from_summary(summary))


def run_train(params: Params, prepared: PrepareResult) -> TrainRecord:
    """Open the MLflow run for this model, log params and lineage, train, and log the training curve.

    With ``train.devices`` > 1 a plain process re-launches this step under torchrun, one process per
    device, waits, and returns what rank 0 recorded. Under torchrun only rank 0 opens the MLflow run and
    writes the record; the other ranks train and return their result with no run id.
    """
    ranks = rank_info()
    if not ranks.launched and (devices := resolve_devices(params.train)) > 1:
        return _run_train_with_torchrun(params, devices)

    def train_step(on_evaluation: Callable[[dict[str, float], int], None] | None = None) -> TrainResult:
        return train(params.train, prepared_dir=prepared.out_dir, out_dir=params.paths.trained,
                     checkpoint_dir=params.paths.checkpoints, seed=params.project.seed, on_evaluation=on_evaluation)

    if not ranks.is_main:
        return TrainRecord(run_id="", lineage={}, result=train_step())
    lineage = {
        "data_version": prepared.data_version,
        "git_commit": git_commit(prepared.out_dir) or "unknown",
        "params_hash": params.section_hash(),
        "base_model": params.train.base_model,
        "train_method": params.train.method,
    }
    if (feedback := training_feedback(params, prepared)) is not None:
        lineage["training_feedback"] = feedback
    with tracking.training_run(params, lineage, validation_dir=params.paths.validation) as run:
        result = train_step(on_evaluation=run.log_evaluation)
        record = TrainRecord(run_id=run.run_id, lineage=lineage, result=result)
        summary = {"run_id": record.run_id, "lineage": lineage, **jsonable(asdict(result))}
        write_json(params.paths.trained / TRAIN_RECORD, summary)
        run.log_result(result, summary)
    return record


def _run_train_with_torchrun(params: Params, devices: int) -> TrainRecord:
    """``langops train`` under torchrun with exactly these (resolved) params; rank 0's record is the result."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="langops-train-") as tmp:
        resolved = Path(tmp) / "params.yaml"  # every path in it is absolute: the ranks read the same folders
        resolved.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        launch_torchrun(devices, ["-m", "langops.cli", "train", "--params", str(resolved)])
    return TrainRecord.load(params.paths.trained)


def run_evaluate(
    params: Params, prepared: PrepareResult, baseline: BaselineResult, trained: TrainRecord
) -> EvaluationResult:
    result = evaluate(
        params.evaluate,
        trained_dir=trained.result.out_dir,
        prepared_dir=prepared.out_dir,
        out_dir=params.paths.evaluation,
        max_length=trained.result.max_length,
        baseline=baseline,
    )
    tracking.log_evaluation(params, trained.run_id, result)
    return result


def run_distill(
    params: Params, prepared: PrepareResult, baseline: BaselineResult, trained: TrainRecord
) -> DistillResult:
    result = distill(params.compress.distill, trained_dir=trained.result.out_dir, prepared_dir=prepared.out_dir,
                     out_dir=params.paths.student, max_length=trained.result.max_length, seed=params.project.seed,
                     baseline_floor=baseline_floor(params, prepared, baseline))
    if result.enabled and trained.run_id:
        tracking.log_distillation(params, trained.run_id, result)
    return result


def run_compress(
    params: Params, prepared: PrepareResult, trained: TrainRecord, distilled: DistillResult
) -> CompressionResult:
    """Compress the model that ships: the distilled student when there is one, else the trained model."""
    result = compress(
        params.compress,
        trained_dir=distilled.out_dir if distilled.shipped else trained.result.out_dir,
        prepared_dir=prepared.out_dir,
        out_dir=params.paths.compressed,
        report_dir=params.paths.compression,
        max_length=trained.result.max_length,
    )
    tracking.log_compression(params, trained.run_id, result)
    return result


def run_register(
    params: Params, trained: TrainRecord, distilled: DistillResult, compressed: CompressionResult
) -> RegistrationResult:
    tracking.configure_mlflow(params)
    return register(
        params.register,
        compression=compressed,
        run_id=trained.run_id,
        lineage=trained.lineage,
        out_dir=params.paths.registration,
        calibration=shipped_calibration(trained.result, distilled),
    )


def shipped_calibration(trained: TrainResult, distilled: DistillResult) -> ShippedCalibration:
    """The calibration of the model compress shipped: the student's when it ships, else the trained model's."""
    if distilled.shipped:
        return ShippedCalibration(f"the student's: {distilled.calibration}", distilled.temperature,
                                  distilled.val_ece_uncalibrated, distilled.val_ece_cross_fitted)
    return ShippedCalibration(trained.calibration, trained.temperature, trained.val_ece_uncalibrated,
                              trained.val_ece_cross_fitted)


def run_promote(
    params: Params,
    prepared: PrepareResult,
    baseline: BaselineResult,
    compressed: CompressionResult,
    registered: RegistrationResult,
    *,
    force_reason: str | None = None,
    actor: str = "pipeline",
    cause: str = "",
    approve: Callable[[Decision], tuple[bool, str, str]] | None = None,
) -> Decision:
    """Decide on the registered version and record the outcome (see ``decide_promotion``).

    When ``promote.require_approval`` is set, a passing, unforced challenger also needs a person:
    ``approve(decision)`` returns ``(approved, reviewer, comment)``. Without an ``approve`` (the DVC stage,
    the CLI) nobody can be asked, so the challenger is not promoted and the record says why.
    """
    decision = decide_promotion(params, prepared, baseline, compressed, registered, force_reason=force_reason)
    if params.promote.require_approval and decision.promote and not decision.forced:
        if approve is None:
            decision = with_approval(decision, approved=False, reviewer=NO_APPROVER,
                                     comment="promote.require_approval is set and this run cannot ask; use the Prefect flow")
        else:
            approved, reviewer, comment = approve(decision)
            decision = with_approval(decision, approved=approved, reviewer=reviewer, comment=comment)
    return record_promotion(params, decision, registered, actor=actor, cause=cause)


def decide_promotion(
    params: Params,
    prepared: PrepareResult,
    baseline: BaselineResult,
    compressed: CompressionResult,
    registered: RegistrationResult,
    *,
    force_reason: str | None = None,
) -> Decision:
    """Gather evidence for challenger, champion and baseline on the same test rows and run the gate.

    The models are judged as they ship: the challenger's compressed model and the champion's registered
    one, each scored here on the current test split, so the comparison is paired row by row; the baseline's
    predictions on those rows come from the baseline step. The challenger must also load and answer in a
    fresh process, the way the server will load it.
    """
    from langops.serving.infra_check import check_servable

    tracking.configure_mlflow(params)
    champion_version = current_alias_version(params.register.model_name, CHAMPION)
    if champion_version == registered.version:
        return already_champion(champion_version, params.promote, force_reason=force_reason)
    challenger = challenger_evidence(prepared, compressed, registered.version)
    servable = check_servable(
        tracking_uri=params.tracking_uri(),
        model_name=params.register.model_name,
        version=challenger.version,
        texts=read_split(prepared.out_dir, "test")["text"].head(32).tolist(),
    )
    challenger = replace(challenger, servable=servable.ok, servable_detail=servable.detail)
    champion = compared = None
    if champion_version is not None:
        champion_dir = _registered_model_dir(params, champion_version)
        champion = shipped_model_evidence(prepared, champion_dir, champion_version, compare_with=challenger.labels)
        compared = compared_rows(prepared, {f"champion version {champion_version}": champion_dir,
                                            f"challenger version {registered.version}": compressed.out_dir})
    shadow = shadow_evidence(params, challenger.version, champion_version) if params.promote.shadow_evidence else None
    return decide(challenger, champion, params.promote, baseline=baseline_evidence(prepared, baseline, challenger.labels),
                  compared=compared, force_reason=force_reason, shadow=shadow)


def baseline_evidence(prepared: PrepareResult, baseline: BaselineResult, labels: Sequence[str]) -> ModelEvidence:
    """The baseline's per-row test predictions as gate evidence, for the model's labels.

    Raises:
        StaleBaselineError: the baseline was made for other prepared rows.
        ValueError: its labels are not the model's.
    """
    if tuple(baseline.labels) != tuple(labels):
        raise ValueError(f"the baseline knows labels {list(baseline.labels)}, the model {list(labels)}: run the "
                         "baseline step again on this prepared data")
    texts, y_true = read_test_rows(prepared.out_dir, labels)
    return ModelEvidence.from_probabilities(BASELINE_NAME, labels, y_true, baseline.test_probabilities(prepared.out_dir),
                                            text_lengths=tuple(len(t) for t in texts))


def baseline_floor(params: Params, prepared: PrepareResult, baseline: BaselineResult) -> BaselineFloor | None:
    """What a distilled student must beat to ship: the baseline's validation predictions by the gate's margin
    (``promote.thresholds.baseline_margin``); None when the project sets no margin."""
    margin = params.promote.thresholds.get(BASELINE_MARGIN)
    if margin is None:
        return None
    return BaselineFloor(baseline.validation_predictions(prepared.out_dir), margin=float(margin),
                         confidence=params.promote.confidence, bootstrap_samples=params.promote.bootstrap_samples)


def compared_rows(prepared: PrepareResult, model_dirs: dict[str, Path]) -> ComparedRows:
    """The test rows that none of the models (name -> shipped folder) trained or was selected on, by their
    training manifests; a model shipped before manifests is named, and nothing is removed for it."""
    from langops.text_hashes import MANIFEST_FILE, TextManifest, text_hashes

    hashes = text_hashes(read_split(prepared.out_dir, "test")["text"].astype(str))
    keep = np.ones(len(hashes), dtype=bool)
    removed: dict[str, int] = {}
    without: list[str] = []
    for name, model_dir in model_dirs.items():
        try:
            manifest = TextManifest.load(Path(model_dir) / MANIFEST_FILE)
        except FileNotFoundError:
            without.append(name.rpartition(" ")[2])
            continue
        for split, seen in manifest.seen(hashes).items():
            removed[f"{name}'s {split} split"] = int((seen & keep).sum())
            keep &= ~seen
    return ComparedRows(keep=tuple(bool(k) for k in keep), removed=removed, without_manifest=tuple(without))


def shadow_evidence(params: Params, version: str | None, champion_version: str | None) -> ShadowEvidence | None:
    """The last ``shadow-stop`` record of ``version`` in the promotion log, if it ran beside ``champion_version``
    and the server's window was recorded, judged by ``deploy.rollout``'s thresholds; else None."""
    from langops.promotions import read_evidence, read_history
    from langops.serving.rollout import Window, judge_canary

    if version is None or champion_version is None:
        return None
    stopped = [e for e in read_history(params, params.register.model_name, limit=500)
               if e.event == "shadow-stop" and e.to_version == version]
    if not stopped or stopped[0].from_version != champion_version:
        return None  # never shadowed, or beside another champion: its window says nothing about this one
    window = (read_evidence(params, stopped[0].record_id).get("server") or {}).get("window")
    if not window:
        return None
    verdict = judge_canary(Window.from_dict(window), params.deploy.rollout)
    return ShadowEvidence(record_id=stopped[0].record_id, requests=int(window["challenger"]["requests"]),
                          checks=tuple((c.name, c.passed, c.detail) for c in verdict.checks))


def record_promotion(
    params: Params, decision: Decision, registered: RegistrationResult, *, actor: str = "pipeline", cause: str = ""
) -> Decision:
    """Apply the decision (tags; the alias only if it passed) and keep it: files, MLflow run, tags.
    ``cause`` says what started the run (a monitor event and its report); history shows it."""
    tracking.configure_mlflow(params)
    champion_after = record_decision(decision, params=params, actor=actor, cause=cause)
    written = decision.write(params.paths.promotion, champion_after=champion_after)
    if decision.challenger_version != decision.champion_version:  # else the run keeps the decision that promoted it
        tracking.log_decision(params, registered.run_id, decision, written)
    return decision


def challenger_evidence(prepared: PrepareResult, compressed: CompressionResult, version: str) -> ModelEvidence:
    """The compressed model about to ship: its per-row test predictions, latency, size and parity."""
    shipped = compressed.shipped
    return shipped_model_evidence(
        prepared,
        compressed.out_dir,
        version,
        latency_ms={
            key.removeprefix(f"{shipped}_"): float(value)
            for key, value in compressed.latency_ms.items()
            if key.startswith(f"{shipped}_")
        },
        size_mb=compressed.sizes_mb[f"{shipped}_onnx"],
        parity_passed=bool(compressed.parity.get("passed", True)),
    )


def shipped_model_evidence(
    prepared: PrepareResult, model_dir: Path, version: str, *, compare_with: Sequence[str] | None = None, **extra: Any
) -> ModelEvidence:
    """Score a compressed model on the current test split and wrap the per-row result as gate evidence.

    A champion whose labels differ from the challenger's (``compare_with``) is not scored: its evidence
    names its labels only, and the gate reports the label change instead of comparing.
    """
    from langops.onnx_model import OnnxClassifier

    classifier = OnnxClassifier.load(model_dir)
    if compare_with is not None and tuple(classifier.labels) != tuple(compare_with):
        return ModelEvidence(version, labels=tuple(classifier.labels))
    try:
        texts, y_true = read_test_rows(prepared.out_dir, classifier.labels)
    except ValueError as exc:
        raise ValueError(f"version {version} cannot be scored: {exc}") from exc
    probs = classifier.predict_proba(texts)
    lengths = tuple(len(t) for t in texts)
    return ModelEvidence.from_probabilities(version, classifier.labels, y_true, probs, text_lengths=lengths, **extra)


def _registered_model_dir(params: Params, version: str) -> Path:
    from langops.serving.registry import download_compressed_dir

    return download_compressed_dir(params.register.model_name, version, cache_dir=params.project.state_dir / "cache")


def run_deploy(params: Params):
    """Make the model server serve the current champion (start it when none is running)."""
    from langops.tasks.deploy import deploy

    record_path = params.paths.deployment / DEPLOYMENT_RECORD
    if not params.deploy.enabled:
        write_json(record_path, {"deployed": False, "reason": "deploy.enabled is false"})
        return None
    tracking.configure_mlflow(params)
    champion = current_alias_version(params.register.model_name, CHAMPION)
    if champion is None:
        record = {"deployed": False, "reason": "no champion to serve: no model has passed the gate yet"}
        write_json(record_path, record)
        log.warning(record["reason"])
        return None
    result = deploy(
        params.deploy,
        tracking_uri=params.tracking_uri(),
        model_name=params.register.model_name,
        expected_version=champion,
        state_dir=params.project.state_dir,
        stop_timeout_s=params.services.stop_timeout_s,
        experiment=params.tracking.experiment,
    )
    write_json(record_path, {"deployed": True, **jsonable(asdict(result))})
    return result


# What each stage left, loaded back for a later stage run on its own (``langops.stages.run_stage``).


def load_prepared(params: Params) -> PrepareResult:
    return PrepareResult.load(params.paths.prepared, params.paths.prepare_report)


def load_validated(params: Params) -> ValidationResult:
    return ValidationResult.load(params.paths.validation)


def load_baseline(params: Params) -> BaselineResult:
    return BaselineResult.load(params.paths.baseline)


def load_trained(params: Params) -> TrainRecord:
    return TrainRecord.load(params.paths.trained)


def load_evaluated(params: Params) -> EvaluationResult:
    return EvaluationResult.load(params.paths.evaluation)


def load_distilled(params: Params) -> DistillResult:
    return DistillResult.load(params.paths.student)


def load_compressed(params: Params) -> CompressionResult:
    return CompressionResult.load(params.paths.compressed)


def load_registered(params: Params) -> RegistrationResult:
    return RegistrationResult.load(params.paths.registration)


ADAPTERS: tuple[Callable[..., Any], ...] = (
    run_prepare, run_validate, run_baseline, run_train, run_evaluate, run_distill, run_compress, run_register,
    run_promote, decide_promotion, record_promotion, run_deploy,
)


def failed_step(exc: BaseException) -> str | None:
    """The step whose adapter raised ``exc`` (the innermost adapter on its traceback), or None if none did.

    The flow's tasks, the sweep and the DVC stages all call the adapters here, so an error that comes up
    through Prefect names its step as well as one from ``langops <step>`` does.
    """
    steps = {adapter.__code__: _step_name(adapter) for adapter in ADAPTERS}
    step = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        step = steps.get(frame.f_code, step)
    return step


def _step_name(adapter: Callable[..., Any]) -> str:
    return "promote" if adapter.__name__.endswith("_promotion") else adapter.__name__.removeprefix("run_")
