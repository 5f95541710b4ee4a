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


DRIFT_ROWS = 1200


@pytest.mark.parametrize("drift", ["new_topic", "new_vocabulary", "class_mix"])
def test_each_drift_is_deterministic_by_seed_and_differs_from_the_usual_tickets(drift, demo):
    from langops.demo_data import generate_demo_dataset as generate

    drifted = generate(DEMO_LABELS, DRIFT_ROWS, seed=42, drift=drift)
    pd.testing.assert_frame_equal(drifted, generate(DEMO_LABELS, DRIFT_ROWS, seed=42, drift=drift))
    other = generate(DEMO_LABELS, DRIFT_ROWS, seed=7, drift=drift)
    assert (other["text"] != drifted["text"]).mean() > 0.9
    assert len(drifted) == DRIFT_ROWS
    assert drifted["text"].duplicated().mean() < 0.02


def test_new_topic_adds_warranty_tickets_with_their_own_label():
    from langops.demo_data import NEW_TOPIC_LABEL, NEW_TOPIC_SHARE

    drifted = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42, drift="new_topic")
    new = drifted[drifted["label"] == NEW_TOPIC_LABEL]
    assert len(new) == round(NEW_TOPIC_SHARE * DRIFT_ROWS)
    assert new["text"].str.contains("warrant|guarantee|repair|protection plan", case=False).mean() > 0.9
    usual = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42)
    assert usual["text"].str.contains("warranty", case=False).mean() < 0.01
    assert set(drifted["label"]) == {*DEMO_LABELS, NEW_TOPIC_LABEL}


def test_new_vocabulary_names_things_the_usual_tickets_never_do():
    from langops.demo_data import NEW_FILLERS, NEW_SLOT_VALUES, SLOT_VALUES

    new_words = [w for key in ("product", "device", "feature") for w in NEW_SLOT_VALUES[key] if w not in SLOT_VALUES[key]]
    pattern = "|".join(sorted(map(_escape, new_words + list(NEW_FILLERS))))
    drifted = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42, drift="new_vocabulary")
    usual = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42)
    assert drifted["text"].str.contains(pattern, case=False).mean() > 0.7
    assert usual["text"].str.contains(pattern, case=False).mean() == 0
    shares = drifted["label"].value_counts(normalize=True) - usual["label"].value_counts(normalize=True)
    assert shares.abs().max() < 0.02  # same classes, same mix (label noise differs a little)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_class_mix_changes_the_class_shares_only():
    from langops.demo_data import DRIFTED_CLASS_WEIGHTS

    drifted = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42, drift="class_mix")["label"].value_counts(normalize=True)
    usual = generate_demo_dataset(DEMO_LABELS, DRIFT_ROWS, seed=42)["label"].value_counts(normalize=True)
    for label, weight in DRIFTED_CLASS_WEIGHTS.items():
        assert drifted[label] == pytest.approx(weight, abs=0.03)  # label noise moves a share a little
    assert usual["technical"] > 3 * drifted["technical"]
    assert drifted["shipping"] > 1.8 * usual["shipping"]


def test_an_unknown_drift_is_refused():
    with pytest.raises(ValueError, match="unknown drift 'holiday'"):
        generate_demo_dataset(DEMO_LABELS, 100, seed=1, drift="holiday")  # type: ignore[arg-type]
