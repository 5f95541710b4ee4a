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

from langops.pyfunc import CONFIDENCE_COLUMN, LABEL_COLUMN, PROB_PREFIX, model_signature, texts_from_input


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
    takes MLflow's own path, so unusual input gets exactly MLflow's answer.

    Raises:
        InvocationError: unsupported content type or charset, a body MLflow cannot parse, input that
            fails the model signature, or a value that is not a string.
    """
    from mlflow.exceptions import MlflowException
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
        texts = _plain_texts(body)
        if texts is not None:
            return InvocationInput(texts=texts)
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
                    f"Ensure that input is a valid UTF-8 encoded string. Error: '{exc!r}'", "BAD_REQUEST"
                ) from exc
            data = mlflow_scoring.parse_csv_input(StringIO(text), schema=input_schema)
        elif mime_type == mlflow_scoring.CONTENT_TYPE_PARQUET:
            data = mlflow_scoring.parse_parquet_input(BytesIO(body))
        else:
            raise InvocationError(
                415, "This predictor only supports the following content types: "
                f"Types: {mlflow_scoring.CONTENT_TYPES}. Got '{content_type}'.", "text/plain",
            )
        try:
            data, _ = _validate_prediction_input(data, None, input_schema, None)
        except MlflowException as exc:
            exc.message = f"Failed to predict data '{data}'. \nError: {exc.message}"
            raise
    except MlflowException as exc:
        raise InvocationError(exc.get_http_status_code(), exc.serialize_as_json()) from exc
    texts = texts_from_input(data)
    bad = [index for index, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise InvocationError(400, mlflow_error(
            f"every 'text' value must be a string; rows {bad[:10]} are not (null or missing)"
        ))
    return InvocationInput(texts=texts)


def _plain_texts(body: bytes) -> list[str] | None:
    """Texts of a JSON body in one of the plain shapes, or None to take MLflow's path.

    Plain shapes: the body's only key is a format whose value holds just strings in a ``text``
    column: ``{"dataframe_split": {"columns": ["text"], "data": [["a"], ...]}}`` (an ``index`` too),
    ``{"dataframe_records": [{"text": "a"}, ...]}``, ``{"instances": ["a", ...]}`` or the same records,
    ``{"inputs": ["a", ...]}`` or ``{"inputs": {"text": ["a", ...]}}``. MLflow turns each into a
    one-column frame of these strings, which is all the pyfunc reads.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or len(payload) != 1:
        return None
    ((form, value),) = payload.items()
    texts: Any = None
    if form == "dataframe_split" and isinstance(value, dict) and value.get("columns") == ["text"]:
        if set(value) <= {"columns", "data", "index"} and isinstance(value.get("data"), list):
            rows = value["data"]
            if all(isinstance(row, list) and len(row) == 1 for row in rows):
                texts = [row[0] for row in rows]
    elif form in ("dataframe_records", "instances") and isinstance(value, list):
        if form == "instances" and all(isinstance(item, str) for item in value):
            texts = value
        elif all(isinstance(item, dict) and len(item) == 1 and "text" in item for item in value):
            texts = [item["text"] for item in value]
    elif form == "inputs":
        if isinstance(value, list):
            texts = value
        elif isinstance(value, dict) and list(value) == ["text"] and isinstance(value["text"], list):
            texts = value["text"]
    if not texts or not all(isinstance(text, str) for text in texts):
        return None
    return texts


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
