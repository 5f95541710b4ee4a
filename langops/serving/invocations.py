"""MLflow's scoring protocol (``POST /invocations``) for the served classifier.

Parsing and schema enforcement reuse MLflow's own scoring-server functions, and the answer is built
with the pyfunc's ``predictions_frame`` and MLflow's ``predictions_to_json``. So a client of
``mlflow models serve`` gets the same formats (``dataframe_split``, ``dataframe_records``,
``instances``, ``inputs``; JSON, CSV or Parquet bodies), the same content-type rules, the same
``{"predictions": [...]}`` rows and the same ``{"error_code", "message"}`` errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO, StringIO
from typing import Any

import numpy as np
import pandas as pd

from langops.io import TEXT
from langops.pyfunc import CONFIDENCE_COLUMN, LABEL_COLUMN, PROB_PREFIX, model_signature, texts_from_input
from langops.serving.request_json import JsonTooComplex, load_json
from langops.text_checks import BLANK_DESCRIPTION, is_blank

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")  # MLflow's JSON input formats


class InvocationError(Exception):
    """A request MLflow's scoring server would refuse: ``body`` is what it would answer."""

    def __init__(self, status_code: int, body: str, media_type: str = "application/json") -> None:
        super().__init__(body)
        self.status_code = status_code
        self.body = body
        self.media_type = media_type


@dataclass(frozen=True)
class InvocationInput:
    texts: list[str]


def mlflow_error(message: str, error_code: str = "BAD_REQUEST") -> str:
    """An error body in MLflow's shape (``MlflowException.serialize_as_json``)."""
    return json.dumps({"error_code": error_code, "message": message})


def parse_invocation(body: bytes, content_type: str | None, labels: Sequence[str]) -> InvocationInput:
    """The texts of an ``/invocations`` request, parsed and schema-checked as MLflow does.

    The common JSON shapes (a lone ``text`` column of strings) are read directly, which costs a few
    microseconds instead of the milliseconds a DataFrame and schema enforcement cost; anything else
    takes MLflow's own path, so unusual input gets exactly MLflow's answer. One difference: a ``text``
    value that is not a string is refused before MLflow's schema enforcement could turn ``null``, ``5``
    or ``true`` into the texts "None", "5" and "True".

    Raises:
        InvocationError: unsupported content type or charset, a body MLflow cannot parse, JSON nested
            too deeply or with a number of too many digits, input that fails the model signature, a
            value that is not a string, or a blank text (``langops.text_checks``; 422).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST
    from mlflow.pyfunc import _validate_prediction_input
    from mlflow.pyfunc import scoring_server as mlflow_scoring

    content_type = content_type or ""
    type_parts = [part.strip() for part in content_type.split(";")]
    mime_type, parameters = type_parts[0], type_parts[1:]
    values = {key: value for pair in parameters for key, _, value in [pair.partition("=")]}
    if values.get("charset", "utf-8").lower() != "utf-8":
        raise InvocationError(415, "The scoring server only supports UTF-8", "text/plain")
    if unexpected := set(values).difference({"charset"}):
        raise InvocationError(
            415, f"Unrecognized content type parameters: {', '.join(unexpected)}. "
            f"{mlflow_scoring.SCORING_PROTOCOL_CHANGE_INFO}", "text/plain",
        )
    if mime_type == mlflow_scoring.CONTENT_TYPE_JSON:
        try:
            payload = load_json(body)
        except JsonTooComplex as exc:
            raise InvocationError(400, mlflow_error(f"Invalid input: {exc}")) from exc
        except ValueError:  # not JSON: MLflow's own parser below answers with its own message
            pass
        else:
            column = _text_column(payload)
            if column is not None:
                _refuse_non_strings(column.values)
                if column.plain:
                    _refuse_blank(column.values)
                    return InvocationInput(texts=column.values)
    input_schema = model_signature(labels).inputs
    try:
        if mime_type == mlflow_scoring.CONTENT_TYPE_JSON:
            data, _ = mlflow_scoring._split_data_and_params(body)
            data = mlflow_scoring.infer_and_parse_data(data, input_schema)
        elif mime_type == mlflow_scoring.CONTENT_TYPE_CSV:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MlflowException(
                    f"Ensure that input is a valid UTF-8 encoded string. Error: '{exc!r}'", BAD_REQUEST
                ) from exc
            data = mlflow_scoring.parse_csv_input(StringIO(text), schema=input_schema)
        elif mime_type == mlflow_scoring.CONTENT_TYPE_PARQUET:
            data = mlflow_scoring.parse_parquet_input(BytesIO(body))
        else:
            raise InvocationError(
                415, "This predictor only supports the following content types: "
                f"Types: {mlflow_scoring.CONTENT_TYPES}. Got '{content_type}'.", "text/plain",
            )
        if isinstance(data, pd.DataFrame) and TEXT in data.columns:  # CSV and Parquet: before enforcement
            _refuse_non_strings(data[TEXT].tolist())
        try:
            data, _ = _validate_prediction_input(data, None, input_schema, None)
        except MlflowException as exc:
            exc.message = f"Failed to predict data '{data}'. \nError: {exc.message}"
            raise
    except MlflowException as exc:
        raise InvocationError(exc.get_http_status_code(), exc.serialize_as_json()) from exc
    except RecursionError as exc:  # MLflow decoding or converting input nested close to the limit again
        raise InvocationError(400, mlflow_error("Invalid input: JSON nested too deeply")) from exc
    texts = texts_from_input(data)
    _refuse_non_strings(texts)
    _refuse_blank(texts)
    return InvocationInput(texts=texts)


def _refuse_non_strings(values: Sequence[Any]) -> None:
    """Raise a 400 naming the rows whose ``text`` is not a string (null, NaN, a number, a boolean, a list...)."""
    bad = [index for index, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        shown = f"{bad[:10]}" + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InvocationError(400, mlflow_error(
            f"every 'text' value must be a string; rows {shown} are not (null, NaN, a number, a boolean, "
            "a list, an object, or missing)"
        ))


def _refuse_blank(texts: Sequence[str]) -> None:
    """Raise a 422 naming the rows whose text is blank (``langops.text_checks``): nothing to score, where
    MLflow would answer them with the empty string's prediction."""
    bad = [index for index, text in enumerate(texts) if is_blank(text)]
    if bad:
        shown = f"{bad[:10]}" + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InvocationError(422, mlflow_error(f"'text' rows {shown} are empty ({BLANK_DESCRIPTION})",
                                                "INVALID_PARAMETER_VALUE"))


@dataclass(frozen=True)
class TextColumn:
    """The raw JSON values of a body's ``text`` column; ``plain`` when that column is all the body holds."""

    values: list[Any]
    plain: bool


def _text_column(payload: Any) -> TextColumn | None:
    """The ``text`` column of a JSON body in one of MLflow's formats, values untouched; None where MLflow
    must judge the body itself (no format key or two, no ``text`` column, rows of uneven shape).

    Plain shapes (skipping MLflow costs nothing): the body's only key is a format whose value holds
    just a non-empty ``text`` column: ``{"dataframe_split": {"columns": ["text"], "data": [["a"], ...]}}``
    (an ``index`` too), ``{"dataframe_records": [{"text": "a"}, ...]}``, ``{"instances": ["a", ...]}`` or
    the same records, ``{"inputs": ["a", ...]}`` or ``{"inputs": {"text": ["a", ...]}}``. MLflow turns
    each into a one-column frame of these strings, which is all the pyfunc reads.
    """
    if not isinstance(payload, dict):
        return None
    forms = [key for key in payload if key in FORMATS]
    if len(forms) != 1:
        return None
    form, alone = forms[0], len(payload) == 1
    value = payload[form]
    if form == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
            return None
        columns, rows = value["columns"], value.get("data")
        if TEXT not in columns or not isinstance(rows, list):
            return None
        if not all(isinstance(row, list) and len(row) == len(columns) for row in rows):
            return None
        position = columns.index(TEXT)
        plain = alone and columns == [TEXT] and set(value) <= {"columns", "data", "index"} and bool(rows)
        return TextColumn([row[position] for row in rows], plain)
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        if not any(TEXT in item for item in value):
            return None  # MLflow names the missing column
        return TextColumn([item.get(TEXT) for item in value], alone and all(len(item) == 1 for item in value))
    if form == "dataframe_records":
        return None
    if isinstance(value, list):
        if any(isinstance(item, dict) for item in value):
            return None  # records mixed with bare values: MLflow refuses them
        return TextColumn(value, alone and bool(value))
    if form == "inputs" and isinstance(value, dict):
        if TEXT not in value:
            return None
        column = value[TEXT]
        if isinstance(column, list):
            return TextColumn(column, alone and len(value) == 1 and bool(column))
        return TextColumn([column], False)
    if isinstance(value, dict):
        return None
    return TextColumn([value], False)  # one bare value


def predictions_json(probs: np.ndarray, labels: Sequence[str]) -> str:
    """The ``{"predictions": [...]}`` body MLflow's scoring server writes for the pyfunc's output.

    Written directly rather than through a DataFrame: the same keys in the same order (``label``,
    ``confidence``, ``prob_<label>``...) and the same float64 reprs as ``predictions_to_json`` of
    ``predictions_frame``, which the MLflow parity tests check byte for byte.
    """
    columns = [f"{PROB_PREFIX}{label}" for label in labels]
    rows = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        record: dict[str, Any] = {LABEL_COLUMN: labels[best], CONFIDENCE_COLUMN: row[best]}
        record.update(zip(columns, row, strict=True))
        rows.append(record)
    return json.dumps({"predictions": rows})


INVOCATIONS_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "MLflow's scoring formats: exactly one of dataframe_split, dataframe_records, "
        "instances or inputs, each holding a 'text' column. CSV (text/csv, header 'text') and Parquet "
        "(application/vnd.apache.parquet) bodies work too.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "dataframe_split": {
                            "type": "object",
                            "properties": {
                                "columns": {"type": "array", "items": {"type": "string"}},
                                "data": {"type": "array", "items": {"type": "array"}},
                            },
                        },
                        "dataframe_records": {"type": "array", "items": {"type": "object"}},
                        "instances": {"type": "array"},
                        "inputs": {},
                    },
                },
                "examples": {
                    "dataframe_split": {"value": {"dataframe_split": {
                        "columns": ["text"], "data": [["my invoice is wrong"], ["where is my parcel?"]]}}},
                    "dataframe_records": {"value": {"dataframe_records": [{"text": "my invoice is wrong"}]}},
                    "instances": {"value": {"instances": [{"text": "my invoice is wrong"}]}},
                    "inputs": {"value": {"inputs": {"text": ["my invoice is wrong", "where is my parcel?"]}}},
                },
            },
            "text/csv": {"schema": {"type": "string"}, "example": "text\nmy invoice is wrong\n"},
        },
    }
}
