"""Safe keys for label names: the one mapping from a user's labels to names that other systems accept.

Labels are user data and are kept exactly as written wherever a person or a client reads them
(predictions, reports, ``labels.json``, ``id2label``, the confusion matrix). Some places have naming
rules of their own: MLflow metric names (alphanumerics and ``_ - . : / space``), DVC metric paths (``.``
separates levels), file names (no ``/``, case-insensitive on some disks). There a label is replaced by
its key:

- a label of at most 40 characters made only of ``A-Z a-z 0-9 _ -``, unique even when case is ignored,
  is its own key;
- any other label becomes a readable slug (accents folded, other characters ``_``, at most 40
  characters) plus ``-`` and the first 8 hex digits of the label's sha256, so ``reverted_card_payment?``
  is ``reverted_card_payment-1a2b3c4d`` and ``a?`` and ``a!`` get distinct keys.

The mapping is deterministic for a label set and is written beside the metrics (``label_keys`` in the
evaluation's ``details.json``, also logged to the MLflow run), so any key can be traced back to its label.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

MAX_SLUG_CHARS = 40
MAX_LABEL_CHARS = 200  # validate refuses longer labels: no report, plot axis or metric name can show them
PLAIN = re.compile(r"[A-Za-z0-9_-]+")
UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


def label_keys(labels: Sequence[str]) -> dict[str, str]:
    """Label -> safe key for every label; keys are unique, also when case is ignored.

    Raises:
        ValueError: two labels are equal (a label set has no repeats).
    """
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat: {sorted({label for label in labels if list(labels).count(label) > 1})}")
    folded: dict[str, int] = {}
    for label in labels:
        folded[label.casefold()] = folded.get(label.casefold(), 0) + 1
    keys = {
        label: label if _plain(label) and folded[label.casefold()] == 1 else _hashed_key(label)
        for label in labels
    }
    if len({key.casefold() for key in keys.values()}) != len(keys):  # a sha256 prefix clash: widen every hash
        keys = {label: key if key == label else _hashed_key(label, digits=16) for label, key in keys.items()}
    return keys


def _plain(label: str) -> bool:
    return len(label) <= MAX_SLUG_CHARS and PLAIN.fullmatch(label) is not None


def _hashed_key(label: str, *, digits: int = 8) -> str:
    ascii_form = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    slug = UNSAFE_RUN.sub("_", ascii_form).strip("_")[:MAX_SLUG_CHARS].rstrip("_") or "label"
    return f"{slug}-{hashlib.sha256(label.encode()).hexdigest()[:digits]}"
