"""The prediction server: an ASGI app that serves one model and follows its registry alias.

The live model is a single reference. A background poller (and ``POST /reload``) loads a new version
beside it, checks it answers a smoke prediction, and only then replaces the reference; each request
keeps the model it started with. So a swap never fails a request, and a version that cannot load or
answer is refused while the old one keeps serving.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from starlette.concurrency import run_in_threadpool

from langops.serving.registry import LocalModelSource, ModelSource, ModelSourceError, Source

if TYPE_CHECKING:
    from langops.onnx_model import OnnxClassifier

logger = logging.getLogger(__name__)

SERVICE = "langops-serving"
VERSION_HEADER = "X-Model-Version"
SMOKE_TEXT = "smoke test: is this model able to answer?"


class ServerSettings(BaseModel):
    """What to serve and how: a registered model and its alias, or a compressed dir (``model_dir``).

    With ``model_dir`` the registry settings are ignored and ``model_name`` only labels the responses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = Field(None, description="MLflow tracking and registry URI")
    model_name: str | None = Field(None, description="registered model to serve")
    alias: str = Field("champion", description="registry alias to follow")
    model_dir: Path | None = Field(None, description="serve this compressed dir instead of the registry")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8765, ge=1, le=65535, description="port to bind")
    poll_seconds: float = Field(5.0, gt=0, description="how often the alias is checked for a new version")
    num_threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per model")
    max_batch: int = Field(64, ge=1, description="most texts accepted in one /predict request")
    max_text_chars: int = Field(5000, ge=1, description="longest text accepted, in characters")
    cache_dir: Path | None = Field(None, description="where registry downloads are kept (default: temp dir)")

    @model_validator(mode="after")
    def _one_source(self) -> ServerSettings:
        if self.model_dir is None and not (self.tracking_uri and self.model_name):
            raise ValueError("give either model_dir, or both tracking_uri and model_name")
        return self

    def build_source(self) -> Source:
        """The compressed dir when ``model_dir`` is set (it wins over the registry), else the registry."""
        if self.model_dir is not None:
            return LocalModelSource(self.model_dir, model_name=self.model_name)
        assert self.tracking_uri and self.model_name  # guaranteed by _one_source
        cache_dir = self.cache_dir or Path(tempfile.gettempdir()) / SERVICE
        return ModelSource(self.tracking_uri, self.model_name, alias=self.alias, cache_dir=cache_dir)


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
    """

    def __init__(self, source: Source, *, num_threads: int | None = None) -> None:
        self.source = source
        self.num_threads = num_threads
        self._current: LoadedModel | None = None
        self._refused: dict[str, str] = {}
        self._last_error: str | None = None
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
                return Refresh(old, old, target)
            if target in self._refused and not retry_refused:
                return Refresh(old, old, target, refused=self._refused[target])
            try:
                candidate = self._load(target)
            except Exception as exc:  # noqa: BLE001 - whatever breaks a candidate, the live model stays
                reason = f"{type(exc).__name__}: {exc}"
                self._refused = {**self._refused, target: reason}
                self._last_error = f"version {target} refused: {reason}"
                logger.error("refused %s version %s, still serving %s: %s", self.source.model_name, target,
                             old or "nothing", reason, exc_info=exc)
                return Refresh(old, old, target, refused=reason)
            self._current = candidate
            self._refused = {version: why for version, why in self._refused.items() if version != target}
            self._last_error = None
            logger.info("now serving %s version %s (was %s)", candidate.name, target, old or "nothing")
            return Refresh(old, target, target)

    def _load(self, version: str) -> LoadedModel:
        from langops.onnx_model import OnnxClassifier

        classifier = OnnxClassifier.load(self.source.fetch(version), num_threads=self.num_threads)
        check_smoke_prediction(classifier)
        return LoadedModel(
            classifier=classifier,
            name=self.source.model_name,
            version=version,
            loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )


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

    def __init__(self, holder: ModelHolder, poll_seconds: float) -> None:
        self.holder = holder
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
            except Exception:  # noqa: BLE001 - an unexpected error must not end the poller for good
                logger.exception("alias check crashed, keeping the current model")
            if self._stop.wait(self.poll_seconds):
                return


class PredictRequest(BaseModel):
    """Either one ``text`` or a list of ``texts``; unknown fields are refused so typos are not ignored."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = None
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        if (self.texts is None) == (self.text is None):
            raise ValueError('send either "text" (one string) or "texts" (a list of strings), not both')
        if self.texts == []:
            raise ValueError('"texts" is empty: send at least one text')
        for index, text in enumerate(self.all_texts()):
            if not text.strip():
                raise ValueError(f"text {index} is empty")
        return self

    def all_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text or ""]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_name: str
    version: str
    predictions: list[Prediction]


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the server for ``settings``; the model loads in the background once the app starts."""
    holder = ModelHolder(settings.build_source(), num_threads=settings.num_threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = AliasPoller(holder, settings.poll_seconds)
        poller.start()
        try:
            yield
        finally:
            poller.stop()

    app = FastAPI(title="langops text classifier", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        invalid_json = [error for error in errors if error["type"] == "json_invalid"]
        if invalid_json:
            reason = invalid_json[0].get("ctx", {}).get("error", "")
            return _error(400, f"request body is not valid JSON: {reason}")
        return _error(422, "; ".join(_describe(error) for error in errors))

    @app.middleware("http")
    async def _version_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        live = holder.current
        if VERSION_HEADER not in response.headers and live is not None:
            response.headers[VERSION_HEADER] = live.version
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is up; says nothing about the model (see /ready)."""
        return {"status": "ok", "service": SERVICE}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        live = holder.current
        if live is None:
            detail = holder.last_error or "no model loaded yet"
            return JSONResponse({"ready": False, "detail": detail}, status_code=503)
        return JSONResponse({"ready": True, "version": live.version})

    @app.get("/version")
    async def version() -> dict[str, Any]:
        live = holder.current
        return {
            "model_name": holder.source.model_name,
            "version": live.version if live else None,
            "alias": holder.source.alias,
            "source": holder.source.kind,
            "loaded_at": live.loaded_at if live else None,
            "refused": dict(holder.refused),
        }

    @app.post("/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest, response: Response) -> PredictResponse | JSONResponse:
        texts = body.all_texts()
        if len(texts) > settings.max_batch:
            return _error(413, f"{len(texts)} texts in one request; the limit is {settings.max_batch}")
        for index, text in enumerate(texts):
            if len(text) > settings.max_text_chars:
                return _error(
                    413, f"text {index} has {len(text)} characters; the limit is {settings.max_text_chars}"
                )
        live = holder.current  # this request keeps this model even if a swap happens meanwhile
        if live is None:
            return _error(503, holder.last_error or "no model loaded yet")
        answers = await run_in_threadpool(live.classifier.predict, texts)
        response.headers[VERSION_HEADER] = live.version
        return PredictResponse(
            model_name=live.name,
            version=live.version,
            predictions=[Prediction(label=a["label"], probabilities=a["probabilities"]) for a in answers],
        )

    @app.post("/reload")
    async def reload() -> JSONResponse:
        """Check the alias now (same path as the poller) and retry a version refused before."""
        try:
            outcome = await run_in_threadpool(holder.refresh, retry_refused=True)
        except ModelSourceError as exc:
            return _error(502, str(exc))
        body = {
            "old_version": outcome.old_version,
            "new_version": outcome.new_version,
            "target_version": outcome.target,
            "swapped": outcome.swapped,
        }
        if outcome.refused is not None:
            serving = outcome.new_version or "nothing"
            detail = f"version {outcome.target} refused, still serving {serving}: {outcome.refused}"
            return JSONResponse({**body, "detail": detail}, status_code=409)
        return JSONResponse(body)

    return app


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``field: message``, without FastAPI's ``body`` prefix."""
    field = ".".join(str(part) for part in error["loc"][1:]) or "request body"
    message = str(error["msg"]).removeprefix("Value error, ")
    if field == "request body" and error["type"] == "missing":
        message = 'missing: send JSON like {"texts": ["..."]}'
    elif field == "request body" and error["type"] == "model_attributes_type":
        message = 'must be a JSON object like {"texts": ["..."]}, sent as application/json'
    elif error["type"] == "extra_forbidden":
        message = 'unknown field: send "text" or "texts"'
    return f"{field}: {message}"
