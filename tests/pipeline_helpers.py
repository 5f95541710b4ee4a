"""Build a small, self-contained langops project for end-to-end tests (flow and `dvc repro`)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from langops.demo_data import generate_demo_dataset

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
DEMO_LABELS = ["billing", "shipping", "technical", "account", "cancellation", "feedback"]


HARNESS_ATTEMPTS = 3


@contextlib.contextmanager
def prefect_harness() -> Iterator[str]:
    """Prefect's test harness (a server over a temporary database), yielding its API URL.

    Its start gives up on the first reset connection (a port another process took between the harness
    choosing it and the server binding it); this starts it again, as ``langops run`` does its own server.
    """
    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with contextlib.ExitStack() as stack:
        for attempt in range(1, HARNESS_ATTEMPTS + 1):
            try:
                stack.enter_context(prefect_test_harness(server_startup_timeout=120))
                break
            except httpx.TransportError:
                stray = SubprocessASGIServer._instances.pop(None, None)  # the harness leaves it registered
                if stray is not None:
                    stray.stop()
                if attempt == HARNESS_ATTEMPTS:
                    raise
        yield PREFECT_API_URL.value()


def flow_run_artifacts(flow_run_id: Any, *, api_url: str | None = None) -> dict[str, dict[str, Any]]:
    """A flow run's artifacts by key, read over the Prefect REST API (``api_url``: the current profile's).

    Prefect 3.8's client ``read_artifacts`` sends nulls that the server rejects, hence plain HTTP.
    """
    import httpx

    if api_url is None:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    reply = httpx.post(
        f"{api_url}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}},
        timeout=30,
        trust_env=False,
    )
    reply.raise_for_status()
    return {artifact["key"]: artifact for artifact in reply.json()}


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it, so parallel runs do not collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A tiny random model trains for the epochs a test asks for (max_epochs), from its first step at the full rate,
# and is kept even when it has learnt one class.
TINY_RECIPE: dict[str, Any] = {"min_steps": 0, "warmup_steps": 0, "collapse_guard": {"action": "warn"}}


def tiny_project_params(root: Path, base_model: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The repository's params with a fast run laid over: a tiny random BERT, a few hundred demo rows,
    and gates such a model can pass."""
    params: dict[str, Any] = yaml.safe_load(REPO_PARAMS.read_text())
    tiny: dict[str, Any] = {
        "project": {"state_dir": str(root / ".langops"), "seed": 7},
        "data": {"source": "demo", "labels": DEMO_LABELS, "demo_rows": 360},
        "validate": {"min_rows_per_class": 5},
        "train": {
            "base_model": str(base_model), "method": "full", "max_epochs": 2, "batch_size": 32,
            "learning_rate": 0.01, "max_length": 48, "num_threads": 1, **TINY_RECIPE,
        },
        "compress": {"min_label_agreement": 0.5, "max_fp32_logit_diff": 0.01, "latency_runs": 5},
        "promote": {
            "thresholds": {"macro_f1": 0.0, "accuracy": 0.0},  # no baseline floor: a tiny random model would not pass
            "min_compared_rows": 20,  # 360 demo rows leave about 55 test rows
            "max_latency_ms": {"batch1_p50": 1000.0, "batch1_p95": 2000.0, "batch32_p50": 20000.0, "batch32_p95": 40000.0},
        },
        "deploy": {"enabled": False, "port": free_port(), "poll_seconds": 0.5},
    }
    for overlay in (tiny, sections):
        for name, values in overlay.items():
            params.setdefault(name, {}).update(values)
    return params


def write_params(root: Path, params: dict[str, Any]) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def spoil(frame: pd.DataFrame, defect: str) -> pd.DataFrame:
    """The demo frame with one kind of bad data that validation (or prepare) must stop."""
    frame = frame.copy()
    if defect == "blank_text":
        frame.loc[0:3, "text"] = "   "
    elif defect == "null_text":
        frame.loc[0:3, "text"] = None
    elif defect == "unknown_label":
        frame.loc[0:5, "label"] = "refunds"
    elif defect == "text_too_short":
        frame.loc[0:5, "text"] = "ok"
    elif defect == "text_too_long":
        frame.loc[0:5, "text"] = "my order never arrived " * 100
    elif defect == "single_row_class":  # it cannot be both trained on and measured
        feedback = frame.index[frame["label"] == "feedback"]
        frame = frame.drop(feedback[1:])
    elif defect == "duplicates":
        frame = pd.concat([frame, frame.sample(frac=0.3, random_state=0)], ignore_index=True)
    elif defect == "missing_column":
        frame = frame.rename(columns={"label": "category"})
    else:
        raise ValueError(f"unknown defect {defect!r}")
    return frame


def write_bad_csv(path: Path, defect: str, rows: int = 360) -> Path:
    spoil(generate_demo_dataset(DEMO_LABELS, rows, seed=3), defect).to_csv(path, index=False)
    return path


INTENT_LABELS = [
    *(f"intent_{i:02d}" for i in range(74)),
    "reverted_card_payment?",
    "Refund_not_showing_up",
    "\U0001f4b3 card_arrival",
]


def write_intent_dataset(path: Path, *, rows_per_class: int = 30, seed: int = 0) -> Path:
    """77 intents, some named the way public intent datasets name theirs (punctuation, case, emoji); each
    intent has its own pair of words so even a tiny model can learn them."""
    import random

    rng = random.Random(seed)
    vocabulary = [f"w{i:03d}" for i in range(2 * len(INTENT_LABELS))]
    rows = [
        {"text": f"{vocabulary[2 * i]} {vocabulary[2 * i + 1]} please {rng.randint(0, 99999)}", "label": label}
        for i, label in enumerate(INTENT_LABELS)
        for _ in range(rows_per_class)
    ]
    rng.shuffle(rows)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
