"""What production monitoring reads: the prediction record, request ids, and feedback labels joined back.

One schema serves the server's prediction log, the reference set the compress step writes beside the
model, and ``langops feedback export``:

``{"time", "request_id", "client_request_id", "endpoint", "model_name", "version", "label", "confidence",
"probabilities", "text_chars", "tokens", "unknown_share", "embedding"}``, plus ``text_sha256`` or ``text`` when
``prediction_log_text`` says so. ``request_id`` names one text: ``<request id>-<index in the request>``, where the
request id is the one the server issued (``new_request_id``), unique whatever the client sent;
``client_request_id`` is the client's own ``X-Request-Id`` (or null), which clients may reuse.

Feedback is ``{"time", "request_id", "label"}`` lines in ``feedback*.jsonl`` beside the prediction log, plus
``text`` when the server kept the request's texts for feedback (``prediction_log_text: labelled``, the
default: the one place an unlabelled text never reaches). Logs written before the server issued its own ids carry the client's id in ``request_id``, so one id may name
several texts there: ``LoggedTexts`` joins a label only to a name that fits exactly one logged text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time as clock
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from langops.onnx_model import Scores

TextPolicy = Literal["labelled", "none", "sha256", "raw"]
PREDICTION_FILES = "predictions*.jsonl*"  # the live file, per-worker files and their rotated copies
FEEDBACK_FILE = "feedback.jsonl"
FEEDBACK_IMPORT_FILE = "feedback-import.jsonl"  # written by `langops feedback import`, never by the server
FEEDBACK_FILES = "feedback*.jsonl*"
# A request id is a token a client may choose: bounded length and a charset safe in logs, CSV and headers.
REQUEST_ID_MAX_CHARS = 64
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What feedback may name: a request id, or a text's id (``<request id>-<index>``).
TEXT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(-[0-9]{1,6})?")
ROUND = 6  # decimals kept for probabilities and embeddings in the log


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_request_id() -> str:
    """The id the server issues for a request: 32 hex digits, the time in ms (12) then 80 random bits (20).

    Random bits make it unique across worker processes and restarts with no coordination; the time prefix
    keeps ids in issue order (the index of issued ids stays append-only) and tells when one was issued.
    """
    return f"{int(clock.time() * 1000) & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"


def is_safe_request_id(value: str) -> bool:
    """A client's ``X-Request-Id`` is kept (as ``client_request_id``) only when this holds; else it is dropped."""
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def split_text_id(name: str) -> tuple[str, int] | None:
    """``(request id, index)`` of a name shaped ``<request id>-<index>``, else None."""
    request, dash, index = name.rpartition("-")
    if not dash or not request or not index.isdigit() or len(index) > 6:
        return None
    return request, int(index)


def text_id(request_id: str, index: int) -> str:
    """The id of the ``index``-th text of a request: what the log records and what feedback names."""
    return f"{request_id}-{index}"


def prediction_rows(
    *,
    request_id: str,
    client_request_id: str | None = None,
    endpoint: str,
    model_name: str,
    version: str,
    texts: Sequence[str],
    labels: Sequence[str],
    scores: Scores,
    text_policy: TextPolicy,
    time: str | None = None,
) -> list[dict[str, Any]]:
    """One record per text in the monitoring schema (the module docstring); ``time`` None leaves it out."""
    rows = []
    embeddings = scores.embeddings
    for index, (text, row) in enumerate(zip(texts, scores.probs, strict=True)):
        best = int(row.argmax())
        record: dict[str, Any] = {} if time is None else {"time": time}
        record |= {
            "request_id": text_id(request_id, index),
            "client_request_id": client_request_id,
            "endpoint": endpoint,
            "model_name": model_name,
            "version": version,
            "label": labels[best],
            "confidence": round(float(row[best]), ROUND),
            "probabilities": {label: round(float(p), ROUND) for label, p in zip(labels, row, strict=True)},
            "text_chars": len(text),
            "tokens": int(scores.tokens[index]),
            "unknown_share": round(float(scores.unknown_share[index]), ROUND),
            "embedding": None if embeddings is None else [round(float(x), ROUND) for x in embeddings[index]],
        }
        if text_policy == "sha256":
            record["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        elif text_policy == "raw":
            record["text"] = text
        rows.append(record)
    return rows


class FeedbackError(ValueError):
    """Feedback that cannot be recorded: a malformed id, an unknown label, a file that is not feedback."""


@dataclass(frozen=True)
class Feedback:
    request_id: str
    label: str
    text: str | None = None  # the labelled text, when the server kept it for feedback (``labelled``)


def check_feedback(request_id: object, label: object, *, labels: Sequence[str] | None, where: str) -> Feedback:
    """One feedback item, checked: the id a text's or a request's, the label one the model knows.

    Raises:
        FeedbackError: naming ``where`` (the item or the line) and what is wrong.
    """
    if not isinstance(request_id, str) or TEXT_ID_PATTERN.fullmatch(request_id) is None:
        raise FeedbackError(
            f"{where}: request_id {str(request_id)[:80]!r} is malformed: expected the X-Request-Id of a "
            f"request or '<request id>-<text index>' ({REQUEST_ID_MAX_CHARS} characters at most of "
            "letters, digits, '.', '_' and '-')"
        )
    if not isinstance(label, str) or not label.strip():
        raise FeedbackError(f"{where}: label must be a non-empty string, got {str(label)[:80]!r}")
    if labels is not None and label not in labels:
        raise FeedbackError(f"{where}: unknown label {label[:80]!r}; the model's labels are {list(labels)}")
    return Feedback(request_id, label)


def feedback_lines(items: Iterable[Feedback], *, time: str) -> list[str]:
    return [json.dumps({"time": time, "request_id": item.request_id, "label": item.label}
                       | ({} if item.text is None else {"text": item.text}), ensure_ascii=False)
            for item in items]


def read_feedback_file(path: Path) -> list[Feedback]:
    """Feedback from a CSV (header ``request_id,label``) or JSONL file, every line checked first.

    Raises:
        FeedbackError: the file's format, or every bad line, named with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"{path}: no such file")
    raw: list[tuple[str, object, object]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeedbackError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise FeedbackError(f'{path}:{number}: expected an object {{"request_id": ..., "label": ...}}')
            raw.append((f"{path}:{number}", item.get("request_id"), item.get("label")))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"request_id", "label"} - set(reader.fieldnames or [])
            if missing:
                raise FeedbackError(f"{path}: CSV header lacks {sorted(missing)} (has {reader.fieldnames})")
            raw = [(f"{path}:{number}", row["request_id"], row["label"]) for number, row in enumerate(reader, start=2)]
    else:
        raise FeedbackError(f"{path}: expected a .csv or .jsonl file")
    items, errors = [], []
    for where, request_id, label in raw:
        try:
            items.append(check_feedback(request_id, label, labels=None, where=where))
        except FeedbackError as exc:
            errors.append(str(exc))
    if errors:
        shown = "; ".join(errors[:5])
        raise FeedbackError(f"{len(errors)} of {len(raw)} feedback rows refused, nothing imported: {shown}")
    return items


def import_feedback(
    path: Path, logs: Logs | Path, *, kept_texts: Callable[[list[str]], list[tuple[str, str] | None]] | None = None
) -> int:
    """Add the feedback in ``path`` to the logs (``feedback-import.jsonl`` in a log folder, or the fleet's
    store); returns the rows added.

    Every row is checked before any is written. ``kept_texts`` maps the ids to ``(issued text id, text)``
    where the server still keeps the one text an id names (the index of issued ids, ``prediction_log_text:
    labelled``), else None: such a label is written as the server writes one, with its text, so it becomes
    data without a raw prediction log.
    """
    items = read_feedback_file(path)
    if kept_texts is not None:
        found = kept_texts([item.request_id for item in items])
        items = [item if kept is None else Feedback(kept[0], item.label, kept[1])
                 for item, kept in zip(items, found, strict=True)]
    lines = feedback_lines(items, time=utc_now())
    as_logs(logs).add_feedback(lines)
    return len(lines)


def read_records(lines: Iterable[LoggedLine]) -> Iterator[dict[str, Any]]:
    """The JSON objects among logged lines; a line cut short by a crash is skipped."""
    for logged in lines:
        try:
            record = json.loads(logged.line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


@dataclass(frozen=True)
class LoggedLine:
    """One logged record as its JSON text, and where it was read (for messages about a bad one)."""

    where: str
    line: str


def file_lines(paths: Iterable[Path]) -> Iterator[LoggedLine]:
    """The non-blank lines of JSONL files, in order, each named ``<file>:<line number>``."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield LoggedLine(f"{path.name}:{number}", line)


class Logs(Protocol):
    """Where a server's prediction log and feedback are read: its folder (``LogFiles``), or the fleet's
    database (``langops.fleet_store.StoreLogs``)."""

    def exists(self) -> bool: ...

    def prediction_lines(self) -> Iterator[LoggedLine]: ...

    def feedback_lines(self) -> Iterator[LoggedLine]: ...

    def add_feedback(self, lines: list[str]) -> None: ...

    def imported_to(self) -> str: ...


class LogFiles:
    """The prediction log folder of one server: ``predictions*.jsonl*`` and ``feedback*.jsonl*``, oldest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)

    def __str__(self) -> str:
        return str(self.log_dir)

    def exists(self) -> bool:
        return self.log_dir.is_dir()

    def prediction_lines(self) -> Iterator[LoggedLine]:
        return file_lines(log_files(self.log_dir, PREDICTION_FILES))

    def feedback_lines(self) -> Iterator[LoggedLine]:
        return file_lines(log_files(self.log_dir, FEEDBACK_FILES))

    def imported_to(self) -> str:
        return str(self.log_dir / FEEDBACK_IMPORT_FILE)

    def add_feedback(self, lines: list[str]) -> None:
        """Append to ``feedback-import.jsonl``, a file of its own beside the server's: the server rotates its
        files, which is not safe to share across processes."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / FEEDBACK_IMPORT_FILE).open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))


def as_logs(logs: Logs | Path) -> Logs:
    """A log folder's ``LogFiles``; ``Logs`` as they are."""
    return LogFiles(logs) if isinstance(logs, (str, Path)) else logs


def log_files(log_dir: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern``, oldest first: rotated copies (``.N``, highest N oldest) before live files."""
    def age(path: Path) -> tuple[int, str]:
        suffix = path.name.rsplit(".", 1)[-1]
        return (-int(suffix) if suffix.isdigit() else 0, path.name)

    return sorted(Path(log_dir).glob(pattern), key=age)


class LoggedTexts:
    """Every name a logged text answers to, so that a feedback label joins the one text it names or none.

    A text answers to names the server issued, its id (``<request id>-<index>``) and its request's id (which
    names every text of the request: a match only for a request of one text); and to names its client chose:
    ``client_request_id`` (every text of every request that carried it) and ``<client_request_id>-<index>``. Records written before the server issued its own
    ids (no ``client_request_id`` key) carry the client's id in ``request_id``, so their names are the
    client's. An issued name is looked up first; otherwise every text a client's name fits counts. One text
    found is a match; several, an ambiguous name (a reused or retried id) that must not be resolved to any.
    """

    def __init__(self) -> None:
        self._issued: dict[str, list[int]] = {}
        self._chosen: dict[str, list[int]] = {}
        self.size = 0

    @classmethod
    def of_records(cls, records: Iterable[dict[str, Any]]) -> LoggedTexts:
        """The names of prediction records, positions in iteration order (records without a string id too)."""
        logged = cls()
        for record in records:
            record_id, client = record.get("request_id"), record.get("client_request_id")
            logged.add(record_id if isinstance(record_id, str) else None,
                       client if isinstance(client, str) else None, issued="client_request_id" in record)
        return logged

    def add(self, record_id: str | None, client_request_id: str | None, *, issued: bool) -> int:
        """Add one logged text; returns its position. ``issued``: ``record_id`` is the server's own."""
        position, self.size = self.size, self.size + 1
        if record_id is None:
            return position
        parts = split_text_id(record_id)
        names = self._issued if issued else self._chosen
        names.setdefault(record_id, []).append(position)
        if parts is not None:
            names.setdefault(parts[0], []).append(position)
            if issued and client_request_id is not None:
                self._chosen.setdefault(client_request_id, []).append(position)
                self._chosen.setdefault(text_id(client_request_id, parts[1]), []).append(position)
        return position

    def find(self, name: str) -> list[int]:
        """Positions of the texts ``name`` names: one is a match, several are ambiguous, none unmatched."""
        return sorted(set(self._issued.get(name) or self._chosen.get(name, ())))


@dataclass(frozen=True)
class FeedbackExport:
    """What ``export_feedback`` wrote and what it could not use, each counted."""

    output: Path
    rows: int
    feedback: int
    unmatched: int  # feedback naming no logged prediction (not logged, sampled out, or rotated away)
    without_text: int  # matched, but the prediction was logged without its text
    unknown_label: int  # a label the model that answered does not have
    ambiguous: int = 0  # feedback naming more than one logged text (an id reused in logs before issued ids)
    ambiguous_examples: tuple[tuple[str, int], ...] = ()  # a few of those ids and how many texts each names


class NoTextsKept(RuntimeError):
    """Feedback matched logged predictions, but none kept its text: nothing to write a dataset from."""


def read_feedback_labels(lines: Iterable[LoggedLine]) -> tuple[dict[str, Feedback], list[str]]:
    """The latest feedback given to each id in feedback logs, by ``time`` where lines carry one, else by log
    order; with the text the server kept for it, if any (a later label without one keeps the earlier text);
    and the ``time`` of every line read."""
    records = [record for record in read_records(lines)
               if isinstance(record.get("request_id"), str) and isinstance(record.get("label"), str)]
    records.sort(key=lambda record: str(record.get("time") or ""))  # stable: ties keep file order
    labels: dict[str, Feedback] = {}
    for record in records:
        earlier = labels.pop(record["request_id"], None)  # re-inserted: the order is the order labels were given
        text = record.get("text") if isinstance(record.get("text"), str) else None
        labels[record["request_id"]] = Feedback(record["request_id"], record["label"],
                                                text if text is not None else earlier.text if earlier else None)
    return labels, [str(record["time"]) for record in records if isinstance(record.get("time"), str)]


def export_feedback(logs: Logs | Path, output: Path) -> FeedbackExport:
    """Write ``labelled_texts(logs)`` as a ``text,label`` CSV, never half written.

    Raises:
        FileNotFoundError: no feedback in ``logs``.
        NoTextsKept: feedback matched predictions, but neither it nor they kept the text.
    """
    found = labelled_texts(logs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(found.rows)
    partial.replace(output)
    return FeedbackExport(output=output, rows=len(found.rows), feedback=found.feedback, unmatched=found.unmatched,
                          without_text=found.without_text, unknown_label=found.unknown_label,
                          ambiguous=len(found.ambiguous), ambiguous_examples=tuple(list(found.ambiguous.items())[:5]))


@dataclass(frozen=True)
class LabelledTexts:
    """The ``(text, label)`` rows feedback gives, what it could not use (counted), and when it was given."""

    rows: list[tuple[str, str]]
    feedback: int
    unmatched: int
    without_text: int
    unknown_label: int
    ambiguous: dict[str, int]  # id -> logged texts it names
    first_label_at: str | None  # the earliest and latest ``time`` of the feedback lines read
    last_label_at: str | None


def labelled_texts(logs: Logs | Path) -> LabelledTexts:
    """Join feedback labels to logged predictions: the labelled texts a dataset is made of.

    A label the server wrote with its text (``prediction_log_text: labelled``) is a row as it is. Each other
    label joins the one logged text its id names (``LoggedTexts``): the server records feedback under
    the id it issued for the text; an imported label may also name a request of one text, or a client's own
    id that exactly one logged text carries. An id that names several logged texts (a client id reused or
    retried, in logs written before the server issued its own ids) is left out and counted, never joined to
    one of them. The latest label for a text wins. Texts are in the prediction log only with
    ``prediction_log_text: raw``.

    Raises:
        FileNotFoundError: no feedback in ``logs``.
        NoTextsKept: feedback matched predictions, but neither it nor they kept the text.
    """
    logs = as_logs(logs)
    labels, times = read_feedback_labels(logs.feedback_lines())
    if not labels:
        where = f"{logs} (looked for {FEEDBACK_FILES})" if isinstance(logs, LogFiles) else str(logs)
        raise FileNotFoundError(f"no feedback in {where}")
    predictions = list(read_records(logs.prediction_lines()))
    logged = LoggedTexts.of_records(predictions)
    joined: dict[int, Feedback] = {}
    unmatched, ambiguous = 0, {}
    rows: list[tuple[str, str]] = []
    for feedback_id, item in labels.items():  # oldest first: a later label for the same text wins
        if item.text is not None:  # written by the server with its text, its label checked when it took it
            rows.append((item.text, item.label))
            continue
        found = logged.find(feedback_id)
        if not found:
            unmatched += 1
        elif len(found) > 1:
            ambiguous[feedback_id] = len(found)
        else:
            joined.pop(found[0], None)
            joined[found[0]] = item
    without_text, unknown_label = 0, 0
    for position, item in joined.items():
        record = predictions[position]
        if item.label not in (record.get("probabilities") or {}):
            unknown_label += 1
        elif not isinstance(record.get("text"), str):
            without_text += 1
        else:
            rows.append((record["text"], item.label))
    if without_text and not rows:
        raise NoTextsKept(
            f"{without_text} feedback labels match logged predictions, but neither kept the text: the server "
            "keeps a text for feedback with deploy.prediction_log_text: labelled (the default) or raw. Set "
            "one, restart the server (langops deploy-model), and export the feedback given after that."
        )
    return LabelledTexts(rows=rows, feedback=len(labels), unmatched=unmatched, without_text=without_text,
                         unknown_label=unknown_label, ambiguous=ambiguous, first_label_at=min(times, default=None),
                         last_label_at=max(times, default=None))
