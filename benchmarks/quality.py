"""The default recipe on public datasets, next to their published figures.

For each dataset the product's own steps run with the defaults of ``params.yaml`` (any ``--set`` laid
over them): prepare → baseline (TF-IDF + logistic regression, and the majority class) → train → evaluate
(torch) → compress twice (static int8, the default, and dynamic int8), then distil a student
(``compress.distill``, forced on here even where params turn it off) and compress it, saying whether the
pipeline would ship it. It prints, per dataset and model (majority class and baseline first), test accuracy
and macro-F1, calibration error before and after temperature scaling (and the ECE a perfectly calibrated
model with the same confidences would measure on as many rows: the sampling floor of the figure), train
time and texts per second at batch 1 and 32 (onnxruntime, 1 thread, the tokenizer included), beside the
published figure from the dataset's README.

    python benchmarks/quality.py                          # SST-2 (dev as test), TweetEval emotion, CLINC150
    python benchmarks/quality.py --datasets emotion --set train.max_steps=600

The datasets are read from ``../shared/datasets/`` beside the repository; a missing one is skipped with
a message. SST-2's train split goes in whole (validation is carved from it); GLUE's dev set, never seen
in training, is the test split. TweetEval and CLINC150 keep their official train/validation/test splits
(CLINC150: the 150 in-scope intents; its out-of-scope rows are scored apart in the paper and left out here).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from langops.config import DataConfig, Params, load_params
from langops.metrics import calibrated_ece_range
from langops.tasks.baseline import baseline, describe
from langops.tasks.compress import REFERENCE_FILE, compress
from langops.tasks.distill import distill
from langops.tasks.evaluate import evaluate
from langops.tasks.prepare import prepare
from langops.tasks.train import train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Dataset:
    name: str
    source: dict[str, str]  # split -> file, as data.source takes it
    published: str  # the figure to compare with, as the dataset's README or the literature gives it
    headline: str  # "accuracy" or "macro_f1": what the published figure measures


DATASETS = {
    "sst2": Dataset(
        "sst2", {"train": "sst2/train.csv", "test": "sst2/dev.csv"},
        "dev accuracy 91.5 (MiniLM-L6 full fine-tune, MiniLM paper); 93.2 BERT-base", "accuracy",
    ),
    "emotion": Dataset(
        "emotion",
        {"train": "tweet_eval_emotion/train.csv", "validation": "tweet_eval_emotion/validation.csv",
         "test": "tweet_eval_emotion/test.csv"},
        "test macro-F1 76 (RoBERTa-base, TweetEval paper)", "macro_f1",
    ),
    "clinc150": Dataset(
        "clinc150",
        {"train": "clinc150/train.csv", "validation": "clinc150/validation.csv", "test": "clinc150/test.csv"},
        "test macro-F1 93.1 (TF-IDF + LR, dataset README); in-scope accuracy ~96 (BERT, Larson et al. 2019)",
        "macro_f1",
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    params = load_params(REPO / "params.yaml", args.overrides)
    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        dataset = DATASETS[name]
        files = {split: args.data_dir / path for split, path in dataset.source.items()}
        if not all(path.is_file() for path in files.values()):
            print(f"skipping {name}: {', '.join(str(p) for p in files.values())} not all there", file=sys.stderr)
            continue
        rows += run_dataset(dataset, {split: str(path) for split, path in files.items()}, params)
        print_table(rows, params)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if rows else 1


def run_dataset(dataset: Dataset, source: dict[str, str], params: Params) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix=f"langops-quality-{dataset.name}-") as tmp:
        root = Path(tmp)
        data = DataConfig(**{**params.data.model_dump(), "source": source, "labels": None})
        prepared = prepare(data, params.prepare, seed=params.project.seed, out_dir=root / "prepared")
        fitted = baseline(params.baseline, prepared=prepared, out_dir=root / "baseline")
        started = time.perf_counter()
        trained = train(params.train, prepared_dir=prepared.out_dir, out_dir=root / "trained",
                        checkpoint_dir=root / "checkpoints", seed=params.project.seed)
        train_seconds = time.perf_counter() - started
        evaluated = evaluate(params.evaluate, trained_dir=trained.out_dir, prepared_dir=prepared.out_dir,
                             out_dir=root / "evaluation", max_length=trained.max_length, baseline=fitted)
        torch_eval = evaluated.metrics
        common = {"dataset": dataset.name, "published": dataset.published, "headline": dataset.headline,
                  "train_rows": prepared.rows["train"], "test_rows": prepared.rows["test"],
                  "train_seconds": round(train_seconds), "steps": trained.steps, "max_length": trained.max_length,
                  "temperature": round(trained.temperature, 3), "attempts": trained.attempts}
        rows = [{**common, "model": "majority class", "accuracy": torch_eval["majority_baseline_accuracy"],
                 "macro_f1": torch_eval["majority_baseline_macro_f1"]},
                {**common, "model": "TF-IDF + LR baseline" + (" (balanced)" if fitted.fits["test"]["balanced"] else ""),
                 "accuracy": torch_eval["baseline_accuracy"],
                 "macro_f1": torch_eval["baseline_macro_f1"], "ece": torch_eval["baseline"]["ece"],
                 "fit_seconds": round(fitted.seconds)}]
        rows += [{**common, "model": "torch (fp32)", **_scores(torch_eval),
                 "ece_uncalibrated": torch_eval["ece_uncalibrated"],
                 "ece_if_calibrated": _ece_if_calibrated(pd.read_csv(evaluated.predictions_csv)["confidence"], params)}]
        for method in ("static", "dynamic"):
            cfg = params.compress.model_copy(update={"quantization": method})
            result = compress(cfg, trained_dir=trained.out_dir, prepared_dir=prepared.out_dir,
                              out_dir=root / f"compressed-{method}", report_dir=root / f"report-{method}",
                              max_length=trained.max_length)
            rows.append({**common, "model": f"int8 {method}", **_scores(result.metrics),
                         "ece_if_calibrated": _reference_ece_if_calibrated(result.out_dir, params),
                         "label_agreement": result.parity["int8_label_agreement"],
                         "batch_max_abs_logit_diff": result.parity["int8_batch_max_abs_logit_diff"],
                         "size_mb": result.sizes_mb["int8_onnx"],
                         "texts_per_s_batch1": 1000 / result.latency_ms["int8_batch1_p50"],
                         "texts_per_s_batch32": 32_000 / result.latency_ms["int8_batch32_p50"]})
            if method == "static":
                rows.append({**common, "model": "onnx fp32", "size_mb": result.sizes_mb["fp32_onnx"],
                             "texts_per_s_batch1": 1000 / result.latency_ms["fp32_batch1_p50"],
                             "texts_per_s_batch32": 32_000 / result.latency_ms["fp32_batch32_p50"]})
        distill_cfg = params.compress.distill.model_copy(update={"enabled": True})
        student = distill(distill_cfg, trained_dir=trained.out_dir, prepared_dir=prepared.out_dir,
                          out_dir=root / "student", max_length=trained.max_length, seed=params.project.seed)
        result = compress(params.compress, trained_dir=student.out_dir, prepared_dir=prepared.out_dir,
                          out_dir=root / "compressed-student", report_dir=root / "report-student",
                          max_length=trained.max_length)
        ships = "ships" if student.shipped else "the teacher ships"
        rows.append({**common, "model": f"student int8 {params.compress.quantization} ({student.layers} layers, {ships})",
                     **_scores(result.metrics), "label_agreement": result.parity["int8_label_agreement"],
                     "ece_if_calibrated": _reference_ece_if_calibrated(result.out_dir, params),
                     "size_mb": result.sizes_mb["int8_onnx"], "distill_seconds": round(student.seconds),
                     "texts_per_s_batch1": 1000 / result.latency_ms["int8_batch1_p50"],
                     "texts_per_s_batch32": 32_000 / result.latency_ms["int8_batch32_p50"]})
        return rows


def _ece_if_calibrated(confidence: pd.Series, params: Params) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these confidences measures on this test set (median, 95th
    percentile): the floor the ECE target is read against."""
    return calibrated_ece_range(confidence.to_numpy(), params.evaluate.calibration_bins)


def _reference_ece_if_calibrated(compressed_dir: Path, params: Params) -> tuple[float, float]:
    """Same, from the test split as the compressed model scored it (its monitoring reference)."""
    return _ece_if_calibrated(pd.read_parquet(compressed_dir / REFERENCE_FILE)["confidence"], params)


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"]}


def print_table(rows: list[dict[str, Any]], params: Params) -> None:
    train = params.train
    print(f"\nrecipe: {train.method}, learning_rate {train.learning_rate}, head {train.head_learning_rate}, "
          f"patience {train.early_stopping_patience}, min_steps {train.min_steps}, max_steps {train.max_steps}, "
          f"max_minutes {train.max_minutes}, "
          f"class_weights {train.class_weights}, max_length {train.max_length}, calibrate {train.calibrate}")
    print(f"baseline: {describe(params.baseline, balanced=False)}, class_weight {params.baseline.class_weight}")
    header = ("dataset", "model", "accuracy", "macro-F1", "ECE (uncal.)", "ECE if calibrated: median, p95", "agree",
              "MB", "texts/s b1", "texts/s b32", "train / fit s", "published")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    def pct(row: dict[str, Any], key: str) -> str:
        return f"{100 * row[key]:.1f}" if key in row else ""

    for row in rows:
        ece = (f"{row['ece']:.3f}" + (f" ({row['ece_uncalibrated']:.3f})" if "ece_uncalibrated" in row else "")
               if "ece" in row else "")
        floor = "{:.3f}, {:.3f}".format(*row["ece_if_calibrated"]) if "ece_if_calibrated" in row else ""
        cells = (row["dataset"], row["model"], pct(row, "accuracy"), pct(row, "macro_f1"), ece, floor,
                 pct(row, "label_agreement"),
                 f"{row['size_mb']:.0f}" if "size_mb" in row else "",
                 f"{row['texts_per_s_batch1']:.0f}" if "texts_per_s_batch1" in row else "",
                 f"{row['texts_per_s_batch32']:.0f}" if "texts_per_s_batch32" in row else "",
                 str(row["train_seconds"]) if row["model"].startswith("torch")
                 else str(row.get("distill_seconds", row.get("fit_seconds", ""))),
                 row["published"] if row["model"].startswith("torch") else "")
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
