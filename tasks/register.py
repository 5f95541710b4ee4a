"""Register: log the compressed model as a pyfunc to the training run and add it as a registry version.

A registry step: its job is writing to MLflow, into the store the caller configured
(``langops.tracking.configure_mlflow``). The version carries its lineage (data, code, params, base model)
and the shipped model's test metrics as tags, so the registry alone answers "what is this model and where
did it come from". It also carries the size and sha256 of every file of the compressed model
(``langops.model_files``), which the server and the promotion gate check their downloads against. A version
is either complete (tagged, described, READY) or absent: any failure after it is created deletes it, and
one whose process was killed before it was complete is deleted by the next langops command.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pandas as pd

from langops.config import RegisterConfig
from langops.faults import crash_point
from langops.io import TEXT, jsonable, read_json, write_json
from langops.metrics import headline
from langops.model_files import FILES_TAG, build_manifest, encode_manifest
from langops.onnx_model import OnnxClassifier
from langops.tasks.compress import CompressionResult

REQUIRED_LINEAGE = ("data_version", "git_commit", "params_hash", "base_model")
MODEL_ARTIFACT_PATH = "model"
METRIC_TAG_PREFIX = "metric."
TRAINING_TEXTS_TAG = "training_texts"  # the hashed train/validation texts shipped in the model's folder
CALIBRATION_TAG = "calibration"  # the shipped model's calibration decision in words; figures as calibration.<key>
READY_TIMEOUT_S = 300.0
RECORD_ENV_VARS = "MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING"
# What the pyfunc imports at load time, pinned to what it was verified with here. langops itself is
# not on a package index: a process loading the model must have it installed (see langops.pyfunc).
PYFUNC_REQUIREMENTS = ("onnxruntime", "tokenizers", "numpy", "pandas")
INPUT_EXAMPLE = ["I was charged twice for my subscription this month.", "Where is my parcel?"]
SUMMARY_FILE = "registration.json"


class RegistrationError(RuntimeError):
    """The registry did not bring the new version to READY."""


@dataclass(frozen=True)
class RegistrationResult:
    model_name: str
    version: str
    model_uri: str
    run_id: str

    @classmethod
    def load(cls, out_dir: Path) -> RegistrationResult:
        """The result as the step left it in ``out_dir`` (for a later stage run on its own)."""
        return cls(**read_json(Path(out_dir) / SUMMARY_FILE))


def register(
    cfg: RegisterConfig,
    *,
    compression: CompressionResult,
    run_id: str,
    lineage: Mapping[str, str],
    out_dir: Path,
    calibration: ShippedCalibration | None = None,
) -> RegistrationResult:
    """Log the compressed model as a pyfunc into run ``run_id`` and register it as a new version.

    Args:
        cfg: the ``register`` section (the registered model's name).
        compression: the compress step's result; its folder is logged whole as the model's artifact.
        run_id: the MLflow run the train step opened.
        lineage: at least ``data_version``, ``git_commit``, ``params_hash`` and ``base_model``; every
            entry becomes a model-version tag.
        out_dir: receives ``registration.json``.

    Returns:
        The new version and its ``models:/<name>/<version>`` URI.

    Raises:
        ValueError: lineage keys are missing, or the file manifest is too long for a tag.
        FileNotFoundError: the compressed dir is incomplete.
        RegistrationError: the version did not become READY (it is deleted first).
    """
    import mlflow  # lazily: a heavy import only the registry steps need
    from mlflow import MlflowClient

    from langops.pyfunc import ARTIFACT_KEY, TextClassifierModel, model_signature
    from langops.tracking import REGISTERING_TAG, environment_kept, owner_tags, reopened_run

    missing = [key for key in REQUIRED_LINEAGE if not lineage.get(key)]
    if missing:
        raise ValueError(f"lineage is missing {missing}; got keys {sorted(lineage)}")
    compressed_dir = compression.out_dir
    # Load before logging anything: a model that cannot load or answer must not reach the registry.
    classifier = OnnxClassifier.load(compressed_dir)
    classifier.predict(INPUT_EXAMPLE)
    tags = {**version_tags(lineage, compression, calibration),
            FILES_TAG: encode_manifest(build_manifest(compressed_dir))}

    # MLflow records which environment variables a model reads by patching os.environ for every thread while
    # it validates the input example, then iterating the names it caught: a Prefect thread reading a variable
    # for the first time in that moment failed the logging ("Set changed size during iteration"). The pyfunc
    # reads none, so there is nothing to record.
    with reopened_run(run_id), environment_kept((RECORD_ENV_VARS,)):
        os.environ[RECORD_ENV_VARS] = "false"
        logged = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=TextClassifierModel(),
            artifacts={ARTIFACT_KEY: str(compressed_dir)},
            signature=model_signature(classifier.labels),
            input_example=pd.DataFrame({TEXT: INPUT_EXAMPLE}),
            pip_requirements=[f"{name}=={installed_version(name)}" for name in PYFUNC_REQUIREMENTS],
        )
    crash_point("register:logged")
    # Lineage and file manifest are written with the version itself, so no version ever exists without them.
    # REGISTERING_TAG (its owner process) comes off last: a version that still has it was left unfinished
    # by a process that died, and the next command deletes it (langops.tracking.clean_up_after_dead_processes).
    unfinished = {**tags, REGISTERING_TAG: json.dumps(owner_tags())}
    created = mlflow.register_model(logged.model_uri, cfg.model_name, await_registration_for=0, tags=unfinished)
    client = MlflowClient()
    try:
        crash_point("register:created")
        client.update_model_version(
            cfg.model_name,
            created.version,
            description=describe_version(classifier.labels, compression, lineage, run_id),
        )
        await_ready(client, cfg.model_name, created.version)
        client.delete_model_version_tag(cfg.model_name, created.version, REGISTERING_TAG)
    except BaseException:
        client.delete_model_version(cfg.model_name, created.version)
        raise
    result = RegistrationResult(
        model_name=cfg.model_name,
        version=str(created.version),
        model_uri=f"models:/{cfg.model_name}/{created.version}",
        run_id=run_id,
    )
    write_json(Path(out_dir) / SUMMARY_FILE, jsonable(asdict(result)))
    return result


@dataclass(frozen=True)
class ShippedCalibration:
    """What calibration decided for the model that ships (the trained model, or the student in its place):
    validation ECE of its own probabilities and of the cross-fitted temperature's, and the temperature folded."""

    decision: str
    temperature: float
    val_ece_uncalibrated: float | None
    val_ece_cross_fitted: float | None

    def tags(self) -> dict[str, str]:
        figures = {"temperature": self.temperature, "val_ece_uncalibrated": self.val_ece_uncalibrated,
                   "val_ece_cross_fitted": self.val_ece_cross_fitted}
        return {CALIBRATION_TAG: self.decision[:5000],
                **{f"{CALIBRATION_TAG}.{key}": repr(value) for key, value in figures.items() if value is not None}}


def version_tags(
    lineage: Mapping[str, str], compression: CompressionResult, calibration: ShippedCalibration | None = None
) -> dict[str, str]:
    """Lineage as is, the shipped model's headline test metrics as ``metric.<name>`` (its test ECE among
    them), its precision, and its calibration decision with the validation ECE before and after."""
    tags = {key: str(value) for key, value in lineage.items()}
    tags.update(
        {f"{METRIC_TAG_PREFIX}{name}": repr(value) for name, value in headline(compression.metrics).items()}
    )
    tags["quantized"] = str(compression.quantized).lower()
    if compression.training_texts is not None:
        manifest = compression.training_texts
        counts = ", ".join(f"{split} {n}" for split, n in manifest["texts"].items())
        tags[TRAINING_TEXTS_TAG] = f"{manifest['file']} sha256 {manifest['sha256']} ({counts} texts)"
    if calibration is not None:
        tags.update(calibration.tags())
    return tags


def describe_version(
    labels: list[str], compression: CompressionResult, lineage: Mapping[str, str], run_id: str
) -> str:
    """A one-paragraph human summary for the registry UI; the tags hold the same facts for machines."""
    metrics = compression.metrics
    precision = compression.shipped
    return (
        f"{lineage['base_model']} text classifier over {len(labels)} labels ({', '.join(labels)}), "
        f"{precision} ONNX. Test macro-F1 {metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f} "
        f"on {metrics['rows']} rows. Trained in run {run_id} on data {lineage['data_version']} "
        f"at commit {lineage['git_commit']}."
    )


def await_ready(client: Any, name: str, version: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll until the version is READY (remote registries copy artifacts asynchronously).

    Raises:
        RegistrationError: the registry reports FAILED_REGISTRATION, or READY does not come in time.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return
        if current.status == "FAILED_REGISTRATION":
            raise RegistrationError(f"{name} version {version} failed to register: {current.status_message}")
        if time.monotonic() > deadline:
            raise RegistrationError(
                f"{name} version {version} still {current.status} after {timeout_s:.0f} s"
            )
        time.sleep(1.0)
