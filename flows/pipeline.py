"""The training pipeline as a Prefect flow: validate → train → evaluate → compress → register → promote → deploy.

The flow only composes: each task calls the same stage runner (``langops.pipeline``) that the DVC stage
calls, and the flow publishes what a person wants to see in the Prefect UI (the validation report,
the metrics table, the gate decision) as artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prefect import Task, flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from langops import pipeline, stage_cache
from langops.aliases import CHAMPION
from langops.config import Params, load_params
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
prepare = task(pipeline.run_prepare, name="prepare", **RETRY)
validate = task(pipeline.run_validate, name="validate")
train = task(pipeline.run_train, name="train")
evaluate = task(pipeline.run_evaluate, name="evaluate")
compress = task(pipeline.run_compress, name="compress")
register = task(pipeline.run_register, name="register", **RETRY)
decide_promotion = task(pipeline.decide_promotion, name="promote-decide", cache_policy=NO_CACHE, **RETRY)
record_promotion = task(pipeline.record_promotion, name="promote-record", cache_policy=NO_CACHE)
deploy = task(pipeline.run_deploy, name="deploy", cache_policy=NO_CACHE, **RETRY)


@dataclass
class StageInputs(CachePolicy):
    """The cache key ``langops.stage_cache.stage_key`` computed for a step just before it is called."""

    key: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return self.key


def run_cached(step: Task, stage: str, params: Params) -> Any:
    """Call ``step`` cached by its inputs; run it afresh when its outputs are gone or were rewritten."""
    key = stage_cache.stage_key(stage, params)
    intact = stage_cache.outputs_intact(stage, params, key, still_exists=_version_exists(params))
    options: dict[str, Any] = {"cache_policy": StageInputs(key=key), "refresh_cache": not intact}
    if not os.environ.get("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"):
        options["result_storage"] = params.project.state_dir / "prefect-results"
    result = step.with_options(**options)(params)
    if not intact:  # an intact stamp already describes these outputs
        stage_cache.write_stamp(stage, params, key)
    return result


def _version_exists(params: Params):
    def exists(version: str) -> bool:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from langops.tracking import configure_mlflow

        configure_mlflow(params)
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
    int8_metrics: dict[str, float]
    majority_baseline_accuracy: float
    server_url: str | None
    tracking_uri: str


@flow(name="langops-training-pipeline", log_prints=True)
def training_pipeline(
    params_path: str = "params.yaml", overrides: list[str] | None = None, dataset: str | None = None
) -> PipelineSummary:
    """Train, gate and deploy a text classifier from the dataset and knobs in ``params.yaml``.

    Args:
        params_path: the project's params file; relative paths in it are relative to its folder.
        overrides: ``key=value`` changes to params for this run, e.g. ``train.epochs=2``.
        dataset: the labelled dataset to train on (a file or folder); shorthand for ``data.source=...``.
    """
    params = load_params(params_path, [*(overrides or []), *([f"data.source={dataset}"] if dataset else [])])
    run_cached(prepare, "prepare", params)
    validate_or_stop(params)
    trained = run_cached(train, "train", params)
    shipped = ship_trained_model(params)
    evaluation, compression = shipped.evaluation, shipped.compression
    summary = PipelineSummary(
        run_id=trained.run_id,
        model_name=shipped.registration.model_name,
        version=shipped.registration.version,
        promoted=shipped.decision.promote,
        decision_reason=shipped.decision.reason,
        champion_version=shipped.champion_version,
        test_metrics={k: evaluation.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        int8_metrics={k: compression.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        majority_baseline_accuracy=evaluation.metrics["majority_baseline_accuracy"],
        server_url=shipped.deployment.url if shipped.deployment is not None else None,
        tracking_uri=params.tracking_uri(),
    )
    links = ui_links(summary.tracking_uri, run_id=summary.run_id, model_name=summary.model_name, version=summary.version)
    for key, url in links.items():
        create_link_artifact(url, link_text=f"{key.replace('-', ' ')} in the MLflow UI", key=key)
    create_markdown_artifact(summary_markdown(summary, links), key="pipeline-summary", description="What this run produced")
    return summary


@dataclass(frozen=True)
class Shipped:
    """What became of a trained model: its test metrics, compression, version, gate decision, server."""

    evaluation: Any
    compression: Any
    registration: Any
    decision: Any
    deployment: Any
    champion_version: str | None


def ship_trained_model(params: Params) -> Shipped:
    """Evaluate, compress, register, gate and deploy the model in ``params.paths.trained``, publishing the
    metrics tables and the gate decision; the pipeline and the sweep's best trial both end here."""
    evaluation = run_cached(evaluate, "evaluate", params)
    compression = run_cached(compress, "compress", params)
    registration = run_cached(register, "register", params)
    decision = promote_challenger(params)
    deployment = deploy(params) if params.deploy.enabled else None
    publish_metrics(evaluation.metrics, compression)
    create_markdown_artifact(decision.to_markdown(), key="promotion-decision", description="Promotion gate decision")
    champion = pipeline.current_alias_version(params.register.model_name, CHAMPION)
    return Shipped(evaluation, compression, registration, decision, deployment, champion)


class PromotionApproval(RunInput):
    """What a reviewer answers in the Prefect UI when ``promote.require_approval`` is set."""

    approve: bool
    reviewer: str
    comment: str = ""


def promote_challenger(params: Params):
    """The gate, then (when params ask for it) a person, then the record; the flow pauses in between."""
    from langops.tasks.promote import with_approval

    decision = decide_promotion(params)
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
    return record_promotion(params, decision)


def validate_or_stop(params: Params) -> None:
    """Run validation; on bad data publish the readable report as an artifact and stop the flow."""
    from langops.tasks.validate import DataValidationError

    try:
        run_cached(validate, "validate", params)
    except DataValidationError as err:
        create_markdown_artifact(
            err.result.report_path.read_text(), key="validation-report", description="Data validation FAILED"
        )
        raise
    create_markdown_artifact(
        (params.paths.validation / "report.md").read_text(), key="validation-report", description="Data validation passed"
    )


def publish_metrics(metrics: dict[str, Any], compression: Any) -> None:
    rows = [
        {"class": row["label"], **{k: round(v, 4) for k, v in row.items() if k != "label"}}
        for row in metrics["per_class"].values()
    ]
    create_table_artifact(rows, key="test-metrics-per-class", description="Per-class metrics of the torch model on the test split")
    overall = [
        {"model": "torch (fp32)", "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"]},
        {"model": "onnx int8 (shipped)", "accuracy": compression.metrics["accuracy"],
         "macro_f1": compression.metrics["macro_f1"], "ece": compression.metrics["ece"]},
    ]
    create_table_artifact(overall, key="test-metrics", description="Test-split metrics, torch vs the shipped model")


def summary_markdown(summary: PipelineSummary, links: dict[str, str] | None = None) -> str:
    verdict = "promoted to champion" if summary.promoted else "not promoted"
    return "\n".join(
        [
            f"# {summary.model_name} version {summary.version}: {verdict}",
            "",
            f"- gate: {summary.decision_reason}",
            f"- champion now: version {summary.champion_version}",
            f"- test accuracy / macro-F1 (torch): {summary.test_metrics['accuracy']:.4f} / {summary.test_metrics['macro_f1']:.4f}",
            f"- test accuracy / macro-F1 (int8 ONNX): {summary.int8_metrics['accuracy']:.4f} / {summary.int8_metrics['macro_f1']:.4f}",
            f"- majority-class baseline accuracy: {summary.majority_baseline_accuracy:.4f}",
            f"- MLflow run: `{summary.run_id}` in `{summary.tracking_uri}`"
            + (f" ([run]({links['mlflow-run']}), [model version]({links['model-version']}))" if links else ""),
            f"- model server: {summary.server_url or 'not deployed'}",
        ]
    ) + "\n"
