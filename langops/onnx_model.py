"""The shipped classifier: an ONNX graph, its fast tokenizer and its labels, scored with onnxruntime.

One small class serves the compress step (parity and latency), the MLflow pyfunc, the promotion gate
and the model server, so all of them score exactly the artifact that ships. It imports neither torch
nor transformers: the server stays light and starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
CLIP_CHARS_PER_TOKEN = 16  # a long text is first tokenised from its first max_length * 16 characters
LOGITS_OUTPUT = "logits"
# The second graph output: the last layer's hidden state at the first token ([CLS]), the pooled sentence
# representation. Projected to EMBEDDING_DIM by a fixed seeded Gaussian matrix stored beside the graph, so
# the server and the reference set computed at compress time use the same one.
EMBEDDING_OUTPUT = "embedding"
PROJECTION_FILE = "embedding_projection.npy"
EMBEDDING_DIM = 32
PROJECTION_SEED = 0
# The encoder inputs a BERT-family graph may declare; each is produced by the tokenizer.
SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Scores:
    """What one scoring call gives per text: probabilities, embeddings and what the tokenizer saw.

    ``embeddings`` is None for a model exported before the graph had an embedding output. ``tokens``
    counts each text's tokens before truncation, special tokens excluded; ``unknown_share`` is the share
    of them that are the tokenizer's unknown token (0 for an empty text).
    """

    probs: np.ndarray  # (n, labels) float64
    embeddings: np.ndarray | None  # (n, EMBEDDING_DIM) float32, L2-normalised
    tokens: np.ndarray  # (n,) int64
    unknown_share: np.ndarray  # (n,) float64

    def __len__(self) -> int:
        return len(self.probs)

    def rows(self, start: int, end: int) -> Scores:
        """The scores of texts ``start:end``."""
        return Scores(self.probs[start:end], None if self.embeddings is None else self.embeddings[start:end],
                      self.tokens[start:end], self.unknown_share[start:end])

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        if len(parts) == 1:
            return parts[0]
        embeddings = [part.embeddings for part in parts]
        return Scores(
            np.concatenate([part.probs for part in parts]),
            None if any(e is None for e in embeddings) else np.concatenate(embeddings),  # type: ignore[arg-type]
            np.concatenate([part.tokens for part in parts]),
            np.concatenate([part.unknown_share for part in parts]),
        )


def embedding_projection(hidden_size: int, *, dim: int = EMBEDDING_DIM, seed: int = PROJECTION_SEED) -> np.ndarray:
    """The fixed random projection of the pooled representation: a seeded Gaussian (hidden_size, dim) matrix."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hidden_size, dim)) / np.sqrt(dim)).astype(np.float32)


def project_embeddings(pooled: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Pooled representations projected and L2-normalised (a zero vector stays zero)."""
    projected = pooled.astype(np.float32) @ projection
    norms = np.sqrt((projected * projected).sum(axis=1, keepdims=True))  # cheaper than np.linalg.norm per call
    return projected / np.maximum(norms, 1e-12)


class OnnxClassifier:
    """Text in, label probabilities out, through an onnxruntime session.

    Texts are truncated to ``max_length`` tokens and padded to the longest text of each batch (not to a
    fixed length), so short requests cost short sequences. Concurrent calls are safe: the session's
    ``run`` and the tokenizer's encode are thread-safe and the object is not mutated after ``load``.
    """

    def __init__(
        self, session: Any, tokenizer: Any, labels: Sequence[str], max_length: int,
        projection: np.ndarray | None = None, training_texts: np.ndarray | None = None,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.input_names = [node.name for node in session.get_inputs()]
        outputs = [node.name for node in session.get_outputs()]
        self._output_name = outputs[0]
        # Embeddings need both the graph output and its projection; older models have neither.
        self.projection = projection if EMBEDDING_OUTPUT in outputs else None
        self._unknown_id = _unknown_token_id(tokenizer)
        # sorted hashes of the texts it trained or was selected on; None for a model shipped before manifests
        self.training_texts = training_texts

    def trained_on(self, texts: Sequence[str]) -> np.ndarray:
        """Which of ``texts`` this model trained or was selected on (all False when that is unknown)."""
        from langops.text_hashes import text_hashes

        if self.training_texts is None or not len(texts):
            return np.zeros(len(texts), dtype=bool)
        hashes = text_hashes(texts)
        found = np.searchsorted(self.training_texts, hashes).clip(max=len(self.training_texts) - 1)
        return self.training_texts[found] == hashes

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
        return cls(session, tokenizer, labels, serving["max_length"], projection=load_projection(directory),
                   training_texts=load_training_texts(directory))

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token arrays for one batch, padded to its longest text, holding only the graph's inputs."""
        return self._arrays(encode_clipped(self._tokenizer, list(texts), self.max_length)[0])

    def _arrays(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
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

    def score(self, texts: Sequence[str], batch_size: int = 64) -> Scores:
        """Probabilities, embeddings and token counts for ``texts``: one onnxruntime call per batch.

        The logits and the pooled representation come from the same call (two graph outputs); the token
        counts from the same tokenisation.
        """
        texts = _as_text_list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        parts = []
        for start in range(0, len(texts), batch_size):
            encodings, shares = encode_clipped(self._tokenizer, texts[start : start + batch_size], self.max_length)
            if self.projection is None:
                (logits,) = self._session.run([self._output_name], self._arrays(encodings))
                embeddings = None
            else:
                logits, pooled = self._session.run([self._output_name, EMBEDDING_OUTPUT], self._arrays(encodings))
                embeddings = project_embeddings(pooled, self.projection)
            tokens, unknown = token_counts(encodings, self._unknown_id, shares)
            parts.append(Scores(softmax(logits.astype(np.float64)), embeddings, tokens, unknown))
        if not parts:
            empty = None if self.projection is None else np.empty((0, self.projection.shape[1]), np.float32)
            return Scores(np.empty((0, len(self.labels))), empty, np.empty(0, np.int64), np.empty(0))
        return Scores.concat(parts)

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


def load_training_texts(directory: Path) -> np.ndarray | None:
    """The sorted hashes of every text in the model's training manifest, or None without one."""
    from langops.text_hashes import MANIFEST_FILE, TextManifest

    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    hashes = TextManifest.load(path).hashes.values()
    return np.unique(np.concatenate([np.asarray(h, dtype=np.uint64) for h in hashes])) if hashes else None


def load_projection(directory: Path) -> np.ndarray | None:
    """The embedding projection stored with the model, or None for a model compressed before it existed.

    Raises:
        ValueError: the file is there but is not a 2-D float matrix.
    """
    path = Path(directory) / PROJECTION_FILE
    if not path.is_file():
        return None
    projection = np.load(path, allow_pickle=False)
    if projection.ndim != 2 or projection.dtype.kind != "f":
        raise ValueError(f"{path} holds a {projection.dtype} array of shape {projection.shape}, "
                         "expected a 2-D float matrix (hidden size, embedding dim)")
    return projection.astype(np.float32)


def token_counts(
    encodings: Sequence[Any], unknown_id: int | None, shares: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per text: tokens before truncation (special and padding tokens excluded) and the unknown token's share.

    Truncation keeps the rest of a long text in ``overflowing``, so counting it there costs no second
    tokenisation. A text tokenised from a prefix (``shares`` below 1, see ``encode_clipped``)
    has its count scaled up by length: an estimate, for texts far longer than the model reads.
    """
    tokens = np.zeros(len(encodings), dtype=np.int64)
    unknown = np.zeros(len(encodings), dtype=np.float64)
    for index, encoding in enumerate(encodings):
        n_tokens = n_unknown = 0
        for part in (encoding, *encoding.overflowing):
            for token_id, special in zip(part.ids, part.special_tokens_mask, strict=True):
                if not special:
                    n_tokens += 1
                    n_unknown += token_id == unknown_id
        tokens[index] = n_tokens if shares is None or shares[index] == 1.0 else round(n_tokens / shares[index])
        unknown[index] = n_unknown / n_tokens if n_tokens else 0.0
    return tokens, unknown


def encode_clipped(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[Any], list[float]]:
    """The tokenizer's encodings of ``texts`` (truncated at ``max_length``), and per text the share of it
    that was tokenised.

    Truncation keeps ``max_length`` tokens, but the tokenizer reads the whole text first: 200 texts of
    5,000 characters cost more to tokenise than to score. A text longer than ``max_length *
    CLIP_CHARS_PER_TOKEN`` characters is tokenised from that prefix when this gives the same encoding,
    which it does when the kept tokens end before the prefix's last run of spaces (``_settled_chars``);
    otherwise, as for a text with few spaces, from all of it.
    """
    limit = max_length * CLIP_CHARS_PER_TOKEN
    long = [index for index, text in enumerate(texts) if len(text) > limit]
    if not long:
        return tokenizer.encode_batch(texts), [1.0] * len(texts)
    inputs, shares = list(texts), [1.0] * len(texts)
    prefixes = tokenizer.encode_batch([texts[index][:limit] for index in long])
    for index, encoding in zip(long, prefixes, strict=True):
        settled = _settled_chars(texts[index][:limit], encoding)
        if settled:
            inputs[index] = texts[index][:settled]
            shares[index] = settled / len(texts[index])
    return tokenizer.encode_batch(inputs), shares


def _settled_chars(prefix: str, encoding: Any) -> int:
    """How many leading characters of any text starting with ``prefix`` give its encoding (0: none do).

    Truncation cut ``encoding`` (tokens overflowed) and every kept token ends before the prefix's last run
    of spaces, where the pre-tokenizer splits (WordPiece, byte-level BPE and SentencePiece alike): what
    follows cannot change them, and the text up to that run has the same encoding. Cut there, its count
    of tokens is exact for its words, so scaling it by length estimates the whole text's well.
    """
    if not encoding.overflowing:
        return 0
    boundary = prefix.rfind(" ")
    while boundary > 0 and prefix[boundary - 1] == " ":
        boundary -= 1
    kept_end = max((end for (_, end), special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True)
                    if not special), default=0)
    return boundary if 0 < kept_end <= boundary else 0


def _unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token (WordPiece's ``[UNK]``); None for a model without one."""
    unk_token = getattr(getattr(tokenizer, "model", None), "unk_token", None)
    return tokenizer.token_to_id(unk_token) if unk_token else None


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
