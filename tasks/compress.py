"""Compress: export the trained model to ONNX, fuse it, quantise it to int8, and prove it still agrees.

The gate and the server judge and serve the file this step writes, so it re-scores that file on the test
split, times it, and refuses to write anything when it drifts from the torch model: the out dir is
built beside its final place and renamed into it only once every check passed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from langops.config import CompressConfig
from langops.faults import crash_point
from langops.io import (
    TEXT,
    read_json,
    read_labels,
    read_split,
    read_test_rows,
    staging_dir,
    swap_in,
    write_json,
    write_labels,
)
from langops.metrics import classification_metrics, metrics_for_dvc, softmax
from langops.model_files import file_sha256
from langops.onnx_model import (
    EMBEDDING_DIM,
    EMBEDDING_OUTPUT,
    FP32_MODEL_FILE,
    LOGITS_OUTPUT,
    MODEL_FILE,
    PROJECTION_FILE,
    PROJECTION_SEED,
    SERVING_FILE,
    TOKENIZER_FILE,
    OnnxClassifier,
    embedding_projection,
)
from langops.text_hashes import MANIFEST_FILE, MANIFEST_SPLITS, TextManifest

TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")
SUMMARY_FILE = "compress.json"
METRICS_FILE = "metrics.json"  # in the report dir: the numbers DVC compares
OUTPUT_NAME = LOGITS_OUTPUT
REFERENCE_FILE = "reference.parquet"  # the test split scored by the shipped model: monitoring's reference
REFERENCE_ENDPOINT = "reference"
# One weight scale per output channel: BERT projections have a few outlier columns that would
# otherwise set the scale for all. On MiniLM (fitted head, 300 rows) per-tensor gave int8 max |logit
# diff| 1.61 and label agreement 0.917; per-channel 0.95 and 0.967. ``compress.reduce_range`` (7-bit
# weights) is for CPUs without VNNI, where u8s8 pairs of products can saturate int16.
QUANTIZATION = {"weight_type": "QInt8", "per_channel": True}
# Static int8 quantises the weight MatMuls of the unfused graph with activation scales fixed by
# calibration (QDQ; onnxruntime fuses the pairs into integer kernels when it loads the graph), so a
# text's answer is the same alone or in any batch. The feed-forward output projections stay fp32: their
# input (after GELU) has the few huge outlier channels BERTs are known for, and one fixed per-tensor
# scale for them cost 5 points of label agreement with fp32 on the demo (0.940 against 0.989 without).
STATIC_SKIPPED = "feed-forward output projections (outlier activations)"
WARMUP_RUNS = 3
LATENCY_BATCH_SIZES = (1, 32)
SCORE_BATCH_SIZE = 64
MB = 1_000_000


class ParityError(RuntimeError):
    """The ONNX model disagrees with the torch model beyond the configured tolerance."""


@dataclass(frozen=True)
class CompressionResult:
    """Where the shipped model is and the evidence about it (also written to ``compress.json``)."""

    out_dir: Path
    model_path: Path
    quantized: bool
    parity: dict[str, Any]
    sizes_mb: dict[str, float]
    latency_ms: dict[str, float]
    metrics: dict[str, Any]
    training_texts: dict[str, Any] | None = None  # the manifest's file, counts per split and sha256

    @property
    def shipped(self) -> str:
        """Which of the exported models ships: ``int8`` or ``fp32``."""
        return "int8" if self.quantized else "fp32"

    @classmethod
    def load(cls, out_dir: Path) -> CompressionResult:
        """The result as the step left it in ``out_dir`` (for a later stage run on its own)."""
        summary = read_json(Path(out_dir) / SUMMARY_FILE)
        return cls(
            out_dir=Path(out_dir),
            model_path=Path(out_dir) / summary["model_file"],
            quantized=bool(summary["quantized"]),
            parity=summary["parity"],
            sizes_mb=summary["sizes_mb"],
            latency_ms=summary["latency_ms"],
            metrics=summary["metrics"],
            training_texts=summary.get("training_texts"),
        )


def compress(
    cfg: CompressConfig, *, trained_dir: Path, prepared_dir: Path, out_dir: Path, report_dir: Path, max_length: int
) -> CompressionResult:
    """Export, optimise and (when ``cfg.quantize``) int8-quantise the trained model, then verify it.

    Args:
        cfg: the ``compress`` section of params.yaml.
        trained_dir: the train step's output (``model/`` with tokenizer, ``labels.json``).
        prepared_dir: the prepared splits; the test split is the parity and metrics set.
        out_dir: the compressed dir to (re)place; ``compress.json`` in it holds every figure.
        report_dir: receives ``metrics.json``, the numbers DVC compares (headline metrics, F1 per label key,
            parity, sizes, latencies).
        max_length: token limit the model was trained with (``train.max_length``).

    Returns:
        The shipped model's path, parity figures, sizes, latencies and test metrics.

    Raises:
        ParityError: fp32 logits drift from torch beyond ``cfg.max_fp32_logit_diff``, or the shipped
            model's labels agree with torch on less than ``cfg.min_label_agreement`` of the test rows.
            ``out_dir`` is then left as it was.
        ValueError: the test split holds labels the model does not know, or the label maps disagree.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trained_dir, out_dir = Path(trained_dir), Path(out_dir)
    model_dir = trained_dir / "model"
    labels = read_labels(trained_dir)
    texts, y_true = read_test_rows(prepared_dir, labels)
    # Eager attention: it traces to the MatMul/Softmax pattern onnxruntime's BERT fuser recognises;
    # the SDPA path does not fuse. The two compute the same function.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_label_map(model.config.id2label, labels)

    staging = staging_dir(out_dir)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            exported = export_onnx(model, tokenizer, Path(scratch) / "exported.onnx", opset=cfg.opset)
            crash_point("compress:exported")
            fusions = optimize_onnx(exported, staging / FP32_MODEL_FILE, num_heads=model.config.num_attention_heads,
                                    hidden_size=model.config.hidden_size)
            write_serving_files(
                staging,
                model_dir=model_dir,
                labels=labels,
                max_length=max_length,
                pad_token=tokenizer.pad_token,
                opset=cfg.opset,
                quantized=cfg.quantize,
            )
            np.save(staging / PROJECTION_FILE, embedding_projection(model.config.hidden_size))
            fp32 = OnnxClassifier.load(staging, model_file=FP32_MODEL_FILE, num_threads=cfg.num_threads)
            if not cfg.quantize:
                shutil.copyfile(staging / FP32_MODEL_FILE, staging / MODEL_FILE)
            elif cfg.quantization == "dynamic":
                quantize_onnx(staging / FP32_MODEL_FILE, staging / MODEL_FILE, reduce_range=cfg.reduce_range)
            else:
                calibration = calibration_texts(prepared_dir, cfg.calibration_rows)
                quantize_static_onnx(exported, staging / MODEL_FILE, [fp32.encode([text]) for text in calibration],
                                     reduce_range=cfg.reduce_range)
        shipped = OnnxClassifier.load(staging, num_threads=cfg.num_threads) if cfg.quantize else fp32
        with torch.inference_mode():
            torch_logits = predict_torch_logits(model, tokenizer, texts, max_length=max_length)
        shipped_logits = shipped.predict_logits(texts, SCORE_BATCH_SIZE)
        parity = check_parity(
            cfg,
            torch_logits=torch_logits,
            fp32_logits=fp32.predict_logits(texts, SCORE_BATCH_SIZE),
            int8_logits=shipped_logits if cfg.quantize else None,
            int8_logits_batch1=shipped.predict_logits(texts, 1) if cfg.quantize else None,
        )
        metrics = classification_metrics(y_true, softmax(shipped_logits.astype(np.float64)), labels)
        latency = measure_latency(fp32, texts, runs=cfg.latency_runs, prefix="fp32_")
        if cfg.quantize:
            latency |= measure_latency(shipped, texts, runs=cfg.latency_runs, prefix="int8_")
        reference_rows = write_reference(staging / REFERENCE_FILE, shipped, texts, [labels[i] for i in y_true])
        manifest = write_training_manifest(staging / MANIFEST_FILE, prepared_dir)
        sizes = {"torch": weights_size_mb(model_dir), "fp32_onnx": file_size_mb(staging / FP32_MODEL_FILE)}
        if cfg.quantize:
            sizes["int8_onnx"] = file_size_mb(staging / MODEL_FILE)
        write_json(
            staging / SUMMARY_FILE,
            {
                "model_file": MODEL_FILE,
                "quantized": cfg.quantize,
                "quantization": quantization_summary(cfg),
                "opset": cfg.opset,
                "max_length": max_length,
                "fused_operators": fusions,
                "parity": parity,
                "sizes_mb": sizes,
                "latency_ms": latency,
                "latency_threads": cfg.num_threads,
                "metrics": metrics,
                "reference": {"file": REFERENCE_FILE, "rows": reference_rows, "split": "test",
                              "size_mb": file_size_mb(staging / REFERENCE_FILE)},
                "training_texts": {"file": MANIFEST_FILE, "texts": manifest.counts,
                                   "sha256": file_sha256(staging / MANIFEST_FILE)},
            },
        )
        swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = read_json(out_dir / SUMMARY_FILE)
    write_json(Path(report_dir) / METRICS_FILE, {**summary, "metrics": metrics_for_dvc(summary["metrics"])})
    return CompressionResult.load(out_dir)


def check_label_map(id2label: dict[int, str], labels: Sequence[str]) -> None:
    """The model's own label order must be labels.json's, or every prediction would be mislabelled.

    Raises:
        ValueError: the two orders differ.
    """
    model_labels = [id2label[i] for i in range(len(id2label))]
    if model_labels != list(labels):
        raise ValueError(f"model config labels {model_labels} differ from labels.json {list(labels)}")


def write_training_manifest(path: Path, prepared_dir: Path) -> TextManifest:
    """The hashed texts of the train and validation splits, shipped beside the model: what it learned from
    and was selected on, for the gate to leave out of any later comparison (``langops.text_hashes``)."""
    manifest = TextManifest.from_texts(
        {split: read_split(prepared_dir, split)["text"].dropna().astype(str) for split in MANIFEST_SPLITS}
    )
    manifest.save(path)
    return manifest


def write_reference(path: Path, classifier: OnnxClassifier, texts: Sequence[str], true_labels: Sequence[str]) -> int:
    """Score ``texts`` with the shipped model and write the rows in the prediction log's schema.

    This is what monitoring compares live traffic with, so it is scored by the same graph, tokenizer and
    projection the server uses. Rows carry no time, ``request_id`` ``test-<row>``, and empty
    ``model_name``/``version`` (the version exists only once registered); ``true_label`` is added.
    Returns the number of rows.
    """
    import pandas as pd

    from langops.prediction_records import prediction_rows

    scores = classifier.score(texts, SCORE_BATCH_SIZE)
    rows = prediction_rows(
        request_id="test", endpoint=REFERENCE_ENDPOINT, model_name="", version="", texts=list(texts),
        labels=classifier.labels, scores=scores, text_policy="none",
    )
    frame = pd.DataFrame(rows)
    frame["true_label"] = list(true_labels)
    frame.to_parquet(path, index=False)
    return len(frame)


def with_embedding_output(model: Any, names: Sequence[str]) -> Any:
    """``model`` as a module whose forward takes ``names`` positionally and returns (logits, embedding).

    The embedding is the last layer's hidden state at the first token ([CLS]): the pooled sentence
    representation every BERT-family head starts from. It shares the encoder with the logits, so the
    server gets both from one onnxruntime call.
    """
    import torch

    class LogitsAndEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> tuple[Any, Any]:
            output = self.model(**dict(zip(names, inputs, strict=True)), output_hidden_states=True)
            return output.logits, output.hidden_states[-1][:, 0]

    return LogitsAndEmbedding().eval()


def export_onnx(model: Any, tokenizer: Any, path: Path, *, opset: int) -> Path:
    """Trace the torch classifier to ONNX with dynamic batch and sequence axes.

    The graph has two outputs: ``logits`` (first: what parity, the pyfunc and quantisation check) and
    ``embedding``, the pooled representation monitoring projects to ``EMBEDDING_DIM`` dimensions.

    The TorchScript exporter (``dynamo=False``) is used on purpose. Both exporters give the same
    logits (max diff ~1e-7 on MiniLM), but onnxruntime's BERT fuser recognises only the TorchScript
    graph's attention: it fuses it into ``Attention``/``EmbedLayerNormalization`` (50 nodes vs 187 from
    ``dynamo=True``, whose attention stays unfused), which quantises to ``QAttention`` and runs fp32
    ~35% faster at batch 1. It also exports in ~2 s instead of ~8 s. It is deprecated since torch 2.9;
    when it goes, this call fails loudly and the parity check guards the switch to ``dynamo=True``.
    """
    import torch

    sample = tokenizer(
        ["a short text", "a somewhat longer text to trace the padding with"],
        padding=True,
        return_tensors="pt",
    )
    # The tracer numbers graph inputs in forward()'s parameter order, whatever order the kwargs come
    # in, and input_names labels them positionally: names must follow forward(), not the tokenizer
    # (BERT's tokenizer lists token_type_ids before attention_mask, which would swap the two).
    names = [name for name in inspect.signature(model.forward).parameters if name in sample]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    traced = with_embedding_output(model, names)
    with warnings.catch_warnings():
        # Known and handled: the exporter's deprecation (see above); tracer notes on shape checks in
        # transformers' mask code, which check_parity verifies at other batch and sequence sizes; and
        # the advanced-indexing caveat about negative indices, which the padding mask never uses
        # (its indices are batch and key positions).
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            traced,
            tuple(sample[name] for name in names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME, EMBEDDING_OUTPUT],
            dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}, EMBEDDING_OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def optimize_onnx(src: Path, dst: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse the BERT graph with onnxruntime's transformer optimizer; returns the fused-operator counts.

    Offline fusion (rather than onnxruntime's load-time optimisation) is what lets quantisation see
    ``Attention`` nodes and emit ``QAttention``; ORT's own ``ORT_ENABLE_EXTENDED`` pass does not fuse
    attention on these graphs. Only Python-level fusions run (no hardware-specific ORT passes), so the
    saved graph is portable across CPUs.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(dst))
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def quantize_onnx(src: Path, dst: Path, *, reduce_range: bool = False) -> Path:
    """Dynamic int8 quantisation: QInt8 weights, activations quantised per batch at run time.

    ``DefaultTensorType`` is needed because ONNX shape inference cannot type the outputs of the fused
    contrib operators (``Attention``, ``SkipLayerNormalization``); every activation here is float32.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=QUANTIZATION["per_channel"],
        reduce_range=reduce_range,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return dst


def quantization_summary(cfg: CompressConfig) -> dict[str, Any] | None:
    """How the shipped model was quantised, as ``compress.json`` records it."""
    if not cfg.quantize:
        return None
    weights = {**QUANTIZATION, "reduce_range": cfg.reduce_range}
    if cfg.quantization == "dynamic":
        return {"method": "dynamic", **weights}
    return {"method": "static", "format": "QDQ", **weights, "activation_type": "QUInt8",
            "calibration": "MinMax", "calibration_rows": cfg.calibration_rows, "kept_fp32": STATIC_SKIPPED}


def calibration_texts(prepared_dir: Path, rows: int) -> list[str]:
    """A fixed sample of training texts: the static scales are fitted on what training saw, never on test."""
    train_texts = read_split(prepared_dir, "train")[TEXT]
    return train_texts.sample(n=min(rows, len(train_texts)), random_state=0).tolist()


def quantize_static_onnx(
    src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], *, reduce_range: bool = False
) -> Path:
    """Static int8 (QDQ) of the exported, unfused graph: weights per channel, activations with one scale
    per tensor from ``feeds`` (one calibration text each), the weight MatMuls but the feed-forward output
    projections quantised."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    nodes = [  # weight MatMuls, and the embedding tables' Gathers (a weight-only int8 lookup)
        node.name for node in graph.node
        if node.op_type in ("MatMul", "Gather") and node.input and node.input[0 if node.op_type == "Gather" else 1] in weights
        and not _is_ffn_output(node.name)
    ]

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    # onnxruntime's quantizer logs advice ("consider pre-processing") on the root logger at WARNING; the
    # graph comes straight from the exporter, shapes typed, so that stays off the user's console
    with _root_log_level(logging.ERROR):
        quantize_static(
            str(src),
            str(dst),
            Feeds(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gather"],
            nodes_to_quantize=nodes,
            per_channel=QUANTIZATION["per_channel"],
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return dst


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def _is_ffn_output(node_name: str) -> bool:
    """``/bert/encoder/layer.0/output/dense/MatMul``: a layer's feed-forward output, not attention's."""
    return "/output/dense/" in node_name and "/attention/" not in node_name


def write_serving_files(
    directory: Path,
    *,
    model_dir: Path,
    labels: Sequence[str],
    max_length: int,
    pad_token: str,
    opset: int,
    quantized: bool,
) -> None:
    """Copy the tokenizer and write labels.json and serving.json: everything ``OnnxClassifier`` reads.

    Raises:
        FileNotFoundError: the trained model has no fast tokenizer (``tokenizer.json``).
    """
    import onnx

    for name in TOKENIZER_FILES:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name} not found: the trained model must ship a fast tokenizer"
            )
        shutil.copyfile(model_dir / name, directory / name)
    write_labels(directory, list(labels))
    graph = onnx.load(str(directory / FP32_MODEL_FILE), load_external_data=False).graph  # every variant has its inputs
    write_json(
        directory / SERVING_FILE,
        {
            "model_file": MODEL_FILE,
            "max_length": max_length,
            "pad_token": pad_token,
            "input_names": [node.name for node in graph.input],
            "output_name": OUTPUT_NAME,
            "embedding": {"output": EMBEDDING_OUTPUT, "projection_file": PROJECTION_FILE, "dim": EMBEDDING_DIM,
                          "seed": PROJECTION_SEED, "pooling": "last hidden state of the first token ([CLS])"},
            "opset": opset,
            "quantized": quantized,
        },
    )


def predict_torch_logits(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int) -> np.ndarray:
    """The reference: logits from the torch model fed by its transformers tokenizer, as in training.

    Comparing against this (not against ONNX fed the same arrays) makes parity cover the serving
    tokenizer too: a tokenizer that encodes differently shows up as drift.
    """
    import torch

    batches = []
    for start in range(0, len(texts), SCORE_BATCH_SIZE):
        encoded = tokenizer(
            list(texts[start : start + SCORE_BATCH_SIZE]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(model(**encoded).logits.to(torch.float32).numpy())
    return np.concatenate(batches)


def check_parity(
    cfg: CompressConfig,
    *,
    torch_logits: np.ndarray,
    fp32_logits: np.ndarray,
    int8_logits: np.ndarray | None = None,
    int8_logits_batch1: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare ONNX logits with torch's; returns the figures, or raises with every failed check listed.

    A dynamically quantised int8 graph quantises activations with one scale per tensor per call, so a
    text's logits depend on the texts batched with it (a static graph's do not: its scales are fixed).
    Agreement is therefore checked twice: scored in batches of ``SCORE_BATCH_SIZE`` (as the metrics are)
    and one text at a time (as single requests are served), and the largest difference between the two
    is recorded as ``int8_batch_max_abs_logit_diff``.

    Raises:
        ParityError: fp32 max |logit diff| above ``cfg.max_fp32_logit_diff``, or the shipped model's
            label agreement (either way of batching, for int8) below ``cfg.min_label_agreement``.
    """
    reference = torch_logits.argmax(axis=1)
    parity: dict[str, Any] = {
        "rows": len(torch_logits),
        "fp32_max_abs_logit_diff": float(np.abs(fp32_logits - torch_logits).max()),
        "fp32_label_agreement": float((fp32_logits.argmax(axis=1) == reference).mean()),
    }
    gated = ["fp32_label_agreement"]
    if int8_logits is not None and int8_logits_batch1 is not None:
        parity["int8_max_abs_logit_diff"] = float(np.abs(int8_logits - torch_logits).max())
        parity["int8_label_agreement"] = float((int8_logits.argmax(axis=1) == reference).mean())
        parity["int8_label_agreement_batch1"] = float((int8_logits_batch1.argmax(axis=1) == reference).mean())
        parity["int8_batch_max_abs_logit_diff"] = float(np.abs(int8_logits - int8_logits_batch1).max())
        gated = ["int8_label_agreement", "int8_label_agreement_batch1"]
    failures = []
    if parity["fp32_max_abs_logit_diff"] > cfg.max_fp32_logit_diff:
        failures.append(
            f"fp32 max |logit diff| {parity['fp32_max_abs_logit_diff']:.3g} > "
            f"max_fp32_logit_diff {cfg.max_fp32_logit_diff:.3g}"
        )
    failures += [
        f"{key} {parity[key]:.4f} < min_label_agreement {cfg.min_label_agreement:.4f}"
        for key in gated
        if parity[key] < cfg.min_label_agreement
    ]
    if failures:
        raise ParityError(
            f"ONNX model fails parity with torch on {parity['rows']} test rows: "
            + "; ".join(failures)
            + f" (figures: {parity})"
        )
    parity["passed"] = True
    return parity


def measure_latency(
    classifier: OnnxClassifier, texts: Sequence[str], *, runs: int, prefix: str
) -> dict[str, float]:
    """Median and p95 wall time (ms) of ``predict_logits`` at batch 1 and 32, over ``runs`` calls each.

    Tokenisation is included: it is what a request to the server pays. Batches are taken from the test
    texts in order, cycling when there are fewer than needed; a few warm-up calls run first so one-off
    allocations are not timed.
    """
    timings: dict[str, float] = {}
    for batch_size in LATENCY_BATCH_SIZES:
        batches = [[texts[(i * batch_size + j) % len(texts)] for j in range(batch_size)] for i in range(runs)]
        for batch in batches[:WARMUP_RUNS]:
            classifier.predict_logits(batch, batch_size)
        elapsed = []
        for batch in batches:
            start = time.perf_counter()
            classifier.predict_logits(batch, batch_size)
            elapsed.append((time.perf_counter() - start) * 1000)
        timings[f"{prefix}batch{batch_size}_p50"] = statistics.median(elapsed)
        timings[f"{prefix}batch{batch_size}_p95"] = float(np.percentile(elapsed, 95))
    return timings


def weights_size_mb(model_dir: Path) -> float:
    """Size of the torch weight files (safetensors or bin) of a saved model, in MB (10^6 bytes)."""
    files = [*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")]
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    return sum(file_size_mb(f) for f in files)


def file_size_mb(path: Path) -> float:
    return path.stat().st_size / MB
