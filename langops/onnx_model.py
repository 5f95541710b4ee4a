"""The shipped classifier: an ONNX graph, its fast tokenizer and its labels, scored with onnxruntime.

One small class serves the compress step (parity and latency), the MLflow pyfunc, the promotion gate
and the model server, so all of them score exactly the artifact that ships. It imports neither torch
nor transformers: the server stays light and starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from langops.io import LABELS_FILE
from langops.metrics import softmax

MODEL_FILE = "model.onnx"
FP32_MODEL_FILE = "model_fp32.onnx"
TOKENIZER_FILE = "tokenizer.json"
SERVING_FILE = "serving.json"
SERVING_KEYS = ("max_length", "pad_token")  # what load() needs from serving.json
# The encoder inputs a BERT-family graph may declare; each is produced by the tokenizer.
SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OnnxClassifier:
    """Text in, label probabilities out, through an onnxruntime session.

    Texts are truncated to ``max_length`` tokens and padded to the longest text of each batch (not to a
    fixed length), so short requests cost short sequences. Concurrent calls are safe: the session's
    ``run`` and the tokenizer's encode are thread-safe and the object is not mutated after ``load``.
    """

    def __init__(self, session: Any, tokenizer: Any, labels: Sequence[str], max_length: int) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.input_names = [node.name for node in session.get_inputs()]
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def load(
        cls, directory: Path, *, model_file: str = MODEL_FILE, num_threads: int | None = None
    ) -> OnnxClassifier:
        """Open a compressed dir: ``model_file``, ``tokenizer.json``, ``labels.json`` and ``serving.json``.

        Args:
            directory: the compress step's output folder.
            model_file: which graph to load (``model_fp32.onnx`` to score the unquantised one).
            num_threads: onnxruntime intra-op threads; None lets onnxruntime use every core.

        Raises:
            FileNotFoundError: a required file is missing (it is named).
            ValueError: serving.json lacks a setting, the graph needs an input the tokenizer cannot
                produce, or its output does not have one column per label.
        """
        import onnxruntime as ort

        directory = Path(directory)
        missing = [
            name
            for name in (model_file, TOKENIZER_FILE, LABELS_FILE, SERVING_FILE)
            if not (directory / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"incomplete compressed model in {directory}: missing {', '.join(missing)}"
            )
        serving = json.loads((directory / SERVING_FILE).read_text())
        absent = [key for key in SERVING_KEYS if key not in serving]
        if absent:
            raise ValueError(f"{directory / SERVING_FILE} lacks {absent}: not written by the compress step")
        labels = json.loads((directory / LABELS_FILE).read_text())
        tokenizer = load_tokenizer(
            directory / TOKENIZER_FILE, max_length=serving["max_length"], pad_token=serving["pad_token"]
        )

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        # CPU only: the int8 graph's integer kernels (MatMulInteger, QAttention) are CPU kernels, and
        # the latency the gate judges is measured on CPU.
        session = ort.InferenceSession(
            str(directory / model_file), options, providers=["CPUExecutionProvider"]
        )
        check_graph(session, n_labels=len(labels), source=directory / model_file)
        return cls(session, tokenizer, labels, serving["max_length"])

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token arrays for one batch, padded to its longest text, holding only the graph's inputs."""
        encodings = self._tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {name: arrays[name] for name in self.input_names}

    def predict_logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits, shape (len(texts), len(labels)), scored ``batch_size`` texts at a time."""
        texts = _as_text_list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not texts:
            return np.empty((0, len(self.labels)), dtype=np.float32)
        batches = [
            self._session.run([self._output_name], self.encode(texts[start : start + batch_size]))[0]
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(batches)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (len(texts), len(labels)), columns in ``labels`` order."""
        return softmax(self.predict_logits(texts, batch_size).astype(np.float64))

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """One ``{"label": str, "probabilities": {label: float}}`` per text, in input order."""
        probs = self.predict_proba(texts, batch_size)
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {label: float(p) for label, p in zip(self.labels, row, strict=True)},
            }
            for row in probs
        ]


def load_tokenizer(path: Path, *, max_length: int, pad_token: str) -> Any:
    """A fast tokenizer set to truncate at ``max_length`` and pad each batch to its longest text.

    Padding and truncation are set here, not trusted from ``tokenizer.json``: saved tokenizers often
    carry a fixed padding length (sentence-transformers saves ``Fixed: 128``) that would waste compute.

    Raises:
        ValueError: ``pad_token`` is not in the tokenizer's vocabulary.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary of {path}")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token)
    return tokenizer


def check_graph(session: Any, *, n_labels: int, source: Path) -> None:
    """Refuse a graph the classifier cannot feed, or whose logits do not match the label map.

    Raises:
        ValueError: an input outside ``SUPPORTED_INPUTS``, or an output width other than ``n_labels``.
    """
    unknown = [node.name for node in session.get_inputs() if node.name not in SUPPORTED_INPUTS]
    if unknown:
        raise ValueError(f"{source} declares inputs {unknown}; only {list(SUPPORTED_INPUTS)} can be fed")
    shape = session.get_outputs()[0].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n_labels):
        raise ValueError(
            f"{source} outputs shape {shape}, expected (batch, {n_labels}) for {n_labels} labels"
        )


def _as_text_list(texts: Sequence[str]) -> list[str]:
    """The texts as a list; a bare string is refused, as it would be scored character by character."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; got {sorted(set(bad))}")
    return texts
