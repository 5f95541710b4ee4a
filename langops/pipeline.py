"""Stage runners: each resolves its paths from ``Params``, calls one step in ``tasks/``, records the
outcome (summary JSON for DVC, params/metrics/artifacts for MLflow) and returns the step's result.

The DVC stages (through ``langops <step>``) and the Prefect flow call these same functions, so both
paths do exactly the same work. The MLflow run is opened by ``run_train``; later stages find its id
in ``<trained>/train.json`` and log into the same run.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langops.aliases import CHAMPION
from langops.config import Params
from langops.io import jsonable, read_json, write_json

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train.json"


def run_prepare(params: Params):
    from langops.tasks.prepare import prepare

    result = prepare(params.data, params.prepare, seed=params.project.seed, out_dir=params.paths.prepared)
    log.info("prepared %s rows into %s (data version %s)", result.rows, result.out_dir, result.data_version)
    for note in result.notes:
        log.info("prepare: %s", note)
    return result


def run_validate(params: Params):
    """Run the expectation suite; raises ``DataValidationError`` (with the report written) on bad data."""
    from langops.tasks.validate import validate

    result = validate(params.data, params.validate, prepared_dir=params.paths.prepared, report_dir=params.paths.validation)
    for warning in result.warnings:
        log.warning("validate: %s", warning)
    if result.warnings:
        log.warning("validate: %d warnings, the run goes on; full report: %s", len(result.warnings), result.report_path)
    return result


@dataclass(frozen=True)
class TrainRecord:
    run_id: str
    lineage: dict[str, str]
    result: Any


def run_train(params: Params) -> TrainRecord:
    """Open the MLflow run for this model, log params and lineage, train, and log the training curve.

    With ``train.devices`` > 1 a plain process re-launches this step under torchrun, one process per
    device, waits, and returns what rank 0 recorded. Under torchrun only rank 0 opens the MLflow run and
    writes ``train.json``; the other ranks train and return their result with no run id.
    """
    import mlflow

    from langops.lineage import dvc_dir_md5, git_commit
    from langops.tasks.train import rank_info, resolve_devices, train
    from langops.tracking import configure_mlflow

    ranks = rank_info()
    if not ranks.launched and (devices := resolve_devices(params.train)) > 1:
        return _run_train_with_torchrun(params, devices)
    if not ranks.is_main:
        result = train(params.train, prepared_dir=params.paths.prepared, out_dir=params.paths.trained,
                       checkpoint_dir=params.paths.checkpoints, seed=params.project.seed)
        return TrainRecord(run_id="", lineage={}, result=result)
    configure_mlflow(params)
    lineage = {
        "data_version": dvc_dir_md5(params.paths.prepared),
        "git_commit": git_commit(params.paths.prepared) or "unknown",
        "params_hash": params.section_hash(),
        "base_model": params.train.base_model,
        "train_method": params.train.method,
    }
    run_name = f"{params.train.method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({f"langops.{k}": v for k, v in lineage.items()})
        mlflow.log_params(_flatten(params.model_dump(mode="json", include={"data", "prepare", "train"})))
        _log_if_exists(params.paths.validation, "validation")
        logged_epochs: set[int] = set()

        def log_epoch(metrics: dict[str, float], epoch: int) -> None:
            mlflow.log_metrics(metrics, step=epoch)
            logged_epochs.add(epoch)

        result = train(
            params.train,
            prepared_dir=params.paths.prepared,
            out_dir=params.paths.trained,
            checkpoint_dir=params.paths.checkpoints,
            seed=params.project.seed,
            on_epoch_end=log_epoch,
        )
        for row in result.history:  # epochs restored from a checkpoint were not logged live
            if row["epoch"] not in logged_epochs:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        summary = {"run_id": run.info.run_id, "lineage": lineage, **jsonable(asdict(result))}
        mlflow.log_metrics(
            {"best_val_macro_f1": result.best_val_macro_f1, "best_epoch": result.best_epoch,
             "train_seconds": result.seconds, "trainable_params": result.trainable_params}
        )
        mlflow.log_params({"train.world_size": result.world_size, "train.effective_batch_size": result.effective_batch_size})
        write_json(params.paths.trained / TRAIN_SUMMARY, summary)
        mlflow.log_dict(summary, "train/train.json")
        if result.adapter_dir is not None:
            mlflow.log_artifacts(str(result.adapter_dir), "train/adapter")
    return TrainRecord(run_id=run.info.run_id, lineage=lineage, result=result)


def _run_train_with_torchrun(params: Params, devices: int) -> TrainRecord:
    """``langops train`` under torchrun with exactly these (resolved) params; rank 0's train.json is the record."""
    import tempfile

    import yaml

    from langops.tasks.train import TrainResult, launch_torchrun

    with tempfile.TemporaryDirectory(prefix="langops-train-") as tmp:
        resolved = Path(tmp) / "params.yaml"  # every path in it is absolute: the ranks read the same folders
        resolved.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        launch_torchrun(devices, ["-m", "langops.cli", "train", "--params", str(resolved)])
    summary = train_summary(params)
    return TrainRecord(run_id=summary["run_id"], lineage=summary["lineage"], result=TrainResult.from_summary(summary))


def train_summary(params: Params) -> dict[str, Any]:
    path = params.paths.trained / TRAIN_SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train step first")
    return read_json(path)


def run_evaluate(params: Params):
    import mlflow

    from langops.metrics import headline
    from langops.tasks.evaluate import evaluate
    from langops.tracking import resumed_run

    result = evaluate(
        params.evaluate,
        trained_dir=params.paths.trained,
        prepared_dir=params.paths.prepared,
        out_dir=params.paths.evaluation,
        max_length=params.train.max_length,
    )
    with resumed_run(params, train_summary(params)["run_id"]):
        mlflow.log_metrics(headline(result.metrics, prefix="test_"))
        mlflow.log_metric("test_majority_baseline_accuracy", result.metrics["majority_baseline_accuracy"])
        mlflow.log_artifacts(str(params.paths.evaluation), "evaluation")
    return result


def run_compress(params: Params):
    import mlflow

    from langops.metrics import headline, metrics_for_dvc
    from langops.tasks.compress import compress
    from langops.tracking import resumed_run

    result = compress(
        params.compress,
        trained_dir=params.paths.trained,
        prepared_dir=params.paths.prepared,
        out_dir=params.paths.compressed,
        max_length=params.train.max_length,
    )
    with resumed_run(params, train_summary(params)["run_id"]):
        scalars = {**headline(result.metrics, prefix="int8_test_")}
        scalars.update(_numeric(result.parity, "parity_"))
        scalars.update(_numeric(result.sizes_mb, "size_mb_"))
        scalars.update(_numeric(result.latency_ms, "latency_ms_"))
        mlflow.log_metrics(scalars)
        mlflow.log_artifact(str(params.paths.compressed / "compress.json"), "compress")
    summary = read_json(params.paths.compressed / "compress.json")
    write_json(_parent(params.paths.compression) / "metrics.json", {**summary, "metrics": metrics_for_dvc(summary["metrics"])})
    return result


def run_register(params: Params):
    from langops.tasks.register import register

    summary = train_summary(params)
    result = register(
        params.register,
        params=params,
        compressed_dir=params.paths.compressed,
        run_id=summary["run_id"],
        lineage=summary["lineage"],
    )
    write_json(params.paths.registration / "registration.json", jsonable(asdict(result)))
    return result


NO_APPROVER = "nobody"


def run_promote(
    params: Params,
    *,
    force_reason: str | None = None,
    actor: str = "pipeline",
    approve: Callable[[Any], tuple[bool, str, str]] | None = None,
):
    """Decide on the latest registered version and record the outcome (see ``decide_promotion``).

    When ``promote.require_approval`` is set, a passing, unforced challenger also needs a person:
    ``approve(decision)`` returns ``(approved, reviewer, comment)``. Without an ``approve`` (the DVC stage,
    the CLI) nobody can be asked, so the challenger is not promoted and the record says why.
    """
    from langops.tasks.promote import with_approval

    decision = decide_promotion(params, force_reason=force_reason)
    if params.promote.require_approval and decision.promote and not decision.forced:
        if approve is None:
            decision = with_approval(decision, approved=False, reviewer=NO_APPROVER,
                                     comment="promote.require_approval is set and this run cannot ask; use the Prefect flow")
        else:
            approved, reviewer, comment = approve(decision)
            decision = with_approval(decision, approved=approved, reviewer=reviewer, comment=comment)
    return record_promotion(params, decision, actor=actor)


def decide_promotion(params: Params, *, force_reason: str | None = None):
    """Gather evidence for challenger and champion on the same test rows and run the gate.

    Both are judged as they ship: the challenger's compressed model and the champion's registered one,
    each scored here on the current test split, so the comparison is paired row by row. The challenger
    must also load and answer in a fresh process, the way the server will load it.
    """
    from langops.io import read_split
    from langops.serving.infra_check import check_servable
    from langops.tasks.promote import already_champion, decide
    from langops.tracking import configure_mlflow

    configure_mlflow(params)
    registration = read_json(params.paths.registration / "registration.json")
    champion_version = current_alias_version(params.register.model_name, CHAMPION)
    if champion_version == str(registration["version"]):
        return already_champion(champion_version, params.promote)
    challenger = challenger_evidence(params, str(registration["version"]))
    servable = check_servable(
        tracking_uri=params.tracking_uri(),
        model_name=params.register.model_name,
        version=challenger.version,
        texts=read_split(params.paths.prepared, "test")["text"].head(32).tolist(),
        cache_dir=params.project.state_dir / "cache",
    )
    challenger = replace(challenger, servable=servable.ok, servable_detail=servable.detail)
    champion = None
    if champion_version is not None:
        champion = shipped_model_evidence(
            params, _registered_model_dir(params, champion_version), champion_version, compare_with=challenger.labels
        )
    return decide(challenger, champion, params.promote, force_reason=force_reason)


def record_promotion(params: Params, decision, *, actor: str = "pipeline"):
    """Apply the decision (tags; the alias only if it passed) and keep it: files, MLflow run, tags."""
    import mlflow

    from langops.tasks.promote import apply_decision
    from langops.tracking import configure_mlflow, resumed_run

    configure_mlflow(params)
    registration = read_json(params.paths.registration / "registration.json")
    champion_after = apply_decision(decision, params=params, actor=actor)
    out = params.paths.promotion
    write_json(out / "decision.json", {**decision.to_dict(), "champion_after": champion_after})
    (out / "decision.md").write_text(decision.to_markdown())
    if decision.challenger_version == decision.champion_version:
        return decision  # already champion: the run keeps the record of the decision that promoted it
    with resumed_run(params, registration["run_id"]):
        mlflow.log_artifact(str(out / "decision.json"), "promotion")
        mlflow.log_artifact(str(out / "decision.md"), "promotion")
        mlflow.set_tag("langops.decision", "promoted" if decision.promote else "rejected")
    return decision


def challenger_evidence(params: Params, version: str):
    """The compressed model about to ship: its per-row test predictions, latency, size and parity."""
    compressed = read_json(params.paths.compressed / "compress.json")
    shipped = "int8" if compressed.get("quantized") else "fp32"
    return shipped_model_evidence(
        params,
        params.paths.compressed,
        version,
        latency_ms={
            key.removeprefix(f"{shipped}_"): float(value)
            for key, value in compressed["latency_ms"].items()
            if key.startswith(f"{shipped}_")
        },
        size_mb=compressed["sizes_mb"][f"{shipped}_onnx"],
        parity_passed=bool(compressed["parity"].get("passed", True)),
    )


def shipped_model_evidence(
    params: Params, model_dir: Path, version: str, *, compare_with: Sequence[str] | None = None, **extra: Any
):
    """Score a compressed model on the current test split and wrap the per-row result as gate evidence.

    A champion whose labels differ from the challenger's (``compare_with``) is not scored: its evidence
    names its labels only, and the gate reports the label change instead of comparing.
    """
    from langops.io import read_test_rows
    from langops.onnx_model import OnnxClassifier
    from langops.tasks.promote import ModelEvidence

    classifier = OnnxClassifier.load(model_dir)
    if compare_with is not None and tuple(classifier.labels) != tuple(compare_with):
        return ModelEvidence(version, labels=tuple(classifier.labels))
    try:
        texts, y_true = read_test_rows(params.paths.prepared, classifier.labels)
    except ValueError as exc:
        raise ValueError(f"version {version} cannot be scored: {exc}") from exc
    probs = classifier.predict_proba(texts)
    lengths = tuple(len(t) for t in texts)
    return ModelEvidence.from_probabilities(version, classifier.labels, y_true, probs, text_lengths=lengths, **extra)


def current_alias_version(model_name: str, alias: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _registered_model_dir(params: Params, version: str) -> Path:
    from langops.serving.registry import download_compressed_dir

    return download_compressed_dir(params.register.model_name, version, cache_dir=params.project.state_dir / "cache")


def run_deploy(params: Params):
    """Make the model server serve the current champion (start it when none is running)."""
    from langops.tasks.deploy import deploy
    from langops.tracking import configure_mlflow

    if not params.deploy.enabled:
        write_json(params.paths.deployment / "deployment.json", {"deployed": False, "reason": "deploy.enabled is false"})
        return None
    configure_mlflow(params)
    champion = current_alias_version(params.register.model_name, CHAMPION)
    if champion is None:
        record = {"deployed": False, "reason": "no champion to serve: no model has passed the gate yet"}
        write_json(params.paths.deployment / "deployment.json", record)
        log.warning(record["reason"])
        return None
    result = deploy(
        params.deploy,
        tracking_uri=params.tracking_uri(),
        model_name=params.register.model_name,
        expected_version=champion,
        state_dir=params.project.state_dir,
    )
    write_json(params.paths.deployment / "deployment.json", {"deployed": True, **jsonable(asdict(result))})
    return result


def _parent(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _log_if_exists(path: Path, artifact_path: str) -> None:
    import mlflow

    if Path(path).is_dir() and any(Path(path).iterdir()):
        mlflow.log_artifacts(str(path), artifact_path)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _numeric(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


STEP_RUNNERS: dict[str, tuple[Callable[..., Any], ...]] = {
    "prepare": (run_prepare,),
    "validate": (run_validate,),
    "train": (run_train,),
    "evaluate": (run_evaluate,),
    "compress": (run_compress,),
    "register": (run_register,),
    "promote": (run_promote, decide_promotion, record_promotion),
    "deploy": (run_deploy,),
}


def failed_step(exc: BaseException) -> str | None:
    """The step whose runner raised ``exc`` (the innermost runner on its traceback), or None if none did.

    The flow's tasks, the sweep and the DVC stages all call the runners here, so an error that comes up
    through Prefect names its step as well as one from ``langops <step>`` does.
    """
    steps = {runner.__code__: step for step, runners in STEP_RUNNERS.items() for runner in runners}
    step = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        step = steps.get(frame.f_code, step)
    return step
