"""Safe keys for labels: readable, deterministic, accepted everywhere, and never two labels on one key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langops.label_keys import label_keys
from langops.metrics import classification_metrics, headline

pytestmark = pytest.mark.unit

MLFLOW_NAME = re.compile(r"[A-Za-z0-9_\-. :/]+")  # what MLflow accepts in metric, param and tag names


def test_plain_labels_are_their_own_keys():
    assert label_keys(["billing", "Refund_not_showing_up", "0", "1", "top-up"]) == {
        "billing": "billing", "Refund_not_showing_up": "Refund_not_showing_up", "0": "0", "1": "1", "top-up": "top-up",
    }


def test_punctuation_case_twins_and_near_collisions_get_distinct_readable_keys():
    keys = label_keys(["reverted_card_payment?", "a?", "a!", "Billing", "billing", "caf\u00e9 / bar %", "\U0001f4b3"])

    assert keys["reverted_card_payment?"].startswith("reverted_card_payment-")
    assert keys["a?"] != keys["a!"] and keys["a?"].startswith("a-")
    assert keys["Billing"] != keys["billing"] and keys["Billing"].casefold() != keys["billing"].casefold()
    assert keys["caf\u00e9 / bar %"].startswith("cafe_bar-")
    assert keys["\U0001f4b3"].startswith("label-")
    assert label_keys(list(reversed(keys))) == keys  # the order of the label set does not matter


label_sets = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=60),
        st.sampled_from(["a?", "a!", "A", "a", "0", "1", "\u05e9\u05dc\u05d5\u05dd", "x" * 200, "a/b", "50%"]),
    ),
    min_size=2, max_size=30, unique=True,
)


@settings(max_examples=200, deadline=None)
@given(labels=label_sets)
def test_any_label_set_maps_to_unique_safe_keys(labels):
    keys = label_keys(labels)

    assert set(keys) == set(labels)
    assert len({key.casefold() for key in keys.values()}) == len(labels)
    for key in keys.values():
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,60}", key)
        assert MLFLOW_NAME.fullmatch(f"test_f1_{key}")
    assert label_keys(labels) == keys


def test_repeated_labels_are_refused():
    with pytest.raises(ValueError, match="labels repeat"):
        label_keys(["a", "b", "a"])


def test_metrics_keep_the_label_and_name_their_keys():
    import numpy as np

    labels = ["reverted_card_payment?", "Refund_not_showing_up"]
    metrics = classification_metrics([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), labels)

    keys = label_keys(labels)
    assert metrics["label_keys"] == {keys[label]: label for label in labels}
    assert {row["label"] for row in metrics["per_class"].values()} == set(labels)
    assert all(MLFLOW_NAME.fullmatch(name) for name in headline(metrics, prefix="test_"))
