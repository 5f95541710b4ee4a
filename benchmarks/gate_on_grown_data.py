"""The promotion gate on a dataset that grows, before and after stable splits, side by side.

Day one a team trains on a public dataset exported as one file; day two the same file has 10% more rows
and a challenger trains on it. The gate then scores both models on the challenger's test split. This
benchmark builds that scenario twice from TweetEval emotion (all 5,052 rows of its official splits, as one
file in source order; version 1 is the first 90%):

- **before**: the split langops used until stable splits: each label's texts shuffled with one seeded
  permutation, so any new row reshuffles every split. The gate compares on every test row.
- **after**: each text's split comes from a hash of the text (``langops.text_hashes``), and the gate
  compares only on test rows neither model trained or was selected on (their training manifests).

Each side trains a champion on version 1 and a challenger on version 2 with the product's own steps and
``params.yaml``'s defaults (teacher only: no distillation, so the comparison is about the rows, not the
student), compresses both to static int8, and runs the gate's ``decide``. It prints, per side: the test
rows, how many the comparison used, how many of those the champion trained on, both models' macro-F1 on
the compared rows, the champion's macro-F1 on the rows it trained on and on the others, and the decision.

    python benchmarks/gate_on_grown_data.py                 # defaults, about 30 minutes on 2 cores
    python benchmarks/gate_on_grown_data.py --set train.max_steps=200   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from langops.config import DataConfig, Params, load_params
from langops.io import SPLITS, split_path
from langops.metrics import classification_metrics
from langops.pipeline import challenger_evidence, compared_rows, shipped_model_evidence
from langops.tasks.compress import compress
from langops.tasks.prepare import PrepareResult, has_text, prepare
from langops.tasks.promote import BASELINE_MARGIN, ComparedRows, decide
from langops.tasks.train import train
from langops.text_hashes import MANIFEST_FILE, TextManifest, text_hashes

REPO = Path(__file__).resolve().parents[1]
EMOTION = REPO.parent / "shared" / "datasets" / "tweet_eval_emotion"
GROWTH = 0.10


def seeded_permutation_split(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """The split langops used before stable splits (kept here to measure against): every copy of a text in
    one split, each label's texts shuffled with one seeded permutation and dealt by the fractions."""
    keys = frame["text"].where(has_text(frame), pd.Series([f"\0row{i}" for i in range(len(frame))], index=frame.index))
    groups = pd.DataFrame({"key": keys, "label": frame["label"]}).drop_duplicates("key")
    rng = np.random.default_rng(seed)
    names = list(fractions)
    assignment: dict[str, str] = {}
    for _, group in groups.groupby("label", sort=True):
        shuffled = list(rng.permutation(sorted(group["key"])))
        counts = [int(len(shuffled) * fractions[name] + 0.5) for name in names]
        start = 0
        for name, count in zip(names, counts, strict=True):
            assignment.update(dict.fromkeys(shuffled[start:start + count], name))
            start += count
        assignment.update(dict.fromkeys(shuffled[start:], "train"))
    split_of = keys.map(assignment)
    return {name: frame[split_of == name].reset_index(drop=True) for name in ["train", *names]}


def prepare_version(rows: pd.DataFrame, root: Path, params: Params, *, stable: bool) -> PrepareResult:
    """Prepare ``rows`` as one file; for the old behaviour, re-deal the prepared rows with the old split."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "tweets.csv"
    rows.to_csv(source, index=False)
    data = DataConfig(**{**params.data.model_dump(), "source": str(source), "labels": None})
    prepared = prepare(data, params.prepare, seed=params.project.seed, out_dir=root / "prepared")
    if not stable:
        everything = pd.concat([pd.read_parquet(split_path(prepared.out_dir, s)) for s in SPLITS], ignore_index=True)
        fractions = {"validation": params.prepare.validation_size, "test": params.prepare.test_size}
        for name, part in seeded_permutation_split(everything, fractions, params.project.seed).items():
            part.to_parquet(split_path(prepared.out_dir, name), index=False)
    return prepared


def train_and_compress(prepared: PrepareResult, root: Path, params: Params) -> tuple[Any, float]:
    started = time.perf_counter()
    trained = train(params.train, prepared_dir=prepared.out_dir, out_dir=root / "trained",
                    checkpoint_dir=root / "checkpoints", seed=params.project.seed)
    seconds = time.perf_counter() - started
    compressed = compress(params.compress, trained_dir=trained.out_dir, prepared_dir=prepared.out_dir,
                          out_dir=root / "compressed", report_dir=root / "compression", max_length=trained.max_length)
    return compressed, seconds


def judge(side: str, v2: PrepareResult, champion_dir: Path, challenger: Any, params: Params) -> dict[str, Any]:
    """The gate's decision on the challenger's test rows, as this side's gate made it, and what it hid."""
    challenger_ev = replace(challenger_evidence(v2, challenger, "2"), servable=True, servable_detail="not checked here")
    champion_ev = shipped_model_evidence(v2, champion_dir, "1", compare_with=challenger_ev.labels)
    rows = compared_rows(v2, {"champion version 1": champion_dir, "challenger version 2": challenger.out_dir})
    compared = rows if side == "after" else ComparedRows(keep=(True,) * rows.total)
    floors = {k: v for k, v in params.promote.thresholds.items() if k != BASELINE_MARGIN}  # the rows are the point
    decision = decide(challenger_ev, champion_ev, params.promote.model_copy(update={"thresholds": floors}),
                      compared=compared)
    keep = np.asarray(compared.keep)
    test = pd.read_parquet(split_path(v2.out_dir, "test"))
    champion_trained = TextManifest.load(champion_dir / MANIFEST_FILE).seen_any(text_hashes(test["text"]))

    def macro_f1(evidence: Any, where: np.ndarray) -> float | None:
        if not where.any():
            return None
        return float(classification_metrics(np.asarray(evidence.y_true)[where], evidence.probabilities[where],
                                            evidence.labels)["macro_f1"])

    return {
        "side": side,
        "test_rows": rows.total,
        "compared": int(keep.sum()),
        "champion_trained_on_compared": int((champion_trained & keep).sum()),
        "champion_macro_f1_compared": macro_f1(champion_ev, keep),
        "challenger_macro_f1_compared": macro_f1(challenger_ev, keep),
        "champion_macro_f1_on_its_training_rows": macro_f1(champion_ev, champion_trained),
        "champion_macro_f1_on_unseen_rows": macro_f1(champion_ev, ~champion_trained),
        "promoted": decision.promote,
        "reason": decision.reason,
    }


def run_side(side: str, tweets: pd.DataFrame, params: Params) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"langops-gate-{side}-") as tmp:
        root = Path(tmp)
        v1_rows = tweets.head(round(len(tweets) / (1 + GROWTH)))
        v1 = prepare_version(v1_rows, root / "v1", params, stable=side == "after")
        champion, champion_seconds = train_and_compress(v1, root / "v1", params)
        v2 = prepare_version(tweets, root / "v2", params, stable=side == "after")
        challenger, challenger_seconds = train_and_compress(v2, root / "v2", params)
        v1_splits = {t: s for s in SPLITS for t in pd.read_parquet(split_path(v1.out_dir, s))["text"]}
        v2_splits = {t: s for s in SPLITS for t in pd.read_parquet(split_path(v2.out_dir, s))["text"]}
        moved = sum(v1_splits[t] != v2_splits[t] for t in v1_splits.keys() & v2_splits.keys())
        return {**judge(side, v2, champion.out_dir, challenger, params), "v1_rows": len(v1_rows),
                "v2_rows": len(tweets), "texts_moved": moved, "shared_texts": len(v1_splits.keys() & v2_splits.keys()),
                "train_seconds": [round(champion_seconds), round(challenger_seconds)]}


def print_table(results: list[dict[str, Any]]) -> None:
    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}"

    header = ("gate", "texts that changed split", "test rows", "compared", "of them the champion trained on",
              "champion macro-F1 (compared)", "challenger macro-F1 (compared)",
              "champion on its training rows / unseen", "decision")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in results:
        cells = (row["side"], f"{row['texts_moved']} of {row['shared_texts']}", str(row["test_rows"]),
                 str(row["compared"]), str(row["champion_trained_on_compared"]),
                 pct(row["champion_macro_f1_compared"]), pct(row["challenger_macro_f1_compared"]),
                 (f"{pct(row['champion_macro_f1_on_its_training_rows']) or '-'} / "
                  f"{pct(row['champion_macro_f1_on_unseen_rows'])}"),
                 ("promoted" if row["promoted"] else "not promoted") + f": {row['reason'][:160]}")
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=EMOTION)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sides", default="before,after")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    files = [args.data_dir / f"{split}.csv" for split in ("train", "validation", "test")]
    if not all(path.is_file() for path in files):
        print(f"skipping: {args.data_dir} lacks the TweetEval emotion CSVs", file=sys.stderr)
        return 1
    tweets = pd.concat([pd.read_csv(path, keep_default_na=False) for path in files], ignore_index=True)
    params = load_params(REPO / "params.yaml", ["compress.distill.enabled=false", *args.overrides])
    results = []
    for side in args.sides.split(","):
        results.append(run_side(side, tweets, params))
        print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
