"""How long a rerun with nothing changed takes next to the first run, in one temporary project.

    python benchmarks/cached_rerun.py                      # the real pipeline on the demo data
    python benchmarks/cached_rerun.py --set train.max_epochs=1 # any param override

Both runs are `langops run` in a fresh process, as a user types it: each starts Prefect's temporary
server (no `langops up`), so the rerun pays for that start-up, the imports and hashing the models' bytes
for the cache keys, and only differs from the first run by what the task cache skips. Prints both wall
times, the ratio, and the rerun's task states from the Prefect database.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()

    project = Path(tempfile.mkdtemp(prefix="langops-rerun-"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["deploy"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    command = [str(Path(sys.executable).parent / "langops"), "run"]
    for override in args.overrides:
        command += ["--set", override]

    timings, outputs = [], []
    for label in ("first run", "rerun"):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, check=False)
        timings.append(time.perf_counter() - started)
        outputs.append(done.stdout + done.stderr)
        if done.returncode != 0:
            sys.exit(f"{label} failed:\n{outputs[-1][-3000:]}")

    first, rerun = timings
    states = _last_flow_run_task_states(project / ".langops" / "prefect" / "prefect.db")
    print(f"first run   {first:8.1f} s")
    print(f"rerun       {rerun:8.1f} s   ({rerun / first:.1%} of the first run)")
    print("rerun task states: " + ", ".join(f"{name.rsplit('-', 1)[0]}={state}" for name, state in states))
    if args.keep:
        print(f"project kept in {project}")
    else:
        shutil.rmtree(project, ignore_errors=True)


def _last_flow_run_task_states(prefect_db: Path) -> list[tuple[str, str]]:
    """(task run name, final state name) of the newest flow run, read from the temporary server's database."""
    with sqlite3.connect(prefect_db) as db:
        (flow_run_id,) = db.execute("SELECT id FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()
        rows = db.execute(
            "SELECT name, state_name FROM task_run WHERE flow_run_id = ? ORDER BY start_time", (flow_run_id,)
        )
        return [(name, state) for name, state in rows]


if __name__ == "__main__":
    main()
