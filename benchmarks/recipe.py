"""How long the default training recipe trains on public datasets, why it stops, and what calibration decides.

For each dataset the product's own steps run with the defaults of ``params.yaml`` (any ``--set`` laid over
them): prepare → train → evaluate (the torch model on the test split). It prints test accuracy and
macro-F1, evaluations, epochs and steps run, the stop reason, the training wall time, and the validation
ECE without a temperature and with the cross-fitted one (each half scored by the other half's), with
whether a temperature was folded. ``benchmarks/quality.py`` goes on to compress and distil; this one is
the training recipe alone.

    python benchmarks/recipe.py                                   # clinc150, emotion, demo, sst2
    python benchmarks/recipe.py --datasets clinc150 --set train.num_threads=1 --json clinc.json

Datasets are read from ``../shared/datasets/`` beside the repository; a missing one is skipped. CLINC150
uses its in-scope files (150 intents, official splits); the 5 texts its official splits share with train
are dropped from train (``prepare.split_overlap: drop``), as validate would otherwise stop the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quality import DATASETS, SHARED

from langops.config import DataConfig, Params, load_params
from langops.tasks.evaluate import evaluate
from langops.tasks.prepare import prepare
from langops.tasks.train import train

REPO = Path(__file__).resolve().parents[1]
CLINC150 = {"train": "clinc150/train.csv", "validation": "clinc150/validation.csv", "test": "clinc150/test.csv"}
SOURCES: dict[str, dict[str, str] | str] = {"clinc150": CLINC150, "demo": "demo",
                                             **{name: dataset.source for name, dataset in DATASETS.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="clinc150,emotion,demo,sst2", help="comma-separated: " + ", ".join(SOURCES))
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    params = load_params(REPO / "params.yaml", args.overrides)
    rows = []
    for name in args.datasets.split(","):
        source = SOURCES[name]
        if isinstance(source, dict):
            files = {split: args.data_dir / path for split, path in source.items()}
            if not all(path.is_file() for path in files.values()):
                print(f"skipping {name}: {', '.join(str(p) for p in files.values())} not all there", file=sys.stderr)
                continue
            source = {split: str(path) for split, path in files.items()}
        rows.append(run_dataset(name, source, params))
        print_table(rows, params)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    return 0 if rows else 1


def run_dataset(name: str, source: dict[str, str] | str, params: Params) -> dict[str, Any]:
    prepare_cfg = params.prepare.model_copy(update={"split_overlap": "drop"} if name == "clinc150" else {})
    with tempfile.TemporaryDirectory(prefix=f"langops-recipe-{name}-") as tmp:
        root = Path(tmp)
        data = DataConfig(**{**params.data.model_dump(), "source": source, "labels": None})
        prepared = prepare(data, prepare_cfg, seed=params.project.seed, out_dir=root / "prepared")
        started = time.perf_counter()
        trained = train(params.train, prepared_dir=prepared.out_dir, out_dir=root / "trained",
                        checkpoint_dir=root / "checkpoints", seed=params.project.seed)
        train_seconds = time.perf_counter() - started
        metrics = evaluate(params.evaluate, trained_dir=trained.out_dir, prepared_dir=prepared.out_dir,
                           out_dir=root / "evaluation", max_length=trained.max_length).metrics
    return {
        "dataset": name, "train_rows": prepared.rows["train"], "validation_rows": prepared.rows["validation"],
        "test_rows": prepared.rows["test"], "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
        "test_ece": metrics["ece"], "evaluations": len(trained.history), "epochs_run": trained.epochs_run,
        "steps": trained.steps, "best_step": trained.best_step, "best_epoch": trained.best_epoch,
        "stop_reason": trained.stop_reason, "train_seconds": round(train_seconds),
        "best_val_macro_f1": trained.best_val_macro_f1, "val_ece_uncalibrated": trained.val_ece_uncalibrated,
        "val_ece_cross_fitted": trained.val_ece_cross_fitted, "temperature_fitted": trained.temperature_fitted,
        "temperature_folded": trained.temperature_folded, "calibration": trained.calibration,
        "history": list(trained.history),
    }


def print_table(rows: list[dict[str, Any]], params: Params) -> None:
    t = params.train
    print(f"\nrecipe: {t.method}, learning_rate {t.learning_rate}, head {t.head_learning_rate}, patience "
          f"{t.early_stopping_patience}, min_steps {t.min_steps}, eval_every_steps {t.eval_every_steps}, max_steps "
          f"{t.max_steps}, max_epochs {t.max_epochs}, max_minutes {t.max_minutes}, warmup_steps {t.warmup_steps}, "
          f"cooldown_fraction {t.cooldown_fraction}, num_threads {t.num_threads}")
    header = ("dataset", "test acc.", "test macro-F1", "evaluations", "epochs", "steps (best)", "stopped by",
              "train s", "val ECE: no T / cross-fitted T", "T folded")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cross = "n/a" if r["val_ece_cross_fitted"] is None else f"{r['val_ece_cross_fitted']:.3f}"
        folded = f"yes, {r['temperature_fitted']:.2f}" if r["temperature_folded"] else "no (T = 1)"
        print(f"| {r['dataset']} | {100 * r['test_accuracy']:.1f} | {100 * r['test_macro_f1']:.1f} | {r['evaluations']} "
              f"| {r['epochs_run']:.2f} | {r['steps']} ({r['best_step']}) | {r['stop_reason']} | {r['train_seconds']} "
              f"| {r['val_ece_uncalibrated']:.3f} / {cross} | {folded} |")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
