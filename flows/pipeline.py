"""The training pipeline as a Prefect flow: validate → train → evaluate → compress → register → promote → deploy.

The flow only composes: its tasks are the stages of ``langops.stages``, each calling the same adapter the
DVC stage calls, with the results of the stages before it; and it publishes what a person wants to see in
the Prefect UI (the validation report, the metrics table, the gate decision) as artifacts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from langops import pipeline, stage_cache
from langops.aliases import CHAMPION
from langops.config import Params, load_params
from langops.faults import crash_point
from langops.monitor import describe_trigger
from langops.promotions import current_alias_version
from langops.stages import STAGES, Stage, stage
from langops.tasks.promote import with_approval
from langops.tasks.register import RegistrationResult
from langops.tasks.validate import DataValidationError
from langops.tracking import ui_links

# Steps whose results depend only on their inputs are cached by those inputs (``langops.stage_cache``):
# a rerun with unchanged data, params and code reuses their results as long as their outputs are still on
# disk as the cached run left them. Promotion and deployment act on the registry's current state, so they
# always run. Only calls that are safe to repeat are retried: reading the dataset (prepare writes its
# output atomically), registration (a failed one deletes its half-made version before raising), the
# gate's evidence (reads and a download) and deployment (reload or start a server for the current
# champion). Training and evaluation fail the same way twice, and recording a promotion is not safe to
# repeat: a retry after the alias moved would find its decision stale.


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and registry failures; a missing file or bad input fails the same way on every try."""
    import httpx
    from mlflow.exceptions import MlflowException

    error = state.data
    transient = (OSError, MlflowException, httpx.TransportError)
    return isinstance(error, transient) and not isinstance(error, FileNotFoundError)


RETRY = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": transient_failure}


def stage_task(stage: Stage) -> Task:
    """The Prefect task of a stage: its adapter, retried when the table says it is safe to repeat."""
    return task(stage.adapter, name=stage.name, **(RETRY if stage.retried else {}))


TASKS: dict[str, Task] = {
    stage.name: stage_task(stage) if stage.cached else stage_task(stage).with_options(cache_policy=NO_CACHE)
    for stage in STAGES
}
# The gate is two tasks, so that a person can be asked in between. Neither is cached: both act on the
# registry's current state.
decide_promotion = task(pipeline.decide_promotion, name="promote-decide", cache_policy=NO_CACHE, **RETRY)
record_promotion = task(pipeline.record_promotion, name="promote-record", cache_policy=NO_CACHE)
# A retraining run's first step: it reads live logs, so it is never cached; a rerun merges the same labels
# into the same rows, so it is safe to retry (DVC's push included).
collect_feedback = task(pipeline.run_collect_feedback, name="collect-feedback", cache_policy=NO_CACHE, **RETRY)


@dataclass
class StageInputs(CachePolicy):
    """The cache key ``langops.stage_cache.stage_key`` computed for a step just before it is called."""

    key: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return self.key


def run_stages(
    params: Params, results: dict[str, Any], *, first: str | None = None, last: str | None = None, cause: str = ""
) -> dict[str, Any]:
    """Run the table's stages in order (from ``first``, through ``last``), each with the results of the stages
    it needs.

    ``results`` holds the results so far, by stage name; the new ones are added to it. The stages that
    need more than a task (the validation report, the gate's pause for a person) are composed in
    ``COMPOSED``; every other stage is its task, cached by its inputs when the table says so. ``cause``
    (what started the run) goes with the promotion record.
    """
    names = [s.name for s in STAGES]
    for current in STAGES[names.index(first) if first else 0:names.index(last) + 1 if last else None]:
        inputs = {stage(need).result: results[need] for need in current.needs}
        crash_point(f"before:{current.name}")
        if current.name in COMPOSED:
            extra = {"cause": cause} if current.name == "promote" else {}
            results[current.name] = COMPOSED[current.name](params, **inputs, **extra)
        elif current.cached:
            results[current.name] = run_cached(current.name, params, **inputs)
        else:
            results[current.name] = TASKS[current.name](params, **inputs)
        crash_point(f"after:{current.name}")
    return results


def run_cached(name: str, params: Params, **results: Any) -> Any:
    """Run stage ``name`` with the results it needs, cached by its inputs; afresh when its outputs are
    gone or were rewritten (or, for a registration, when its version left the registry)."""
    current = stage(name)
    key = stage_cache.stage_key(current, params)
    still_valid = _registered_version_exists(params) if name == "register" else None
    intact = stage_cache.outputs_intact(current, params, key, still_valid=still_valid)
    options: dict[str, Any] = {"cache_policy": StageInputs(key=key), "refresh_cache": not intact}
    if not os.environ.get("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"):
        options["result_storage"] = params.project.state_dir / "prefect-results"
    result = TASKS[name].with_options(**options)(params, **results)
    if not intact:  # an intact stamp already describes these outputs
        stage_cache.write_stamp(current, params, key)
    return result


def _registered_version_exists(params: Params):
    def exists() -> bool:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from langops.tracking import configure_mlflow

        configure_mlflow(params)
        version = stage("register").load(params).version
        try:
            MlflowClient().get_model_version(params.register.model_name, version)
        except MlflowException:
            return False
        return True

    return exists


@dataclass(frozen=True)
class PipelineSummary:
    run_id: str
    model_name: str
    version: str
    promoted: bool
    decision_reason: str
    champion_version: str | None
    test_metrics: dict[str, float]
    int8_metrics: dict[str, float]  # of the model that ships
    majority_metrics: dict[str, float]  # the test split's most frequent class for every row
    baseline_metrics: dict[str, float]  # TF-IDF + logistic regression fit on train + validation (tasks/baseline.py)
    server_url: str | None
    tracking_uri: str
    shipped_model: str = "int8 ONNX"  # what ships: "int8 ONNX", "fp32 ONNX", "int8 ONNX of the 3-layer student"


@dataclass(frozen=True)
class SkippedRun:
    """A retraining run that found nothing new to learn, and why."""

    reason: str
    champion_version: str | None


@flow(name="langops-training-pipeline", log_prints=True)
def training_pipeline(
    params_path: str = "params.yaml", overrides: list[str] | None = None, dataset: str | None = None,
    trigger: dict[str, str] | None = None, retraining: bool = False,
) -> PipelineSummary | SkippedRun:
    """Train, gate and deploy a text classifier from the dataset and knobs in ``params.yaml``.

    Args:
        params_path: the project's params file; relative paths in it are relative to its folder.
        overrides: ``key=value`` changes to params for this run, e.g. ``train.max_epochs=2``.
        dataset: the labelled dataset to train on (a file or folder); shorthand for ``data.source=...``.
        trigger: the event that started this run, filled in by the deployment's trigger in ``prefect.yaml``
            (the event's name, its monitoring run and drift report); kept with the promotion record.
        retraining: the run was started by itself (the deployment's schedule or trigger): collect the labelled
            production texts first (``feedback.collect``), and skip training when neither they nor the data
            changed since the champion was trained.
    """
    params = load_params(params_path, [*(overrides or []), *([f"data.source={dataset}"] if dataset else [])])
    logger = get_run_logger()
    cause = describe_trigger(trigger) if trigger else ""
    if cause:
        logger.info("started by %s", cause)
    if params.feedback.collect == "always" or (retraining and params.feedback.collect == "retraining"):
        collected = collect_feedback(params)
        create_markdown_artifact(collected.describe(), key="feedback-collection",
                                 description="Labelled production texts added to the training data")
    results = run_stages(params, {}, last="prepare")
    if retraining and (reason := pipeline.nothing_new(params, results["prepare"])):
        logger.info(reason)
        create_markdown_artifact(reason, key="retraining-skipped", description="Nothing new to learn")
        return SkippedRun(reason, current_alias_version(params.register.model_name, CHAMPION))
    shipped = ship(params, run_stages(params, results, first="validate", cause=cause))
    evaluation, compression = shipped.evaluation, shipped.compression
    summary = PipelineSummary(
        run_id=shipped.trained.run_id,
        model_name=shipped.registration.model_name,
        version=shipped.registration.version,
        promoted=shipped.decision.promote,
        decision_reason=shipped.decision.reason,
        champion_version=shipped.champion_version,
        test_metrics={k: evaluation.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        int8_metrics={k: compression.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        majority_metrics=majority_metrics(evaluation.metrics),
        baseline_metrics=baseline_metrics(evaluation.metrics),
        server_url=shipped.deployment.url if shipped.deployment is not None else None,
        tracking_uri=params.tracking_uri(),
        shipped_model=shipped.shipped_model,
    )
    links = ui_links(summary.tracking_uri, run_id=summary.run_id, model_name=summary.model_name, version=summary.version)
    for key, url in links.items():
        create_link_artifact(url, link_text=f"{key.replace('-', ' ')} in the MLflow UI", key=key)
    create_markdown_artifact(summary_markdown(summary, links), key="pipeline-summary", description="What this run produced")
    return summary


@dataclass(frozen=True)
class Shipped:
    """What became of a trained model: its test metrics, compression, version, gate decision, server."""

    trained: Any
    evaluation: Any
    compression: Any
    registration: Any
    decision: Any
    deployment: Any
    champion_version: str | None
    shipped_model: str  # the compressed graph's precision, and whether it is the distilled student's


def ship_trained_model(params: Params, prepared: Any, trained: Any) -> Shipped:
    """Evaluate, compress, register, gate and deploy a trained model (the stages after ``train``); the
    sweep's best trial ends here. The baseline it is evaluated beside comes from the cache when the data
    and ``baseline`` params are those it was fit for."""
    baseline = run_cached("baseline", params, prepared=prepared)
    return ship(params, run_stages(params, {"prepare": prepared, "baseline": baseline, "train": trained},
                                   first="evaluate"))


def ship(params: Params, results: dict[str, Any]) -> Shipped:
    """Publish the metrics tables and the gate decision of a pipeline's results, and say what shipped."""
    evaluation, compression, decision = results["evaluate"], results["compress"], results["promote"]
    publish_metrics(evaluation.metrics, compression)
    create_markdown_artifact(decision.to_markdown(), key="promotion-decision", description="Promotion gate decision")
    champion = current_alias_version(params.register.model_name, CHAMPION)
    distilled = results.get("distill")
    shipped_model = f"{compression.shipped} ONNX" + (
        f" of the {distilled.layers}-layer student" if distilled is not None and distilled.shipped else "")
    return Shipped(results["train"], evaluation, compression, results["register"], decision, results["deploy"],
                   champion, shipped_model)


class PromotionApproval(RunInput):
    """What a reviewer answers in the Prefect UI when ``promote.require_approval`` is set."""

    approve: bool
    reviewer: str
    comment: str = ""


def promote_challenger(params: Params, prepared: Any, baseline: Any, compressed: Any, registered: RegistrationResult, *,
                       cause: str = ""):
    """The gate, then (when params ask for it) a person, then the record; the flow pauses in between."""
    decision = decide_promotion(params, prepared, baseline, compressed, registered)
    if params.promote.require_approval and decision.promote and not decision.forced:
        create_markdown_artifact(
            decision.to_markdown(), key="promotion-awaiting-approval", description="The gate passed: approve or reject"
        )
        answer = pause_flow_run(
            wait_for_input=PromotionApproval.with_initial_data(
                description=f"Approve version {decision.challenger_version}? The evidence is in the "
                "'promotion-awaiting-approval' artifact.",
                reviewer="",
            ),
            timeout=params.promote.approval_timeout_s,
            poll_interval=2,
            key="promotion-approval",
        )
        decision = with_approval(decision, approved=answer.approve, reviewer=answer.reviewer, comment=answer.comment)
    return record_promotion(params, decision, registered, cause=cause)


def validate_or_stop(params: Params, prepared: Any) -> Any:
    """Run validation; on bad data publish the readable report as an artifact and stop the flow."""
    try:
        validated = run_cached("validate", params, prepared=prepared)
    except DataValidationError as err:
        create_markdown_artifact(
            err.result.report_path.read_text(), key="validation-report", description="Data validation FAILED"
        )
        raise
    create_markdown_artifact(
        validated.report_path.read_text(), key="validation-report",
        description="Data validation passed" + (f" with {len(validated.warnings)} warnings" if validated.warnings else ""),
    )
    return validated


# Stages the flow composes from more than their task.
COMPOSED: dict[str, Callable[..., Any]] = {"validate": validate_or_stop, "promote": promote_challenger}


def majority_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The majority class's test figures, from evaluate's metrics."""
    return {"accuracy": metrics["majority_baseline_accuracy"], "macro_f1": metrics["majority_baseline_macro_f1"]}


def baseline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The TF-IDF baseline's test figures, from evaluate's metrics."""
    return {"accuracy": metrics["baseline_accuracy"], "macro_f1": metrics["baseline_macro_f1"]}


def metrics_table(metrics: dict[str, Any], compression: Any) -> list[dict[str, Any]]:
    """Every model scored on the test split, side by side: majority class, TF-IDF baseline, torch, shipped."""
    return [
        {"model": "majority class", **majority_metrics(metrics), "ece": None},
        {"model": "TF-IDF + logistic regression (baseline)", **baseline_metrics(metrics),
         "ece": metrics["baseline"]["ece"]},
        {"model": "torch (fp32)", "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"]},
        {"model": f"{compression.shipped} ONNX (shipped)", "accuracy": compression.metrics["accuracy"],
         "macro_f1": compression.metrics["macro_f1"], "ece": compression.metrics["ece"]},
    ]


def publish_metrics(metrics: dict[str, Any], compression: Any) -> None:
    rows = [
        {"class": row["label"], **{k: round(v, 4) for k, v in row.items() if k != "label"}}
        for row in metrics["per_class"].values()
    ]
    create_table_artifact(rows, key="test-metrics-per-class", description="Per-class metrics of the torch model on the test split")
    create_table_artifact(metrics_table(metrics, compression), key="test-metrics",
                          description="Test-split metrics: majority class and TF-IDF baseline beside torch and the shipped model")


def summary_markdown(summary: PipelineSummary, links: dict[str, str] | None = None) -> str:
    verdict = "promoted to champion" if summary.promoted else "not promoted"
    return "\n".join(
        [
            f"# {summary.model_name} version {summary.version}: {verdict}",
            "",
            f"- gate: {summary.decision_reason}",
            f"- champion now: version {summary.champion_version}",
            "",
            "| test split | accuracy | macro-F1 |",
            "|---|---|---|",
            *(f"| {name} | {figures['accuracy']:.4f} | {figures['macro_f1']:.4f} |" for name, figures in (
                ("majority class", summary.majority_metrics),
                ("TF-IDF + logistic regression (baseline)", summary.baseline_metrics),
                ("torch", summary.test_metrics),
                (summary.shipped_model, summary.int8_metrics),
            )),
            "",
            f"- MLflow run: `{summary.run_id}` in `{summary.tracking_uri}`"
            + (f" ([run]({links['mlflow-run']}), [model version]({links['model-version']}))" if links else ""),
            f"- model server: {summary.server_url or 'not deployed'}",
        ]
    ) + "\n"
