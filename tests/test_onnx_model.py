"""OnnxClassifier on a compressed tiny model: shapes, distributions, dynamic padding, errors, threads."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS
from test_compress import MAX_LENGTH, build_compressed_dir

from langops.onnx_model import FP32_MODEL_FILE, OnnxClassifier

pytestmark = pytest.mark.model

TEXTS = ["my invoice is wrong", "where is the parcel", "the app crashes on start " * 3, "hi"]


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_trained_dir) -> Path:
    return build_compressed_dir(tmp_path_factory.mktemp("onnx-model"), tiny_trained_dir).out_dir


@pytest.fixture(scope="module")
def classifier(compressed_dir: Path) -> OnnxClassifier:
    return OnnxClassifier.load(compressed_dir, num_threads=1)


def test_load_reads_labels_and_serving_settings(classifier: OnnxClassifier) -> None:
    assert classifier.labels == LABELS
    assert classifier.max_length == MAX_LENGTH
    assert set(classifier.input_names) <= {"input_ids", "attention_mask", "token_type_ids"}


def test_predict_shapes_and_distributions(classifier: OnnxClassifier) -> None:
    logits = classifier.predict_logits(TEXTS)
    assert logits.shape == (len(TEXTS), len(LABELS)) and np.isfinite(logits).all()
    probs = classifier.predict_proba(TEXTS)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    answers = classifier.predict(TEXTS)
    assert len(answers) == len(TEXTS)
    for answer, row in zip(answers, probs, strict=True):
        assert answer["label"] == LABELS[int(row.argmax())]
        assert list(answer["probabilities"]) == LABELS
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0)


def test_empty_input_gives_empty_output(classifier: OnnxClassifier) -> None:
    assert classifier.predict_logits([]).shape == (0, len(LABELS))
    assert classifier.predict([]) == []


def test_padding_is_per_batch_and_truncates_at_max_length(classifier: OnnxClassifier) -> None:
    short = classifier.encode(["hi", "hello there"])
    assert short["input_ids"].shape == (2, 4)  # [CLS] hello there [SEP]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert classifier.encode(["word " * 200])["input_ids"].shape == (1, MAX_LENGTH)


def test_batch_size_does_not_change_fp32_logits(compressed_dir: Path) -> None:
    """Padding to each batch's longest text is masked out, so batching is invisible on the fp32 graph.

    (The int8 graph quantises activations per batch, so its logits move slightly with the batch.)
    """
    fp32 = OnnxClassifier.load(compressed_dir, model_file=FP32_MODEL_FILE)
    np.testing.assert_allclose(
        fp32.predict_logits(TEXTS, batch_size=1), fp32.predict_logits(TEXTS, batch_size=64), atol=1e-5
    )


def test_concurrent_calls_agree_with_sequential_ones(classifier: OnnxClassifier) -> None:
    expected = [classifier.predict_logits([text]) for text in TEXTS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: classifier.predict_logits([TEXTS[i % len(TEXTS)]]), range(40)))
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, expected[i % len(TEXTS)])


def test_a_bare_string_is_refused(classifier: OnnxClassifier) -> None:
    with pytest.raises(TypeError, match="not a single string"):
        classifier.predict("one text")
    with pytest.raises(TypeError, match="must all be strings"):
        classifier.predict(["ok", 3])


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json", "labels.json", "serving.json"])
def test_missing_file_is_named(compressed_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = shutil.copytree(compressed_dir, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        OnnxClassifier.load(broken)


def test_labels_that_do_not_match_the_graph_are_refused(compressed_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(compressed_dir, tmp_path / "broken")
    (broken / "labels.json").write_text('["only", "two"]')
    with pytest.raises(ValueError, match="expected \\(batch, 2\\) for 2 labels"):
        OnnxClassifier.load(broken)


def test_a_serving_file_without_settings_is_refused(compressed_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(compressed_dir, tmp_path / "broken")
    (broken / "serving.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \['max_length', 'pad_token'\]"):
        OnnxClassifier.load(broken)
