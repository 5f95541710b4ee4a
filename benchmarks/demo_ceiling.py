"""How much of the demo a bag of n-grams can learn: the baseline's learning curve on the demo generator.

The baseline step's own model (TF-IDF + logistic regression with the ``baseline:`` params) is fit on the first
N tickets of one seeded frame and scored on its last ``--test-rows`` tickets, for growing N. A curve that is
flat from the demo's size on means the baseline already sits at what its features can reach: a model that
beats it must read something n-grams do not see. It runs twice: with the generator as it is (most borrowed
sentences carry a cue saying which request is the ticket's) and with every borrowed sentence unmarked, which is
how the generator wrote them before the cues (the same draws, one more per ticket).

    python benchmarks/demo_ceiling.py                       # 2,100 / 6,000 / 20,000 training tickets
    python benchmarks/demo_ceiling.py --train-rows 2100 --test-rows 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import f1_score

from langops import demo_data
from langops.config import load_params
from langops.tasks.baseline import fit_baseline

GENERATORS = {"with cues (today)": demo_data.UNMARKED_RELATED_SHARE, "no cues (before)": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", default="2100,6000,20000", help="comma-separated training sizes")
    parser.add_argument("--test-rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    sizes = [int(size) for size in args.train_rows.split(",")]
    cfg = load_params(args.params).baseline
    labels = list(demo_data.DEMO_LABELS)
    print(f"{'generator':<20} {'train rows':>10} {'test macro-F1':>14} {'fit s':>7}")
    for name, unmarked_share in GENERATORS.items():
        demo_data.UNMARKED_RELATED_SHARE = unmarked_share
        frame = demo_data.generate_demo_dataset(labels, max(sizes) + args.test_rows, seed=args.seed)
        test = frame.iloc[-args.test_rows:]
        y_test = np.array([labels.index(label) for label in test["label"]])
        for size in sizes:
            train = frame.iloc[:size]
            started = time.perf_counter()
            model, _ = fit_baseline(cfg, train["text"].tolist(), np.array([labels.index(x) for x in train["label"]]))
            seconds = time.perf_counter() - started
            predicted = model.predict(test["text"].tolist())
            score = f1_score(y_test, predicted, labels=list(range(len(labels))), average="macro")
            print(f"{name:<20} {size:>10,} {100 * score:>14.1f} {seconds:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
