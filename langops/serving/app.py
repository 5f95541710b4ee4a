"""The prediction server: an ASGI app that serves one model and follows its registry alias.

The live model is a single reference. A background poller (and ``POST /reload``) loads a new version
beside it, checks it answers a smoke prediction, and only then replaces the reference; each request
keeps the model it started with. So a swap never fails a request, and a version that cannot load or
answer is refused while the old one keeps serving. When nothing is live yet (a start or a restart) and
the alias's version is refused, the server falls back to the last good version rather than serve nothing,
says so on ``/ready`` and ``/version``, and swaps to the alias's version once it loads.

Requests are scored through a micro-batcher (``batching``): concurrent texts share one onnxruntime
call, the queue of waiting texts is bounded (503 with ``Retry-After`` beyond it), and on shutdown
queued batches are scored before the process exits.

Every request gets an id from the server (``X-Request-Id`` of the response), whatever the client sent in its
own ``X-Request-Id`` (kept as ``client_request_id``): its texts are ``<id>-<index>``, which is what the
prediction log records and what ``/feedback`` names. The ids issued are recorded where every worker can
check them (``issued_ids``), so feedback for an id never issued, or for a client's id several texts
carry, is refused instead of landing on the wrong text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from langops.aliases import CHAMPION
from langops.config import DeployConfig, ServerConfig
from langops.prediction_records import text_id
from langops.serving.batching import MicroBatcher, Overloaded, ShuttingDown
from langops.serving.metrics import ServerMetrics
from langops.serving.middleware import (
    DOCS_ASSETS,
    ROLE_HEADER,
    VERSION_HEADER,
    ServingMiddleware,
    error_body,
)
from langops.serving.registry import (
    LocalModelSource,
    ModelSource,
    ModelSourceError,
    PinnedModelSource,
    Source,
)
from langops.serving.request_json import JsonTooComplex, load_json
from langops.serving.rollout import CHALLENGER_ROLE, CHAMPION_ROLE, RolloutActions, RolloutController
from langops.text_checks import BLANK_DESCRIPTION, is_blank

if TYPE_CHECKING:
    from langops.config import Params
    from langops.onnx_model import OnnxClassifier, Scores
    from langops.serving.fleet_windows import FleetWindows
    from langops.serving.issued_ids import IssuedIds, Lookup
    from langops.serving.prediction_log import FeedbackLog, PredictionLog

logger = logging.getLogger(__name__)

SERVICE = "langops-serving"
SMOKE_TEXT = "smoke test: is this model able to answer?"
SETTINGS_ENV = "LANGOPS_SERVER_SETTINGS"  # JSON settings handed to uvicorn worker processes
INLINE_PARSE_BYTES = 32_768  # bigger /invocations bodies are parsed on a thread, off the event loop
INDEX_WAIT_S = 1.0  # longest a scored request waits for its ids to be recorded before answering anyway
__all__ = ["SERVICE", "VERSION_HEADER", "ServerSettings", "app_from_env", "create_app"]


SERVER_DIR = "server"  # under <state_dir>: the deployed server's pid file, log, settings, downloads and predictions
MODEL_CACHE_DIR = "models"  # under SERVER_DIR
PREDICTION_LOG_DIR = "predictions"  # under SERVER_DIR


class ServerSettings(ServerConfig):
    """What to serve, on top of how (``ServerConfig``: bind address, workers, batching, limits, auth, log).

    The model is a registered one (following its ``alias``, or a pinned ``version``) or a compressed dir.
    With ``model_dir`` the registry settings are ignored and ``model_name`` only labels the responses.
    A server process gets these whole, as the JSON of ``model_dump_json()`` (``python -m langops.serving
    --settings FILE``; uvicorn workers in ``LANGOPS_SERVER_SETTINGS``).
    """

    tracking_uri: str | None = Field(None, description="MLflow tracking and registry URI")
    model_name: str | None = Field(None, description="registered model to serve")
    alias: str = Field(CHAMPION, description="registry alias to follow")
    version: str | None = Field(None, description="serve this registered version instead of following the alias")
    model_dir: Path | None = Field(None, description="serve this compressed dir instead of the registry")
    prediction_log_dir: Path | None = Field(None, description="write the prediction log here (unset: no log)")
    cache_dir: Path | None = Field(None, description="where registry downloads are kept (default: temp dir)")
    state_dir: Path | None = Field(
        None, description="the project's state folder: the champion lock a canary's promotion takes "
        "(default: the folder of a sqlite tracking store)",
    )
    experiment: str = Field("langops", description="tracking.experiment: rollout steps go to <experiment>-promotions")

    @model_validator(mode="after")
    def _one_source(self) -> ServerSettings:
        if self.model_dir is None and not (self.tracking_uri and self.model_name):
            raise ValueError("give either model_dir, or both tracking_uri and model_name")
        return self

    @classmethod
    def from_deploy(cls, deploy: DeployConfig, *, state_dir: Path, **serve: Any) -> ServerSettings:
        """The settings params.yaml's ``deploy:`` section asks for, serving what ``serve`` names.

        Every ``ServerConfig`` field is taken from ``deploy`` whole; registry downloads go to
        ``<state_dir>/server/models`` and, with ``deploy.prediction_log``, the log to ``<state_dir>/server/predictions``.
        ``serve`` names the model (``tracking_uri``, ``model_name``, ``alias``, ``version`` or ``model_dir``) and
        may override any other field (``langops serve --port 9000``).

        Raises:
            pydantic.ValidationError: a value is out of range, or no model is named.
        """
        server_dir = Path(state_dir) / SERVER_DIR
        values: dict[str, Any] = {
            **deploy.model_dump(include=set(ServerConfig.model_fields)),
            "cache_dir": server_dir / MODEL_CACHE_DIR,
            "state_dir": Path(state_dir),
            "prediction_log_dir": server_dir / PREDICTION_LOG_DIR if deploy.prediction_log else None,
        }
        return cls(**{**values, **serve})

    def tuning(self) -> dict[str, Any]:
        """How the server runs (the ``ServerConfig`` fields), as JSON values: what ``/version`` reports (the
        store's password hidden)."""
        from langops.fleet_store import redacted

        tuning = self.model_dump(mode="json", include=set(ServerConfig.model_fields))
        store = self.prediction_store_url()
        tuning["prediction_store"] = None if store is None else redacted(store)
        return tuning

    def fingerprint(self) -> str:
        """A short hash of every setting: equal fingerprints, same settings (``/version`` reports it)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def build_source(self) -> Source:
        """The compressed dir when ``model_dir`` is set (it wins over the registry), else the registry."""
        if self.model_dir is not None:
            return LocalModelSource(self.model_dir, model_name=self.model_name)
        assert self.tracking_uri and self.model_name  # guaranteed by _one_source
        cache_dir = self.cache_dir or Path(tempfile.gettempdir()) / SERVICE
        if self.version is not None:
            return PinnedModelSource(self.tracking_uri, self.model_name, self.version, cache_dir=cache_dir)
        return ModelSource(self.tracking_uri, self.model_name, alias=self.alias, cache_dir=cache_dir)

    def follows_alias(self) -> bool:
        """Serving a registry alias (not a folder, not a pinned version): the only kind that runs rollouts."""
        return self.model_dir is None and self.version is None

    def rollout_params(self) -> Params:
        """The project settings a canary's registry steps need: the store, its lock, the promotion log.

        Raises:
            ValueError: no ``state_dir`` and a tracking store that is not a local SQLite file.
        """
        from langops.config import parse_params

        assert self.tracking_uri and self.model_name
        state_dir = self.state_dir
        if state_dir is None:
            if not self.tracking_uri.startswith("sqlite:///"):
                raise ValueError("a server of a remote tracking store needs state_dir to run canaries")
            state_dir = Path(self.tracking_uri.removeprefix("sqlite:///")).parent
        raw: dict[str, Any] = {"project": {"state_dir": str(state_dir)}, "tracking": {"experiment": self.experiment},
                               "register": {"model_name": self.model_name}}
        params = parse_params(raw).resolved(Path(state_dir))
        if params.tracking_uri() != self.tracking_uri:
            raw["tracking"]["uri"] = self.tracking_uri
            params = parse_params(raw).resolved(Path(state_dir))
        return params

    def onnx_threads(self) -> int:
        """Intra-op threads per worker: as set, else the physical cores shared among the workers."""
        if self.num_threads is not None:
            return self.num_threads
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return max(1, cores // self.workers)


def parse_model_uri(uri: str) -> dict[str, Any]:
    """Settings for ``models:/name@alias``, ``models:/name/<version>`` or a compressed dir's path.

    Raises:
        ValueError: a ``models:/`` URI of another shape (``latest``, stages, no name).
    """
    if not uri.startswith("models:/"):
        return {"model_dir": Path(uri.removeprefix("file://"))}
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return {"model_name": name, "alias": alias}
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return {"model_name": name, "version": version}
    raise ValueError(f"model URI {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a folder")


class ModelRejected(RuntimeError):
    """A loaded model gave a smoke prediction that cannot be right (wrong labels, bad probabilities)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model that loaded and answered its smoke prediction: the only kind requests ever see."""

    classifier: OnnxClassifier
    name: str
    version: str
    loaded_at: str


@dataclass(frozen=True)
class Refresh:
    """What one check of the alias did: ``target`` is what the alias names, ``refused`` why it is not live."""

    old_version: str | None
    new_version: str | None
    target: str
    refused: str | None = None

    @property
    def swapped(self) -> bool:
        return self.old_version != self.new_version


class ModelHolder:
    """Holds the live model and replaces it only with a version that loaded and answered.

    Versions that failed are remembered with their reason, so the poller does not download and load a
    broken version every few seconds; an explicit reload retries them. Writers hold a lock and replace
    ``_current`` and ``_refused`` wholesale, so readers (requests, /version) never wait or see half an update.

    With nothing live, a refused alias version makes the holder try the source's ``fallback_versions``
    (last served here, then earlier champions): an old good model beats none. ``fallback_for`` then
    names the alias's version it stands in for, until the alias names a version that loads.
    """

    def __init__(self, source: Source, *, num_threads: int) -> None:
        self.source = source
        self.num_threads = num_threads
        self._current: LoadedModel | None = None
        self._refused: dict[str, str] = {}
        self._last_error: str | None = None
        self._fallback_for: str | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def refused(self) -> Mapping[str, str]:
        return self._refused

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def fallback_for(self) -> str | None:
        """The alias's version, refused, that the live model stands in for; None when it is the alias's."""
        return self._fallback_for

    def refresh(self, *, retry_refused: bool) -> Refresh:
        """Make the alias's version live if it is new and works; otherwise keep the current model.

        Raises:
            ModelSourceError: the source cannot say which version is current (registry down, no alias).
        """
        with self._lock:
            old = self._current.version if self._current else None
            try:
                target = self.source.current_version()
            except ModelSourceError as exc:
                self._last_error = str(exc)
                raise
            if target == old:
                self._fallback_for = None
                return Refresh(old, old, target)
            if target in self._refused and not retry_refused:
                if self._fallback_for is not None:  # the fallback now stands in for this version
                    self._fallback_for = target
                return Refresh(old, old, target, refused=self._refused[target])
            try:
                candidate = self._load(target)
            except Exception as exc:  # whatever breaks a candidate, the live model stays
                reason = self._refuse(target, exc)
                self._last_error = f"version {target} refused: {reason}"
                if self._current is None:
                    self._fall_back(target)
                elif self._fallback_for is not None:
                    self._fallback_for = target
                new = self._current.version if self._current else None
                return Refresh(old, new, target, refused=reason)
            self._go_live(candidate, fallback_for=None)
            self._refused = {version: why for version, why in self._refused.items() if version != target}
            self._last_error = None
            logger.info("now serving %s version %s (was %s)", candidate.name, target, old or "nothing")
            return Refresh(old, target, target)

    def _refuse(self, version: str, exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        self._refused = {**self._refused, version: reason}
        logger.error("refused %s version %s, still serving %s: %s", self.source.model_name, version,
                     self._current.version if self._current else "nothing", reason, exc_info=exc)
        return reason

    def _fall_back(self, refused: str) -> None:
        """Serve the first earlier good version that loads, standing in for the refused ``refused``."""
        try:
            versions = [version for version in self.source.fallback_versions() if version != refused]
        except ModelSourceError as exc:
            logger.error("no fallback for refused version %s: %s", refused, exc)
            return
        for version in versions:
            try:
                candidate = self._load(version)
            except Exception as exc:  # try the next one
                self._refuse(version, exc)
                continue
            self._go_live(candidate, fallback_for=refused)
            logger.warning("version %s refused and nothing was live: serving %s version %s instead",
                           refused, candidate.name, version)
            return
        logger.error("version %s refused and no earlier version loads (tried %s)", refused, versions)

    def _go_live(self, candidate: LoadedModel, *, fallback_for: str | None) -> None:
        """Make ``candidate`` live and remember it, so a restart can fall back to it."""
        self._fallback_for = fallback_for  # first: /ready never pairs a fallback note with the alias's version
        self._current = candidate
        try:
            self.source.record_served(candidate.version)
        except (ModelSourceError, OSError) as exc:  # serving goes on; only a later fallback loses this hint
            logger.warning("cannot record version %s as last served: %s", candidate.version, exc)

    def load_version(self, version: str, num_threads: int) -> LoadedModel:
        """Load ``version`` beside the live model (a challenger), smoke-checked; nothing goes live.

        Raises:
            ModelSourceError, ModelRejected, and whatever loading a broken model raises.
        """
        return self._load(version, num_threads=num_threads)

    def _load(self, version: str, *, num_threads: int | None = None) -> LoadedModel:
        classifier = load_serving_classifier(self.source.fetch(version), num_threads=num_threads or self.num_threads)
        check_smoke_prediction(classifier)
        return LoadedModel(
            classifier=classifier,
            name=self.source.model_name,
            version=version,
            loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )


def load_serving_classifier(directory: Path, *, num_threads: int) -> OnnxClassifier:
    """The compressed model with an onnxruntime session tuned for a server.

    ``OnnxClassifier.load`` checks the folder, graph and labels; the session is then rebuilt with
    spinning off: idle intra-op threads that spin between batches take the cores the event loop needs
    to read the next requests, which on a small machine costs more than waking the threads does.

    Raises:
        FileNotFoundError, ValueError: as ``OnnxClassifier.load``.
    """
    import onnxruntime as ort

    from langops.onnx_model import MODEL_FILE, SERVING_FILE, TOKENIZER_FILE, OnnxClassifier, load_tokenizer

    checked = OnnxClassifier.load(directory, num_threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(Path(directory) / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    pad_token = json.loads((Path(directory) / SERVING_FILE).read_text())["pad_token"]
    tokenizer = load_tokenizer(Path(directory) / TOKENIZER_FILE, max_length=checked.max_length, pad_token=pad_token)
    return OnnxClassifier(session, tokenizer, checked.labels, checked.max_length, projection=checked.projection)


def check_smoke_prediction(classifier: OnnxClassifier) -> None:
    """Predict one text and check the answer is a distribution over the model's own labels.

    Raises:
        ModelRejected: the answer has the wrong shape, an unknown label or probabilities not summing to 1.
    """
    answer = classifier.predict([SMOKE_TEXT])
    if len(answer) != 1:
        raise ModelRejected(f"smoke prediction returned {len(answer)} answers for 1 text")
    label, probabilities = answer[0]["label"], answer[0]["probabilities"]
    if label not in classifier.labels or set(probabilities) != set(classifier.labels):
        raise ModelRejected(f"smoke prediction {answer[0]} does not match the labels {classifier.labels}")
    total = sum(float(p) for p in probabilities.values())
    if not all(math.isfinite(float(p)) for p in probabilities.values()) or abs(total - 1.0) > 1e-3:
        raise ModelRejected(f"smoke prediction probabilities are not a distribution: {probabilities}")


class AliasPoller:
    """A daemon thread that checks the alias every ``poll_seconds``, starting at once.

    Registry calls and model loading block, so they run here rather than on the event loop, and the
    first check loads the initial model while the server already answers ``/health``.
    """

    def __init__(self, holder: ModelHolder, poll_seconds: float,
                 followers: tuple[Callable[[], None], ...] = ()) -> None:
        self.holder = holder
        self.followers = followers  # also called on each poll (the rollout, the cache check)
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="langops-alias-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.holder.refresh(retry_refused=False)
            except ModelSourceError as exc:
                logger.warning("alias check failed, keeping the current model: %s", exc)
            except Exception:  # an unexpected error must not end the poller for good
                logger.exception("alias check crashed, keeping the current model")
            for follow in self.followers:
                try:
                    follow()
                except Exception as exc:  # noqa: BLE001 - the registry is down: keep what runs
                    logger.warning("%s failed, keeping what runs: %r",
                                   getattr(follow, "__qualname__", type(follow).__name__), exc)
            if self._stop.wait(self.poll_seconds):
                return


class CacheCheck:
    """Checks the cached copy of the live model every ``every_s`` (called on each poll), repairing a damaged one.

    The live model answers from memory, so damage on disk would otherwise surface only at its next load,
    which then waits for a download; see ``langops.serving.registry.repair_cached_copy``.
    """

    def __init__(self, holder: ModelHolder, *, every_s: float, on_repair: Callable[[], None]) -> None:
        self.holder = holder
        self.every_s = every_s
        self.on_repair = on_repair
        self._due = time.monotonic() + every_s  # the first load has just checked it

    def __call__(self) -> None:
        if time.monotonic() < self._due:
            return
        self._due = time.monotonic() + self.every_s
        live = self.holder.current
        if live is None:
            return
        problems = self.holder.source.repair_cached(live.version)
        if problems:
            self.on_repair()
            logger.warning("the cached copy of %s version %s was damaged and is downloaded again (still serving "
                           "from memory): %s", live.name, live.version, "; ".join(problems))


class PredictRequest(BaseModel):
    """Either one ``text`` or a list of ``texts``; unknown fields are refused so typos are not ignored."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["I was charged twice this month", "where is my parcel?"]},
                                        {"text": "the app crashes when I log in"}]},
    )

    texts: list[StrictStr] | None = Field(None, description="texts to classify")
    text: StrictStr | None = Field(None, description="one text to classify")

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if (self.texts is None) == (self.text is None):
            raise ValueError('send either "text" (one string) or "texts" (a list of strings), not both')
        if self.texts == []:
            raise ValueError('"texts" is empty: send at least one text')
        for index, text in enumerate(self.all_texts()):
            if is_blank(text):
                raise ValueError(f"text {index} is empty ({BLANK_DESCRIPTION})")
        return self

    def all_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text or ""]


class FeedbackItem(BaseModel):
    """A label for one scored text, named by the id the server gave it."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(
        description="the text's id as the server issued it: '<X-Request-Id of the response>-<index of the text "
        "in the request>' (predictions[].request_id of /predict), or the issued X-Request-Id of a request of one "
        "text. The client's own X-Request-Id (or '<it>-<index>') is accepted only while exactly one scored text "
        "carries it", max_length=80,
    )
    label: StrictStr = Field(description="the true label: one of the served model's labels", max_length=200)
    force: StrictBool = Field(False, description="replace a label given to this text before (without it, a "
                              "different label for a text already labelled is refused with 409)")


EXAMPLE_ID = "0192f3a1b2c4d5e6f708192a3b4c5d6e"
FEEDBACK_EXAMPLES = {
    "one": {"summary": "one label", "value": {"request_id": f"{EXAMPLE_ID}-0", "label": "billing"}},
    "list": {"summary": "several labels", "value": [
        {"request_id": f"{EXAMPLE_ID}-0", "label": "billing"},
        {"request_id": f"{EXAMPLE_ID}-1", "label": "shipping"}]},
}


class FeedbackResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"accepted": 1, "request_ids": [f"{EXAMPLE_ID}-1"]}]})

    accepted: int = Field(description="labels queued for the feedback log")
    request_ids: list[str] = Field(description="the issued id of the text each label was recorded for, in request "
                                   "order")


class Prediction(BaseModel):
    request_id: str = Field(description="the text's id, '<request_id>-<index>': what /feedback names")
    label: str = Field(description="the most probable label")
    confidence: float = Field(description="probability of that label")
    probabilities: dict[str, float] = Field(description="probability of every label")


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_name": "langops-classifier", "version": "3", "request_id": EXAMPLE_ID, "client_request_id": "order-4711",
        "predictions": [{"request_id": f"{EXAMPLE_ID}-0", "label": "billing", "confidence": 0.91,
                         "probabilities": {"billing": 0.91, "shipping": 0.05, "other": 0.04}}]}]})

    model_name: str
    version: str = Field(description="the model version that answered (also in X-Model-Version)")
    request_id: str = Field(description="the id the server issued for this request (also in X-Request-Id)")
    client_request_id: str | None = Field(
        description="the client's own X-Request-Id, when it sent a usable one (also in X-Client-Request-Id)"
    )
    predictions: list[Prediction] = Field(description="one per text, in request order")


class InvocationsResponse(BaseModel):
    """What ``mlflow models serve`` answers for the registered pyfunc: one row per text."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"predictions": [
        {"label": "billing", "confidence": 0.91, "prob_billing": 0.91, "prob_other": 0.04,
         "prob_shipping": 0.05}]}]})

    predictions: list[dict[str, str | float]] = Field(
        description="rows with label, confidence and one prob_<label> column per class"
    )


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong")


class MlflowErrorResponse(BaseModel):
    error_code: str
    message: str


class HealthResponse(BaseModel):
    status: str
    service: str


class ReadyResponse(BaseModel):
    ready: bool
    version: str | None = None
    detail: str | None = Field(None, description="why not ready, or why a fallback version is served")


class VersionResponse(BaseModel):
    model_name: str
    version: str | None
    alias: str | None
    source: str
    loaded_at: str | None
    refused: dict[str, str]
    fallback_for: str | None = Field(
        description="the alias's version, refused, that the served fallback stands in for (null: none)"
    )
    settings: dict[str, Any] = Field(description="how the server runs: workers, batching, limits, auth variable, log")
    settings_fingerprint: str = Field(description="hash of every setting; deploy restarts the server when it differs")


class RequestRefused(Exception):
    """A request answered with an error before or instead of scoring (status, message, extra headers)."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers or {}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "body is not UTF-8 JSON"},
    401: {"model": ErrorResponse, "description": "bearer token missing or wrong (when auth is on)"},
    413: {"model": ErrorResponse, "description": "body, text count or text length over the limit"},
    422: {"model": ErrorResponse, "description": "JSON of the wrong shape; the message names the field"},
    503: {"model": ErrorResponse, "description": "no model yet, overloaded (with Retry-After), or shutting down"},
}


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the server for ``settings``; the model loads in the background once the app starts.

    The bearer token is read from the environment variable ``settings.auth_token_env`` here, once.
    """
    holder = ModelHolder(settings.build_source(), num_threads=settings.onnx_threads())
    tuning, fingerprint = settings.tuning(), settings.fingerprint()
    metrics = ServerMetrics()
    batcher = MicroBatcher(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        on_batch=metrics.batch_size.observe,
        on_queue=metrics.queue_depth.set,
    )
    rollout = RolloutController(
        settings.rollout, champion=lambda: holder.current, load=holder.load_version, metrics=metrics,
        actions=RolloutActions(settings.rollout_params) if settings.follows_alias() else None,
        num_threads=settings.onnx_threads(), max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
        on_promoted=lambda: _refresh_quietly(holder), fleet=_fleet_windows(settings),
    )
    prediction_log: list[PredictionLog] = []  # filled while the app runs
    feedback_log: list[FeedbackLog] = []
    issued_ids: list[IssuedIds] = []
    index_broken: list[str] = []  # why the index of issued ids could not be opened

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if settings.prediction_log_dir is not None:
            # Predictions are served without the log and the index (a store that does not answer, a broken
            # file); the failure is logged, and feedback is refused saying why.
            try:
                prediction_log.append(_open_prediction_log(settings, metrics))
            except Exception:
                logger.exception("cannot open the prediction log: predictions are served but not logged")
            try:
                feedback_log.append(_open_feedback_log(settings))
                issued_ids.append(_open_issued_ids(settings))
            except Exception as exc:
                index_broken.append(_short_error(exc))
                logger.exception("cannot open the index of issued ids: feedback will be refused (503)")
        rollout.start()
        cache_check = CacheCheck(holder, every_s=settings.cache_check_s, on_repair=metrics.cache_repairs.inc)
        poller = AliasPoller(holder, settings.poll_seconds, followers=(rollout.refresh, cache_check))
        poller.start()
        try:
            yield
        finally:
            await batcher.close()  # requests still queued are scored before the process exits
            poller.stop()
            await rollout.close()
            for log in prediction_log:
                log.close()
            for feedback in feedback_log:
                feedback.close()
            for index in issued_ids:  # last: requests scored during shutdown still record their ids
                index.close()
            metrics.close()

    app = FastAPI(
        title="langops text classifier",
        description="Scores texts with the served langops model (int8 ONNX). `/invocations` speaks MLflow's "
        "scoring protocol; `/predict` is the compact native form. When the server runs with a token, "
        "every endpoint but `/health` needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load Swagger UI from a CDN; /docs below serves it from here
        redoc_url=None,
    )
    _serve_docs_offline(app)
    app.add_middleware(
        ServingMiddleware,
        metrics=metrics,
        live_version=lambda: holder.current.version if holder.current else None,
        token=os.environ.get(settings.auth_token_env) or None,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
    )

    @app.exception_handler(RequestRefused)
    async def _refused(request: Request, exc: RequestRefused) -> Response:
        return Response(error_body(request.url.path, exc.message, exc.status_code), exc.status_code,
                        headers=exc.headers, media_type="application/json")

    async def score(texts: list[str], endpoint: str, request: Request) -> tuple[LoadedModel, Scores, str]:
        """Scores from the live model through the batcher, counted and logged under the request's issued id,
        which is recorded for feedback before the answer goes out; refusals become RequestRefused.

        While a canary runs, the requests in its share are answered by the challenger instead; when the
        challenger fails or is too slow, by the champion. Returns the model that answered and its role.
        """
        request_id, client_request_id = request.state.request_id, request.state.client_request_id
        answer = await score_texts(texts, endpoint, request_id, client_request_id,
                                   request.headers.get(settings.rollout.route_header))
        if texts:
            await remember_ids(request_id, client_request_id, texts)
        return answer

    async def score_texts(texts: list[str], endpoint: str, request_id: str, client_request_id: str | None,
                          route_header: str | None) -> tuple[LoadedModel, Scores, str]:
        if len(texts) > settings.max_request_texts:
            raise RequestRefused(413, f"{len(texts)} texts in one request; the limit is {settings.max_request_texts}")
        for index, text in enumerate(texts):
            if len(text) > settings.max_text_chars:
                raise RequestRefused(
                    413, f"text {index} has {len(text)} characters; the limit is {settings.max_text_chars}"
                )
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:  # a lone surrogate escaped in JSON ("\ud800")
                    raise RequestRefused(400, f"text {index} is not valid Unicode: {exc.reason} at {exc.start}") from exc
        live = holder.current  # this request keeps this model even if a swap happens meanwhile
        if live is None:
            raise RequestRefused(503, holder.last_error or "no model loaded yet")
        if not texts:  # MLflow's formats allow an empty list, which the pyfunc answers with no rows
            return live, live.classifier.score([]), CHAMPION_ROLE
        canary = rollout.canary_for(route_header, texts) if rollout.rollout is not None else None
        if canary is not None:
            challenger, scorer = canary
            answer = await rollout.score_canary(challenger, scorer, texts, request_id)
            if answer is not None:
                record(endpoint, request_id, client_request_id, challenger, texts, answer)
                rollout.mirror_to_champion(texts, request_id, challenger, answer)
                return challenger, answer, CHALLENGER_ROLE
        started = time.perf_counter()
        try:
            scores = await batcher.score(live.classifier, texts)
        except Overloaded as exc:
            raise RequestRefused(503, str(exc), {"Retry-After": str(settings.retry_after_s)}) from exc
        except ShuttingDown as exc:
            raise RequestRefused(503, str(exc), {"Connection": "close"}) from exc
        record(endpoint, request_id, client_request_id, live, texts, scores)
        if rollout.rollout is not None:
            rollout.observe_champion(live, texts, scores, (time.perf_counter() - started) * 1000, request_id)
        return live, scores, CHAMPION_ROLE

    def record(endpoint: str, request_id: str, client_request_id: str | None, answered: LoadedModel,
               texts: list[str], scores: Scores) -> None:
        """Count and log the answer under the version that gave it."""
        metrics.texts.labels(endpoint).inc(len(texts))
        best = scores.probs.argmax(axis=1)
        metrics.observe_predictions(answered.version, answered.classifier.labels, best.tolist(),
                                    scores.probs[np.arange(len(best)), best].tolist())
        for log in prediction_log:
            log.record(request_id=request_id, client_request_id=client_request_id, endpoint=endpoint,
                       model_name=answered.name, version=answered.version, texts=texts,
                       labels=answered.classifier.labels, scores=scores)

    async def remember_ids(request_id: str, client_request_id: str | None, texts: list[str]) -> None:
        """Record the request's issued id for feedback (with its texts under ``prediction_log_text: labelled``)
        and wait until it is written (one short transaction, so feedback sent on the answer finds it on any
        worker). A failure is counted, never the request's."""
        if not issued_ids:
            return
        kept = texts if settings.prediction_log_text == "labelled" else len(texts)
        written = issued_ids[0].add(request_id, client_request_id, kept)
        if written is None:
            metrics.issued_ids_unrecorded.labels("queue_full").inc()
            return
        try:
            if not await asyncio.wait_for(asyncio.wrap_future(written), INDEX_WAIT_S):
                metrics.issued_ids_unrecorded.labels("error").inc()
        except asyncio.TimeoutError:
            metrics.issued_ids_unrecorded.labels("late").inc()  # still queued: it is written a little later

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, str]:
        """The process is up; says nothing about the model (see /ready). Never needs a token."""
        return {"status": "ok", "service": SERVICE}

    @app.get("/ping", response_model=HealthResponse)
    async def ping() -> dict[str, str]:
        """``/health`` under the name MLflow clients poll (``mlflow models serve`` answers both)."""
        return {"status": "ok", "service": SERVICE}

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready() -> JSONResponse:
        """200 once a model is loaded and has answered a smoke prediction, else 503 with the reason.

        A fallback is ready too (it answers), with a ``detail`` saying which version it stands in for.
        """
        live, refused = holder.current, holder.fallback_for
        if live is None:
            detail = holder.last_error or "no model loaded yet"
            return JSONResponse({"ready": False, "detail": detail}, status_code=503)
        if refused is not None:
            reason = holder.refused.get(refused, "reason unknown")
            detail = (f"{holder.source.model_name}@{holder.source.alias} names version {refused}, which was "
                      f"refused ({reason}); falling back to version {live.version}")
            return JSONResponse({"ready": True, "version": live.version, "detail": detail})
        return JSONResponse({"ready": True, "version": live.version})

    for path, probe in (("/health", health), ("/ping", ping), ("/ready", ready)):  # the GET answer, no body
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> dict[str, Any]:
        """The model being served, where it comes from, when it loaded, versions refused, and how it runs."""
        live = holder.current
        return {
            "model_name": holder.source.model_name,
            "version": live.version if live else None,
            "alias": holder.source.alias,
            "source": holder.source.kind,
            "loaded_at": live.loaded_at if live else None,
            "refused": dict(holder.refused),
            "fallback_for": holder.fallback_for,
            "settings": tuning,
            "settings_fingerprint": fingerprint,
        }

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        """Requests, errors, latency, batch sizes, queue depth and the live model, for Prometheus."""
        from prometheus_client import CONTENT_TYPE_LATEST

        live = holder.current
        if live is not None:
            metrics.set_model(live.name, live.version)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": PredictRequest.model_json_schema()}}}},
    )
    async def predict(request: Request) -> Response:
        """Label and per-class probabilities for each text, and the version that answered."""
        body = _parse_predict_request(await request.body())
        live, scores, role = await score(body.all_texts(), "/predict", request)
        labels, probs, request_id = live.classifier.labels, scores.probs, request.state.request_id
        predictions = [
            {"request_id": text_id(request_id, index), "label": labels[int(row.argmax())],
             "confidence": float(row.max()),
             "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)}}
            for index, row in enumerate(probs)
        ]
        content = {"model_name": live.name, "version": live.version, "request_id": request_id,
                   "client_request_id": request.state.client_request_id, "predictions": predictions}
        return JSONResponse(content, headers={VERSION_HEADER: live.version, ROLE_HEADER: role})

    @app.post(
        "/invocations",
        response_model=InvocationsResponse,
        responses={400: {"model": MlflowErrorResponse}, 413: {"model": MlflowErrorResponse},
                   415: {"description": "unsupported content type (text/plain, as MLflow)"},
                   422: {"model": MlflowErrorResponse, "description": "a blank text (the rows are named)"},
                   503: {"model": MlflowErrorResponse}},
        openapi_extra=_invocations_openapi(),
    )
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol: the same formats and answers as ``mlflow models serve``."""
        from langops.serving.invocations import InvocationError, parse_invocation, predictions_json

        raw = await request.body()
        live = holder.current
        if live is None:
            raise RequestRefused(503, holder.last_error or "no model loaded yet")
        content_type = request.headers.get("content-type")
        try:
            if len(raw) > INLINE_PARSE_BYTES:
                parsed = await asyncio.to_thread(parse_invocation, raw, content_type, live.classifier.labels)
            else:
                parsed = parse_invocation(raw, content_type, live.classifier.labels)
        except InvocationError as exc:
            return Response(exc.body, exc.status_code, media_type=exc.media_type)
        live, scores, role = await score(parsed.texts, "/invocations", request)
        return Response(predictions_json(scores.probs, live.classifier.labels), media_type="application/json",
                        headers={VERSION_HEADER: live.version, ROLE_HEADER: role})

    @app.post(
        "/feedback",
        status_code=202,
        response_model=FeedbackResponse,
        responses={**_ERRORS,
                   404: {"model": ErrorResponse, "description": "an id the server did not issue within "
                         "feedback_window_hours (the id is named)"},
                   409: {"model": ErrorResponse, "description": "a client's id that several scored texts carry (their "
                         "number is given: name the issued id), or the server keeps no prediction log"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"oneOf": [FeedbackItem.model_json_schema(),
                                 {"type": "array", "items": FeedbackItem.model_json_schema(), "minItems": 1}]},
            "examples": FEEDBACK_EXAMPLES}}}},
    )
    async def feedback(request: Request) -> JSONResponse:
        """The true label of scored texts, named by the ids the server issued (``X-Request-Id`` of the answer,
        ``predictions[].request_id``); checked against the ids issued, then written to the feedback log under
        the issued id of the one text each names."""
        from langops.prediction_records import Feedback, FeedbackError, check_feedback

        items = _parse_feedback_request(await request.body(), max_items=settings.max_request_texts)
        if settings.prediction_log_dir is None:
            raise RequestRefused(409, "feedback is off: this server keeps no prediction log (prediction_log_dir "
                                 "unset; deploy.prediction_log: false), so there is nothing to join labels to")
        live = holder.current
        if live is None:
            raise RequestRefused(503, holder.last_error or "no model loaded yet: labels cannot be checked")
        try:
            named = [check_feedback(item.request_id, item.label, labels=live.classifier.labels, where=f"item {index}")
                     for index, item in enumerate(items)]
        except FeedbackError as exc:
            raise RequestRefused(422, str(exc)) from exc
        if not issued_ids or not feedback_log:
            raise RequestRefused(503, "feedback cannot be checked: the index of issued ids did not open ("
                                 f"{'; '.join(index_broken) or 'not open yet'}); see the server log")
        try:
            found = await run_in_threadpool(issued_ids[0].lookup, [item.request_id for item in named])
        except Exception as exc:  # a damaged index refuses feedback, never answers 500
            logger.exception("cannot read the index of issued ids")
            raise RequestRefused(503, f"feedback cannot be checked: the index of issued ids cannot be read "
                                 f"({_short_error(exc)}); see the server log") from exc
        refusal = _feedback_refusal(found, window_hours=settings.feedback_window_hours, many=len(named) > 1)
        if refusal is not None:
            raise refusal
        checked = [Feedback(lookup.text_id or "", item.label, lookup.text)
                   for item, lookup in zip(named, found, strict=True)]
        forced = {text.request_id for text, item in zip(checked, items, strict=True) if item.force}
        try:
            conflicts = await run_in_threadpool(issued_ids[0].claim_labels,
                                                [(item.request_id, item.label) for item in checked], forced=forced)
        except Exception as exc:  # a damaged index refuses feedback, never answers 500
            logger.exception("cannot record labels in the index of issued ids")
            raise RequestRefused(503, f"feedback cannot be recorded: the index of issued ids cannot be written "
                                 f"({_short_error(exc)}); see the server log") from exc
        if conflicts:
            shown = "; ".join(f"{name!r} was labelled {before!r}, not {now!r}" for name, before, now in conflicts[:5])
            raise RequestRefused(409, f"{len(conflicts)} text(s) already labelled otherwise: {shown}. Send "
                                 '"force": true with an item to replace its label. Nothing was recorded.')
        try:
            queued = await run_in_threadpool(feedback_log[0].record, checked)
        except Exception as exc:  # the store does not answer: the client retries (the claim above allows it)
            logger.exception("cannot write feedback to the prediction store")
            raise RequestRefused(503, f"feedback cannot be stored ({_short_error(exc)}); retry later",
                                 {"Retry-After": str(settings.retry_after_s)}) from exc
        if not queued:
            raise RequestRefused(503, "the feedback log is behind; retry later",
                                 {"Retry-After": str(settings.retry_after_s)})
        metrics.feedback.inc(len(checked))
        if rollout.rollout is not None:
            for item in checked:
                rollout.feedback(item.request_id, item.label)
        return JSONResponse({"accepted": len(checked), "request_ids": [item.request_id for item in checked]},
                            status_code=202)

    @app.get("/rollout")
    async def rollout_status() -> dict[str, Any]:
        """The shadow or canary in progress: its state, the window since its step began, and the last verdict."""
        return await run_in_threadpool(rollout.status)

    @app.post("/reload")
    async def reload() -> JSONResponse:
        """Check the alias and the rollout now (same path as the poller) and retry a version refused before."""
        try:
            outcome = await run_in_threadpool(holder.refresh, retry_refused=True)
        except ModelSourceError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=502)
        try:
            rollout.refused.clear()
            await run_in_threadpool(rollout.refresh)
        except Exception as exc:  # noqa: BLE001 - the champion reloaded; say what the rollout check hit
            return JSONResponse({"detail": f"rollout check failed: {exc!r}"}, status_code=502)
        body = {
            "old_version": outcome.old_version,
            "new_version": outcome.new_version,
            "target_version": outcome.target,
            "swapped": outcome.swapped,
        }
        if outcome.refused is not None:
            serving = outcome.new_version or "nothing"
            doing = "falling back to" if outcome.swapped else "still serving"
            detail = f"version {outcome.target} refused, {doing} {serving}: {outcome.refused}"
            return JSONResponse({**body, "detail": detail}, status_code=409)
        return JSONResponse(body)

    return app


def _refresh_quietly(holder: ModelHolder) -> None:
    """Check the alias now (after a canary's promotion); a failure leaves it to the next poll."""
    try:
        holder.refresh(retry_refused=False)
    except ModelSourceError as exc:
        logger.warning("could not load the promoted champion yet: %s", exc)


def app_from_env() -> FastAPI:
    """The app factory uvicorn workers call (``--workers N``): settings come as JSON in ``SETTINGS_ENV``."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start workers through langops.serving.server.serve")
    # A spawned worker starts with bare logging: set it up as serve() does, so each worker says what it serves.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _stop_when_orphaned()
    settings = ServerSettings.model_validate_json(raw)
    from langops.serving.protocol import HeaderDeadlineProtocol

    HeaderDeadlineProtocol.header_read_timeout_s = settings.header_read_timeout_s  # this worker's connections
    return create_app(settings)


def _stop_when_orphaned(interval_s: float = 1.0) -> None:
    """Stop this worker, as SIGTERM does (requests in flight finish), once the process that started it is
    gone. A supervisor killed with SIGKILL (or by the OOM killer) cannot stop its workers, and they would
    go on serving, orphaned, holding the port against the next server."""
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        logger.warning("the server's supervisor (pid %d) is gone: this worker stops", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="langops-orphan-watch", daemon=True).start()


def _parse_predict_request(raw: bytes) -> PredictRequest:
    """Decode, parse and validate a /predict body, saying exactly what is wrong.

    Raises:
        RequestRefused: 400 for bytes that are not UTF-8 JSON (or JSON nested too deeply, or a number with
            too many digits), 422 for JSON of the wrong shape.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRefused(400, f"request body is not valid UTF-8: byte {exc.start} is {raw[exc.start:exc.start + 1]!r}") from exc
    if not text.strip():
        raise RequestRefused(422, 'request body: missing: send JSON like {"texts": ["..."]}')
    try:
        data = load_json(text)
    except JsonTooComplex as exc:
        raise RequestRefused(400, f"request body refused: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RequestRefused(400, f"request body is not valid JSON: {exc}") from exc
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestRefused(422, "; ".join(_describe(error) for error in exc.errors())) from exc


def _parse_feedback_request(raw: bytes, *, max_items: int) -> list[FeedbackItem]:
    """A /feedback body: one ``{"request_id", "label"}`` object or a list of them.

    Raises:
        RequestRefused: 400 for bytes that are not UTF-8 JSON, 413 for more than ``max_items`` items, 422 for
            JSON of the wrong shape (the field named).
    """
    try:
        data = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestRefused(400, f"request body is not valid UTF-8: byte {exc.start} is {raw[exc.start:exc.start + 1]!r}") from exc
    except JsonTooComplex as exc:
        raise RequestRefused(400, f"request body refused: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RequestRefused(400, f'request body is not valid JSON: {exc}; send {{"request_id": "...", "label": "..."}}') from exc
    many = isinstance(data, list)
    if many and not data:
        raise RequestRefused(422, "request body: empty list: send at least one {\"request_id\", \"label\"} object")
    if many and len(data) > max_items:
        raise RequestRefused(413, f"{len(data)} feedback items in one request; the limit is {max_items}")
    items = []
    for index, item in enumerate(data if many else [data]):
        try:
            items.append(FeedbackItem.model_validate(item))
        except ValidationError as exc:
            prefix = f"item {index}: " if many else ""
            messages = "; ".join(_describe_feedback(error) for error in exc.errors())
            if not isinstance(item, dict):
                messages = 'must be a JSON object like {"request_id": "...", "label": "..."}'
            raise RequestRefused(422, prefix + messages) from exc
    return items


def _feedback_refusal(found: list[Lookup], *, window_hours: float, many: bool) -> RequestRefused | None:
    """None when every id names exactly one scored text; else a 409 (some id names several) or a 404 (some
    id names none) that says, for each such item, what its id names and what to send instead."""
    problems, ambiguous = [], False
    for index, lookup in enumerate(found):
        where = f"item {index}: " if many else ""
        if lookup.texts == 0:
            problems.append(
                f"{where}request_id {lookup.name!r} names no text this server scored in the last {window_hours:g} "
                "hours (feedback_window_hours): name the id the server issued, the X-Request-Id of the answer "
                "followed by -<index of the text> (predictions[].request_id of /predict)")
        elif lookup.texts > 1:
            ambiguous = True
            what = (f"is the X-Request-Id {lookup.texts} scored texts were sent with" if lookup.by_client_id
                    else f"names a request of {lookup.texts} texts")
            problems.append(f"{where}request_id {lookup.name!r} is ambiguous: it {what}; name one text by the id "
                            "the server issued for it (X-Request-Id of its answer followed by -<index of the text>, "
                            "predictions[].request_id of /predict)")
    if not problems:
        return None
    return RequestRefused(409 if ambiguous else 404, "; ".join(problems[:5]) + (
        f"; and {len(problems) - 5} more" if len(problems) > 5 else "") + ". Nothing was recorded.")


def _serve_docs_offline(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's scripts and styles served from the ``swagger-ui-bundle`` package under
    ``/docs/assets``, so the page works on a machine with no way out (and leaks no visit to a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def _open_prediction_log(settings: ServerSettings, metrics: ServerMetrics) -> PredictionLog:
    from langops.serving.prediction_log import LOG_FILE, PredictionLog, PredictionLogConfig

    assert settings.prediction_log_dir is not None
    config = PredictionLogConfig(
        directory=settings.prediction_log_dir,
        sample_rate=settings.prediction_log_sample_rate,
        text=settings.prediction_log_text,
        max_bytes=settings.prediction_log_max_bytes,
        backups=settings.prediction_log_backups,
        queue_size=settings.prediction_log_queue,
        # Several workers must not rotate one file: each writes its own (the monitor reads them all).
        file_name=LOG_FILE if settings.workers == 1 else f"predictions-{os.getpid()}.jsonl",
        store=settings.prediction_store_url(),
        store_rows=settings.prediction_store_rows,
    )
    return PredictionLog(config, on_dropped=metrics.prediction_log_dropped.inc,
                         on_written=metrics.prediction_log_written.inc)


def _open_feedback_log(settings: ServerSettings) -> FeedbackLog:
    from langops.serving.prediction_log import FeedbackLog, feedback_file_name

    assert settings.prediction_log_dir is not None
    store = settings.prediction_store_url()
    if store is not None:
        return FeedbackLog.in_store(store)
    return FeedbackLog.in_file(settings.prediction_log_dir / feedback_file_name(settings.workers, os.getpid()),
                               max_bytes=settings.prediction_log_max_bytes, backups=settings.prediction_log_backups,
                               queue_size=settings.prediction_log_queue)


def _fleet_windows(settings: ServerSettings) -> FleetWindows | None:
    """The fleet's canary windows, for a server that runs rollouts and has the fleet's store."""
    from langops.serving.fleet_windows import FleetWindows

    store = settings.prediction_store_url()
    if store is None or settings.prediction_log_dir is None or not settings.follows_alias():
        return None
    return FleetWindows(store, judge_every_s=settings.rollout.judge_every_s)


def _open_issued_ids(settings: ServerSettings) -> IssuedIds:
    from langops.serving.issued_ids import INDEX_FILE, IssuedIds

    assert settings.prediction_log_dir is not None
    return IssuedIds(settings.prediction_store_url() or settings.prediction_log_dir / INDEX_FILE,
                     window_hours=settings.feedback_window_hours, max_requests=settings.feedback_max_requests,
                     queue_size=settings.prediction_log_queue)


def _short_error(exc: BaseException) -> str:
    """An exception as one line for a client: its type and the driver's own message, without SQLAlchemy's
    statement and background link."""
    original = getattr(exc, "orig", None) or exc
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first}"


def _invocations_openapi() -> dict[str, Any]:
    from langops.serving.invocations import INVOCATIONS_OPENAPI

    return INVOCATIONS_OPENAPI


def _describe_feedback(error: Any) -> str:
    """One pydantic error of a feedback item as ``field: message``."""
    field = ".".join(str(part) for part in error["loc"]) or "item"
    if error["type"] == "extra_forbidden":
        return f'{field}: unknown field: send "request_id" and "label"'
    return f"{field}: {error['msg']}"


def _describe(error: Any) -> str:
    """One pydantic error as ``field: message``."""
    field = ".".join(str(part) for part in error["loc"]) or "request body"
    message = str(error["msg"]).removeprefix("Value error, ")
    if field == "request body" and error["type"] == "model_type":
        message = 'must be a JSON object like {"texts": ["..."]}'
    elif error["type"] == "extra_forbidden":
        message = 'unknown field: send "text" or "texts"'
    return f"{field}: {message}"
