"""The steps of ``langops monitor`` (``flows/monitor.py``): judge the served model's recent predictions, publish
the report, and ask for retraining when it is due.

* ``find_model``: the champion (or a named version) and its compressed folder, through the verified download.
* ``check_window``: the reference (``reference.parquet`` beside the model), the window of the prediction log for
  that version with its feedback, ``langops.monitoring.detect_drift``, the report under
  ``paths.monitoring/<UTC time>/``, and the feedback labels given since the newest registered version.
* ``log_report``: an MLflow run in ``<tracking.experiment>-monitoring`` with each check's score and p-value, the
  window's rows and accuracy estimate, and the report files.
* ``decide_event`` (pure): which event, if any, the run asks for, with every reason spelled out; the cool-down.
* ``last_event`` / ``record_event``: the cool-down's memory, a tag on the monitoring runs.
* ``decide_and_emit``: the decision and the emission under one lock per model, so runs cannot race the cool-down;
  an event is recorded (pending) before it is sent and marked sent once Prefect has stored it, so a run killed
  in between leaves a pending event that the next run confirms or sends again with the same id
  (``finish_pending_events``): never lost, never two retrainings for one event.

The Prefect parts (tasks, the markdown artifact, ``emit_event``) live in the flow; this module imports no Prefect.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langops.config import Params

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlflow import MlflowClient

    from langops.monitoring import DriftReport
    from langops.prediction_records import Logs

logger = logging.getLogger(__name__)

EVENT_DRIFT = "langops.monitor.drift"  # the verdict is drift, or the (estimated or fed-back) accuracy dropped
EVENT_FEEDBACK = "langops.monitor.feedback"  # enough new feedback labels to retrain on
EVENTS = (EVENT_DRIFT, EVENT_FEEDBACK)
RESOURCE_PREFIX = "langops.model."  # an event's resource id: langops.model.<model name>.<version>
NO_EVENT = "none"
# Tags of a monitoring run: which model it judged, and the event it emitted (``none``) and when.
MODEL_TAG = "langops.model_name"
VERSION_TAG = "langops.model_version"
VERDICT_TAG = "langops.monitor.verdict"
EVENT_TAG = "langops.monitor.event"
EMITTED_AT_TAG = "langops.monitor.emitted_at"
EVENT_ID_TAG = "langops.monitor.event_id"
EMISSION_TAG = "langops.monitor.emission"  # pending (recorded, not yet known to be stored by Prefect) or sent
PENDING, SENT = "pending", "sent"
EVENT_ARTIFACT = "event.json"  # the event as sent, so that a later run can send it again under its id
REPORT_ARTIFACTS = "report"  # the report files' folder in the run's artifacts
ACCURACY_CHECKS = ("estimated_accuracy", "feedback_accuracy")


class MonitorError(RuntimeError):
    """Nothing to monitor: no champion, no such version, or the version has no reference set."""


def monitoring_experiment_name(params: Params) -> str:
    return f"{params.tracking.experiment}-monitoring"


def prediction_log_dir(params: Params) -> Path:
    """``monitor.log_dir``, else where the deploy step's server writes its log: ``<state_dir>/server/predictions``."""
    from langops.serving.app import PREDICTION_LOG_DIR, SERVER_DIR

    return params.monitor.log_dir or params.project.state_dir / SERVER_DIR / PREDICTION_LOG_DIR


def prediction_logs(params: Params, log_dir: Path | None = None) -> Logs:
    """Where the served model's predictions and feedback are read: the fleet's store when one is configured
    (``deploy.prediction_store``, ``$LANGOPS_PREDICTION_STORE``), else the log folder (``log_dir``, else
    ``prediction_log_dir``)."""
    from langops.fleet_store import StoreLogs
    from langops.prediction_records import LogFiles

    store = params.deploy.prediction_store_url()
    if store is not None and log_dir is None:
        return StoreLogs(store)
    return LogFiles(log_dir or prediction_log_dir(params))


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class MonitoredModel:
    """The version being judged, where its compressed folder was downloaded, and when training last registered."""

    model_name: str
    version: str
    compressed_dir: Path
    last_registered: str  # ISO time of the newest version of the model: the last training that registered


def find_model(params: Params, version: str | None = None) -> MonitoredModel:
    """The champion (or ``version``) of ``register.model_name``, downloaded and checked against its registration.

    Raises:
        MonitorError: there is no champion, or the version does not exist or cannot be downloaded intact.
    """
    from langops.aliases import CHAMPION
    from langops.promotions import current_alias_version
    from langops.serving.registry import ModelSourceError, download_compressed_dir
    from langops.tracking import configure_mlflow

    configure_mlflow(params)
    name = params.register.model_name
    version = version or current_alias_version(name, CHAMPION)
    if version is None:
        raise MonitorError(f"{name} has no {CHAMPION}: promote a version first, or name one with --version")
    try:
        compressed = download_compressed_dir(name, str(version), cache_dir=params.project.state_dir / "monitor" / "models",
                                             tracking_uri=params.tracking_uri())
    except ModelSourceError as exc:
        raise MonitorError(str(exc)) from exc
    client = _client(params)
    newest = max(int(v.creation_timestamp) for v in client.search_model_versions(f"name='{name}'"))
    return MonitoredModel(model_name=name, version=str(version), compressed_dir=compressed,
                          last_registered=datetime.fromtimestamp(newest / 1000, timezone.utc).isoformat())


# ---------------------------------------------------------------------------------------------- the window


@dataclass(frozen=True)
class WindowCheck:
    """What ``check_window`` found: the verdict, the report's folder, and the numbers the flow logs and decides by."""

    verdict: str
    reasons: tuple[str, ...]
    rows: int
    report_dir: Path
    metrics: dict[str, float]
    accuracy_drops: dict[str, float]  # judged accuracy checks: reference accuracy minus the window's
    accuracy_margin: float
    feedback_labels: int  # feedback labels given since the newest registered version
    skipped_lines: int
    markdown: str


def check_window(params: Params, model: MonitoredModel, *, now: datetime | None = None,
                 report_root: Path | None = None) -> WindowCheck:
    """Judge the last ``monitor.window_hours`` of ``model``'s predictions against its reference; write the report.

    Args:
        params: resolved params (``monitor``, ``paths.monitoring``).
        model: what ``find_model`` returned.
        now: the window's end (default: the current UTC time); the report folder is named by it.
        report_root: where the report folder goes (default ``paths.monitoring``).

    Raises:
        MonitorError: the model folder has no ``reference.parquet`` (registered before monitoring existed).
    """
    import pandas as pd

    from langops.monitoring import detect_drift, load_window, read_feedback, write_report
    from langops.tasks.compress import REFERENCE_FILE

    cfg = params.monitor
    now = now or datetime.now(timezone.utc)
    reference_file = model.compressed_dir / REFERENCE_FILE
    if not reference_file.is_file():
        raise MonitorError(f"{model.model_name} version {model.version} has no {REFERENCE_FILE} to compare with: "
                           "it was compressed before monitoring existed; retrain to get one")
    reference = pd.read_parquet(reference_file)
    logs = prediction_logs(params)
    feedback = read_feedback(logs.feedback_lines() if logs.exists() else [])
    loaded = load_window(logs, cfg, now=now, version=model.version, model_name=model.model_name, feedback=feedback)
    if loaded.ambiguous_feedback:
        logger.warning("%d feedback ids left out of the window's accuracy: each names more than one logged text "
                       "(e.g. %s)", loaded.ambiguous_feedback,
                       ", ".join(f"{name!r}: {count} texts" for name, count in loaded.ambiguous_examples))
    report = detect_drift(reference, loaded.frame, cfg, skipped_lines=loaded.skipped_lines,
                          ambiguous_feedback=loaded.ambiguous_feedback)
    folder = (report_root or params.paths.monitoring) / now.strftime("%Y%m%dT%H%M%SZ")
    write_report(report, folder)
    drops = {c.name: float(c.score) for c in report.checks
             if c.name in ACCURACY_CHECKS and c.judged and not math.isnan(c.score)}
    return WindowCheck(
        verdict=report.verdict, reasons=report.reasons, rows=report.rows, report_dir=folder,
        metrics=report_metrics(report), accuracy_drops=drops, accuracy_margin=cfg.accuracy_drop_margin,
        feedback_labels=count_feedback_since(feedback, model.last_registered), skipped_lines=loaded.skipped_lines,
        markdown=report.to_markdown(),
    )


def count_feedback_since(feedback: Any, since: str) -> int:
    """Texts given a feedback label after ``since`` (ISO time); a text labelled twice counts once."""
    import pandas as pd

    if feedback.empty:
        return 0
    times = pd.to_datetime(feedback["time"], utc=True, errors="coerce", format="ISO8601")
    return int(feedback.loc[times > pd.Timestamp(since), "request_id"].nunique())


def report_metrics(report: DriftReport) -> dict[str, float]:
    """The numbers of a report as flat MLflow metrics: ``<check>.score``/``.p_value``, rows, accuracy estimates."""
    metrics: dict[str, float] = {"rows": float(report.rows), "reference_rows": float(report.reference_rows),
                                 "skipped_lines": float(report.skipped_lines),
                                 "ambiguous_feedback": float(report.ambiguous_feedback),
                                 "drift": float(report.verdict == "drift"),
                                 "drifted_checks": float(sum(c.drifted for c in report.checks))}
    for check in report.checks:
        metrics[f"{check.name}.score"] = check.score
        if check.p_value is not None:
            metrics[f"{check.name}.p_value"] = check.p_value
        for key in ("estimated_accuracy", "estimated_macro_f1", "reference_accuracy", "accuracy", "macro_f1", "rows"):
            if key in check.details and check.name in ACCURACY_CHECKS:
                name = key if check.name == "estimated_accuracy" else f"feedback_{key}"
                metrics[name] = check.details[key]
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


# ------------------------------------------------------------------------------------------------- MLflow


def log_report(params: Params, model: MonitoredModel, checked: WindowCheck) -> str:
    """One run in the monitoring experiment: the window's metrics, the report files, the model it judged.

    Returns:
        The run id (the event's payload carries it).
    """
    from mlflow.entities import Metric, Param

    from langops.monitoring import REPORT_HTML

    client = _client(params)
    experiment_id = _monitoring_experiment(client, params)
    tags = {MODEL_TAG: model.model_name, VERSION_TAG: model.version, VERDICT_TAG: checked.verdict,
            EVENT_TAG: NO_EVENT, "mlflow.runName": f"{model.model_name} v{model.version} {checked.report_dir.name}"}
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    metrics = {**checked.metrics, "feedback_labels_since_training": float(checked.feedback_labels)}
    settings = params.monitor.model_dump(mode="json")
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
        params=[Param(f"monitor.{k}", str(v)) for k, v in settings.items()],
    )
    client.set_tag(run_id, "langops.monitor.reasons", "\n".join(checked.reasons)[:5000])
    client.log_artifacts(run_id, str(checked.report_dir), REPORT_ARTIFACTS)
    client.set_tag(run_id, "langops.monitor.report_html", f"{REPORT_ARTIFACTS}/{REPORT_HTML}")  # the page to open
    client.set_terminated(run_id)
    return run_id


def last_event(params: Params, model_name: str) -> datetime | None:
    """When the last monitor event for ``model_name`` was emitted (from the monitoring runs), or None."""
    client = _client(params)
    experiment = client.get_experiment_by_name(monitoring_experiment_name(params))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = '{model_name}' and tags.`{EVENT_TAG}` != '{NO_EVENT}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    times = [datetime.fromisoformat(r.data.tags[EMITTED_AT_TAG]) for r in runs if EMITTED_AT_TAG in r.data.tags]
    return max(times, default=None)


@dataclass(frozen=True)
class MonitorEvent:
    """One event as the monitor sends it: its id is chosen before sending, so sending it again is harmless."""

    event: str
    id: str
    resource: dict[str, str]
    payload: dict[str, Any]
    occurred: str  # ISO 8601, UTC


def record_event(params: Params, run_id: str, event: MonitorEvent) -> None:
    """Record ``event`` on the monitoring run before it is sent, as pending: the cool-down starts here, and a run
    killed while sending leaves what the next run needs to finish the job (``finish_pending_events``)."""
    client = _client(params)
    client.log_dict(run_id, asdict(event), EVENT_ARTIFACT)
    client.set_tag(run_id, EVENT_ID_TAG, event.id)
    client.set_tag(run_id, EMITTED_AT_TAG, event.occurred)
    client.set_tag(run_id, EMISSION_TAG, PENDING)
    client.set_tag(run_id, EVENT_TAG, event.event)  # last: what the cool-down searches by


def mark_sent(params: Params, run_id: str) -> None:
    _client(params).set_tag(run_id, EMISSION_TAG, SENT)


def finish_pending_events(params: Params, model_name: str, *, send: Callable[[MonitorEvent], bool]) -> list[str]:
    """Send again every event of ``model_name`` left pending by a monitor run that died before Prefect confirmed it.

    Called under the model's ``monitor-event`` lock, so no live run is sending them. ``send`` checks Prefect's
    event store for the id first and sends only when it is not there; it returns whether the event is stored.
    An event still unconfirmed stays pending for the run after. Returns the ids now sent.
    """
    import mlflow.artifacts

    client = _client(params)
    experiment = client.get_experiment_by_name(monitoring_experiment_name(params))
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = '{model_name}' and tags.`{EMISSION_TAG}` = '{PENDING}'",
        max_results=100,
    )
    finished = []
    for run in runs:
        record = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{EVENT_ARTIFACT}")
        event = MonitorEvent(**record)
        if send(event):
            mark_sent(params, run.info.run_id)
            finished.append(event.id)
            logger.warning("event %s (%s) of monitoring run %s was left pending by a run that died; it is now "
                           "stored by Prefect", event.id, event.event, run.info.run_id)
        else:
            logger.warning("event %s (%s) of monitoring run %s is still not confirmed by Prefect; the next run "
                           "tries again", event.id, event.event, run.info.run_id)
    return finished


def _client(params: Params) -> MlflowClient:
    from mlflow import MlflowClient

    uri = params.tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _monitoring_experiment(client: MlflowClient, params: Params) -> str:
    """The monitoring experiment's id, created on first use; on the embedded store its artifacts go to
    ``<artifact root>/monitoring``."""
    from mlflow.exceptions import MlflowException

    name = monitoring_experiment_name(params)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local_store = params.tracking.uri is None and params.tracking_uri().startswith("sqlite:")
    try:
        return client.create_experiment(name, artifact_location=f"{params.artifact_root()}/monitoring"
                                        if local_store else None)
    except MlflowException:  # another monitor run created it since we looked
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# ----------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class EventDecision:
    """Which event a monitor run emits (None: none) and why; ``suppressed`` names the event the cool-down held."""

    event: str | None
    reasons: tuple[str, ...]
    suppressed: str | None = None
    next_allowed: str | None = None


def decide_event(
    *,
    verdict: str,
    accuracy_drops: dict[str, float],
    accuracy_margin: float,
    feedback_labels: int,
    retrain_feedback_rows: int,
    last_emitted: datetime | None,
    now: datetime,
    cooldown_hours: float,
) -> EventDecision:
    """The monitor's one decision: ask for retraining, and by which event, or not.

    ``langops.monitor.drift`` when the verdict is drift or a judged accuracy (estimated, or real on feedback)
    fell more than ``accuracy_margin`` below the reference's; else ``langops.monitor.feedback`` when at least
    ``retrain_feedback_rows`` feedback labels were given since the last training. Nothing without a verdict
    (too few rows), and nothing within ``cooldown_hours`` of the last event for the model.
    """
    if verdict == "no_verdict":
        return EventDecision(None, ("no verdict (too few rows in the window): nothing emitted",))
    reasons: list[str] = []
    event = None
    if verdict == "drift":
        event = EVENT_DRIFT
        reasons.append("the verdict is drift")
    for name, drop in sorted(accuracy_drops.items()):
        if drop > accuracy_margin:
            event = EVENT_DRIFT
            reasons.append(f"{name}: {drop:.3f} below the reference's accuracy (margin {accuracy_margin:g})")
    if feedback_labels >= retrain_feedback_rows:
        event = event or EVENT_FEEDBACK
        reasons.append(f"{feedback_labels} feedback labels since the last training (retrain at {retrain_feedback_rows})")
    if event is None:
        quiet = (f"no drift, no accuracy drop past {accuracy_margin:g}, and {feedback_labels} feedback labels "
                 f"since the last training (< {retrain_feedback_rows}): nothing emitted")
        return EventDecision(None, (quiet,))
    if last_emitted is not None:
        until = last_emitted + timedelta(hours=cooldown_hours)
        if now < until:
            held = (f"cool-down: the last event was at {last_emitted.isoformat()}, none before "
                    f"{until.isoformat()} ({cooldown_hours:g} h)")
            return EventDecision(None, (*reasons, held), suppressed=event, next_allowed=until.isoformat())
    return EventDecision(event, tuple(reasons))


EVENT_LOCK = "monitor-event"  # the lock purpose that serialises the cool-down check and the emission


def decide_and_emit(
    params: Params,
    model: MonitoredModel,
    checked: WindowCheck,
    run_id: str,
    *,
    now: datetime,
    send: Callable[[MonitorEvent], bool],
) -> tuple[EventDecision, str | None]:
    """Decide (``decide_event``, after reading the last emission) and, if due, record and send the event, all under
    the model's ``monitor-event`` lock: two monitor runs at the same moment cannot both get past the cool-down.

    Events that an earlier run left pending are finished first. The new one is recorded as pending, sent, and
    marked sent once Prefect has stored it.

    Args:
        send: sends an event under its id unless Prefect already stored it; returns whether it is stored now
            (the flow's ``emit_event`` and a look in Prefect's event store).

    Returns:
        The decision, and the emitted event's id (None when nothing was emitted).
    """
    from uuid import uuid4

    from langops.promotions import champion_lock

    cfg = params.monitor
    with champion_lock(params, model.model_name, purpose=EVENT_LOCK):
        finish_pending_events(params, model.model_name, send=send)
        decision = decide_event(
            verdict=checked.verdict, accuracy_drops=checked.accuracy_drops, accuracy_margin=checked.accuracy_margin,
            feedback_labels=checked.feedback_labels, retrain_feedback_rows=cfg.retrain_feedback_rows,
            last_emitted=last_event(params, model.model_name), now=now, cooldown_hours=cfg.cooldown_hours,
        )
        if decision.event is None:
            return decision, None
        event = MonitorEvent(event=decision.event, id=str(uuid4()), resource=event_resource(model),
                             payload=event_payload(checked, decision, run_id),
                             occurred=datetime.now(timezone.utc).isoformat())
        record_event(params, run_id, event)
        stored = send(event)
        if stored:
            mark_sent(params, run_id)
        else:
            logger.warning("event %s (%s) was sent but Prefect has not confirmed storing it; the next monitor run "
                           "checks and sends it again if needed", event.id, event.event)
        return decision, event.id


def event_resource(model: MonitoredModel) -> dict[str, str]:
    """The event's resource: the model version (a trigger matches ``langops.model.*``)."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{model.model_name}.{model.version}",
            "prefect.resource.name": f"{model.model_name} version {model.version}",
            "langops.model.name": model.model_name, "langops.model.version": model.version}


def event_payload(checked: WindowCheck, decision: EventDecision, run_id: str) -> dict[str, Any]:
    """What the event carries: the verdict and reasons, each check's score and p-value, the report's run."""
    return {"verdict": checked.verdict, "reasons": list(decision.reasons), "rows": checked.rows,
            "metrics": checked.metrics, "feedback_labels": checked.feedback_labels, "mlflow_run_id": run_id,
            "report_dir": str(checked.report_dir)}


def describe_trigger(trigger: dict[str, Any]) -> str:
    """One line naming the event that started a training run and the drift report behind it (history shows it).

    ``trigger`` is what the training deployment's trigger in ``prefect.yaml`` renders from the event: its
    name and the payload's ``mlflow_run_id`` and ``report_dir`` (an ``event_id`` too, when given); missing
    or unrendered keys are left out.
    """
    def given(key: str) -> str:
        value = str(trigger.get(key) or "").strip()
        return "" if "{{" in value else value

    parts = [given("event") or "an event"]
    if given("event_id"):
        parts.append(f"(event {given('event_id')})")
    details = [f"drift report {given('report_dir')}" if given("report_dir") else "",
               f"monitoring run {given('monitor_run_id')}" if given("monitor_run_id") else ""]
    details = [d for d in details if d]
    return " ".join(parts) + (": " + ", ".join(details) if details else "")


@dataclass(frozen=True)
class MonitorResult:
    """What ``langops monitor`` returns: the verdict, where the report is, and the event (if any)."""

    model_name: str
    version: str
    verdict: str
    rows: int
    reasons: tuple[str, ...]
    report_dir: str
    run_id: str
    event: str | None
    event_reasons: tuple[str, ...] = field(default_factory=tuple)
    event_id: str | None = None
    suppressed: str | None = None
