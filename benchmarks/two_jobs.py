"""Two trainings on one machine: how much slower each gets than alone, with the CPU share and without it.

The demo data is prepared once; then the same training (the default base model and recipe, a fixed number of
steps) runs alone, and twice at the same time, in separate processes, as a run beside a sweep or beside the
test suite would. It prints each mode's seconds per epoch alone and side by side, and their ratio; a fair
share of 2 jobs on the same cores is a ratio of about 2.

- ``fair share``: this version's default (``train.num_threads: null``: each job's share of the CPUs, asked
  again while it runs).
- ``every core``: what a torch process does on its own: one thread per core whatever else runs.

    python benchmarks/two_jobs.py                 # 40 steps per training
    python benchmarks/two_jobs.py --steps 100 --modes fair
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "fair share": {"num_threads": None, "env": {}},
    "every core": {"num_threads": os.cpu_count(), "env": {}},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per training")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--child", nargs=3, metavar=("PREPARED", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return train_once(Path(args.child[0]), Path(args.child[1]), args.steps, args.child[2])

    with tempfile.TemporaryDirectory(prefix="langops-two-jobs-") as tmp:
        root = Path(tmp)
        prepared = prepare_demo(root)
        rows = []
        for mode in args.modes.split(","):
            wait_for_idle_cores()
            alone = run_jobs(1, prepared, root / "alone", args.steps, MODES[mode])
            together = run_jobs(2, prepared, root / "together", args.steps, MODES[mode])
            rows.append((mode, alone, together))
            print(f"{mode}: alone {alone[0]:.1f} s/epoch, two at once {together} s/epoch", flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.steps} steps per training, demo data, default base model and recipe")
    print("| mode | epoch alone (s) | epoch two at once (s, median of the 2) | ratio |\n|---|---|---|---|")
    for mode, alone, together in rows:
        both = statistics.median(together)
        print(f"| {mode} | {alone[0]:.1f} | {both:.1f} | {both / alone[0]:.2f} |")
    return 0


def wait_for_idle_cores(limit_s: float = 180.0) -> None:
    """Wait (at most ``limit_s``) for the 1-minute load average to fall under 0.5: the fair share reads it, and
    what ran before this benchmark would otherwise count as another program's work."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(5)
    print(f"load average before the next measurement: {os.getloadavg()[0]:.2f}", flush=True)


def prepare_demo(root: Path) -> Path:
    from langops.config import load_params
    from langops.tasks.prepare import prepare

    params = load_params(REPO / "params.yaml")
    return prepare(params.data, params.prepare, seed=params.project.seed, out_dir=root / "prepared").out_dir


def run_jobs(count: int, prepared: Path, out: Path, steps: int, mode: dict) -> list[float]:
    """Start ``count`` trainings at once; each one's seconds per epoch."""
    env = {**os.environ, **mode["env"]}
    threads = str(mode["num_threads"] or 0)
    jobs = [subprocess.Popen([sys.executable, __file__, "--steps", str(steps), "--child", str(prepared),
                              str(out / str(i)), threads], env=env, stdout=subprocess.PIPE, text=True)
            for i in range(count)]
    results = []
    for job in jobs:
        stdout, _ = job.communicate()
        if job.returncode:
            raise SystemExit(f"a training failed (exit {job.returncode})")
        results.append(round(json.loads(stdout.splitlines()[-1])["seconds_per_epoch"], 1))
    return results


def train_once(prepared: Path, out: Path, steps: int, threads: str) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(asctime)s %(name)s %(message)s")  # threads chosen, to stderr
    from langops.config import load_params
    from langops.io import read_split
    from langops.tasks.train import train

    params = load_params(REPO / "params.yaml")
    cfg = params.train.model_copy(update={
        "num_threads": int(threads) or None, "max_steps": steps, "max_epochs": None, "min_steps": 0,
        "warmup_steps": 0, "eval_every_steps": steps, "early_stopping_patience": 1000, "resume": False})
    result = train(cfg, prepared_dir=prepared, out_dir=out / "trained", checkpoint_dir=out / "checkpoints",
                   seed=params.project.seed)
    batches_per_epoch = -(-len(read_split(prepared, "train")) // cfg.batch_size)
    print(json.dumps({"seconds_per_epoch": result.train_loop_seconds / result.steps * batches_per_epoch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
