"""The training pipeline as a Prefect flow: validate → train → evaluate → compress → register → promote → deploy.

The flow only composes: each task calls the same stage runner (``langops.pipeline``) that the DVC stage
calls, and the flow publishes what a person wants to see in the Prefect UI (the validation report,
the metrics table, the gate decision) as artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from langops import pipeline
from langops.config import Params, load_params

# Steps that write files or the registry are not cached by input here: their outputs live on disk and in
# MLflow, and DVC is the layer that skips unchanged work. Only calls that are safe to repeat are retried:
# registration (a failed one deletes its half-made version before raising) and deployment (reload or
# start a server for the current champion). Recording a promotion is not: a retry after the alias moved
# would find its decision stale.
prepare = task(pipeline.run_prepare, name="prepare", cache_policy=NO_CACHE)
validate = task(pipeline.run_validate, name="validate", cache_policy=NO_CACHE)
train = task(pipeline.run_train, name="train", cache_policy=NO_CACHE)
evaluate = task(pipeline.run_evaluate, name="evaluate", cache_policy=NO_CACHE)
compress = task(pipeline.run_compress, name="compress", cache_policy=NO_CACHE)
register = task(pipeline.run_register, name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
decide_promotion = task(pipeline.decide_promotion, name="promote-decide", cache_policy=NO_CACHE)
record_promotion = task(pipeline.record_promotion, name="promote-record", cache_policy=NO_CACHE)
deploy = task(pipeline.run_deploy, name="deploy", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)


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
def training_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> PipelineSummary:
    """Train, gate and deploy a text classifier from the dataset and knobs in ``params.yaml``."""
    params = load_params(params_path, overrides)
    prepare(params)
    _validate_or_stop(params)
    trained = train(params)
    evaluation = evaluate(params)
    compression = compress(params)
    registration = register(params)
    decision = _promote(params)
    deployment = deploy(params) if params.deploy.enabled else None

    _publish_metrics(evaluation.metrics, compression)
    create_markdown_artifact(decision.to_markdown(), key="promotion-decision", description="Promotion gate decision")
    summary = PipelineSummary(
        run_id=trained.run_id,
        model_name=registration.model_name,
        version=registration.version,
        promoted=decision.promote,
        decision_reason=decision.reason,
        champion_version=pipeline.current_alias_version(params.register.model_name, "champion"),
        test_metrics={k: evaluation.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        int8_metrics={k: compression.metrics[k] for k in ("accuracy", "macro_f1", "ece")},
        majority_baseline_accuracy=evaluation.metrics["majority_baseline_accuracy"],
        server_url=deployment.url if deployment is not None else None,
        tracking_uri=params.tracking_uri(),
    )
    create_markdown_artifact(summary_markdown(summary), key="pipeline-summary", description="What this run produced")
    return summary


class PromotionApproval(RunInput):
    """What a reviewer answers in the Prefect UI when ``promote.require_approval`` is set."""

    approve: bool
    reviewer: str
    comment: str = ""


def _promote(params: Params):
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


def _validate_or_stop(params: Params) -> None:
    """Run validation; on bad data publish the readable report as an artifact and stop the flow."""
    from langops.tasks.validate import DataValidationError

    try:
        validate(params)
    except DataValidationError as err:
        create_markdown_artifact(
            err.result.report_path.read_text(), key="validation-report", description="Data validation FAILED"
        )
        raise
    create_markdown_artifact(
        (params.paths.validation / "report.md").read_text(), key="validation-report", description="Data validation passed"
    )


def _publish_metrics(metrics: dict[str, Any], compression: Any) -> None:
    rows = [
        {"class": name, **{k: round(v, 4) for k, v in row.items()}} for name, row in metrics["per_class"].items()
    ]
    create_table_artifact(rows, key="test-metrics-per-class", description="Per-class metrics of the torch model on the test split")
    overall = [
        {"model": "torch (fp32)", "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"]},
        {"model": "onnx int8 (shipped)", "accuracy": compression.metrics["accuracy"],
         "macro_f1": compression.metrics["macro_f1"], "ece": compression.metrics["ece"]},
    ]
    create_table_artifact(overall, key="test-metrics", description="Test-split metrics, torch vs the shipped model")


def summary_markdown(summary: PipelineSummary) -> str:
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
            f"- MLflow run: `{summary.run_id}` in `{summary.tracking_uri}`",
            f"- model server: {summary.server_url or 'not deployed'}",
        ]
    ) + "\n"
