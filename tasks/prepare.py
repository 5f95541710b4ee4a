"""Turn a labelled text file, the user's own split files, or the demo generator into train/validation/test.

Prepare reshapes data and never judges it: null or blank texts, unknown labels and tiny classes are kept
so the validate step can report every one of them with counts, instead of rows quietly disappearing.
What it does change is recorded in ``summary.json`` and shown in validate's report:

- every copy of a normalised text lands in one split (a grouped, stratified split), so the split itself
  can never put a training text into validation or test;
- a text seen with different labels is settled by ``prepare.label_conflicts``;
- ``prepare.deduplicate`` keeps one copy of each text; otherwise every copy is kept, in one split;
- texts shared by splits the *user* gave are a real finding: ``prepare.split_overlap`` keeps them for
  validate to stop the run, or drops them from the earlier split. A given test split is never changed.

Each prepared row keeps ``source_row`` ("train.csv:57", the line the record starts on), so a report can
point at the user's own file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from langops.config import SPLIT_ALIASES, DataConfig, PrepareConfig
from langops.demo_data import DEMO_LABELS, generate_demo_dataset
from langops.faults import crash_point
from langops.io import (
    LABEL,
    LABELS_FILE,
    SPLITS,
    TEXT,
    read_json,
    read_labels,
    split_path,
    staging_dir,
    swap_in,
    write_json,
    write_labels,
)
from langops.lineage import dvc_dir_md5, file_md5
from langops.text_checks import is_blank
from langops.text_hashes import split_by_hash, text_hashes

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
SPLIT_CHANGES_FILE = "split_changes.json"  # in the report folder: what the last new data version moved
SOURCE_ROW = "source_row"  # "<file>:<line>" of the record each prepared row came from
SPLIT = "split"
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MAX_EXAMPLES = 5
MAX_EXAMPLE_CHARS = 80
HEAD_BYTES = 256 * 1024  # what check_source reads of each file


class PrepareError(ValueError):
    """The source cannot be read as a labelled text table; the message names the file, line and problem."""


class SourceEncodingError(PrepareError):
    """A text file is not in ``data.encoding``; ``reads_as_cp1252`` says whether Windows-1252 would fit."""

    def __init__(self, message: str, *, reads_as_cp1252: bool) -> None:
        super().__init__(message)
        self.reads_as_cp1252 = reads_as_cp1252


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    rows: dict[str, int]
    labels: tuple[str, ...]
    data_version: str
    notes: tuple[str, ...] = ()

    @classmethod
    def load(cls, out_dir: Path, report_dir: Path | None = None) -> PrepareResult:
        """The result as the step left it in ``out_dir`` and ``report_dir`` (for a later stage run on its own).

        A prepared folder made by other means than this step (the splits and the labels, no summary) loads
        too, with its row counts read from the splits and nothing to say about what prepare did.

        Raises:
            FileNotFoundError: ``out_dir`` holds no prepared dataset.
        """
        out_dir = Path(out_dir)
        if not (out_dir / LABELS_FILE).is_file():
            raise FileNotFoundError(f"{out_dir / LABELS_FILE} not found: run the prepare step first")
        if (out_dir / SUMMARY_FILE).is_file():
            summary = read_json(out_dir / SUMMARY_FILE)
            rows, notes = summary["rows"], tuple(describe_changes(summary))
        else:
            rows = {name: len(pd.read_parquet(split_path(out_dir, name))) for name in SPLITS
                    if split_path(out_dir, name).is_file()}
            notes = ()
        data_version = dvc_dir_md5(out_dir)
        changes_file = Path(report_dir) / SPLIT_CHANGES_FILE if report_dir is not None else None
        if changes_file is not None and changes_file.is_file():
            changes = read_json(changes_file)
            if changes.get("data_version") == data_version:  # else it describes another version
                notes = (*notes, describe_split_changes(changes))
        return cls(out_dir=out_dir, rows=rows, labels=tuple(read_labels(out_dir)), data_version=data_version, notes=notes)


def prepare(
    data: DataConfig, cfg: PrepareConfig, *, seed: int, out_dir: Path, report_dir: Path | None = None
) -> PrepareResult:
    """Read, normalise, settle repeats and conflicts, and split; then replace ``out_dir`` in one swap.

    Args:
        data: where the data is (one file, split files, a folder, or the demo) and its columns and labels.
        cfg: split sizes and seed, normalisation and the policies for repeats, label conflicts and overlap.
        seed: drives the demo generator, so the same inputs give byte-identical outputs.
        out_dir: receives ``{train,validation,test}.parquet``, ``labels.json`` and ``summary.json``.
        report_dir: receives ``split_changes.json``: how many texts kept, joined, left or changed their split
            since the data version ``out_dir`` held before (kept out of ``out_dir``, so the data version
            depends on the data alone).

    Returns:
        Row counts per split, the label set, ``data_version`` (DVC's md5 of ``out_dir``) and one line per
        thing prepare changed.

    Raises:
        PrepareError: a source file is missing, unreadable (encoding, binary, malformed line), of an
            unsupported format, empty, or lacks a named column.
    """
    files = source_files(data)
    if data.is_demo:
        demo = generate_demo_dataset(data.labels or DEMO_LABELS, data.demo_rows, seed)
        given = {"all": demo.assign(**{SOURCE_ROW: [f"demo:{i + 1}" for i in range(len(demo))]})}
        origin: dict[str, Any] = {"source": "demo", "demo_rows": data.demo_rows}
    else:
        given = read_given_splits(data, files)
        origin = _origin(files)
    extra, extra_found = read_extra_sources(data)
    if extra_found:
        origin["extra_sources"] = extra_found
    given = {name: normalise_frame(frame, lowercase=cfg.lowercase) for name, frame in given.items()}
    if extra is not None:
        given = add_extra_rows(given, normalise_frame(extra, lowercase=cfg.lowercase), cfg)
    label_whitespace = _merge_counts(frame.attrs.get("label_whitespace", {}) for frame in given.values())

    conflicts: dict[str, Any] = {"policy": cfg.label_conflicts, "texts": 0, "rows_dropped": 0, "examples": []}
    duplicates_dropped = 0
    for name in [n for n in given if n != "test"]:  # a test split the user gave stays exactly as given
        given[name], found = settle_label_conflicts(given[name], cfg.label_conflicts)
        conflicts = _add_conflicts(conflicts, found)
        if cfg.deduplicate:
            given[name], dropped = drop_duplicate_texts(given[name])
            duplicates_dropped += dropped
    overlap = split_overlap(given, drop=cfg.split_overlap == "drop")
    splits, carved = carve_missing_splits(given, cfg)

    labels = tuple(data.labels) if data.labels is not None else infer_labels(splits.values())
    summary = {
        **origin,
        "splits_given": sorted((set(given) - {"all"}), key=SPLITS.index),
        "carved": carved,
        "split": {"method": "text_hash", "seed": cfg.split_seed, "validation_size": cfg.validation_size,
                  "test_size": cfg.test_size},
        **({"seed": seed} if data.is_demo else {}),
        "lowercase": cfg.lowercase,
        "duplicates_dropped": duplicates_dropped,
        "repeated_texts": repeated_text_counts(splits),
        "label_conflicts": conflicts,
        "split_overlap": {"policy": cfg.split_overlap, **overlap},
        "label_whitespace": label_whitespace,
        "rows": {name: len(split) for name, split in splits.items()},
        "class_counts": {name: count_labels(split) for name, split in splits.items()},
    }
    out_dir = Path(out_dir)
    previous = PreparedTexts.read(out_dir)
    write_outputs(out_dir, splits, labels, summary)
    data_version = dvc_dir_md5(out_dir)
    changes = None
    if report_dir is not None:
        changes = record_split_changes(previous, PreparedTexts.read(out_dir), Path(report_dir) / SPLIT_CHANGES_FILE)
    return PrepareResult(
        out_dir=out_dir,
        rows=summary["rows"],
        labels=labels,
        data_version=data_version,
        notes=(*describe_changes(summary), *([describe_split_changes(changes)] if changes else [])),
    )


# --------------------------------------------------------------------------------------------- sources


def source_files(data: DataConfig) -> dict[str, Path]:
    """The files behind ``data.source``: ``{"all": file}`` for one file to split, else split -> file.

    Empty for the demo. A folder is searched (not recursively) for ``train.*``, ``validation.*`` (or
    ``val``/``valid``/``dev``) and ``test.*`` in a supported format.

    Raises:
        PrepareError: a file or folder is missing, or a folder's split files are absent or ambiguous.
    """
    if data.is_demo:
        return {}
    if isinstance(data.source, dict):
        files = {split: Path(path) for split, path in data.source.items()}
    else:
        path = Path(data.source)
        files = _split_files_in(path) if path.is_dir() else {"all": path}
    for path in files.values():
        if not path.exists():
            raise PrepareError(f"data source not found: {path} (data.source)")
        if path.is_dir():
            raise PrepareError(f"data source {path} is a folder; name a file for each split (data.source)")
        format_of(path)
    return files


def read_extra_sources(data: DataConfig) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The rows of ``data.extra_sources`` as one frame (None: none there), and what was read for the summary:
    each file's md5 and rows, or ``"missing"`` for a file not written yet (no feedback exported so far)."""
    frames, found = [], {}
    for name in data.extra_sources:
        path = Path(name)
        if not path.exists():
            found[path.name] = "missing"
            continue
        frame = read_source(path, text_column=data.text_column, label_column=data.label_column, encoding=data.encoding)
        frames.append(frame)
        found[path.name] = {"md5": file_md5(path), "rows": len(frame)}
    return (pd.concat(frames, ignore_index=True) if frames else None), found


def add_extra_rows(given: dict[str, pd.DataFrame], extra: pd.DataFrame, cfg: PrepareConfig) -> dict[str, pd.DataFrame]:
    """Add the extra sources' rows to the splits without a leak: a text the given splits already hold joins
    that split; the rest are split like one file (``prepare.validation_size``/``test_size``). One file to
    split just grows; a split that will be carved from train gets its share through train."""
    if "all" in given:
        return {"all": pd.concat([given["all"], extra], ignore_index=True)}
    grown = dict(given)
    home = {text: name for name in reversed(list(given)) for text in given[name][TEXT][has_text(given[name])]}
    placed = extra[TEXT].map(home)
    for name in given:
        grown[name] = pd.concat([grown[name], extra[placed == name]], ignore_index=True)
    parts = split_by_text(extra[placed.isna()].reset_index(drop=True),
                          {"validation": cfg.validation_size, "test": cfg.test_size}, seed=cfg.split_seed)
    for name, part in parts.items():
        target = name if name in grown else "train"
        grown[target] = pd.concat([grown[target], part], ignore_index=True)
    return grown


def _split_files_in(folder: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_ALIASES.get(path.stem.lower())
        if path.is_file() and split is not None and path.suffix.lower() in FORMATS:
            found.setdefault(split, []).append(path)
    ambiguous = {split: [p.name for p in paths] for split, paths in found.items() if len(paths) > 1}
    if ambiguous:
        raise PrepareError(f"{folder} holds more than one file for a split: {ambiguous}; keep one per split")
    if "train" not in found:
        names = sorted(p.name for p in folder.iterdir())[:20]
        raise PrepareError(
            f"{folder} has no train file: a data folder needs train.<csv|tsv|jsonl|json|parquet>, and may hold "
            f"validation (or val/dev) and test files; it holds {names}"
        )
    return {split: paths[0] for split, paths in sorted(found.items(), key=lambda kv: SPLITS.index(kv[0]))}


def format_of(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PrepareError(f"unsupported data format {path.suffix!r} for {path}; expected one of {sorted(FORMATS)}")
    return kind


def read_given_splits(data: DataConfig, files: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """Each file as a ``text``/``label``/``source_row`` frame; a ``split_column`` file becomes its splits."""
    frames = {
        name: read_source(path, text_column=data.text_column, label_column=data.label_column,
                          encoding=data.encoding, split_column=data.split_column)
        for name, path in files.items()
    }
    if data.split_column is None:
        return frames
    (whole,) = frames.values()
    return {split: part.drop(columns=SPLIT).reset_index(drop=True)
            for split, part in whole.groupby(SPLIT, sort=False)}


def _origin(files: dict[str, Path]) -> dict[str, Any]:
    if set(files) == {"all"}:
        return {"source": files["all"].name, "source_md5": file_md5(files["all"])}
    return {"source": {k: p.name for k, p in files.items()}, "source_md5": {k: file_md5(p) for k, p in files.items()}}


# --------------------------------------------------------------------------------------------- reading


def read_source(
    path: Path, *, text_column: str, label_column: str, encoding: str = "utf-8", split_column: str | None = None
) -> pd.DataFrame:
    """Load a CSV, TSV, JSON-lines, JSON or Parquet file as ``text``, ``label`` and ``source_row`` columns.

    Text files are decoded strictly (a UTF-8 byte-order mark is dropped); only empty cells become null, so
    a ticket reading "NA" or "None" stays text. TSV is read literally (tabs separate, quotes are text).
    Labels become strings: ``1``, ``1.0`` and a categorical ``"1"`` are all the label ``"1"``.

    Raises:
        PrepareError: naming the file and, where there is one, the line and the problem.
    """
    path = Path(path)
    wanted = {"data.text_column": text_column, "data.label_column": label_column}
    if split_column is not None:
        wanted["data.split_column"] = split_column
    records, columns = read_records(path, encoding)
    for role, column in wanted.items():
        if column not in columns:
            raise PrepareError(f"column {column!r} ({role}) not found in {path}; columns present: {columns}")
    rows = [(line, rec.get(text_column), rec.get(label_column), rec.get(split_column)) for line, rec in records]
    if not rows:
        raise PrepareError(f"{path} has a header but no data rows")
    frame = pd.DataFrame(
        {
            TEXT: pd.Series([_text_value(r[1]) for r in rows], dtype=object),
            LABEL: pd.Series([label_string(r[2]) for r in rows], dtype=object),
            SOURCE_ROW: [f"{path.name}:{r[0]}" for r in rows],
        }
    )
    if split_column is not None:
        frame[SPLIT] = _split_names(path, split_column, [(r[0], r[3]) for r in rows])
    if format_of(path) == "tsv":
        _note_quoted_tsv(path, frame)
    return frame


def read_records(path: Path, encoding: str = "utf-8") -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """Every record of a data file as (line it starts on, {column: value}), and the columns in file order.

    Raises:
        PrepareError: the file is missing, of an unknown format, undecodable, binary, empty or malformed.
    """
    if not path.is_file():
        raise PrepareError(f"data source not found: {path} (data.source)")
    kind = format_of(path)
    if kind == "parquet":
        records, columns = _parquet_records(path)
    else:
        text = decode_text(path, encoding)
        if not text.strip():
            raise PrepareError(f"{path} is empty: no header and no rows")
        if kind in ("csv", "tsv"):
            records, columns = _delimited_records(path, text, delimiter="," if kind == "csv" else "\t")
        else:
            records, columns = _json_records(path, text)
    return list(records), columns


def check_source(data: DataConfig) -> None:
    """Refuse, in well under a second, a dataset that cannot work, before any server or step starts.

    Looks only at each file's start: missing or unknown files, binary or undecodable bytes there, an
    empty or header-only file, and the named columns. The full read in ``prepare`` still checks every line.

    Raises:
        PrepareError: naming the file and the problem.
    """
    wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
    if data.split_column is not None:
        wanted["data.split_column"] = data.split_column
    extra = [Path(name) for name in data.extra_sources if Path(name).exists()]
    for path in [*source_files(data).values(), *extra]:
        columns, has_rows = _peek(path, data.encoding)
        if not has_rows:
            raise PrepareError(f"{path} has a header but no data rows")
        for role, column in wanted.items():
            if column not in columns:
                raise PrepareError(f"column {column!r} ({role}) not found in {path}; columns present: {columns}")


def _peek(path: Path, encoding: str) -> tuple[list[str], bool]:
    """The columns of a file and whether it has a row, from its first ``HEAD_BYTES`` (Parquet: its footer)."""
    kind = format_of(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(path)
        except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
            raise PrepareError(f"{path} cannot be read as Parquet: {exc}") from None
        return [str(name) for name in metadata.schema.to_arrow_schema().names], metadata.num_rows > 0
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
        more = bool(fh.read(1))
    text = decode_text(path, encoding, raw=head, complete=not more)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise PrepareError(f"{path} is empty: no header and no rows")
    if kind == "csv" or kind == "tsv":
        try:
            header = next(csv.reader([lines[0]], delimiter="," if kind == "csv" else "\t"))
        except csv.Error as exc:
            raise _csv_error(path, 1, exc) from None
        return [name.strip() for name in header], len(lines) > 1 or more
    _, columns = _json_records(path, "\n".join(lines[: max(1, len(lines) - (1 if more else 0))]))
    return columns, True


def decode_text(path: Path, encoding: str, *, raw: bytes | None = None, complete: bool = True) -> str:
    """The file (or its first bytes ``raw``) as text, or an error that says where it stops being
    ``encoding`` and what to do. With ``complete=False`` a character cut at the end of ``raw`` is dropped."""
    if raw is None:
        raw = path.read_bytes()
    if not complete:
        decoder = codecs.getincrementaldecoder("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)()
        try:
            return decoder.decode(raw, final=False)
        except UnicodeDecodeError:
            pass  # reported below, with the offset
    if b"\x00" in raw[:65536] and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        offset = raw.index(b"\x00")
        line = raw.count(b"\n", 0, offset) + 1
        raise PrepareError(f"{path} looks binary, not a text table: NUL byte at offset {offset} (line {line})")
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.start + 4]
        try:
            guess = raw[exc.start : exc.end].decode("cp1252")
            raw.decode("cp1252")
        except UnicodeDecodeError:
            reads_as_cp1252 = False
            hint = "; re-save it as UTF-8, or set data.encoding to the encoding it was written in"
        else:
            reads_as_cp1252 = True
            hint = (f"; it reads as cp1252 (Windows-1252/Latin-1), where byte 0x{bad[0]:02x} is {guess!r}: "
                    "set data.encoding: cp1252 if that is how it was saved, or re-save the file as UTF-8")
        raise SourceEncodingError(
            f"{path} is not valid {encoding}: byte offset {exc.start} (line {line}, column {column}) holds "
            f"{bad!r}, {exc.reason}{hint}",
            reads_as_cp1252=reads_as_cp1252,
        ) from None


def _csv_error(path: Path, line: int, exc: csv.Error) -> PrepareError:
    """The csv module's error with the file and line, and what a field over its size limit usually means."""
    hint = (" (one field runs past the CSV reader's limit: a quote that is never closed, a file without line "
            "breaks, or a text far longer than any to classify)") if "field limit" in str(exc) else ""
    return PrepareError(f"{path} line {line}: {exc}{hint}")


def _delimited_records(path: Path, text: str, *, delimiter: str) -> tuple[Iterator[tuple[int, dict]], list[str]]:
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    )
    try:
        header = next(reader)
    except csv.Error as exc:
        raise _csv_error(path, 1, exc) from None
    columns = [name.strip() for name in header]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise PrepareError(f"{path} header names columns {duplicated} more than once")

    def records() -> Iterator[tuple[int, dict]]:
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _csv_error(path, line, exc) from None
            if fields and len(fields) != len(columns):
                if not any(f.strip() for f in fields):
                    line = reader.line_num + 1
                    continue
                sep = "tab" if delimiter == "\t" else "comma"
                raise PrepareError(
                    f"{path} line {line}: {len(fields)} fields where the header has {len(columns)} "
                    f"(a {sep} inside a text? quote that field"
                    + (", or save the file as CSV" if delimiter == "\t" else "") + ")"
                )
            if fields:
                yield line, {c: (v if v != "" else None) for c, v in zip(columns, fields)}
            line = reader.line_num + 1

    return records(), columns


def _json_records(path: Path, text: str) -> tuple[Iterator[tuple[int, dict]], list[str]]:
    """JSON lines (one object per line, extra fields ignored), or one JSON array of objects."""
    items: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        items = [(i + 1, item) for i, item in enumerate(array)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PrepareError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    columns: dict[str, None] = {}
    for number, item in items:
        if not isinstance(item, dict):
            raise PrepareError(f"{path} line {number}: expected a JSON object with named fields, got {type(item).__name__}")
        columns.update(dict.fromkeys(item))
    return iter(items), list(columns)


def _parquet_records(path: Path) -> tuple[Iterator[tuple[int, dict]], list[str]]:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise PrepareError(f"{path} cannot be read as Parquet: {exc}") from None
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    frame = frame.astype(object).where(frame.notna(), None)
    return ((i + 1, record) for i, record in enumerate(frame.to_dict("records"))), columns


def _text_value(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def label_string(value: Any) -> str | None:
    """One spelling per label: ``1``, ``1.0``, ``np.int64(1)`` and ``"1"`` all become ``"1"``; null stays null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _split_names(path: Path, column: str, values: list[tuple[int, Any]]) -> list[str]:
    names, bad = [], []
    for line, value in values:
        split = SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
        names.append(split)
        if split is None:
            bad.append((line, value))
    if bad:
        shown = ", ".join(f"line {line}: {value!r}" for line, value in bad[:MAX_EXAMPLES])
        raise PrepareError(
            f"{path}: {len(bad)} rows have no known split in column {column!r} (data.split_column); "
            f"use train, validation (or val/dev) or test: {shown}"
        )
    if "train" not in names:
        raise PrepareError(f"{path}: no row has split 'train' in column {column!r} (data.split_column)")
    return names


def _note_quoted_tsv(path: Path, frame: pd.DataFrame) -> None:
    quoted = frame[TEXT].map(lambda t: isinstance(t, str) and len(t) > 1 and t[0] == t[-1] == '"', na_action="ignore")
    count = int(quoted.fillna(False).astype(bool).sum())
    if count:
        log.warning(
            "%s: %d texts start and end with a double quote; TSV is read literally, so the quotes are part of "
            "the text. If the file was written with CSV-style quoting, save it as CSV instead.", path, count
        )


# ------------------------------------------------------------------------------------------- cleaning


def normalise_text(text: str, *, lowercase: bool = False) -> str:
    """NFC, whitespace runs collapsed to one space, trimmed: the same ticket always compares equal."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text.lower() if lowercase else text


def normalise_frame(frame: pd.DataFrame, *, lowercase: bool) -> pd.DataFrame:
    """Normalise texts and strip labels; nulls stay null for validate to count.

    Labels are only stripped of surrounding whitespace (``" billing"`` is ``"billing"``), and every label so
    changed is counted in ``attrs["label_whitespace"]`` for the report; case is never changed.
    """
    texts = frame[TEXT].map(lambda v: normalise_text(str(v), lowercase=lowercase), na_action="ignore")
    raw_labels = frame[LABEL]
    labels = raw_labels.map(lambda v: str(v).strip(), na_action="ignore")
    changed = raw_labels.notna() & (raw_labels != labels)
    columns = {TEXT: texts, LABEL: labels}
    if SOURCE_ROW in frame.columns:
        columns[SOURCE_ROW] = frame[SOURCE_ROW]
    normalised = pd.DataFrame(columns, dtype=object)
    normalised = normalised.where(normalised.notna(), None).reset_index(drop=True)
    normalised.attrs["label_whitespace"] = {
        repr(raw): int(n) for raw, n in raw_labels[changed].value_counts().sort_index().items()
    }
    return normalised


def settle_label_conflicts(frame: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Texts that occur with more than one label, and what ``policy`` did with them.

    ``majority`` keeps the rows of a text's most frequent label (a tie drops the text), ``drop`` drops
    every copy, ``fail`` keeps them all for validate's ``label_conflicts`` check to stop the run.
    """
    labelled = frame[has_text(frame) & frame[LABEL].notna()]
    counts = labelled.groupby([TEXT, LABEL]).size()
    per_text = counts.groupby(level=0).size()
    conflicting = per_text.index[per_text > 1]
    report: dict[str, Any] = {"texts": len(conflicting), "rows_dropped": 0, "examples": []}
    if not len(conflicting):
        return frame, report
    drop = pd.Series(False, index=frame.index)
    in_conflict = frame[TEXT].isin(conflicting)
    if policy == "drop":
        drop = in_conflict
    elif policy == "majority":
        keep_label: dict[str, str | None] = {}
        for text in conflicting:
            by_label = counts.loc[text].sort_values(ascending=False)
            tie = len(by_label) > 1 and by_label.iloc[0] == by_label.iloc[1]
            keep_label[text] = None if tie else str(by_label.index[0])
        kept = frame[TEXT].map(keep_label)
        drop = in_conflict & (kept.isna() | (frame[LABEL] != kept))
    report["rows_dropped"] = int(drop.sum())
    report["examples"] = [
        {"text": _shorten(text), "labels": {str(k): int(v) for k, v in counts.loc[text].items()}}
        for text in sorted(conflicting, key=lambda t: (-int(counts.loc[t].sum()), t))[:MAX_EXAMPLES]
    ]
    return frame[~drop].reset_index(drop=True), report


def has_text(frame: pd.DataFrame) -> pd.Series:
    """Rows with a real text: null and blank ones (``langops.text_checks.is_blank``: nothing visible) are never
    grouped, merged or settled, so validate sees every one of them."""
    return frame[TEXT].map(lambda text: isinstance(text, str) and not is_blank(text)).astype(bool)


def drop_duplicate_texts(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of each exact text; null or blank texts are never merged, validate must see them all."""
    repeated = has_text(frame) & frame[TEXT].duplicated(keep="first")
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def split_overlap(given: dict[str, pd.DataFrame], *, drop: bool) -> dict[str, Any]:
    """Rows of a later user-given split whose text is also in an earlier one; with ``drop``, drop them from
    the earlier split (train, then validation) in place. A given test split is never changed."""
    named = [name for name in SPLITS if name in given]
    overlap: dict[str, int] = {}
    dropped: dict[str, int] = {}
    examples: list[str] = []
    for later_index, later in enumerate(named):
        later_texts = set(given[later][TEXT][has_text(given[later])])
        for earlier in named[:later_index]:
            shared = given[earlier][TEXT].isin(later_texts)
            earlier_texts = set(given[earlier][TEXT][has_text(given[earlier])])
            rows_in_later = int(given[later][TEXT].isin(earlier_texts).sum())
            if not rows_in_later:
                continue
            overlap[f"{later}-{earlier}"] = rows_in_later
            examples += [_shorten(t) for t in given[earlier][TEXT][shared].head(MAX_EXAMPLES - len(examples))]
            if drop:
                dropped[earlier] = dropped.get(earlier, 0) + int(shared.sum())
                given[earlier] = given[earlier][~shared].reset_index(drop=True)
    return {"rows": overlap, "rows_dropped": dropped, "examples": examples[:MAX_EXAMPLES]}


# ------------------------------------------------------------------------------------------ splitting


def carve_missing_splits(
    given: dict[str, pd.DataFrame], cfg: PrepareConfig
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The three splits: the user's where given, the rest carved from train (or from the one file)."""
    if "all" in given:
        parts = split_by_text(given["all"], {"validation": cfg.validation_size, "test": cfg.test_size}, seed=cfg.split_seed)
        return parts, {"validation": "source", "test": "source"}
    missing = {name: getattr(cfg, f"{name}_size") for name in ("validation", "test") if name not in given}
    splits = dict(given)
    carved: dict[str, str] = {}
    if missing:
        parts = split_by_text(given["train"], missing, seed=cfg.split_seed)
        splits.update(parts)
        carved = dict.fromkeys(missing, "train")
    return {name: splits[name].reset_index(drop=True) for name in SPLITS}, carved


def split_by_text(frame: pd.DataFrame, fractions: dict[str, float], *, seed: int) -> dict[str, pd.DataFrame]:
    """Split ``frame`` into train and the splits in ``fractions`` by a hash of each text (``split_by_hash``).

    A row's split depends on its text and ``seed`` only, never on the other rows: a grown dataset keeps
    every old text where it was, every copy of a text lands in one split, and a relabelled text does not
    move. Null and blank texts stay in train, where validate reports them. Rows keep their source order.
    """
    texted = has_text(frame)
    split_of = pd.Series("train", index=frame.index, dtype=object)
    split_of[texted] = split_by_hash(frame.loc[texted, TEXT].tolist(), fractions, seed=seed)
    return {name: frame[split_of == name].reset_index(drop=True) for name in ["train", *fractions]}


# ----------------------------------------------------------------------------------------- reporting


def infer_labels(frames: Iterable[pd.DataFrame]) -> tuple[str, ...]:
    seen: set[str] = set()
    for frame in frames:
        seen.update(str(label) for label in frame[LABEL].dropna())
    return tuple(sorted(seen))


def count_labels(frame: pd.DataFrame) -> dict[str, int]:
    return {str(label): int(n) for label, n in frame[LABEL].value_counts().sort_index().items()}


def repeated_text_counts(splits: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Per split: texts that occur more than once, and the surplus rows they add."""
    counts = {}
    for name, frame in splits.items():
        sizes = frame[TEXT][has_text(frame)].value_counts()
        repeated = sizes[sizes > 1]
        counts[name] = {"texts": len(repeated), "surplus_rows": int((repeated - 1).sum())}
    return counts


def describe_changes(summary: dict[str, Any]) -> Iterator[str]:
    """One line per thing prepare did to the user's rows (also shown at the top of validate's report)."""
    given = summary["splits_given"]
    if given:
        carved = ", ".join(f"{name} carved from train" for name in summary["carved"]) or "nothing carved"
        yield f"splits given: {', '.join(given)}; {carved}"
    if summary["duplicates_dropped"]:
        yield f"prepare.deduplicate: dropped {summary['duplicates_dropped']} repeated rows (one copy of each text kept)"
    repeated = sum(c["surplus_rows"] for c in summary["repeated_texts"].values())
    if repeated:
        yield (f"{repeated} rows repeat another text of their split; every copy of a text is in one split, "
               "so repeats never leak between splits")
    conflicts = summary["label_conflicts"]
    if conflicts["texts"]:
        action = {"majority": "kept each text's majority label (a tie drops the text)",
                  "drop": "dropped every copy", "fail": "kept them for validate to report"}[conflicts["policy"]]
        yield (f"{conflicts['texts']} texts occur with different labels; prepare.label_conflicts: "
               f"{conflicts['policy']} {action}, dropping {conflicts['rows_dropped']} rows")
    overlap = summary["split_overlap"]
    if overlap["rows"]:
        pairs = ", ".join(f"{n} {pair.replace('-', ' rows also in ')}" for pair, n in overlap["rows"].items())
        if overlap["rows_dropped"]:
            dropped = ", ".join(f"{n} from {name}" for name, n in overlap["rows_dropped"].items())
            yield f"the given splits share texts ({pairs}); prepare.split_overlap: drop removed {dropped}"
        else:
            yield f"the given splits share texts ({pairs}); prepare.split_overlap: fail leaves them for validate"
    extra = summary.get("extra_sources") or {}
    if extra:
        used = [f"{name} ({info['rows']} rows)" for name, info in extra.items() if info != "missing"]
        missing = [name for name, info in extra.items() if info == "missing"]
        parts = ([f"added {', '.join(used)}"] if used else []) + ([f"not there yet: {', '.join(missing)}"] if missing else [])
        yield "data.extra_sources: " + "; ".join(parts)
    if summary["label_whitespace"]:
        stripped = ", ".join(f"{raw} ({n} rows)" for raw, n in summary["label_whitespace"].items())
        yield f"labels stripped of surrounding whitespace: {stripped}"


def _add_conflicts(total: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    return {
        **total,
        "texts": total["texts"] + found["texts"],
        "rows_dropped": total["rows_dropped"] + found["rows_dropped"],
        "examples": (total["examples"] + found["examples"])[:MAX_EXAMPLES],
    }


def _merge_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            merged[key] = merged.get(key, 0) + n
    return dict(sorted(merged.items()))


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_EXAMPLE_CHARS else text[:MAX_EXAMPLE_CHARS] + "..."


# ------------------------------------------------------------------------------------ split changes


@dataclass(frozen=True)
class PreparedTexts:
    """Each text of a prepared data version, by its hash (``langops.text_hashes``): its split and label,
    and whether that split is one the user gave; with how the version was split."""

    data_version: str
    texts: pd.DataFrame  # hash, text, split, label, given
    split: dict[str, Any]  # summary["split"]: method, seed, sizes ({} for versions older than hashed splits)

    @classmethod
    def read(cls, prepared_dir: Path) -> PreparedTexts | None:
        """None when ``prepared_dir`` holds no complete prepared dataset."""
        prepared_dir = Path(prepared_dir)
        if not all(split_path(prepared_dir, name).is_file() for name in SPLITS):
            return None
        summary = read_json(prepared_dir / SUMMARY_FILE) if (prepared_dir / SUMMARY_FILE).is_file() else {}
        given = set(summary.get("splits_given", []))
        frames = []
        for name in SPLITS:
            split = pd.read_parquet(split_path(prepared_dir, name), columns=[TEXT, LABEL])
            split = split[has_text(split)]
            frames.append(split.assign(split=name, given=name in given))
        texts = pd.concat(frames, ignore_index=True)
        texts.insert(0, "hash", text_hashes(texts[TEXT]))
        return cls(data_version=dvc_dir_md5(prepared_dir), texts=texts.drop_duplicates("hash").reset_index(drop=True),
                   split=summary.get("split", {}))


def compare_splits(previous: PreparedTexts | None, current: PreparedTexts) -> dict[str, Any]:
    """How many texts kept, joined, left or changed their split from ``previous`` to ``current``, and why
    each change happened; a relabelled text is counted apart (it keeps its split)."""
    if previous is None:
        return {"previous_data_version": None, "data_version": current.data_version,
                "texts": {"before": 0, "after": len(current.texts), "joined": len(current.texts)}}
    merged = previous.texts.merge(current.texts, on="hash", how="outer", suffixes=("_before", "_after"), indicator=True)
    both = merged[merged["_merge"] == "both"]
    joined = merged[merged["_merge"] == "right_only"]
    moved = both[both["split_before"] != both["split_after"]]
    relabelled = both[both["label_before"] != both["label_after"]]
    reasons = moved.apply(lambda row: _why_moved(row, previous.split, current.split), axis=1) if len(moved) else pd.Series(dtype=object)
    return {
        "previous_data_version": previous.data_version,
        "data_version": current.data_version,
        "texts": {"before": len(previous.texts), "after": len(current.texts), "kept": len(both) - len(moved),
                  "joined": len(joined), "left": int((merged["_merge"] == "left_only").sum()), "changed": len(moved)},
        "joined_by_split": {name: int((joined["split_after"] == name).sum()) for name in SPLITS},
        "changed_by_reason": {str(k): int(v) for k, v in reasons.value_counts().sort_index().items()},
        "changed_examples": [
            {"text": _shorten(row.text_after), "from": row.split_before, "to": row.split_after, "reason": reason}
            for row, reason in zip(moved.head(MAX_EXAMPLES).itertuples(), reasons.head(MAX_EXAMPLES), strict=True)
        ],
        "relabelled": {"texts": len(relabelled),
                       "kept_split": int((relabelled["split_before"] == relabelled["split_after"]).sum())},
    }


def _why_moved(row: Any, before: dict[str, Any], after: dict[str, Any]) -> str:
    if before.get("method") != after.get("method"):
        return "the version before was split by the older, order-dependent method"
    if before.get("seed") != after.get("seed"):
        return "prepare.split_seed changed"
    if (before.get("validation_size"), before.get("test_size")) != (after.get("validation_size"), after.get("test_size")):
        return "prepare.validation_size or test_size changed"
    if row.given_before or row.given_after:
        return "its split is one you gave"
    return "unexplained"


def record_split_changes(previous: PreparedTexts | None, current: PreparedTexts | None, path: Path) -> dict[str, Any]:
    """Write ``compare_splits`` to ``path``. The same data prepared again keeps the record of how that
    version came to be, so a rerun neither hides nor rewrites the last change."""
    if current is None:
        raise FileNotFoundError("prepare wrote no complete dataset to compare")
    if previous is not None and previous.data_version == current.data_version and path.is_file():
        kept = read_json(path)
        if kept.get("data_version") == current.data_version:
            return kept
    changes = compare_splits(previous, current)
    write_json(path, changes)
    return changes


def describe_split_changes(changes: dict[str, Any]) -> str:
    """One line for the log and the validation report."""
    texts = changes["texts"]
    if changes["previous_data_version"] is None:
        return f"split: {texts['after']} texts dealt by their hash; no earlier data version to compare with"
    joined = ", ".join(f"{name} {n}" for name, n in changes["joined_by_split"].items() if n)
    line = (f"split since data version {changes['previous_data_version'][:12]}: {texts['kept']} texts kept their "
            f"split, {texts['joined']} joined" + (f" ({joined})" if joined else "")
            + f", {texts['left']} left, {texts['changed']} changed split")
    if texts["changed"]:
        line += " (" + ", ".join(f"{n}: {why}" for why, n in changes["changed_by_reason"].items()) + ")"
    relabelled = changes["relabelled"]
    if relabelled["texts"]:
        line += f"; {relabelled['texts']} relabelled texts, {relabelled['kept_split']} of them kept their split"
    return line


# ------------------------------------------------------------------------------------------- writing


def write_outputs(
    out_dir: Path, splits: dict[str, pd.DataFrame], labels: tuple[str, ...], summary: dict[str, Any]
) -> None:
    """Write everything into a sibling temp folder, then swap it in: readers never see old and new mixed."""
    staging = staging_dir(out_dir)
    try:
        for name, split in splits.items():
            split[[TEXT, LABEL, SOURCE_ROW]].to_parquet(split_path(staging, name), index=False)
        write_labels(staging, list(labels))
        write_json(staging / SUMMARY_FILE, summary)
        crash_point("prepare:staged")
        swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
