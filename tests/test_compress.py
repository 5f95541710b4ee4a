"""The compress step on a tiny random BERT: layout, parity, sizes, latency, dynamic shapes, failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LABELS, write_prepared

from langops.config import CompressConfig
from langops.io import read_split
from langops.metrics import classification_metrics
from langops.onnx_model import FP32_MODEL_FILE, MODEL_FILE, OnnxClassifier
from langops.tasks.compress import CompressionResult, ParityError, check_parity, compress

MAX_LENGTH = 32
# Random weights: int8 label agreement is luck, so only fp32 parity is held to the real tolerance here.
TEST_CONFIG = CompressConfig(latency_runs=5, min_label_agreement=0.0)


def build_compressed_dir(
    root: Path, trained_dir: Path, cfg: CompressConfig = TEST_CONFIG
) -> CompressionResult:
    """Run the real compress step on the tiny model (shared by the ONNX-model and register tests)."""
    return compress(
        cfg,
        trained_dir=trained_dir,
        prepared_dir=write_prepared(root / "prepared"),
        out_dir=root / "compressed",
        report_dir=root / "compression",
        max_length=MAX_LENGTH,
    )


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_trained_dir) -> CompressionResult:
    return build_compressed_dir(tmp_path_factory.mktemp("compress"), tiny_trained_dir)


@pytest.mark.model
def test_writes_the_compressed_layout(compressed: CompressionResult) -> None:
    out = compressed.out_dir
    for name in (
        MODEL_FILE,
        FP32_MODEL_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "labels.json",
        "serving.json",
        "compress.json",
    ):
        assert (out / name).is_file(), name
    assert compressed.model_path == out / MODEL_FILE and compressed.quantized
    assert json.loads((out / "labels.json").read_text()) == LABELS
    serving = json.loads((out / "serving.json").read_text())
    assert serving["max_length"] == MAX_LENGTH and serving["quantized"] is True and serving["opset"] == 17
    assert set(serving["input_names"]) <= {"input_ids", "attention_mask", "token_type_ids"}
    summary = json.loads((out / "compress.json").read_text())
    assert summary["parity"] == compressed.parity and summary["latency_ms"] == compressed.latency_ms
    assert summary["sizes_mb"] == compressed.sizes_mb and summary["metrics"] == compressed.metrics
    assert summary["fused_operators"].get("Attention") == 2, "the BERT fuser should fuse both layers"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging left behind"


@pytest.mark.model
def test_the_shipped_folder_remembers_which_texts_the_model_trained_on(compressed: CompressionResult) -> None:
    from langops.io import read_split
    from langops.onnx_model import OnnxClassifier

    prepared = compressed.out_dir.parent / "prepared"
    assert compressed.training_texts["texts"] == {"train": 120, "validation": 30}
    classifier = OnnxClassifier.load(compressed.out_dir)
    assert classifier.trained_on(read_split(prepared, "train")["text"].tolist()).all()
    assert classifier.trained_on(read_split(prepared, "validation")["text"].str.upper().tolist()).all()
    assert not classifier.trained_on(read_split(prepared, "test")["text"].tolist()).any()


@pytest.mark.model
def test_parity_within_bounds(compressed: CompressionResult) -> None:
    parity = compressed.parity
    assert parity["rows"] == 3 * 10 and parity["passed"] is True
    assert 0 <= parity["fp32_max_abs_logit_diff"] <= TEST_CONFIG.max_fp32_logit_diff
    assert parity["fp32_label_agreement"] == 1.0
    assert 0 <= parity["int8_max_abs_logit_diff"] < 0.05
    assert TEST_CONFIG.min_label_agreement <= parity["int8_label_agreement"] <= 1.0
    assert TEST_CONFIG.min_label_agreement <= parity["int8_label_agreement_batch1"] <= 1.0


@pytest.mark.unit
def test_check_parity_lists_every_failure() -> None:
    torch_logits = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    int8_batched = torch_logits.copy()
    int8_batched[0] = [0.0, 1.0]  # one flip in four: 0.75 agreement
    with pytest.raises(ParityError) as failure:
        check_parity(
            CompressConfig(min_label_agreement=0.9, max_fp32_logit_diff=1e-3),
            torch_logits=torch_logits,
            fp32_logits=torch_logits + 0.01,
            int8_logits=int8_batched,
            int8_logits_batch1=torch_logits,
        )
    message = str(failure.value)
    assert "fp32 max |logit diff| 0.01 > max_fp32_logit_diff 0.001" in message
    assert "int8_label_agreement 0.7500 < min_label_agreement 0.9000" in message
    assert "int8_label_agreement_batch1" not in message.split(" (figures")[0]


@pytest.mark.unit
def test_check_parity_gates_single_text_scoring_too() -> None:
    torch_logits = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ParityError, match=r"int8_label_agreement_batch1 0\.5000 < min_label_agreement"):
        check_parity(
            CompressConfig(min_label_agreement=0.9),
            torch_logits=torch_logits,
            fp32_logits=torch_logits,
            int8_logits=torch_logits,
            int8_logits_batch1=np.array([[1.0, 0.0], [1.0, 0.0]]),
        )


@pytest.mark.model
def test_int8_is_smaller_than_fp32(compressed: CompressionResult) -> None:
    sizes = compressed.sizes_mb
    assert sizes["int8_onnx"] < 0.5 * sizes["fp32_onnx"]
    assert sizes["fp32_onnx"] == pytest.approx(sizes["torch"], rel=0.05)
    assert (compressed.out_dir / MODEL_FILE).stat().st_size == pytest.approx(sizes["int8_onnx"] * 1e6)


@pytest.mark.model
def test_latency_figures_are_positive(compressed: CompressionResult) -> None:
    expected = {
        f"{model}_batch{batch}_{stat}"
        for model in ("fp32", "int8")
        for batch in (1, 32)
        for stat in ("p50", "p95")
    }
    assert set(compressed.latency_ms) == expected
    assert all(value > 0 for value in compressed.latency_ms.values())
    assert compressed.latency_ms["int8_batch1_p50"] <= compressed.latency_ms["int8_batch1_p95"]


@pytest.mark.model
def test_metrics_are_the_shipped_model_on_the_test_split(compressed: CompressionResult) -> None:
    prepared = compressed.out_dir.parent / "prepared"
    test = read_split(prepared, "test")
    probs = OnnxClassifier.load(compressed.out_dir).predict_proba(test["text"].tolist())
    expected = classification_metrics([LABELS.index(y) for y in test["label"]], probs, LABELS)
    assert compressed.metrics["rows"] == len(test)
    assert compressed.metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert compressed.metrics["confusion_matrix"] == expected["confusion_matrix"]


@pytest.mark.model
def test_graph_has_dynamic_batch_and_sequence(compressed: CompressionResult, tiny_trained_dir: Path) -> None:
    """Batches of several sizes and lengths (one past max_length) match torch on the exported fp32 graph."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_trained_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained_dir / "model")
    classifier = OnnxClassifier.load(compressed.out_dir, model_file=FP32_MODEL_FILE)
    batches = [["short"], ["a bit longer text", "x", "billing " * 10], ["word " * 100] * 2 + ["y"] * 15]
    for batch in batches:
        with torch.inference_mode():
            encoded = tokenizer(
                batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            expected = model(**encoded).logits.numpy()
        got = classifier.predict_logits(batch)
        assert got.shape == (len(batch), len(LABELS))
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert classifier.encode(batches[2])["input_ids"].shape == (17, MAX_LENGTH)


@pytest.mark.model
def test_without_quantization_ships_the_fp32_graph(tmp_path: Path, tiny_trained_dir: Path) -> None:
    cfg = TEST_CONFIG.model_copy(update={"quantize": False})
    result = build_compressed_dir(tmp_path, tiny_trained_dir, cfg)
    out = result.out_dir
    assert not result.quantized
    assert (out / MODEL_FILE).read_bytes() == (out / FP32_MODEL_FILE).read_bytes()
    assert "int8_onnx" not in result.sizes_mb and not any(k.startswith("int8") for k in result.latency_ms)
    assert "int8_label_agreement" not in result.parity
    assert json.loads((out / "serving.json").read_text())["quantized"] is False


@pytest.mark.model
def test_parity_failure_raises_and_keeps_the_previous_out_dir(
    compressed: CompressionResult, tiny_trained_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "compressed"
    shutil.copytree(compressed.out_dir, out_dir)
    (out_dir / "marker").write_text("previous")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    impossible = TEST_CONFIG.model_copy(update={"max_fp32_logit_diff": 1e-12})
    with pytest.raises(ParityError, match=r"fp32 max \|logit diff\| .* > max_fp32_logit_diff 1e-12"):
        compress(
            impossible,
            trained_dir=tiny_trained_dir,
            prepared_dir=compressed.out_dir.parent / "prepared",
            out_dir=out_dir,
            report_dir=tmp_path / "report",
            max_length=MAX_LENGTH,
        )
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"], "staging dir left behind"


@pytest.mark.model
def test_unknown_test_label_is_refused_before_any_work(tmp_path: Path, tiny_trained_dir: Path) -> None:
    prepared = write_prepared(tmp_path / "prepared")
    pd.DataFrame({"text": ["where is my refund"], "label": ["refunds"]}).to_parquet(prepared / "test.parquet")
    with pytest.raises(ValueError, match=r"labels the model does not know: \['refunds'\]"):
        compress(
            TEST_CONFIG,
            trained_dir=tiny_trained_dir,
            prepared_dir=prepared,
            out_dir=tmp_path / "out",
            report_dir=tmp_path / "report",
            max_length=MAX_LENGTH,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.model
@pytest.mark.parametrize("batch_size", [2, 7, 64])
def test_static_int8_answers_a_text_the_same_alone_and_in_any_batch(compressed: CompressionResult, batch_size) -> None:
    assert json.loads((compressed.out_dir / "compress.json").read_text())["quantization"]["method"] == "static"
    texts = [f"{word} order {i} " * (1 + i % 5) for i, word in enumerate(["refund", "parcel", "crash", "login"] * 8)]
    shipped = OnnxClassifier.load(compressed.out_dir)
    alone = np.concatenate([shipped.predict_logits([text], 1) for text in texts])
    np.testing.assert_allclose(shipped.predict_logits(texts, batch_size), alone, rtol=0, atol=1e-5)
    assert compressed.parity["int8_batch_max_abs_logit_diff"] <= 1e-5


@pytest.mark.model
def test_dynamic_int8_stays_an_option(tmp_path, tiny_trained_dir) -> None:
    result = build_compressed_dir(tmp_path, tiny_trained_dir, TEST_CONFIG.model_copy(update={"quantization": "dynamic"}))
    summary = json.loads((result.out_dir / "compress.json").read_text())
    assert summary["quantization"]["method"] == "dynamic" and result.quantized
    assert result.sizes_mb["int8_onnx"] < result.sizes_mb["fp32_onnx"]


def _matmul_weight_range(model_path: Path) -> int:
    """The largest |int8 weight| of the graph's quantised MatMuls."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    weights = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_quantized")]
    return int(max(np.abs(w.astype(np.int32)).max() for w in weights if w.ndim == 2 and w.dtype == np.int8))


@pytest.mark.model
@pytest.mark.parametrize("quantization", ["static", "dynamic"])
def test_reduce_range_quantises_to_7_bit_weights_that_cannot_saturate_int16_pairs(
    tmp_path, tiny_trained_dir, compressed: CompressionResult, quantization
) -> None:
    cfg = TEST_CONFIG.model_copy(update={"quantization": quantization, "reduce_range": True})
    result = build_compressed_dir(tmp_path, tiny_trained_dir, cfg)
    assert json.loads((result.out_dir / "compress.json").read_text())["quantization"]["reduce_range"] is True
    # two u8 activations (at most 255) times weights of at most 64 stay under int16's 32767
    assert _matmul_weight_range(result.out_dir / MODEL_FILE) <= 64
    assert json.loads((compressed.out_dir / "compress.json").read_text())["quantization"]["reduce_range"] is False
    assert _matmul_weight_range(compressed.out_dir / MODEL_FILE) == 127
