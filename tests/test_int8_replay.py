"""The int8 replay behind ``benchmarks/int8_saturation.py``: it answers as onnxruntime's int8 graph does,
and its int16 saturation changes nothing where 7-bit weights make saturation impossible."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_compress import MAX_LENGTH, TEST_CONFIG, build_compressed_dir

from langops.onnx_model import MODEL_FILE, OnnxClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from int8_saturation import INT16_MAX, read_qdq_graph, replay

TEXTS = [f"{word} order {i} " * (1 + i % 6) for i, word in enumerate(["refund", "parcel", "crash", "login"] * 5)]


@pytest.fixture(scope="module", params=[False, True], ids=["8-bit", "7-bit"])
def static_int8(request, tmp_path_factory, tiny_trained_dir):
    cfg = TEST_CONFIG.model_copy(update={"quantization": "static", "reduce_range": request.param})
    return build_compressed_dir(tmp_path_factory.mktemp("replay"), tiny_trained_dir, cfg).out_dir


@pytest.mark.model
def test_the_exact_replay_answers_as_the_onnxruntime_int8_graph(static_int8, tiny_trained_dir) -> None:
    onnxruntime_logits = OnnxClassifier.load(static_int8).predict_logits(TEXTS, batch_size=1)
    replayed, counts = replay(tiny_trained_dir, read_qdq_graph(static_int8 / MODEL_FILE), TEXTS, MAX_LENGTH,
                              saturate=False)
    np.testing.assert_allclose(replayed, onnxruntime_logits, atol=0.05)
    assert (replayed.argmax(1) == onnxruntime_logits.argmax(1)).all()
    assert {"attention.self.query", "intermediate.dense"} <= counts.keys()


@pytest.mark.model
def test_saturation_changes_nothing_when_no_pair_can_reach_int16s_limit(static_int8, tiny_trained_dir) -> None:
    graph = read_qdq_graph(static_int8 / MODEL_FILE)
    largest_weight = max(np.abs(q.weight).max() for q in graph.matmuls)
    exact, _ = replay(tiny_trained_dir, graph, TEXTS, MAX_LENGTH, saturate=False)
    saturating, counts = replay(tiny_trained_dir, graph, TEXTS, MAX_LENGTH, saturate=True)
    saturated = sum(pairs for pairs, _ in counts.values())
    if 2 * 255 * largest_weight <= INT16_MAX:  # 7-bit weights
        assert saturated == 0
        np.testing.assert_array_equal(saturating, exact)
    else:
        assert largest_weight == 127
        assert saturated == 0 or not np.array_equal(saturating, exact)
