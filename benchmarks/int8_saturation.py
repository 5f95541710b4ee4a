"""Static int8 on CPUs without AVX-512-VNNI: what int16 saturation would change, emulated and checked.

onnxruntime's u8s8 integer kernels multiply with VPMADDUBSW on AVX2 (and on AVX-512 without VNNI): each
pair of adjacent u8 × s8 products is added into an int16 that saturates at ±32767, before the int32
accumulation. VNNI's VPDPBUSD accumulates in int32 and never saturates. A machine has one kernel or the
other, so this benchmark replays the shipped static (QDQ) graph in torch: its quantised MatMuls with
the graph's own int8 weights, weight scales and calibrated activation scales, and every other tensor
the graph quantises (the embedding tables and lookups, the LayerNorm outputs, the MatMul outputs):

- **exact**: the integer products summed in int32, as VNNI computes them. Its labels are compared with
  onnxruntime's on this machine: that is the check that the replay is the int8 model.
- **saturating**: the same, with each pair of products along the inner dimension (k, k + 1 for even k,
  as the kernel packs them) clipped to int16 first, as AVX2 does.

It prints the share of saturated pairs per kind of layer, and the labels, accuracy and macro-F1 of torch
fp32, onnxruntime int8, the exact replay and the saturating replay, side by side. With ``--reduce-range``
it also quantises with 7-bit weights (``compress.reduce_range``: |pair| ≤ 2 × 255 × 64 < 32767, so they
cannot saturate) and scores that graph with onnxruntime, for the accuracy the fix costs.

    python benchmarks/int8_saturation.py --dataset sst2 --reduce-range      # trains the default teacher
    python benchmarks/int8_saturation.py --trained models/trained --prepared data/prepared
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from langops.config import DataConfig, load_params
from langops.io import LABEL, TEXT, read_labels, read_split
from langops.modeling import load_trained_classifier, predict_logits
from langops.onnx_model import OnnxClassifier
from langops.tasks.compress import compress
from langops.tasks.prepare import prepare
from langops.tasks.train import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from quality import DATASETS, SHARED

INT16_MAX = 32767


@dataclass(frozen=True)
class Quantiser:
    """An activation's u8 quantisation in the graph: x → round(x / scale) + zero_point, clipped to 0..255."""

    scale: float
    zero_point: int

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantise and dequantise, as the graph's QuantizeLinear → DequantizeLinear pair does."""
        return (self.integers(x.double()) - self.zero_point) * self.scale


@dataclass(frozen=True)
class QuantisedMatMul:
    """One weight MatMul of the QDQ graph: int8 weights (K, N) per output channel, u8 input and output."""

    module: str  # the torch Linear it came from, e.g. bert.encoder.layer.0.attention.self.query
    weight: np.ndarray  # int8 values, (K, N)
    weight_scale: np.ndarray  # (N,)
    inputs: Quantiser
    output: Quantiser | None  # the product (before the bias) is quantised again when the graph says so


@dataclass(frozen=True)
class QdqGraph:
    matmuls: list[QuantisedMatMul]
    tables: dict[str, np.ndarray]  # weight-only quantised tensors (the embedding tables), dequantised
    outputs: dict[str, Quantiser]  # modules whose output the graph quantises (embedding lookups, LayerNorms)


def _module(tensor_or_node: str) -> str:
    """``/model/bert/encoder/layer.0/attention/output/LayerNorm/LayerNormalization_output_0`` →
    ``bert.encoder.layer.0.attention.output.LayerNorm``."""
    return re.sub(r"^/model/", "", tensor_or_node).rsplit("/", 1)[0].replace("/", ".")


def read_qdq_graph(onnx_path: Path) -> QdqGraph:
    """Every quantisation of the static int8 graph, by the torch module it applies to."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def quantiser(node) -> Quantiser:
        return Quantiser(float(inits[node.input[1]]), int(inits[node.input[2]]))

    matmuls, matmul_inputs = [], set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        act, weight = (producer.get(name) for name in node.input)
        if not (act and weight and act.op_type == weight.op_type == "DequantizeLinear" and weight.input[0] in inits):
            continue
        if np.any(inits[weight.input[2]] != 0):
            raise ValueError(f"{node.name}: asymmetric weights; the replay assumes zero points of 0")
        quantised_output = [c for c in consumers[node.output[0]] if c.op_type == "QuantizeLinear"]
        matmuls.append(QuantisedMatMul(
            module=_module(node.name),
            weight=inits[weight.input[0]].astype(np.int32),
            weight_scale=np.broadcast_to(inits[weight.input[1]], inits[weight.input[0]].shape[1:]).astype(np.float64),
            inputs=quantiser(act),
            output=quantiser(quantised_output[0]) if quantised_output else None,
        ))
        matmul_inputs.add(producer[act.input[0]].input[0])
    tables, outputs = {}, {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            if not node.output[0].endswith(".weight_DequantizeLinear_Output") or len(consumers[node.output[0]]) != 1 \
                    or consumers[node.output[0]][0].op_type != "Gather":
                continue
            values, scale, zero = (inits[name] for name in node.input)
            if np.ndim(scale):
                raise ValueError(f"{node.output[0]}: per-channel table; the replay handles one scale per table")
            name = node.output[0].removeprefix("model.").removesuffix("_DequantizeLinear_Output")
            tables[name] = (values.astype(np.float32) - zero) * scale
        elif node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            source = producer[node.input[0]]
            if source.op_type in ("Gather", "LayerNormalization"):
                outputs[_module(node.input[0])] = quantiser(node)
            elif source.op_type != "MatMul" and node.input[0] not in matmul_inputs:
                raise ValueError(f"the replay does not model the quantised {source.op_type} output {node.input[0]}")
    return QdqGraph(matmuls, tables, outputs)


class ReplayedLinear(torch.nn.Module):
    """A Linear computed as the int8 kernel does: quantise the input, integer products, dequantise."""

    def __init__(self, q: QuantisedMatMul, bias: torch.Tensor | None, counts: dict[str, list[int]], saturate: bool):
        super().__init__()
        self.q, self.saturate, self.counts = q, saturate, counts
        w = torch.tensor(q.weight, dtype=torch.float64)
        self.w, self.w_even, self.w_odd = w, w[0::2], w[1::2]
        self.column_sums = w.sum(0)
        # the largest |weight| of each even and odd row bounds every pair that row can make
        self.bound_even, self.bound_odd = self.w_even.abs().amax(1), self.w_odd.abs().amax(1)
        self.scale = torch.tensor(q.weight_scale) * q.inputs.scale
        self.bias = None if bias is None else bias.detach().double()
        self.kind = re.sub(r"^.*layer\.\d+\.", "", q.module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = self.q.inputs.integers(x.double().reshape(-1, shape[-1]))
        acc = a @ self.w
        if self.saturate:
            a_even, a_odd = a[:, 0::2], a[:, 1::2]
            rows, pairs = torch.nonzero(a_even * self.bound_even + a_odd * self.bound_odd > INT16_MAX, as_tuple=True)
            products = a_even[rows, pairs, None] * self.w_even[pairs] + a_odd[rows, pairs, None] * self.w_odd[pairs]
            clipped = products.clamp(-INT16_MAX - 1, INT16_MAX) - products
            acc.index_add_(0, rows, clipped)
            self.counts[self.kind][0] += int((clipped != 0).sum())
        self.counts[self.kind][1] += a.shape[0] * self.w_even.shape[0] * self.w.shape[1]
        y = (acc - self.q.inputs.zero_point * self.column_sums) * self.scale
        if self.q.output is not None:
            y = self.q.output(y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def replay(trained_dir: Path, graph: QdqGraph, texts: list[str], max_length: int, *, saturate: bool
           ) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Logits of the int8 graph replayed in torch, and per kind of layer [saturated pairs, all pairs]."""
    model, tokenizer = load_trained_classifier(trained_dir / "model")
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, table in graph.tables.items():
            params[name].copy_(torch.from_numpy(table))
        for q in graph.matmuls:
            parent_name, _, child = q.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, ReplayedLinear(q, getattr(parent, child).bias, counts, saturate))
        for name, quantise in graph.outputs.items():
            model.get_submodule(name).register_forward_hook(
                lambda module, args, out, quantise=quantise: quantise(out).to(out.dtype))
    logits = predict_logits(model, tokenizer, texts, batch_size=1, max_length=max_length)
    return logits, dict(counts)


def scores(logits: np.ndarray, y: np.ndarray, torch_fp32: np.ndarray, onnxruntime_int8: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1, and the share of labels that agree with torch fp32 and with this CPU's int8."""
    predicted = logits.argmax(1)
    return {
        "accuracy": accuracy_score(y, predicted),
        "macro_f1": f1_score(y, predicted, average="macro"),
        "agreement_with_torch_fp32": float((predicted == torch_fp32.argmax(1)).mean()),
        "agreement_with_onnxruntime_int8": float((predicted == onnxruntime_int8.argmax(1)).mean()),
        "max_abs_logit_diff_to_onnxruntime_int8": float(np.abs(logits - onnxruntime_int8).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="train the default recipe on it first")
    parser.add_argument("--trained", type=Path, help="a train step's output folder")
    parser.add_argument("--prepared", type=Path, help="the prepared splits it was trained on (test is scored)")
    parser.add_argument("--reduce-range", action="store_true", help="also quantise with 7-bit weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if bool(args.dataset) == bool(args.trained and args.prepared):
        parser.error("give --dataset, or --trained and --prepared")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params(REPO / "params.yaml", args.overrides)

    with tempfile.TemporaryDirectory(prefix="langops-saturation-") as tmp:
        root = Path(tmp)
        if args.dataset:
            dataset = DATASETS[args.dataset]
            source = {split: str(SHARED / path) for split, path in dataset.source.items()}
            data = DataConfig(**{**params.data.model_dump(), "source": source, "labels": None})
            prepared_dir = prepare(data, params.prepare, seed=params.project.seed, out_dir=root / "prepared").out_dir
            trained_dir = train(params.train, prepared_dir=prepared_dir, out_dir=root / "trained",
                                checkpoint_dir=root / "checkpoints", seed=params.project.seed).out_dir
        else:
            trained_dir, prepared_dir = args.trained, args.prepared
        max_length = json.loads((trained_dir / "model" / "config.json").read_text())["langops_max_length"]
        test = read_split(prepared_dir, "test")
        labels = read_labels(prepared_dir)
        y = test[LABEL].map({label: i for i, label in enumerate(labels)}).to_numpy()
        texts = test[TEXT].tolist()

        static = compress(params.compress.model_copy(update={"quantization": "static", "reduce_range": False, "latency_runs": 5}),
                          trained_dir=trained_dir, prepared_dir=prepared_dir, out_dir=root / "static",
                          report_dir=root / "static-report", max_length=max_length)
        onnxruntime_int8 = OnnxClassifier.load(static.out_dir).predict_logits(texts, batch_size=1)
        model, tokenizer = load_trained_classifier(trained_dir / "model")
        torch_fp32 = predict_logits(model, tokenizer, texts, max_length=max_length)
        logits = {"torch fp32": torch_fp32, "onnxruntime int8 (this CPU)": onnxruntime_int8}
        started = time.perf_counter()
        graph = read_qdq_graph(static.out_dir / "model.onnx")
        exact, _ = replay(trained_dir, graph, texts, max_length, saturate=False)
        logits["replay, int32 pairs (VNNI)"] = exact
        saturating, counts = replay(trained_dir, graph, texts, max_length, saturate=True)
        logits["replay, int16 pairs (AVX2)"] = saturating
        replay_seconds = time.perf_counter() - started
        if args.reduce_range:
            seven_bit = compress(params.compress.model_copy(update={"quantization": "static", "reduce_range": True, "latency_runs": 5}),
                                 trained_dir=trained_dir, prepared_dir=prepared_dir, out_dir=root / "reduced",
                                 report_dir=root / "reduced-report", max_length=max_length)
            logits["onnxruntime int8, 7-bit weights"] = OnnxClassifier.load(seven_bit.out_dir).predict_logits(
                texts, batch_size=1)
    rows = {name: scores(values, y, torch_fp32, onnxruntime_int8) for name, values in logits.items()}
    rows["replay, int16 pairs (AVX2)"]["agreement_with_vnni_replay"] = float(
        (saturating.argmax(1) == exact.argmax(1)).mean())

    print(f"\n{len(texts)} test texts; replays took {replay_seconds:.0f} s")
    print(f"\n{'layer':<28} {'saturated pairs':>16} {'of':>14} {'share':>10}")
    for kind, (saturated, total) in sorted(counts.items()):
        print(f"{kind:<28} {saturated:>16,} {total:>14,} {saturated / total:>10.2e}")
    print(f"\n{'model':<32} {'accuracy':>9} {'macro-F1':>9} {'labels = torch':>15} {'labels = ort int8':>18} "
          f"{'max |Δlogit| to ort int8':>25}")
    for name, row in rows.items():
        print(f"{name:<32} {row['accuracy']:>9.4f} {row['macro_f1']:>9.4f} {row['agreement_with_torch_fp32']:>15.4f} "
              f"{row['agreement_with_onnxruntime_int8']:>18.4f} {row['max_abs_logit_diff_to_onnxruntime_int8']:>25.4f}")
    print(f"\nthe saturating replay's labels agree with the exact replay's on "
          f"{rows['replay, int16 pairs (AVX2)']['agreement_with_vnni_replay']:.4f} of the texts")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "saturated_pairs": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
