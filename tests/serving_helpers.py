"""Shared pieces of the serving and deploy tests.

A tiny compressed model built by the real compress step, a real MLflow SQLite registry under a temp
folder holding good and broken versions of it, and uvicorn servers on free loopback ports. Test
modules load the fixtures with ``pytest_plugins = ["serving_helpers"]``, so the session-scoped model
is built once for both modules (conftest.py belongs to the whole suite).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import httpx
import pytest
from conftest import write_prepared
from pipeline_helpers import free_port

from langops.serving.app import ServerSettings, create_app

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from langops.config import Params

TIMEOUT_S = 60.0


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def served_version(client: httpx.Client) -> str | None:
    return client.get("/version").json()["version"]


def wait_for_version(client: httpx.Client, version: str) -> None:
    wait_until(lambda: served_version(client) == version, what=f"version {version} to be served")


@dataclass
class LiveServer:
    """A uvicorn server running ``create_app`` in a thread of the test process, over real HTTP."""

    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)


@contextmanager
def running_server(settings: ServerSettings) -> Iterator[LiveServer]:
    """Serve ``settings`` on its port until the block ends; the server is stopped even on failure."""
    import uvicorn

    from langops.serving.server import uvicorn_options

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options(settings), "log_level": "warning"}))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{settings.port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn to start", timeout=30)
        assert server.started, "uvicorn did not start (see the captured log)"
        yield LiveServer(url=f"http://{settings.host}:{settings.port}")
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serving_local(settings: ServerSettings) -> Iterator[LiveServer]:
    """A live server for ``settings``, once it answers with its local model (``model_dir``)."""
    with running_server(settings) as live, live.client() as client:
        wait_for_version(client, "local")
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """A client of the test module's own ``server`` fixture."""
    with server.client() as client:
        yield client


def build_compressed_dir(root: Path, trained_dir: Path) -> Path:
    """A compressed dir made by the real compress step from the tiny trained model."""
    from langops.config import CompressConfig
    from langops.tasks.compress import compress

    # Parity is the compress tests' business; serving only needs a model that loads and answers.
    cfg = CompressConfig(latency_runs=5, min_label_agreement=0.0, max_fp32_logit_diff=1.0)
    out_dir = root / "compressed"
    prepared_dir = write_prepared(root / "prepared")
    compress(cfg, trained_dir=trained_dir, prepared_dir=prepared_dir, out_dir=out_dir, report_dir=root / "compression",
             max_length=32)
    return out_dir


@dataclass
class Registry:
    """A real MLflow SQLite registry under a temp folder, with one registered model."""

    root: Path
    tracking_uri: str
    model_name: str

    def params(self) -> Params:
        from langops.config import parse_params

        return parse_params({"project": {"state_dir": str(self.root)}}).resolved(self.root)

    def register(self, compressed_dir: Path) -> str:
        """Register ``compressed_dir`` as a new version the way the pipeline does; returns the version."""
        import mlflow

        from langops.tasks.compress import CompressionResult
        from langops.tasks.register import register
        from langops.tracking import configure_mlflow

        params = self.params()
        configure_mlflow(params)
        with mlflow.start_run() as run:
            result = register(
                params.register,
                compression=CompressionResult.load(compressed_dir),
                run_id=run.info.run_id,
                lineage={"data_version": "test", "git_commit": "test", "params_hash": params.section_hash(),
                         "base_model": "tiny-random-bert"},
                out_dir=params.paths.registration,
            )
        return str(result.version)

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def set_champion(self, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, "champion", version)

    def promote(self, version: str) -> None:
        """Make ``version`` champion the way ``langops promote --force`` does: locked, logged, tagged."""
        from langops.promotions import move_champion

        move_champion(self.params(), model_name=self.model_name, new_champion=version, event="force",
                      reason="test", actor="test")

    def stored_model_file(self, version: str) -> Path:
        """The ``model.onnx`` of ``version`` in the artifact store (a local folder here)."""
        stored = self.client().get_model_version_download_uri(self.model_name, version)
        (onnx_file,) = Path(urlparse(stored).path).rglob("model.onnx")
        return onnx_file

    def corrupt(self, version: str) -> bytes:
        """Overwrite the stored ``model.onnx`` of ``version`` and return what it held: the register step
        refuses to register a broken model, so breakage in the artifact store after registration is
        what a server can meet."""
        onnx_file = self.stored_model_file(version)
        original = onnx_file.read_bytes()
        onnx_file.write_bytes(b"this is not an onnx model")
        return original

    def settings(self, **overrides: object) -> ServerSettings:
        """Server settings following this registry's champion on a fresh free port."""
        values: dict[str, object] = {
            "tracking_uri": self.tracking_uri,
            "model_name": self.model_name,
            "port": free_port(),
            "poll_seconds": 3600.0,  # tests move the alias and /reload; the poller test sets its own
            "cache_dir": self.root / "cache",
        }
        return ServerSettings(**{**values, **overrides})


@dataclass(frozen=True)
class RegisteredModels:
    registry: Registry
    good: tuple[str, str]
    broken: str


def empty_registry(root: Path) -> Registry:
    """A registry under ``root`` with no version yet, for tests that damage what they register."""
    from langops.config import parse_params

    params = parse_params({"project": {"state_dir": str(root)}}).resolved(root)
    return Registry(root=root, tracking_uri=params.tracking_uri(), model_name=params.register.model_name)


def make_registry(root: Path, compressed_dir: Path) -> RegisteredModels:
    """Versions 1 and 2: the same good model, told apart by number; version 3: its stored model is garbage."""
    registry = empty_registry(root)
    first, second = registry.register(compressed_dir), registry.register(compressed_dir)
    broken = registry.register(compressed_dir)
    registry.corrupt(broken)
    return RegisteredModels(registry=registry, good=(first, second), broken=broken)


@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory: pytest.TempPathFactory, tiny_trained_dir: Path) -> Path:
    return build_compressed_dir(tmp_path_factory.mktemp("serving-model"), tiny_trained_dir)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, compressed_dir: Path) -> RegisteredModels:
    return make_registry(tmp_path_factory.mktemp("registry"), compressed_dir)


class RequestLoop:
    """A client thread posting predictions until the block ends; it keeps every failure and version.

    Requests are paced (``pause_s`` apart) so that the loop does not take the CPU from the training run it
    is watching, and the block ends only after a few replies that started after its last statement: a
    version the server switched to just before the block ended is seen."""

    def __init__(self, url: str, texts: Sequence[str] = (), pause_s: float = 0.02) -> None:
        self.url, self.failures, self.versions = url, [], set()
        self.texts = list(texts) or [f"my parcel {i} has not arrived" for i in range(1000)]
        self.pause_s, self.replies = pause_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            for i in itertools.count():
                if self._stop.wait(self.pause_s):
                    return
                try:
                    reply = http.post(f"{self.url}/predict", json={"text": self.texts[i % len(self.texts)]})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                finally:
                    self.replies += 1
                if reply.status_code != 200:
                    self.failures.append(f"{reply.status_code}: {reply.text[:200]}")
                else:
                    self.versions.add(reply.headers["x-model-version"])

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        wanted, deadline = self.replies + 3, time.monotonic() + 60
        while self.replies < wanted and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=60)
