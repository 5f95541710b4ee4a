"""One 64-bit hash per text: where a text's split comes from, and how a model remembers what it trained on.

A text is hashed in its canonical form (unicode NFC, whitespace runs collapsed, case folded), so "Refund
please" and " refund  please" are the same text everywhere.

- **Stable splits.** ``split_by_hash`` puts a text in validation, test or train by a salted hash of the text
  alone, as TFX's ExampleGen does with hash buckets: a text's split never depends on which other rows exist,
  so appending rows, a new export of the same table, or more demo rows never move an existing text, and a
  relabelled text stays where it was. Every copy of a text lands in the same split.
- **Training manifests.** ``TextManifest`` keeps the sorted hashes of a model's train and validation texts,
  shipped in the model's folder, so a later step can ask "did this model see this text?" without the data
  it was trained on (the promotion gate removes such rows before comparing two models).

The hash is BLAKE2b cut to 64 bits: a million texts collide with probability about 3e-8.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_FILE = "training_texts.parquet"
MANIFEST_SPLITS = ("train", "validation")  # what a model learns from, or is selected and calibrated on
_UNIT = float(2**64)


def canonical_text(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, trimmed, case folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def text_hash(text: str, *, salt: str = "") -> int:
    """The text's 64-bit hash; a salt gives an independent hash of the same text."""
    data = (salt + "\0" + canonical_text(text)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def text_hashes(texts: Iterable[str], *, salt: str = "") -> np.ndarray:
    """``text_hash`` of each text, as a ``uint64`` array in the same order."""
    return np.fromiter((text_hash(t, salt=salt) for t in texts), dtype=np.uint64)


def split_position(text: str, seed: int) -> float:
    """Where a text falls in [0, 1) for ``split_by_hash``: uniform over texts, fixed for a text and seed."""
    return text_hash(text, salt=f"split:{seed}") / _UNIT


def split_by_hash(texts: Sequence[str], fractions: Mapping[str, float], *, seed: int) -> list[str]:
    """The split of each text: ``validation`` below its fraction, ``test`` in the top ``test`` fraction, else
    ``train``; only the splits named in ``fractions`` are dealt.

    Validation and test sit at opposite ends of [0, 1), so changing one's size moves texts only between
    that split and train. Label balance is that of a random split: each class's share of a split is
    binomial around ``fraction`` (validate warns about classes too thin for that to be reliable).
    """
    unknown = sorted(set(fractions) - {"validation", "test"})
    if unknown:
        raise ValueError(f"split_by_hash deals validation and test only, not {unknown}")
    validation, test = fractions.get("validation", 0.0), fractions.get("test", 0.0)
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(f"split fractions must be non-negative and leave room for train, got {dict(fractions)}")
    splits = []
    for text in texts:
        position = split_position(text, seed)
        splits.append("validation" if position < validation else "test" if position >= 1 - test else "train")
    return splits


@dataclass(frozen=True)
class TextManifest:
    """The hashed texts a model trained on (train) and was selected and calibrated on (validation)."""

    hashes: Mapping[str, np.ndarray]  # split -> sorted unique uint64

    @classmethod
    def from_texts(cls, texts_by_split: Mapping[str, Iterable[str]]) -> TextManifest:
        return cls({split: np.unique(text_hashes(texts)) for split, texts in texts_by_split.items()})

    @classmethod
    def load(cls, path: Path) -> TextManifest:
        """Raises FileNotFoundError with the path when the model has no manifest."""
        import pandas as pd

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training manifest at {path}")
        frame = pd.read_parquet(path)
        return cls({str(split): np.sort(group["hash"].to_numpy(dtype=np.uint64))
                    for split, group in frame.groupby("split", sort=False)})

    def save(self, path: Path) -> Path:
        import pandas as pd

        frame = pd.concat(
            [pd.DataFrame({"split": split, "hash": hashes.astype(np.uint64)}) for split, hashes in self.hashes.items()],
            ignore_index=True,
        )
        frame.to_parquet(path, index=False)
        return path

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(hashes) for split, hashes in self.hashes.items()}

    def seen(self, hashes: np.ndarray) -> dict[str, np.ndarray]:
        """For each split of the manifest, a boolean mask: which of ``hashes`` it holds."""
        return {split: np.isin(hashes, known, assume_unique=False) for split, known in self.hashes.items()}

    def seen_any(self, hashes: np.ndarray) -> np.ndarray:
        masks = list(self.seen(hashes).values())
        return np.logical_or.reduce(masks) if masks else np.zeros(len(hashes), dtype=bool)
