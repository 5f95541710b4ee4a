"""``langops``: run the whole pipeline, one step (what the DVC stages call), or the model server."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from langops.aliases import CHAMPION
from langops.config import ConfigError, Params, load_params
from langops.logs import FILE_ONLY, configure_logging
from langops.stages import STAGES, render_dvc_yaml, run_stage

if TYPE_CHECKING:
    import httpx

    from langops.prediction_records import Logs

log = logging.getLogger("langops.cli")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure is printed once, as one block, and its traceback goes to the log file.

    Exit codes: 0 done, 1 failed, 2 bad params (or a bad value for a command), 3 the data cannot be used
    (unreadable, or it failed validation).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "init":  # it writes the params file the other commands read
        return _init(args)
    if args.command == "dvc-yaml":  # the table alone, no params
        return _dvc_yaml(args)
    try:
        params = load_params(args.params, _param_overrides(args))
    except ConfigError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 2
    log_file = configure_logging(params.project.state_dir, command=args.command, verbose=args.verbose)
    try:
        if args.command != "relocate":  # the one command for a moved project
            use_local_state(params)
        return args.handler(params, args)
    except ConfigError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _report_failure(args, exc, log_file)


def _param_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, and ``--dataset`` as the ``data.source`` it stands for."""
    dataset = getattr(args, "dataset", None)
    return [*args.overrides, *([f"data.source={dataset}"] if dataset else [])]


def _report_failure(args: argparse.Namespace, exc: Exception, log_file: Path) -> int:
    """Print what failed, the error and where its traceback is, once; the exit code says what kind of failure.

    The traceback goes to the log file (and, with ``--verbose``, to the console). The error's message is
    printed as it is: a ``DataValidationError``'s already lists every failed check and the report.
    """
    log.error("langops %s failed", args.command, exc_info=exc, extra={FILE_ONLY: True})
    # A module not imported yet raised nothing; importing it here would cost seconds (torch, GX) to say so.
    pipeline = sys.modules.get("langops.pipeline")
    step = None if hasattr(args, "step") or pipeline is None else pipeline.failed_step(exc)
    what = f"langops {args.command} failed" + (f" in step {step}" if step else "")
    # langops's own errors say what is wrong in their message; anything else is named by its type too.
    message = str(exc) if type(exc).__module__.startswith("langops.") else f"{type(exc).__name__}: {exc}"
    hint = "" if args.verbose else " (the traceback is there; --verbose shows it)"
    print(f"{what}:\n{message}\nfull log: {log_file}{hint}", file=sys.stderr)
    return 3 if _is_data_error(exc) else 1


def _is_data_error(exc: Exception) -> bool:
    """The data cannot be used: it is unreadable (prepare) or failed validation."""
    data_errors = [getattr(sys.modules.get(module), name, None) for module, name in
                   (("langops.tasks.prepare", "PrepareError"), ("langops.tasks.validate", "DataValidationError"))]
    return any(isinstance(exc, error) for error in data_errors if error is not None)


def use_local_state(params: Params) -> None:
    """Keep Prefect's database and settings under the project's state folder unless told otherwise.

    With no ``PREFECT_API_URL`` Prefect runs flows against a temporary local server whose SQLite
    database lives in ``PREFECT_HOME``; pointing that at ``.langops/prefect`` keeps all state in one
    folder. Must run before Prefect is imported.
    """
    from langops.relocation import check_location

    state = params.project.state_dir
    state.mkdir(parents=True, exist_ok=True)
    check_location(params)  # a moved project stops here, before anything writes to the old place
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # While `langops up` runs the local servers, use them (PREFECT_API_URL, MLFLOW_TRACKING_URI) unless set.
    from langops.services import apply_endpoints

    apply_endpoints(params)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="langops", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param for this run, e.g. --set train.max_epochs=2 (repeatable)",
    )
    common.add_argument(
        "--verbose", action="store_true",
        help="show tracebacks and Prefect's failure reports on the console (the log file always has them)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run the whole pipeline as a Prefect flow")
    run.add_argument(
        "--dataset", metavar="PATH", help="the labelled dataset to train on; same as --set data.source=PATH"
    )
    run.set_defaults(handler=_run)

    sweep = sub.add_parser(
        "sweep", parents=[common], help="train the sweep's trials in parallel on Dask (sweep: in params), ship the best"
    )
    sweep.set_defaults(handler=_sweep)

    # One command per stage of the table. `langops deploy` applies the Prefect deployments (prefect.yaml);
    # the pipeline's deploy stage, which starts or reloads the model server, is `langops deploy-model`.
    for stage in STAGES:
        command = sub.add_parser(
            stage.cli_command, parents=[common], help=f"run the {stage.name} stage alone (what `dvc repro` calls)"
        )
        command.set_defaults(handler=_step, step=stage.name)
        if stage.name == "promote":
            command.add_argument(
                "--force", metavar="REASON", dest="force_reason",
                help="promote even if the gate refuses; the reason is recorded with the decision",
            )
    dvc_yaml = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (langops/stages.py)")
    dvc_yaml.add_argument("--output", type=Path, default=Path("dvc.yaml"), help="default: dvc.yaml; - prints it")

    serve = sub.add_parser("serve", parents=[common], help="serve the champion over HTTP (foreground)")
    serve.add_argument("--host", help="bind address (default: deploy.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: deploy.port)")
    serve.add_argument("--workers", type=int, help="uvicorn worker processes (default: deploy.workers)")
    serve.add_argument("--model-uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or a compressed model folder "
                       "(default: models:/<register.model_name>@champion)")
    serve.add_argument("--alias", default=CHAMPION, help=f"registry alias to follow (default: {CHAMPION})")
    serve.add_argument("--model-dir", type=Path, help="serve a compressed model folder instead of the registry")
    serve.add_argument("--num-threads", type=int, default=None,
                       help="onnxruntime intra-op threads per worker (default: deploy.num_threads, else cores / workers)")
    serve.set_defaults(handler=_serve)

    up = sub.add_parser("up", parents=[common], help="start the local Prefect server + worker, MLflow server, model server")
    up.set_defaults(handler=_up)
    down = sub.add_parser("down", parents=[common], help="stop everything `langops up` started")
    down.set_defaults(handler=_down)
    status = sub.add_parser("status", parents=[common], help="what runs where, healthy or not, and what to export")
    status.set_defaults(handler=_status)
    deploy = sub.add_parser("deploy", parents=[common], help="apply the Prefect deployments in prefect.yaml")
    deploy.add_argument("--prefect-file", type=Path, help="default: the project's prefect.yaml, else langops' own")
    deploy.set_defaults(handler=_deploy)

    init = sub.add_parser(
        "init", help="write params.yaml for your dataset (columns, labels), and show what validation would say"
    )
    init.add_argument("--data", required=True, type=Path, metavar="FILE",
                      help="a CSV/TSV/JSONL/JSON/Parquet file, or a folder of train/validation/test files")
    init.add_argument("--params", default="params.yaml", help="params file to write (default: params.yaml)")
    init.add_argument("--text-column", help="the column holding the text (default: inferred)")
    init.add_argument("--label-column", help="the column holding the label (default: inferred)")
    init.add_argument("--force", action="store_true", help="replace the data: section of an existing params file")

    stop = sub.add_parser("stop", parents=[common], help="stop the background model server started by deploy-model")
    stop.set_defaults(handler=_stop)

    history = sub.add_parser("history", parents=[common], help="list the champion's promotions and rollbacks")
    history.add_argument("--limit", type=int, default=20, help="newest events to show (default: 20)")
    history.set_defaults(handler=_history)

    relocate = sub.add_parser(
        "relocate", parents=[common], help="after moving the project folder: point its MLflow store at the new place"
    )
    relocate.set_defaults(handler=_relocate)

    rollback = sub.add_parser("rollback", parents=[common], help="serve previous_champion again (recorded)")
    rollback.add_argument("--reason", required=True, help="why; kept in the promotion log")
    rollback.add_argument("--actor", default=os.environ.get("USER") or "cli", help="who (default: $USER or cli)")
    rollback.set_defaults(handler=_rollback)

    actor_default = os.environ.get("USER") or "cli"
    canary = sub.add_parser("canary", help="let the challenger answer a share of live traffic, judged and rolled "
                            "back automatically (docs/serving.md)")
    canary_sub = canary.add_subparsers(dest="canary_command", required=True)
    shadow = sub.add_parser("shadow", help="mirror live traffic to the challenger; the champion answers all")
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True)
    for mode, commands in (("canary", canary_sub), ("shadow", shadow_sub)):
        start = commands.add_parser("start", parents=[common], help=f"start a {mode} of a registered version")
        start.add_argument("--version", required=True, help="the registered version to try (becomes `challenger`)")
        start.add_argument("--reason", default=f"{mode} started from the command line", help="kept in the log")
        start.add_argument("--actor", default=actor_default, help="who (default: $USER or cli)")
        start.set_defaults(handler=_rollout_start, mode=mode)
        status_of = commands.add_parser("status", parents=[common],
                                        help="the rollout in the registry and, from the server, its window and verdict")
        status_of.set_defaults(handler=_rollout_status)
    for name, command_help, event in (
        ("abort", "stop the canary now; the champion answers everything (recorded)", "canary-abort"),
        ("promote", "make the canary's version champion now (recorded, locked like every promotion)", "promote"),
    ):
        command = canary_sub.add_parser(name, parents=[common], help=command_help)
        command.add_argument("--reason", required=name == "abort", default=f"canary {name}d from the command line",
                             help="why; kept in the promotion log")
        command.add_argument("--actor", default=actor_default, help="who (default: $USER or cli)")
        command.set_defaults(handler=_rollout_end, event=event)
    stop_shadow = shadow_sub.add_parser("stop", parents=[common], help="stop mirroring (recorded with the evidence)")
    stop_shadow.add_argument("--reason", default="shadow stopped from the command line", help="kept in the log")
    stop_shadow.add_argument("--actor", default=actor_default, help="who (default: $USER or cli)")
    stop_shadow.set_defaults(handler=_rollout_end, event="shadow-stop")

    monitor = sub.add_parser(
        "monitor", parents=[common],
        help="judge the champion's recent predictions for drift; publish the report; emit a retraining event when due",
    )
    monitor.add_argument("--version", help="the model version to judge (default: the champion)")
    monitor.set_defaults(handler=_monitor)

    feedback = sub.add_parser("feedback", help="true labels for served predictions: import them, export a dataset")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    log_dir_help = ("the server's prediction log folder (default: the fleet's store when deploy.prediction_store or "
                    "$LANGOPS_PREDICTION_STORE names one, else monitor.log_dir, else <state_dir>/server/predictions, "
                    "where deploy-model puts it)")
    feedback_import = feedback_sub.add_parser(
        "import", parents=[common], help="append request_id,label rows (CSV or JSONL) to the feedback log",
    )
    feedback_import.add_argument("file", type=Path, help="a .csv with header request_id,label, or .jsonl objects")
    feedback_import.add_argument("--log-dir", type=Path, help=log_dir_help)
    feedback_import.set_defaults(handler=_feedback_import)
    feedback_export = feedback_sub.add_parser(
        "export", parents=[common],
        help="write the labelled texts as a text,label CSV (kept by the server with each label, or joined from "
             "a raw prediction log)",
    )
    feedback_export.add_argument("--output", type=Path, default=Path("data/feedback.csv"),
                                 help="the CSV to write (default: data/feedback.csv); then `dvc add` it")
    feedback_export.add_argument("--log-dir", type=Path, help=log_dir_help)
    feedback_export.add_argument(
        "--skip-ambiguous", action="store_true",
        help="exit 0 even when some labels were left out because their id names more than one logged text "
        "(a client's id reused in logs written before the server issued its own ids); they are still counted",
    )
    feedback_export.set_defaults(handler=_feedback_export)
    return parser


def _prediction_logs(params: Params, args: argparse.Namespace) -> Logs:
    from langops.monitor import prediction_logs

    return prediction_logs(params, args.log_dir)


def _monitor(params: Params, args: argparse.Namespace) -> int:
    """Run the monitor flow once; exit 0 whatever the verdict (the report and the event say it), 1 when there is
    nothing to monitor."""
    from langops.monitor import MonitorError, find_model

    try:
        find_model(params, args.version)  # no champion or no such version: say so before a server starts
    except MonitorError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    with _flow_in_this_process(params, "langops.flows.monitor") as flows:
        result = flows.monitor_pipeline(params_path=str(Path(args.params).resolve()), overrides=list(args.overrides),
                                        version=args.version)
    print(f"{result.model_name} version {result.version}: {result.verdict} on {result.rows} rows")
    for reason in result.reasons:
        print(f"  - {reason}")
    print(f"report: {result.report_dir}   MLflow run: {result.run_id}")
    if result.event:
        print(f"emitted {result.event}: " + "; ".join(result.event_reasons))
    else:
        print("no event: " + "; ".join(result.event_reasons))
    return 0


def _feedback_import(params: Params, args: argparse.Namespace) -> int:
    from langops.prediction_records import FeedbackError, import_feedback

    logs = _prediction_logs(params, args)
    try:
        added = import_feedback(args.file, logs, kept_texts=_kept_texts(params, logs))
    except FeedbackError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 2
    print(f"imported {added} feedback labels into {logs.imported_to()}")
    return 0


def _kept_texts(params: Params, logs: Logs):
    """What ``import_feedback`` asks the server's index of issued ids: the one text each id names, if kept."""
    from langops.prediction_records import LogFiles
    from langops.serving.issued_ids import INDEX_FILE, IssuedIds

    index_at: Path | str
    if isinstance(logs, LogFiles):
        index_at = logs.log_dir / INDEX_FILE
        if not index_at.is_file():
            return None
    else:
        index_at = logs.url

    def look_up(names: list[str]) -> list[tuple[str, str] | None]:
        index = IssuedIds(index_at, window_hours=params.deploy.feedback_window_hours,
                          max_requests=params.deploy.feedback_max_requests, queue_size=1)
        try:
            return [(found.text_id, found.text) if found.text_id and found.text is not None else None
                    for found in index.lookup(names)]
        finally:
            index.close()

    return look_up


def _feedback_export(params: Params, args: argparse.Namespace) -> int:
    """Write the dataset; exit 1 when there is none to write, 3 when labels were left out as ambiguous (the CSV
    holds the rest) unless ``--skip-ambiguous``, else 0."""
    from langops.prediction_records import NoTextsKept, export_feedback

    try:
        result = export_feedback(_prediction_logs(params, args), args.output)
    except (FileNotFoundError, NoTextsKept) as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.rows} labelled texts to {result.output} from {result.feedback} feedback labels")
    skipped = {"naming no logged prediction (not logged, sampled out or rotated away)": result.unmatched,
               "with no text kept (prediction_log_text none or sha256 when it was logged)": result.without_text,
               "with a label the answering model does not have": result.unknown_label,
               "whose id names more than one logged text (ambiguous: never joined to one of them)": result.ambiguous}
    for why, count in skipped.items():
        if count:
            print(f"  skipped {count} {why}")
    print(f"track it with: dvc add {result.output}   train on it with: --set data.source={result.output}")
    if not result.ambiguous:
        return 0
    examples = ", ".join(f"{name!r} names {count} texts" for name, count in result.ambiguous_examples)
    print(f"langops: left out {result.ambiguous} feedback labels whose id names more than one logged text ({examples}"
          f"{', ...' if result.ambiguous > len(result.ambiguous_examples) else ''}): a client's own X-Request-Id that "
          "several requests carried (retried or reused; in logs written before the server issued its own ids, the "
          "only id there is); no label was joined to a guess. Label "
          "those texts again by the ids the server issued, or rerun with --skip-ambiguous to accept the dataset "
          "without them", file=sys.stderr)
    return 0 if args.skip_ambiguous else 3


@contextlib.contextmanager
def _flow_in_this_process(params: Params, flow_module: str) -> Iterator[ModuleType]:
    """Around a flow run in this process, yielding ``flow_module`` imported: a Prefect API (a temporary server,
    unless one is configured, booting while the flow's module loads), runs left Running by dead processes
    marked Crashed, and this process named on the runs it starts (``langops.orphaned_runs``)."""
    from langops.orphaned_runs import runs_tagged_with_this_process, tidy_dead_runs
    from langops.services import begin_temporary_prefect_server

    starting = begin_temporary_prefect_server(params)
    module = importlib.import_module(flow_module)  # torch and transformers load while the server boots
    starting.wait()
    tidy_dead_runs()
    with runs_tagged_with_this_process():
        yield module


def _run(params: Params, args: argparse.Namespace) -> int:
    from langops.tasks.prepare import check_source

    started = time.perf_counter()
    check_source(params.data)  # a dataset that cannot work fails now, not after a server has started
    with _flow_in_this_process(params, "langops.flows.pipeline") as flows:
        summary = flows.training_pipeline(
            params_path=str(Path(args.params).resolve()), overrides=list(args.overrides), dataset=args.dataset
        )
    print(_closing_summary(params, summary, time.perf_counter() - started))
    return 0


def _sweep(params: Params, args: argparse.Namespace) -> int:
    """Run the sweep flow; the trials and the data files are checked here first, so a bad ``sweep:`` or a
    missing dataset starts nothing."""
    from langops.sweep import expand_trials
    from langops.tasks.prepare import check_source

    expand_trials(params)
    check_source(params.data)
    started = time.perf_counter()
    with _flow_in_this_process(params, "langops.flows.sweep") as flows:
        summary = flows.sweep_pipeline(params_path=str(Path(args.params).resolve()), overrides=list(args.overrides))
    print(flows.summary_markdown(summary))
    print(f"sweep finished in {time.perf_counter() - started:.0f}s")
    return 0


def _step(params: Params, args: argparse.Namespace) -> int:
    """One stage on its own; the results it needs come from the outputs earlier stages left."""
    if args.step == "promote":
        actor = os.environ.get("USER", "cli") if args.force_reason else "pipeline"
        decision = run_stage("promote", params, force_reason=args.force_reason, actor=actor)
        print(decision.to_markdown())
    else:
        if args.step == "prepare":
            from langops.tasks.prepare import check_source

            check_source(params.data)  # before the step's imports (torch) cost seconds
        run_stage(args.step, params)
    return 0


def _dvc_yaml(args: argparse.Namespace) -> int:
    text = render_dvc_yaml()
    if str(args.output) == "-":
        print(text, end="")
    else:
        args.output.write_text(text)
        print(f"wrote {args.output} from the stage table")
    return 0


def _serve(params: Params, args: argparse.Namespace) -> int:
    """``langops serve``: the settings of ``deploy:`` (as the deploy step uses them), with the options given on top."""
    from pydantic import ValidationError

    from langops.serving.app import parse_model_uri
    from langops.serving.server import ServerSettings, serve

    given = {"host": args.host, "port": args.port, "workers": args.workers, "num_threads": args.num_threads,
             "model_dir": args.model_dir}
    serve_what = {"tracking_uri": params.tracking_uri(), "model_name": params.register.model_name, "alias": args.alias,
                  "experiment": params.tracking.experiment,
                  **{name: value for name, value in given.items() if value is not None}}
    try:
        if args.model_uri:
            serve_what.update(parse_model_uri(args.model_uri))
        settings = ServerSettings.from_deploy(params.deploy, state_dir=params.project.state_dir, **serve_what)
    except (ValidationError, ValueError) as exc:
        print(f"langops serve: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


def _init(args: argparse.Namespace) -> int:
    """``langops init``: exit 0 when the data would pass validation, 3 when a run would stop on it."""
    from langops.project_init import InitError, init_project, render
    from langops.tasks.prepare import PrepareError

    try:
        result = init_project(args.data, params_path=Path(args.params), text_column=args.text_column,
                              label_column=args.label_column, force=args.force)
    except InitError as exc:
        print(f"langops init: {exc}", file=sys.stderr)
        return 2
    except PrepareError as exc:
        print(f"langops init: {exc}", file=sys.stderr)
        return 3
    print(render(result))
    return 3 if result.errors else 0


def _stop(params: Params, args: argparse.Namespace) -> int:
    from langops.tasks.deploy import stop_server

    stopped = stop_server(params.project.state_dir, timeout_s=params.services.stop_timeout_s)
    print("model server stopped" if stopped else "no model server was running")
    return 0


def _up(params: Params, args: argparse.Namespace) -> int:
    from langops.services import ServiceError, start_services

    try:
        result = start_services(params)
    except ServiceError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    _print_status(params, result.statuses, started=set(result.started))
    for note in result.notes:
        print(note)
    return 0 if _core_services_healthy(result.statuses) else 1


def _down(params: Params, args: argparse.Namespace) -> int:
    from langops.services import stop_services

    for result in stop_services(params):
        if result.stopped:
            how = "killed after the SIGTERM grace period" if result.killed else "stopped"
            print(f"{result.name:<15} {how} (pid {result.pid})")
        else:
            print(f"{result.name:<15} was not running")
    return 0


def _status(params: Params, args: argparse.Namespace) -> int:
    from langops.services import service_status

    statuses = service_status(params)
    _print_status(params, statuses)
    return 0 if _core_services_healthy(statuses) else 1


def _core_services_healthy(statuses) -> bool:
    """Prefect, MLflow and the worker; the model server may rightly be down (no champion yet)."""
    from langops.services import MODEL_SERVER

    return all(s.healthy for s in statuses if s.name != MODEL_SERVER)


def _print_status(params: Params, statuses, *, started: set[str] | None = None) -> None:
    """One line per service; after ``up`` (``started`` given) also whether this call started it."""
    from langops.services import exports, read_endpoints

    for s in statuses:
        state = "healthy" if s.healthy else ("UNHEALTHY" if s.pid else "down")
        note = ""
        if started is not None and s.pid:
            note = "  [started]" if s.name in started else "  [already running]"
        print(f"{s.name:<15} {state:<9} pid {s.pid or '-'!s:<8} {s.url or '-':<24} {s.detail}{note}")
    endpoints = read_endpoints(params.project.state_dir)
    if endpoints is not None:
        print(f"\nPrefect UI: {endpoints.prefect_ui_url}   MLflow UI: {endpoints.mlflow_tracking_uri}")
        print("langops commands in this project use these servers; other tools need:")
        for key, value in exports(endpoints).items():
            print(f"  export {key}={value}")
    print(f"logs and pid files: {params.project.state_dir / 'services'}")


def _deploy(params: Params, args: argparse.Namespace) -> int:
    from langops.services import ServiceError, apply_deployments

    try:
        applied = apply_deployments(params, project_dir=Path(args.params).resolve().parent, prefect_file=args.prefect_file)
    except ServiceError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    for d in applied:
        print(f"{d.flow_name}/{d.name}  entrypoint {d.entrypoint}  pool {d.work_pool}  "
              f"schedule {', '.join(d.schedules) or 'none (run on demand)'}")
        print(f"  run now: prefect deployment run '{d.flow_name}/{d.name}'")
    return 0


def _history(params: Params, args: argparse.Namespace) -> int:
    from langops.promotions import read_history, versions_tag

    model = params.register.model_name
    if args.limit < 1:
        print(f"langops: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    events = read_history(params, model, limit=args.limit)
    if not events:
        print(f"no promotion events recorded for {model}")
        return 0
    rows = [("when", "event", "from → to", "actor", "reason")]
    rows += [(e.at, e.event, f"{e.from_version or '-'} → {e.to_version}", e.actor, e.reason) for e in events]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"promotion history of {model}, newest first")
    learned = versions_tag(params, model, {e.to_version for e in events if e.event == "promote"}, "training_feedback")
    causes = [("", ""), *((e.cause, learned.get(e.to_version, "") if e.event == "promote" else "") for e in events)]
    for row, (cause, feedback) in zip(rows, causes):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
        if cause:
            print(" " * (widths[0] + 2) + f"started by {cause}")
        if feedback:
            print(" " * (widths[0] + 2) + f"learned from feedback {feedback}")
    return 0


def _relocate(params: Params, args: argparse.Namespace) -> int:
    from langops.relocation import relocate

    moved = relocate(params)
    if moved.old_state_dir == moved.new_state_dir:
        print(f"{moved.new_state_dir} has not moved: nothing to rewrite")
        return 0
    rows = ", ".join(f"{column} {count}" for column, count in sorted(moved.rewritten.items())) or "no rows"
    print(f"MLflow store now points at {moved.new_state_dir} (was {moved.old_state_dir}); rewrote {rows}")
    return 0


def _rollback(params: Params, args: argparse.Namespace) -> int:
    from langops.promotions import PromotionError, rollback

    model = params.register.model_name
    try:
        event = rollback(params, model_name=model, reason=args.reason, actor=args.actor)
    except PromotionError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    url = f"http://{params.deploy.host}:{params.deploy.port}"
    print(
        f"rolled back {model}: champion is now version {event.to_version} (was {event.from_version}); "
        f"previous_champion is now version {event.from_version}\n"
        f"recorded as {event.record_id} by {event.actor} at {event.at}\n"
        f"a running model server switches on its next poll (every {params.deploy.poll_seconds:g}s), "
        f"or now with: curl -X POST {url}/reload"
    )
    return 0


def _rollout_start(params: Params, args: argparse.Namespace) -> int:
    from langops.rollouts import RolloutError, start_rollout

    try:
        rollout, event = start_rollout(params, mode=args.mode, version=args.version, cfg=params.deploy.rollout,
                                       actor=args.actor, reason=args.reason)
    except RolloutError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    cfg = params.deploy.rollout
    if rollout.mode == "canary":
        plan = (f"answering {rollout.percent:g}% of requests (steps {', '.join(f'{s:g}%' for s in rollout.steps)}; "
                f"each judged over {cfg.min_requests} challenger requests; "
                f"{'promoted' if cfg.auto_promote else 'held for `langops canary promote`'} after the last)")
    else:
        plan = f"scoring {cfg.shadow_sample_rate:.0%} of requests off the request path; the champion answers all"
    print(f"{rollout.mode} of {params.register.model_name} version {rollout.version} against champion "
          f"{rollout.champion_version}: {plan}\nrecorded as {event.record_id}\n{_tell_server(params)}")
    return 0


def _rollout_end(params: Params, args: argparse.Namespace) -> int:
    from langops.promotions import PromotionError
    from langops.rollouts import end_rollout, promote_rollout

    evidence = _server_rollout(params)
    window = {"server": evidence} if evidence else {}
    try:
        if args.event == "promote":
            event = promote_rollout(params, expected=None, reason=args.reason, actor=args.actor, evidence=window)
            what = f"version {event.to_version} is champion (was {event.from_version})"
        else:
            _, event = end_rollout(params, expected=None, event=args.event, reason=args.reason, actor=args.actor,
                                   evidence=window)
            what = f"version {event.to_version} no longer {'answers' if args.event == 'canary-abort' else 'shadows'}"
    except PromotionError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 1
    print(f"{args.event}: {what}; recorded as {event.record_id}\n{_tell_server(params)}")
    return 0


def _rollout_status(params: Params, args: argparse.Namespace) -> int:
    from langops.rollouts import current_rollout

    rollout = current_rollout(params)
    if rollout is None:
        print(f"no shadow or canary of {params.register.model_name} in progress")
    else:
        step = (f" at {rollout.percent:g}% (step {rollout.step + 1} of {len(rollout.steps)}, since "
                f"{rollout.step_started_at})" if rollout.mode == "canary" else "")
        print(f"{rollout.mode} of version {rollout.version} against champion {rollout.champion_version}{step}; "
              f"started {rollout.started_at}")
    server = _server_rollout(params)
    if server is None:
        print(f"the model server at {params.deploy.host}:{params.deploy.port} does not answer: no live window")
        return 0
    window, verdict = server["window"], server.get("verdict")
    for role in ("champion", "challenger"):
        stats = window[role]
        print(f"  {role:10}  {stats['requests']} requests, {stats['errors']} errors, p50 {_ms(stats['p50_ms'])}, "
              f"p99 {_ms(stats['p99_ms'])}, low confidence {_share(stats['low_confidence_rate'])}, feedback accuracy "
              f"{_share(stats['accuracy'])} ({stats['feedback']} labels)")
    print(f"  agreement   {_share(window['agreement'])} on {window['compared']} texts; dropped {window['dropped']}; "
          f"confidence shift {window['confidence_shift'] if window['confidence_shift'] is not None else '-'}")
    if verdict:
        print(f"  verdict     {verdict['outcome']}: " + "; ".join(verdict["reasons"]))
    if server.get("last_action"):
        print(f"  last step   {server['last_action']}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _call_server(params: Params, method: str, path: str, *, timeout: float) -> tuple[str, httpx.Response | None]:
    """The deployed server's URL and its answer to ``method path`` (None when no server answers)."""
    import httpx

    from langops.tasks.deploy import auth_headers, server_url

    url = server_url(params.deploy.host, params.deploy.port)
    try:
        return url, httpx.request(method, f"{url}{path}", headers=auth_headers(params.deploy), timeout=timeout,
                                  trust_env=False)
    except httpx.HTTPError:
        return url, None


def _server_rollout(params: Params) -> dict | None:
    """The deployed server's ``/rollout`` answer, or None when no server answers."""
    _, answer = _call_server(params, "GET", "/rollout", timeout=5.0)
    return answer.json() if answer is not None and answer.status_code == 200 else None


def _tell_server(params: Params) -> str:
    """Ask the deployed server to follow the change now; say what happened."""
    url, answer = _call_server(params, "POST", "/reload", timeout=60.0)
    if answer is None:
        return (f"no model server answers at {url}; a server started later follows this, one running elsewhere "
                f"on its next poll (every {params.deploy.poll_seconds:g}s)")
    if answer.status_code >= 400:
        return f"the model server at {url} did not reload ({answer.status_code}): {answer.text[:300]}"
    return f"the model server at {url} follows it now (see: langops canary status)"


def _closing_summary(params: Params, summary, seconds: float) -> str:
    state = params.project.state_dir
    lines = [
        "",
        f"langops pipeline finished in {seconds / 60:.1f} min",
        f"  model            {summary.model_name} version {summary.version} "
        f"({'promoted to champion' if summary.promoted else 'not promoted'})",
        f"  gate             {summary.decision_reason}",
        f"  champion         version {summary.champion_version}",
        *(f"  test {name:<12}{summary.test_metrics[key]:.4f} torch, {summary.int8_metrics[key]:.4f} {summary.shipped_model}"
          f" (TF-IDF baseline {summary.baseline_metrics[key]:.4f}, majority class {summary.majority_metrics[key]:.4f})"
          for name, key in (("accuracy", "accuracy"), ("macro-F1", "macro_f1"))),
        f"  MLflow run       {summary.run_id}",
    ]
    if summary.server_url:
        lines += [
            f"  model server     {summary.server_url}  (try: curl -s {summary.server_url}/predict "
            "-H 'content-type: application/json' -d '{\"text\": \"my card was charged twice\"}')",
            "                   stop it with: langops stop",
        ]
    from langops.services import read_endpoints

    endpoints = read_endpoints(state)
    if endpoints is not None:
        lines += [
            f"  Prefect UI       {endpoints.prefect_ui_url}",
            f"  MLflow UI        {endpoints.mlflow_tracking_uri}",
        ]
    else:
        services = params.services
        lines += [
            f"  UIs              langops up  (Prefect on http://{services.host}:{services.prefect_port}, "
            f"MLflow on http://{services.host}:{services.mlflow_port}; this run shows in both)",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
