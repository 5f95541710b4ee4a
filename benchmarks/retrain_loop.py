"""How the production loop answers the demo's ``new_vocabulary`` drift: rows to detect it, labels to learn it,
time to a promoted model, and accuracy on drifted traffic before and after.

One project, as a team runs it (``langops run`` on the embedded defaults, the default base model and the
repository's params, any ``--set`` laid over them):

1. ``langops run`` trains the champion on the demo tickets.
2. Drifted traffic arrives (new products, devices and slang: ``generate_demo_dataset(..., drift=
   "new_vocabulary")``). The champion scores it, and the monitor's checks (``detect_drift`` against the
   champion's reference set, ``monitor.*`` of params) judge windows of its first N texts: the smallest N that
   says drift is what detection costs in traffic. Clean traffic of the largest N is the control.
3. People label the first K drifted texts; they go into ``data/raw/feedback.csv`` (the file the retraining
   run's feedback collection writes) and ``langops run`` runs again, through the same gate. K grows
   (``--labels``), as labels accumulate in production.
4. After each run, the champion (whichever version the gate left there) labels held-back drifted texts that
   nobody labelled, and held-back clean ones; so does the run's own model, promoted or not.

Time from drift onset to a promoted model = (texts to detect) / (your traffic rate) + the time people take to
label K texts + the run's wall time; the table gives the two measured parts. Run it on an idle machine:

    python benchmarks/retrain_loop.py --work-dir /tmp/bench-retrain
    python benchmarks/retrain_loop.py --labels 50,100 --set train.max_steps=200   # quicker, weaker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from sklearn.metrics import accuracy_score, f1_score

from langops.config import load_params
from langops.demo_data import DEMO_LABELS, generate_demo_dataset
from langops.monitoring import detect_drift, read_prediction_logs
from langops.prediction_records import LoggedLine, prediction_rows, utc_now
from langops.serving.app import load_serving_classifier
from langops.serving.registry import ModelSource, ModelSourceError
from langops.tasks.compress import REFERENCE_FILE

REPO = Path(__file__).resolve().parents[1]
WINDOWS = (50, 100, 200, 400, 800)
HELD_BACK = 600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/langops-bench-retrain"))
    parser.add_argument("--labels", default="100,200,400", help="labelled drifted texts per retraining, growing")
    parser.add_argument("--demo-rows", type=int, default=3000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    labels_given = sorted(int(k) for k in args.labels.split(","))
    root = args.work_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    params = _write_params(root, args.demo_rows)

    drifted = generate_demo_dataset(DEMO_LABELS, max(labels_given) + HELD_BACK + max(WINDOWS), seed=909,
                                    drift="new_vocabulary")
    labelled_pool, held_back = drifted.iloc[:max(labels_given)], drifted.iloc[-HELD_BACK:]
    traffic = drifted.iloc[max(labels_given):max(labels_given) + max(WINDOWS)]
    clean = generate_demo_dataset(DEMO_LABELS, args.demo_rows + HELD_BACK + max(WINDOWS), seed=808)
    clean_held_back, clean_traffic = clean.iloc[-HELD_BACK:], clean.iloc[args.demo_rows:args.demo_rows + max(WINDOWS)]

    rows: list[dict[str, Any]] = []
    seconds = _langops_run(root, args.overrides)
    champion, model_dir = _champion(root, params)
    detection = _detection(model_dir, params, traffic, clean_traffic, root)
    rows.append({"labels": 0, "run_s": seconds, "decision": f"version {champion} trained",
                 **_scored(model_dir, held_back, clean_held_back)})
    for count in labels_given:
        feedback = root / "data" / "raw" / "feedback.csv"
        feedback.parent.mkdir(parents=True, exist_ok=True)
        labelled_pool.iloc[:count].to_csv(feedback, index=False)
        seconds = _langops_run(root, args.overrides)
        now, model_dir = _champion(root, params)
        trained, trained_dir = _newest(root, params)
        decision = f"version {now} promoted" if now != champion else f"version {trained} refused, {champion} kept"
        champion = now
        challenger = _scored(trained_dir, held_back, clean_held_back)
        rows.append({"labels": count, "run_s": seconds, "decision": decision,
                     "challenger_drifted_accuracy": challenger["drifted_accuracy"],
                     **_scored(model_dir, held_back, clean_held_back)})

    print(f"\nnew_vocabulary drift, demo {args.demo_rows} rows, overrides {args.overrides or 'none'}")
    print("monitor verdict on the first N drifted texts the champion scored (clean traffic: the control):")
    for size, verdict, control in detection:
        print(f"  N={size:<5} drifted: {verdict:<10} clean: {control}")
    first = next((size for size, verdict, _ in detection if verdict == "drift"), None)
    print(f"texts to detect: {first if first is not None else f'more than {max(WINDOWS)}'}")
    print("\nthe champion after each run (and the run's own model on the held-back drifted texts):")
    print("| labelled drifted texts | run (s) | gate | drifted accuracy | drifted macro-F1 | clean accuracy "
          "| this run's model, drifted accuracy |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        trained = row.get("challenger_drifted_accuracy", row["drifted_accuracy"])
        print(f"| {row['labels']} | {row['run_s']:.0f} | {row['decision']} | {row['drifted_accuracy']:.3f} | "
              f"{row['drifted_macro_f1']:.3f} | {row['clean_accuracy']:.3f} | {trained:.3f} |")
    (root / "retrain-loop.json").write_text(json.dumps({"detection": detection, "runs": rows}, indent=2))
    return 0


def _write_params(root: Path, demo_rows: int) -> Any:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["state_dir"] = str(root / ".langops")
    params["data"] |= {"source": "demo", "demo_rows": demo_rows, "extra_sources": ["data/raw/feedback.csv"]}
    params["deploy"]["enabled"] = False
    params["feedback"] = {**params.get("feedback", {}), "collect": "never"}  # the labels are written here
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(root / "params.yaml")


def _langops_run(root: Path, overrides: list[str]) -> float:
    command = [sys.executable, "-m", "langops.cli", "run", *(part for o in overrides for part in ("--set", o))]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=root, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, text=True,
                            capture_output=True, check=False)
    seconds = time.perf_counter() - started
    print(result.stdout[-1500:])
    if result.returncode != 0:
        raise SystemExit(f"langops run failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return seconds


def _champion(root: Path, params: Any) -> tuple[str, Path]:
    """The champion's version and compressed folder; exits saying so when the first run promoted nothing."""
    source = ModelSource(params.tracking_uri(), params.register.model_name, alias="champion",
                         cache_dir=root / "bench-models")
    try:
        version = source.current_version()
    except ModelSourceError as exc:
        raise SystemExit(f"no champion to drift from: the first run was not promoted (its gate line is above): {exc}")
    return version, source.fetch(version)


def _newest(root: Path, params: Any) -> tuple[str, Path]:
    """The version the last run registered (promoted or not) and its compressed folder."""
    from mlflow import MlflowClient

    from langops.serving.registry import PinnedModelSource

    client = MlflowClient(tracking_uri=params.tracking_uri(), registry_uri=params.tracking_uri())
    name = params.register.model_name
    version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    source = PinnedModelSource(params.tracking_uri(), name, version, cache_dir=root / "bench-models")
    return version, source.fetch(version)


def _scored(model_dir: Path, drifted: pd.DataFrame, clean: pd.DataFrame) -> dict[str, float]:
    classifier = load_serving_classifier(model_dir, num_threads=2)
    predicted = [p["label"] for p in classifier.predict(list(drifted["text"]))]
    clean_predicted = [p["label"] for p in classifier.predict(list(clean["text"]))]
    return {"drifted_accuracy": float(accuracy_score(drifted["label"], predicted)),
            "drifted_macro_f1": float(f1_score(drifted["label"], predicted, average="macro")),
            "clean_accuracy": float(accuracy_score(clean["label"], clean_predicted))}


def _detection(model_dir: Path, params: Any, drifted: pd.DataFrame, clean: pd.DataFrame,
               root: Path) -> list[tuple[int, str, str]]:
    """The monitor's verdict on the first N texts of drifted and of clean traffic, as the server logs them."""
    classifier = load_serving_classifier(model_dir, num_threads=2)
    reference = pd.read_parquet(model_dir / REFERENCE_FILE)
    frames = {name: _logged(classifier, list(frame["text"])) for name, frame in (("drifted", drifted),
                                                                                 ("clean", clean))}
    found = []
    for size in WINDOWS:
        verdicts = {name: detect_drift(reference, frame.head(size), params.monitor).verdict
                    for name, frame in frames.items()}
        found.append((size, verdicts["drifted"], verdicts["clean"]))
    return found


def _logged(classifier: Any, texts: list[str]) -> pd.DataFrame:
    """The prediction records the server would write for these texts, read as the monitor reads them."""
    rows = prediction_rows(request_id="bench", endpoint="/predict", model_name="bench", version="champion",
                           texts=texts, labels=classifier.labels, scores=classifier.score(texts), text_policy="none",
                           time=utc_now())
    frame, _, skipped, examples = read_prediction_logs(LoggedLine(f"text {i}", json.dumps(row))
                                                       for i, row in enumerate(rows))
    assert not skipped, examples
    return frame


if __name__ == "__main__":
    raise SystemExit(main())
