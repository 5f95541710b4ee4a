"""``langops init --data FILE``: start a project on the user's own data.

It reads the file (or folder of split files), infers the text, label and split columns and the labels,
writes them into ``params.yaml``, and then runs prepare and validate on a scratch copy, so the user sees
the class counts and everything validation would refuse before any training is started.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from langops.config import SPLIT_ALIASES, DataConfig, Params, load_params
from langops.io import SPLITS
from langops.tasks.prepare import (
    PrepareError,
    SourceEncodingError,
    label_string,
    prepare,
    read_records,
    source_files,
)
from langops.tasks.validate import DataValidationError, validate

# Column names that usually hold the text or the label, most telling first.
TEXT_NAMES = ("text", "sentence", "body", "message", "content", "review", "tweet", "utterance", "question",
              "comment", "document", "description", "query", "title", "sms", "email")
LABEL_NAMES = ("label", "labels", "category", "class", "intent", "target", "sentiment", "emotion", "topic",
               "tag", "y", "gold_label", "label_text")
MAX_LABELS = 1000
DATA_SECTION = re.compile(r"^data:[ \t]*(#.*)?$")


class InitError(ValueError):
    """The data cannot be set up automatically; the message says what to pass instead."""


@dataclass(frozen=True)
class InitResult:
    params_path: Path
    data: dict[str, Any]
    reasons: dict[str, str]  # data key -> how it was chosen
    rows: dict[str, int]  # per file as given (``all`` for one file to split)
    class_counts: dict[str, int]
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()  # what prepare would do to the rows (settle conflicts, carve splits ...)
    notes: tuple[str, ...] = field(default_factory=tuple)


def init_project(
    data_path: Path,
    *,
    params_path: Path,
    text_column: str | None = None,
    label_column: str | None = None,
    force: bool = False,
) -> InitResult:
    """Write ``params.yaml`` for ``data_path`` and check the data the way a run would.

    Args:
        data_path: a CSV/TSV/JSONL/JSON/Parquet file, or a folder with train/validation/test files.
        params_path: the params file to write; its other sections are kept when it exists.
        text_column, label_column: the columns to use instead of inferring them.
        force: replace the ``data:`` section of an existing params file.

    Raises:
        InitError: the params file exists (without ``force``), or a column cannot be inferred.
        PrepareError: the data cannot be read (the message names the file and line).
    """
    params_path = Path(params_path)
    if params_path.exists() and not force:
        raise InitError(f"{params_path} exists; pass --force to replace its data: section (the rest is kept)")
    data_path = Path(data_path).resolve()
    files = source_files(DataConfig(source=str(data_path)))
    first = files.get("all") or files["train"]
    encoding, notes = "utf-8", []
    try:
        records, columns = read_records(first, encoding)
    except SourceEncodingError as exc:
        if not exc.reads_as_cp1252:
            raise
        encoding = "cp1252"
        records, columns = read_records(first, encoding)
        notes.append(f"{first.name} is not UTF-8 but reads as cp1252 (Windows-1252): data.encoding: cp1252")
    if not records:  # nothing to infer columns or labels from, and nothing to train on
        raise InitError(f"{first} has a header but no data rows (columns: {columns}); add labelled rows")
    reasons: dict[str, str] = {}
    text_column = text_column or _infer_text_column(records, columns, reasons)
    label_column = label_column or _infer_label_column(records, columns, text_column, reasons)
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise InitError(f"{first.name} has no column {column!r} for the {role}; its columns are {columns}")
    split_column = _infer_split_column(records, columns, {text_column, label_column}, reasons) if "all" in files else None

    counts: dict[str, int] = {}
    rows: dict[str, int] = {}
    for name, path in files.items():
        file_records = records if path == first else read_records(path, encoding)[0]
        rows[name] = len(file_records)
        for _, record in file_records:
            label = label_string(record.get(label_column))
            if label is not None:
                counts[label.strip()] = counts.get(label.strip(), 0) + 1
    if len(counts) > MAX_LABELS:
        raise InitError(
            f"column {label_column!r} holds {len(counts)} distinct values, too many for labels; "
            "name the label column with --label-column"
        )
    data = {
        "source": _relative(data_path, params_path.parent),
        "split_column": split_column,
        "text_column": text_column,
        "label_column": label_column,
        "labels": sorted(counts),
        "encoding": encoding,
    }
    write_data_section(params_path, data)
    raw_dir = params_path.parent.resolve() / "data" / "raw"
    if (params_path.parent / "dvc.yaml").is_file() and not data_path.is_relative_to(raw_dir):
        notes.append("dvc.yaml's prepare stage tracks data/raw: keep the data there for `dvc repro` to see changes")
    errors, warnings, changes = dry_run(params_path)
    return InitResult(
        params_path=params_path,
        data=data,
        reasons=reasons,
        rows=rows,
        class_counts=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        errors=errors,
        warnings=warnings,
        changes=changes,
        notes=tuple(notes),
    )


def _infer_text_column(records: list, columns: list[str], reasons: dict[str, str]) -> str:
    strings = [c for c in columns if _share_strings(records, c) > 0.9]
    named = [c for name in TEXT_NAMES for c in strings if c.strip().lower() == name]
    if named:
        reasons["text_column"] = "named like a text column"
        return named[0]
    if not strings:
        raise InitError(f"no column holds text; name it with --text-column (columns: {columns})")
    longest = max(strings, key=lambda c: _mean_length(records, c))
    reasons["text_column"] = "the column with the longest values"
    return longest


def _infer_label_column(records: list, columns: list[str], text_column: str, reasons: dict[str, str]) -> str:
    others = [c for c in columns if c != text_column]
    named = [c for name in LABEL_NAMES for c in others if c.strip().lower() == name]
    if named:
        reasons["label_column"] = "named like a label column"
        return named[0]
    candidates = [(c, _distinct(records, c)) for c in others]
    candidates = [(c, n) for c, n in candidates if 2 <= n <= min(MAX_LABELS, max(2, len(records) // 2))]
    if not candidates:
        raise InitError(f"no column looks like labels; name it with --label-column (columns: {columns})")
    reasons["label_column"] = "the column with the fewest distinct values"
    return min(candidates, key=lambda cn: cn[1])[0]


def _infer_split_column(records: list, columns: list[str], taken: set[str], reasons: dict[str, str]) -> str | None:
    for column in columns:
        values = {str(r.get(column)).strip().lower() for _, r in records if r.get(column) is not None}
        if column not in taken and values and values <= set(SPLIT_ALIASES) and "train" in {SPLIT_ALIASES[v] for v in values}:
            reasons["split_column"] = f"its values are split names: {sorted(values)}"
            return column
    return None


def _share_strings(records: list, column: str) -> float:
    values = [r.get(column) for _, r in records if r.get(column) is not None]
    return sum(isinstance(v, str) for v in values) / max(len(values), 1)


def _mean_length(records: list, column: str) -> float:
    values = [len(r[column]) for _, r in records if isinstance(r.get(column), str)]
    return sum(values) / max(len(values), 1)


def _distinct(records: list, column: str) -> int:
    return len({label_string(r.get(column)) for _, r in records} - {None})


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def write_data_section(params_path: Path, data: dict[str, Any]) -> None:
    """Replace the ``data:`` section of ``params_path`` in place, keeping every other line and comment; a
    missing file is written whole from the defaults."""
    section = yaml.safe_dump({"data": data}, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if not params_path.exists():
        defaults = Params().model_dump(mode="json")
        defaults["data"] = {**defaults["data"], **data}
        params_path.write_text(
            "# Written by `langops init`; every knob of the pipeline, one section per step (see README).\n"
            + yaml.safe_dump(defaults, sort_keys=False, allow_unicode=True)
        )
        return
    lines = params_path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if DATA_SECTION.match(line.rstrip("\n"))), None)
    if start is None:
        params_path.write_text("".join(lines) + ("\n" if lines and not lines[-1].endswith("\n") else "") + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "\t", "#", "\n")), len(lines))
    while end > start + 1 and lines[end - 1].strip() == "":  # keep the blank line before the next section
        end -= 1
    params_path.write_text("".join(lines[:start]) + section + "".join(lines[end:]))


def dry_run(params_path: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Prepare and validate with the new params into a scratch folder: the errors and warnings a run would
    meet, and what prepare would change."""
    params = load_params(params_path)
    with tempfile.TemporaryDirectory(prefix="langops-init-") as scratch:
        out = Path(scratch)
        try:
            prepared = prepare(params.data, params.prepare, seed=params.project.seed, out_dir=out / "prepared")
            result = validate(params.data, params.validate, prepared_dir=prepared.out_dir, report_dir=out / "report")
        except DataValidationError as exc:
            lines = str(exc).splitlines()
            errors = tuple(_entries(lines[1:], stop="warnings (these alone would not stop the run):"))
            return errors, tuple(exc.result.warnings), prepared.notes
        except PrepareError as exc:
            return (str(exc),), (), ()
    return (), result.warnings, prepared.notes


def _entries(lines: list[str], *, stop: str) -> list[str]:
    """The failed checks of a validation message, one string each (examples and fix joined)."""
    entries: list[str] = []
    for line in lines:
        if line.startswith(stop) or line.startswith("full report:"):
            break
        if line.startswith("  - "):
            entries.append(line[4:])
        elif entries:
            entries[-1] += "\n    " + line.strip()
    return entries


def render(result: InitResult) -> str:
    """What init found and wrote, the class counts, and what a run would say about the data."""
    data = result.data
    lines = [f"wrote the data: section of {result.params_path}"]
    for key in ("source", "text_column", "label_column", "split_column", "encoding"):
        if data.get(key) is not None:
            reason = f"  ({result.reasons[key]})" if key in result.reasons else ""
            lines.append(f"  data.{key:<13} {data[key]}{reason}")
    rows = ", ".join(f"{name if name != 'all' else 'rows'} {n}" for name, n in result.rows.items())
    given = [name for name in SPLITS if name in result.rows]
    lines.append(f"  splits         {'prepare splits the one file' if 'all' in result.rows else 'as given: ' + ', '.join(given)}"
                 f" ({rows})")
    lines.append(f"  data.labels    {len(data['labels'])} labels, rows per label:")
    for label, n in list(result.class_counts.items())[:30]:
        lines.append(f"    {label!r:<40} {n}")
    if len(result.class_counts) > 30:
        lines.append(f"    ... and {len(result.class_counts) - 30} more")
    lines += [f"note: {note}" for note in result.notes]
    if result.changes:
        lines.append("prepare will:")
        lines += [f"  - {change}" for change in result.changes]
    if result.errors:
        lines.append(f"\nvalidation would STOP a run on this data ({_count(len(result.errors), 'problem')}); fix these first:")
        lines += [f"  - {error}" for error in result.errors]
    else:
        lines.append("\nvalidation passes on a dry run of prepare + validate.")
    if result.warnings:
        lines.append(f"warnings (the run goes on; {_count(len(result.warnings), 'warning')}):")
        lines += [f"  - {warning}" for warning in result.warnings]
    lines.append("next: langops run" if not result.errors else "then: langops run")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
