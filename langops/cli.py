"""``langops``: run the whole pipeline, one step (what the DVC stages call), or the model server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from langops.config import ConfigError, Params, load_params

STEPS = ("prepare", "validate", "train", "evaluate", "compress", "register", "promote", "deploy")
# `langops deploy` applies the Prefect deployments (prefect.yaml); the pipeline's deploy step, which starts or
# reloads the model server for the champion, is `langops deploy-model`.
STEP_COMMANDS = {step: "deploy-model" if step == "deploy" else step for step in STEPS}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries()
    try:
        params = load_params(args.params, args.overrides)
        use_local_state(params)
        return args.handler(params, args)
    except ConfigError as exc:
        print(f"langops: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from langops.tasks.validate import DataValidationError

        if isinstance(exc, DataValidationError):
            print(f"langops: {exc}", file=sys.stderr)
            return 3
        raise


def use_local_state(params: Params) -> None:
    """Keep Prefect's database and settings under the project's state folder unless told otherwise.

    With no ``PREFECT_API_URL`` Prefect runs flows against a temporary local server whose SQLite
    database lives in ``PREFECT_HOME``; pointing that at ``.langops/prefect`` keeps all state in one
    folder. Must run before Prefect is imported.
    """
    state = params.project.state_dir
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="langops", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param for this run, e.g. --set train.epochs=2 (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run the whole pipeline as a Prefect flow")
    run.set_defaults(handler=_run)

    for step, command in STEP_COMMANDS.items():
        stage = sub.add_parser(command, parents=[common], help=f"run the {step} step alone (what `dvc repro` calls)")
        stage.set_defaults(handler=_step, step=step)
        if step == "promote":
            stage.add_argument(
                "--force", metavar="REASON", dest="force_reason",
                help="promote even if the gate refuses; the reason is recorded with the decision",
            )

    serve = sub.add_parser("serve", parents=[common], help="serve the champion over HTTP (foreground)")
    serve.add_argument("--host", help="bind address (default: deploy.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: deploy.port)")
    serve.add_argument("--alias", default="champion", help="registry alias to follow (default: champion)")
    serve.add_argument("--model-dir", type=Path, help="serve a compressed model folder instead of the registry")
    serve.add_argument("--num-threads", type=int, default=None, help="onnxruntime intra-op threads")
    serve.set_defaults(handler=_serve)

    stop = sub.add_parser("stop", parents=[common], help="stop the background model server started by deploy")
    stop.set_defaults(handler=_stop)

    history = sub.add_parser("history", parents=[common], help="list the champion's promotions and rollbacks")
    history.add_argument("--limit", type=int, default=20, help="newest events to show (default: 20)")
    history.set_defaults(handler=_history)

    rollback = sub.add_parser("rollback", parents=[common], help="serve previous_champion again (recorded)")
    rollback.add_argument("--reason", required=True, help="why; kept in the promotion log")
    rollback.add_argument("--actor", default=os.environ.get("USER") or "cli", help="who (default: $USER or cli)")
    rollback.set_defaults(handler=_rollback)
    return parser


def _run(params: Params, args: argparse.Namespace) -> int:
    from langops.flows.pipeline import training_pipeline

    started = time.perf_counter()
    summary = training_pipeline(params_path=str(Path(args.params).resolve()), overrides=list(args.overrides))
    print(_closing_summary(params, summary, time.perf_counter() - started))
    return 0


def _step(params: Params, args: argparse.Namespace) -> int:
    from langops import pipeline

    runner = getattr(pipeline, f"run_{args.step}")
    if args.step == "promote":
        actor = os.environ.get("USER", "cli") if args.force_reason else "pipeline"
        decision = runner(params, force_reason=args.force_reason, actor=actor)
        print(decision.to_markdown())
    else:
        runner(params)
    return 0


def _serve(params: Params, args: argparse.Namespace) -> int:
    from langops.serving.server import ServerSettings, serve

    serve(
        ServerSettings(
            tracking_uri=params.tracking_uri(),
            model_name=params.register.model_name,
            alias=args.alias,
            model_dir=args.model_dir,
            host=args.host or params.deploy.host,
            port=args.port or params.deploy.port,
            poll_seconds=params.deploy.poll_seconds,
            num_threads=args.num_threads,
            cache_dir=params.project.state_dir / "server" / "models",
        )
    )
    return 0


def _stop(params: Params, args: argparse.Namespace) -> int:
    from langops.tasks.deploy import stop_server

    stopped = stop_server(params.project.state_dir)
    print("model server stopped" if stopped else "no model server was running")
    return 0


def _history(params: Params, args: argparse.Namespace) -> int:
    from langops.promotions import read_history

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
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
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


def _closing_summary(params: Params, summary, seconds: float) -> str:
    state = params.project.state_dir
    lines = [
        "",
        f"langops pipeline finished in {seconds / 60:.1f} min",
        f"  model            {summary.model_name} version {summary.version} "
        f"({'promoted to champion' if summary.promoted else 'not promoted'})",
        f"  gate             {summary.decision_reason}",
        f"  champion         version {summary.champion_version}",
        f"  test accuracy    {summary.test_metrics['accuracy']:.4f} torch, {summary.int8_metrics['accuracy']:.4f} int8 ONNX "
        f"(majority-class baseline {summary.majority_baseline_accuracy:.4f})",
        f"  test macro-F1    {summary.test_metrics['macro_f1']:.4f} torch, {summary.int8_metrics['macro_f1']:.4f} int8 ONNX",
        f"  MLflow run       {summary.run_id}",
    ]
    if summary.server_url:
        lines += [
            f"  model server     {summary.server_url}  (try: curl -s {summary.server_url}/predict "
            "-H 'content-type: application/json' -d '{\"text\": \"my card was charged twice\"}')",
            "                   stop it with: langops stop",
        ]
    bin_dir = Path(sys.executable).parent
    lines += [
        f"  MLflow UI        {bin_dir / 'mlflow'} ui --backend-store-uri {summary.tracking_uri} --port 5000",
        f"  Prefect UI       PREFECT_HOME={state / 'prefect'} {bin_dir / 'prefect'} server start"
        "  (then http://127.0.0.1:4200)",
    ]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    for name in ("httpx", "urllib3", "alembic", "great_expectations", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
