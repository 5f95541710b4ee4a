"""Resolve what to serve: a registered model's aliased version, or a compressed folder on disk.

The server asks a source two things: which version should be live now (cheap, polled), and where that
version's compressed model lies locally (expensive, done once per version). Keeping the two apart is
what lets the poller notice a moved alias without downloading anything.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from langops.aliases import CHAMPION

if TYPE_CHECKING:
    from mlflow import MlflowClient

SERVING_FILE = "serving.json"
LOCAL_VERSION = "local"


class ModelSourceError(RuntimeError):
    """The registry cannot say which version to serve, or a version's artifacts are unusable."""


class Source(Protocol):
    """Anything the server can follow: tells the live version and fetches a version's compressed dir."""

    @property
    def model_name(self) -> str: ...

    @property
    def alias(self) -> str | None: ...

    @property
    def kind(self) -> str: ...

    def current_version(self) -> str: ...

    def fetch(self, version: str) -> Path: ...


class ModelSource:
    """A registered model followed through an alias (``champion`` by default) in an MLflow registry.

    ``tracking_uri`` is used as the registry URI too (as ``configure_mlflow`` sets them); versions are
    downloaded once into ``cache_dir`` (see ``download_compressed_dir``).
    """

    kind = "registry"

    def __init__(
        self, tracking_uri: str, model_name: str, *, alias: str = CHAMPION, cache_dir: Path
    ) -> None:
        self.tracking_uri = tracking_uri
        self._model_name = model_name
        self._alias = alias
        self.cache_dir = Path(cache_dir)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def alias(self) -> str:
        return self._alias

    def _client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def current_version(self) -> str:
        """The version the alias points to now.

        Raises:
            ModelSourceError: the model or the alias does not exist, or the registry cannot be reached.
        """
        from mlflow.exceptions import MlflowException

        try:
            version = self._client().get_model_version_by_alias(self.model_name, self.alias)
        except MlflowException as exc:
            raise ModelSourceError(
                f"cannot resolve {self.model_name}@{self.alias} in {self.tracking_uri}: {exc.message}"
            ) from exc
        return str(version.version)

    def fetch(self, version: str) -> Path:
        return download_compressed_dir(
            self.model_name, version, cache_dir=self.cache_dir, tracking_uri=self.tracking_uri
        )


class PinnedModelSource(ModelSource):
    """One registered version served as is (``models:/name/3``): the poller never moves it."""

    def __init__(self, tracking_uri: str, model_name: str, version: str, *, cache_dir: Path) -> None:
        super().__init__(tracking_uri, model_name, alias="", cache_dir=cache_dir)
        self.version = str(version)

    @property
    def alias(self) -> str | None:  # type: ignore[override]
        return None

    def current_version(self) -> str:
        """The pinned version, once the registry confirms it exists.

        Raises:
            ModelSourceError: the version is not registered, or the registry cannot be reached.
        """
        from mlflow.exceptions import MlflowException

        try:
            self._client().get_model_version(self.model_name, self.version)
        except MlflowException as exc:
            raise ModelSourceError(
                f"cannot find {self.model_name} version {self.version} in {self.tracking_uri}: {exc.message}"
            ) from exc
        return self.version


class LocalModelSource:
    """A compressed dir served as is (``--model-dir``): no registry, the version is always ``local``."""

    kind = "local"
    alias = None

    def __init__(self, model_dir: Path, *, model_name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self._model_name = model_name or self.model_dir.resolve().name

    @property
    def model_name(self) -> str:
        return self._model_name

    def current_version(self) -> str:
        return LOCAL_VERSION

    def fetch(self, version: str) -> Path:
        if version != LOCAL_VERSION:
            raise ModelSourceError(f"a local model dir only has version {LOCAL_VERSION!r}, not {version!r}")
        return find_compressed_dir(self.model_dir)


def download_compressed_dir(
    model_name: str, version: str, *, cache_dir: Path, tracking_uri: str | None = None
) -> Path:
    """Download (once) the artifacts of a registered version and return the compressed dir inside them.

    Downloads are cached under a key made of the registry URI, the model name, the version and the
    version's creation time: a restarted server reuses what it fetched, while a wiped and refilled store
    (where version numbers restart at 1) never gets a stale copy. The download goes to a temporary
    sibling and is renamed into place when complete, so an interrupted one is never taken for cached.
    ``tracking_uri`` serves as the registry URI too; without it MLflow's configured URIs are used
    (see ``configure_mlflow``).

    The version's storage URI is resolved here rather than by downloading ``models:/name/version``:
    MLflow 3.17 resolves such a URI against the process-wide registry URI and ignores the one passed
    to ``download_artifacts``, so a server given ``--tracking-uri`` would look in the wrong store.

    Raises:
        ModelSourceError: the version does not exist, or its artifacts hold no compressed model.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registry_uri = tracking_uri or mlflow.get_registry_uri()
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    try:
        created = client.get_model_version(model_name, version).creation_timestamp
        storage_uri = client.get_model_version_download_uri(model_name, version)
    except MlflowException as exc:
        raise ModelSourceError(f"cannot read {model_name} version {version}: {exc.message}") from exc
    target = Path(cache_dir) / _uri_key(registry_uri) / model_name / f"{version}-{created}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=storage_uri,
                dst_path=str(staging),
                tracking_uri=tracking_uri,
                registry_uri=registry_uri,
            )
            _move_into_place(staging, target)
        except MlflowException as exc:
            raise ModelSourceError(f"cannot download {model_name} version {version}: {exc.message}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return find_compressed_dir(target)


def find_compressed_dir(root: Path) -> Path:
    """The one folder under ``root`` holding ``serving.json``.

    Searching instead of naming the pyfunc's artifact key keeps serving independent of how the
    register step lays out its artifacts.

    Raises:
        ModelSourceError: no folder, or more than one, holds ``serving.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelSourceError(f"model folder not found: {root}")
    found = sorted(path.parent for path in root.rglob(SERVING_FILE))
    if not found:
        raise ModelSourceError(f"no {SERVING_FILE} under {root}: not a compressed langops model")
    if len(found) > 1:
        raise ModelSourceError(f"several compressed models under {root}: {[str(p) for p in found]}")
    return found[0]


def _uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename a finished download into the cache; another process that got there first wins."""
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
