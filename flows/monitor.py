"""Production monitoring as a Prefect flow: judge the champion's recent predictions, publish the report, and
emit an event that retrains when drift, an accuracy drop or enough new feedback asks for it.

The flow only composes the steps of ``langops.monitor``: find the model (verified download) → check the window
(reference vs prediction log, report under ``paths.monitoring``) → log the report (MLflow run in
``<experiment>-monitoring``) and publish it (markdown artifact ``drift-report``) → decide → emit
(``langops.monitor.drift`` / ``langops.monitor.feedback``; the ``langops-training`` deployment's trigger in
``prefect.yaml`` runs the training pipeline on them) → remember the emission for the cool-down.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from langops import monitor
from langops.config import Params, load_params
from langops.faults import crash_point
from langops.flows.pipeline import RETRY
from langops.monitor import EventDecision, MonitoredModel, MonitorEvent, MonitorResult, WindowCheck

ARTIFACT_KEY = "drift-report"

find_model = task(monitor.find_model, name="monitor-find-model", cache_policy=NO_CACHE, **RETRY)
check_window = task(monitor.check_window, name="monitor-check-window", cache_policy=NO_CACHE)
log_report = task(monitor.log_report, name="monitor-log-report", cache_policy=NO_CACHE)


@task(name="monitor-publish-report", cache_policy=NO_CACHE)
def publish_report(params: Params, model: MonitoredModel, checked: WindowCheck, run_id: str) -> None:
    """The report as the flow run's markdown artifact ``drift-report``, naming the HTML page to open; with an
    MLflow server, also a link artifact ``drift-report-page`` to that page in the run's artifacts."""
    from langops.monitoring import REPORT_HTML
    from langops.tracking import ui_links

    page = f"{monitor.REPORT_ARTIFACTS}/{REPORT_HTML}"
    header = (f"**{model.model_name} version {model.version}**: MLflow run `{run_id}`, report files in "
              f"`{checked.report_dir}`; the page to open: `{checked.report_dir / REPORT_HTML}` (also the run's "
              f"artifact `{page}`)\n\n")
    create_markdown_artifact(header + checked.markdown, key=ARTIFACT_KEY,
                             description=f"Drift report: {checked.verdict} on {checked.rows} rows")
    links = ui_links(params.tracking_uri(), run_id=run_id, model_name=model.model_name, version=model.version)
    if "mlflow-run" in links:
        create_link_artifact(f"{links['mlflow-run']}/artifacts/{page}", link_text="the drift report page in MLflow",
                             key="drift-report-page")


@task(name="monitor-decide-and-emit", cache_policy=NO_CACHE)
def decide_and_emit(params: Params, model: MonitoredModel, checked: WindowCheck, run_id: str,
                    now: datetime) -> tuple[EventDecision, str | None]:
    """Under the model's lock: events left pending by a dead run, the cool-down, the decision, the event."""
    return monitor.decide_and_emit(params, model, checked, run_id, now=now, send=send_event)


STORED_WAIT_S = 30.0  # how long a sent event may take to show in Prefect's event store before it stays pending


def send_event(event: MonitorEvent) -> bool:
    """Send ``event`` under its own id unless Prefect has stored it already; True once Prefect has stored it.

    Prefect stores an event id once, and its triggers skip an id they have seen, so sending an event again
    that did arrive starts no second retraining; looking first keeps it so beyond the triggers' memory too.
    """
    from prefect.events import emit_event

    if _stored(event):
        return True
    emit_event(event=event.event, resource=event.resource, payload=event.payload, id=UUID(event.id),
               occurred=datetime.fromisoformat(event.occurred))
    crash_point("monitor:sent")  # handed to Prefect's events client, which sends it in the background
    deadline = time.monotonic() + STORED_WAIT_S
    while not _stored(event):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _stored(event: MonitorEvent) -> bool:
    from prefect.client.orchestration import get_client

    occurred = datetime.fromisoformat(event.occurred)
    window = {"since": (occurred - timedelta(hours=1)).isoformat(), "until": (occurred + timedelta(hours=1)).isoformat()}
    with get_client(sync_client=True) as client:
        reply = client.request("POST", "/events/filter",
                               json={"filter": {"id": {"id": [event.id]}, "occurred": window}, "limit": 1})
        reply.raise_for_status()
        return bool(reply.json()["events"])


@flow(name="langops-monitor", log_prints=True)
def monitor_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None,
                     version: str | None = None) -> MonitorResult:
    """Judge the served model's recent predictions against its test split; ask for retraining when due.

    Args:
        params_path: the project's params file (``monitor:`` and ``paths.monitoring`` are read).
        overrides: ``key=value`` changes to params for this run, e.g. ``monitor.window_hours=6``.
        version: the model version to judge (default: the champion).
    """
    logger = get_run_logger()
    params = load_params(params_path, overrides or [])
    now = datetime.now(timezone.utc)
    model = find_model(params, version)
    checked = check_window(params, model, now=now)
    run_id = log_report(params, model, checked)
    publish_report(params, model, checked, run_id)
    decision, event_id = decide_and_emit(params, model, checked, run_id, now)
    logger.info("%s version %s: %s on %d rows; %s", model.model_name, model.version, checked.verdict, checked.rows,
                f"emitted {decision.event}" if decision.event else "; ".join(decision.reasons))
    return MonitorResult(model_name=model.model_name, version=model.version, verdict=checked.verdict,
                         rows=checked.rows, reasons=checked.reasons, report_dir=str(checked.report_dir),
                         run_id=run_id, event=decision.event, event_reasons=decision.reasons, event_id=event_id,
                         suppressed=decision.suppressed)
