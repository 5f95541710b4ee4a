"""The demo generator: deterministic, imbalanced, noisy, and learnable but not trivially so."""

from __future__ import annotations

import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from langops.demo_data import DEMO_LABELS, generate_demo_dataset

pytestmark = pytest.mark.unit

ROWS = 3000


@pytest.fixture(scope="module")
def demo() -> pd.DataFrame:
    return generate_demo_dataset(DEMO_LABELS, ROWS, seed=42)


def test_same_seed_same_frame_other_seed_other_frame(demo):
    pd.testing.assert_frame_equal(demo, generate_demo_dataset(DEMO_LABELS, ROWS, seed=42))
    other = generate_demo_dataset(DEMO_LABELS, ROWS, seed=7)
    assert (other["text"] != demo["text"]).mean() > 0.9


def test_shape_and_labels(demo):
    assert list(demo.columns) == ["text", "label"]
    assert len(demo) == ROWS
    assert set(demo["label"]) == set(DEMO_LABELS)
    assert demo["text"].notna().all()


def test_classes_are_imbalanced_within_bounds(demo):
    counts = demo["label"].value_counts()
    assert 1.5 <= counts.max() / counts.min() <= 3.5
    assert counts.max() / ROWS < 0.35  # a majority-class guess stays far from a real model


def test_duplicates_are_rare_and_lengths_in_range(demo):
    assert demo["text"].duplicated().mean() < 0.02
    lengths = demo["text"].str.len()
    assert lengths.min() >= 3
    assert lengths.max() <= 2000


def test_tickets_are_noisy_and_varied(demo):
    texts = demo["text"]
    assert texts.str.split().str[:3].str.join(" ").nunique() > 500  # many openings, not a few templates
    assert (texts == texts.str.lower()).mean() > 0.1  # people who never press shift
    assert (texts.str.count(r"[.?!]\s") >= 1).mean() > 0.2  # multi-sentence tickets


def test_tfidf_baseline_is_learnable_but_not_trivial(demo):
    train, test = train_test_split(demo, test_size=0.2, stratify=demo["label"], random_state=0)
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000))
    model.fit(train["text"], train["label"])
    accuracy = (model.predict(test["text"]) == test["label"]).mean()
    assert 0.6 <= accuracy <= 0.95


def test_subset_of_labels_and_small_sizes():
    frame = generate_demo_dataset(["billing", "feedback"], 10, seed=1)
    assert len(frame) == 10
    assert set(frame["label"]) == {"billing", "feedback"}


def test_unknown_label_is_named():
    with pytest.raises(ValueError, match="'refunds'"):
        generate_demo_dataset(["billing", "refunds"], 100, seed=0)
