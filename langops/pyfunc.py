"""The registered model's MLflow face: a pyfunc that scores texts with the compressed ONNX classifier.

The logged model carries the whole compressed dir as its one artifact and this class as code, so
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"text": [...]}))`` works in
any process where langops is installed, and scores exactly what the gate judged and the server serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema

from langops.io import TEXT
from langops.onnx_model import OnnxClassifier

ARTIFACT_KEY = "compressed"
LABEL_COLUMN = "label"
CONFIDENCE_COLUMN = "confidence"
PROB_PREFIX = "prob_"


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """Texts in (a ``text`` column), one row out per text: label, confidence and ``prob_<label>`` columns.

    It holds no state until ``load_context``, so MLflow pickles it as a mere reference to this class.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self._classifier = OnnxClassifier.load(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score a DataFrame with a ``text`` column, a Series, or a list of strings.

        Through ``mlflow.pyfunc.load_model`` MLflow enforces the signature first, so callers there pass
        a DataFrame (or a Series named ``text``); lists arrive only when the model is called directly.
        """
        probs = self._classifier.predict_proba(texts_from_input(model_input))
        return predictions_frame(probs, self._classifier.labels)


def texts_from_input(model_input: Any) -> list[str]:
    """The texts to score from what a pyfunc caller may pass.

    Raises:
        ValueError: a DataFrame without a ``text`` column.
        TypeError: anything that is not a DataFrame, Series, or list of strings.
    """
    if isinstance(model_input, pd.DataFrame):
        if TEXT not in model_input.columns:
            raise ValueError(f"input DataFrame needs a {TEXT!r} column; got {list(model_input.columns)}")
        return model_input[TEXT].tolist()
    if isinstance(model_input, (pd.Series, np.ndarray)):
        return list(model_input)
    if isinstance(model_input, list):
        return model_input
    raise TypeError(
        f"expected a DataFrame with a {TEXT!r} column, a Series or a list of str; "
        f"got {type(model_input).__name__}"
    )


def predictions_frame(probs: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """The output table: ``label``, ``confidence`` (its probability), then one ``prob_<label>`` per class."""
    columns = {
        LABEL_COLUMN: [labels[i] for i in probs.argmax(axis=1)],
        CONFIDENCE_COLUMN: probs.max(axis=1),
    }
    columns.update({f"{PROB_PREFIX}{label}": probs[:, i] for i, label in enumerate(labels)})
    return pd.DataFrame(columns)


def model_signature(labels: Sequence[str]) -> ModelSignature:
    """Input: one string column ``text``. Output: the columns of ``predictions_frame`` for these labels."""
    outputs = [ColSpec(DataType.string, LABEL_COLUMN), ColSpec(DataType.double, CONFIDENCE_COLUMN)]
    outputs += [ColSpec(DataType.double, f"{PROB_PREFIX}{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, TEXT)]), outputs=Schema(outputs))
