"""Turn a labelled text file (or the demo generator) into normalised, stratified train/validation/test splits.

Prepare only reshapes data; it never judges it. Null or blank texts, unknown labels and tiny classes
are kept so the validate step can report every one of them with counts, instead of rows quietly
disappearing here.
"""

from __future__ import annotations

import logging
import shutil
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from langops.config import DataConfig, PrepareConfig
from langops.demo_data import DEMO_LABELS, generate_demo_dataset
from langops.io import LABEL, SPLITS, TEXT, split_path, write_json, write_labels
from langops.lineage import dvc_dir_md5, file_md5

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class PrepareError(ValueError):
    """The source cannot be read as a labelled text table: missing file, unknown format or missing column."""


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    rows: dict[str, int]
    labels: tuple[str, ...]
    data_version: str


def prepare(data: DataConfig, cfg: PrepareConfig, *, seed: int, out_dir: Path) -> PrepareResult:
    """Read, normalise and split the dataset, then replace ``out_dir`` with the new splits in one swap.

    Args:
        data: where the data is and which columns and labels it has.
        cfg: split sizes and normalisation switches.
        seed: drives the demo generator and the split, so the same inputs give byte-identical outputs.
        out_dir: receives ``{train,validation,test}.parquet``, ``labels.json`` and ``summary.json``.

    Returns:
        Row counts per split, the label set and ``data_version`` (DVC's md5 of ``out_dir``).

    Raises:
        PrepareError: the source file is missing, of an unsupported format, or lacks a named column.
    """
    if data.is_demo:
        frame = generate_demo_dataset(data.labels or DEMO_LABELS, data.demo_rows, seed)
        source: dict[str, Any] = {"source": "demo", "demo_rows": data.demo_rows}
    else:
        path = Path(data.source)
        frame = read_source(path, text_column=data.text_column, label_column=data.label_column)
        source = {"source": path.name, "source_md5": file_md5(path)}
    frame = normalise_frame(frame, lowercase=cfg.lowercase)
    duplicates = 0
    if cfg.deduplicate:
        frame, duplicates = drop_duplicate_texts(frame)
    splits = split_frame(frame, validation_size=cfg.validation_size, test_size=cfg.test_size, seed=seed)
    labels = tuple(data.labels) if data.labels is not None else tuple(sorted(frame[LABEL].dropna().unique()))
    summary = {
        **source,
        "seed": seed,
        "lowercase": cfg.lowercase,
        "duplicates_dropped": duplicates,
        "rows": {name: len(split) for name, split in splits.items()},
        "class_counts": {name: count_labels(split) for name, split in splits.items()},
    }
    write_outputs(Path(out_dir), splits, labels, summary)
    return PrepareResult(
        out_dir=Path(out_dir),
        rows=summary["rows"],
        labels=labels,
        data_version=dvc_dir_md5(Path(out_dir)),
    )


def read_source(path: Path, *, text_column: str, label_column: str) -> pd.DataFrame:
    """Load a CSV, TSV, JSON-lines or Parquet file and return its two named columns as ``text``, ``label``.

    CSV/TSV cells are read as strings and only empty cells become null, so a ticket reading "NA" or
    "None" stays text.
    """
    if not path.is_file():
        raise PrepareError(f"data source not found: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PrepareError(
            f"unsupported data format {path.suffix!r} for {path}; expected one of {sorted(FORMATS)}"
        )
    if kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    elif kind == "jsonl":
        raw = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    else:
        raw = pd.read_parquet(path)
    present = [str(c) for c in raw.columns]
    for role, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in raw.columns:
            raise PrepareError(f"column {column!r} ({role}) not found in {path}; columns present: {present}")
    return pd.DataFrame({TEXT: raw[text_column], LABEL: raw[label_column]})


def normalise_text(text: str, *, lowercase: bool = False) -> str:
    """NFC, whitespace runs collapsed to one space, trimmed: the same ticket always compares equal."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text.lower() if lowercase else text


def normalise_frame(frame: pd.DataFrame, *, lowercase: bool) -> pd.DataFrame:
    """Normalise texts and make labels stripped strings; nulls stay null for validate to count."""
    texts = frame[TEXT].map(lambda v: normalise_text(str(v), lowercase=lowercase), na_action="ignore")
    labels = frame[LABEL].map(lambda v: str(v).strip(), na_action="ignore")
    normalised = pd.DataFrame({TEXT: texts, LABEL: labels}, dtype=object)
    return normalised.where(normalised.notna(), None).reset_index(drop=True)


def drop_duplicate_texts(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of each exact text; null texts are never merged, validate must see them all."""
    repeated = frame[TEXT].notna() & frame[TEXT].duplicated(keep="first")
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def split_frame(
    frame: pd.DataFrame, *, validation_size: float, test_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Stratified train/validation/test split; a random one (with a warning) when a class is too small.

    The fallback keeps the run going so validate can name the tiny class, rather than sklearn's error.
    """
    try:
        return _split(frame, validation_size=validation_size, test_size=test_size, seed=seed, stratify=True)
    except ValueError as exc:
        log.warning(
            "stratified split impossible (%s); using a random split, validate will flag small classes", exc
        )
    return _split(frame, validation_size=validation_size, test_size=test_size, seed=seed, stratify=False)


def _split(
    frame: pd.DataFrame, *, validation_size: float, test_size: float, seed: int, stratify: bool
) -> dict[str, pd.DataFrame]:
    def strata(part: pd.DataFrame) -> pd.Series | None:
        return part[LABEL].fillna("\0null") if stratify else None

    rest, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=strata(frame))
    train, validation = train_test_split(
        rest, test_size=validation_size / (1 - test_size), random_state=seed, stratify=strata(rest)
    )
    parts = {"train": train, "validation": validation, "test": test}
    return {name: parts[name].reset_index(drop=True) for name in SPLITS}


def count_labels(frame: pd.DataFrame) -> dict[str, int]:
    return {str(label): int(n) for label, n in frame[LABEL].value_counts().sort_index().items()}


def write_outputs(
    out_dir: Path, splits: dict[str, pd.DataFrame], labels: tuple[str, ...], summary: dict[str, Any]
) -> None:
    """Write everything into a sibling temp folder, then swap it in: readers never see old and new mixed."""
    token = uuid.uuid4().hex[:12]
    staging = out_dir.with_name(f".{out_dir.name}.new-{token}")
    staging.mkdir(parents=True)
    try:
        for name, split in splits.items():
            split[[TEXT, LABEL]].to_parquet(split_path(staging, name), index=False)
        write_labels(staging, list(labels))
        write_json(staging / SUMMARY_FILE, summary)
        replace_dir(staging, out_dir, backup=out_dir.with_name(f".{out_dir.name}.old-{token}"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path, *, backup: Path) -> None:
    """Swap ``new`` into ``target`` by renames; the old folder is parked at ``backup`` and deleted last."""
    if not target.exists():
        new.rename(target)
        return
    target.rename(backup)
    try:
        new.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup)
