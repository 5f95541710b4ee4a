"""The validate step compares new training data with the data the champion was judged on."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import KEYWORDS, write_prepared

from langops.config import Params, parse_params
from langops.io import split_path
from langops.pipeline import CHAMPION_DRIFT_REPORT, compare_with_champion, run_validate
from langops.tasks.prepare import PrepareResult
from langops.tasks.validate import DataValidationError

pytest_plugins = ["serving_helpers"]
from serving_helpers import Registry, empty_registry  # noqa: E402

pytestmark = pytest.mark.model


def _params(registry: Registry, champion_drift: str) -> Params:
    """The registry's project; windows as small as the tiny model's 30-row reference set."""
    return parse_params({
        "project": {"state_dir": str(registry.root)},
        "validate": {"champion_drift": champion_drift, "min_rows_per_class": 5},
        "monitor": {"min_rows": 20, "permutations": 200},
    }).resolved(registry.root)


def _train_like_the_reference(prepared: Path, rows_per_class: dict[str, int], seed: int = 5) -> PrepareResult:
    """Replace the train split with texts made as the champion's reference set was (conftest's test-split
    texts), ``rows_per_class`` of each label: the same kind of data, in the class mix asked for."""
    rng = random.Random(seed)
    rows = [{"text": f"hello, {rng.choice(KEYWORDS[label])} again for order {rng.randint(1000, 9999)} test{i % 10}",
             "label": label}
            for label, count in rows_per_class.items() for i in range(count)]
    pd.DataFrame(rows).sample(frac=1.0, random_state=seed).to_parquet(split_path(prepared, "train"))
    return PrepareResult.load(prepared)


@pytest.fixture(scope="module")
def champion(tmp_path_factory, compressed_dir) -> Registry:
    registry = empty_registry(tmp_path_factory.mktemp("champion-registry"))
    registry.promote(registry.register(compressed_dir))
    return registry


def test_data_like_the_champions_passes_and_the_comparison_is_reported(champion, tmp_path):
    params = _params(champion, "error")
    prepared = _train_like_the_reference(write_prepared(tmp_path / "prepared"),
                                         {"billing": 40, "shipping": 40, "technical": 40})

    run_validate(params, prepared)

    report = (params.paths.validation / CHAMPION_DRIFT_REPORT).read_text()
    assert report.startswith("# Training data against champion langops-classifier v1's: OK: no drift")
    assert "| label_mix |" in report and "| embedding_classifier |" in report


def test_a_class_mix_the_champion_never_saw_warns_or_stops_the_run_as_params_say(champion, tmp_path):
    prepared = _train_like_the_reference(write_prepared(tmp_path / "prepared"),
                                         {"billing": 80, "shipping": 5, "technical": 5})

    assert run_validate(_params(champion, "warn"), prepared).success
    report = compare_with_champion(_params(champion, "warn"), prepared)
    assert report.verdict == "drift" and report.check("label_mix").drifted
    with pytest.raises(DataValidationError, match=r"the training data drifted from the champion's .*label_mix"):
        run_validate(_params(champion, "error"), prepared)


def test_with_no_champion_or_switched_off_nothing_is_compared(tmp_path):
    registry = empty_registry(tmp_path / "registry")
    prepared = _train_like_the_reference(write_prepared(tmp_path / "prepared"),
                                         {"billing": 80, "shipping": 5, "technical": 5})

    assert compare_with_champion(_params(registry, "error"), prepared) is None
    assert run_validate(_params(registry, "error"), prepared).success
    assert compare_with_champion(_params(registry, "off"), prepared) is None
