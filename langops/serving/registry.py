"""Resolve what to serve: a registered model's aliased version, or a compressed folder on disk.

The server asks a source two things: which version should be live now (cheap, polled), and where that
version's compressed model lies locally (expensive, done once per version). Keeping the two apart is
what lets the poller notice a moved alias without downloading anything. A registry source also says
which earlier versions were good (``fallback_versions``), for a server that would otherwise serve nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from langops.aliases import CHAMPION, CHAMPION_SINCE_TAG, PREVIOUS_CHAMPION
from langops.io import write_json
from langops.model_files import FILES_TAG, Manifest, decode_manifest, manifest_mismatches

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

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

    def fallback_versions(self) -> list[str]: ...

    def record_served(self, version: str) -> None: ...

    def repair_cached(self, version: str) -> list[str]: ...


class ModelSource:
    """A registered model followed through an alias (``champion`` by default) in an MLflow registry.

    ``tracking_uri`` is used as the registry URI too (as ``configure_mlflow`` sets them); versions are
    downloaded once into ``cache_dir`` (see ``download_compressed_dir``), where the source also keeps
    the version it last served, for ``fallback_versions``.
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

    def repair_cached(self, version: str) -> list[str]:
        return repair_cached_copy(self.model_name, version, cache_dir=self.cache_dir, tracking_uri=self.tracking_uri)

    def fallback_versions(self) -> list[str]:
        """Earlier good versions, best first: what this server last served, then the registry's champions.

        The registry's are ``previous_champion`` and then every version ``langops.promotions`` made
        champion (tag ``langops.champion_since``), newest first. Versions that were never champion are
        left out: they may never have passed the gate.

        Raises:
            ModelSourceError: the registry cannot be reached.
        """
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            versions = {str(v.version): v for v in client.search_model_versions(f"name = '{self.model_name}'")}
        except MlflowException as exc:
            raise ModelSourceError(f"cannot list the versions of {self.model_name}: {exc.message}") from exc
        ordered = [self._last_served(versions), self._alias_version(client, PREVIOUS_CHAMPION)]
        ordered += sorted(
            (name for name, v in versions.items() if v.tags.get(CHAMPION_SINCE_TAG)),
            key=lambda name: versions[name].tags[CHAMPION_SINCE_TAG],
            reverse=True,
        )
        return list(dict.fromkeys(name for name in ordered if name in versions))

    def record_served(self, version: str) -> None:
        """Remember ``version`` (with its creation time) as served, atomically, for a later restart.

        Raises:
            ModelSourceError: the registry cannot be reached.
            OSError: the cache folder cannot be written.
        """
        from mlflow.exceptions import MlflowException

        try:
            created = self._client().get_model_version(self.model_name, version).creation_timestamp
        except MlflowException as exc:
            raise ModelSourceError(f"cannot read {self.model_name} version {version}: {exc.message}") from exc
        write_json(self._last_served_file(), {"version": version, "created": created})

    def _last_served_file(self) -> Path:
        folder = model_cache_dir(self.cache_dir, self.tracking_uri, self.model_name)
        return folder / f"last-served@{self.alias}.json"

    def _last_served(self, versions: dict[str, ModelVersion]) -> str | None:
        """The recorded version, if the registry still holds it (a wiped store reuses version numbers)."""
        path = self._last_served_file()
        if not path.is_file():
            return None
        try:
            recorded = json.loads(path.read_text())
            version, created = str(recorded["version"]), recorded["created"]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable last-served record %s: %s", path, exc)
            return None
        registered = versions.get(version)
        return version if registered is not None and registered.creation_timestamp == created else None

    def _alias_version(self, client: MlflowClient, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None  # no such alias: nothing to add
            raise ModelSourceError(f"cannot resolve {self.model_name}@{alias}: {exc.message}") from exc


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

    def fallback_versions(self) -> list[str]:
        """None: a pinned server serves its version or nothing."""
        return []

    def record_served(self, version: str) -> None:
        """Nothing to remember: a pinned server never falls back."""


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

    def fallback_versions(self) -> list[str]:
        """None: a folder has one version."""
        return []

    def record_served(self, version: str) -> None:
        """Nothing to remember: a folder has one version."""

    def repair_cached(self, version: str) -> list[str]:
        """Nothing to repair from: the folder is the only copy."""
        return []


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

    Both a cached copy and a fresh download are checked against the size and sha256 of every file the
    register step recorded on the version (tag ``langops.files``): a cached copy that differs is deleted
    and downloaded again, and a download that differs is refused, never cached, so a file corrupted in
    the artifact store fails here and, once restored, is downloaded afresh. Versions registered before
    the tag existed have no record to check against and are used as downloaded, as they always were.

    The version's storage URI is resolved here rather than by downloading ``models:/name/version``:
    MLflow 3.17 resolves such a URI against the process-wide registry URI and ignores the one passed
    to ``download_artifacts``, so a server given ``--tracking-uri`` would look in the wrong store.

    Raises:
        ModelSourceError: the version does not exist, its artifacts hold no compressed model, or the
            downloaded files differ from the registered ones (the message names each file and how).
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    located = _locate(model_name, version, cache_dir=cache_dir, tracking_uri=tracking_uri)
    target, expected, storage_uri = located.target, located.expected, located.storage_uri
    if target.is_dir() and (problems := _copy_problems(target, expected)):
        logger.warning("cached copy of %s version %s differs from the registry, downloading it again: %s",
                       model_name, version, "; ".join(problems))
        _discard(target)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=storage_uri,
                dst_path=str(staging),
                tracking_uri=located.tracking_uri,
                registry_uri=located.registry_uri,
            )
            if problems := _copy_problems(staging, expected):
                raise ModelSourceError(
                    f"{model_name} version {version} in {storage_uri} differs from the files registered "
                    f"with it: {'; '.join(problems)}"
                )
            _move_into_place(staging, target)
        except MlflowException as exc:
            raise ModelSourceError(f"cannot download {model_name} version {version}: {exc.message}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return find_compressed_dir(target)


def repair_cached_copy(model_name: str, version: str, *, cache_dir: Path, tracking_uri: str | None = None) -> list[str]:
    """Check a cached copy against the version's registered files and download it again if it differs.

    A server checks the copy behind its live model now and then (``ServerSettings.cache_check_s``): the
    model in memory keeps answering whatever happens to its files, so without this a copy damaged on disk
    would be found only when it is next loaded (a restart, a new worker, a swap back), and that load
    would wait for the download. Returns how the copy differed; empty when it was whole or is not cached.

    Raises:
        ModelSourceError: the registry cannot be read, or the fresh download differs too.
    """
    located = _locate(model_name, version, cache_dir=cache_dir, tracking_uri=tracking_uri)
    if not located.target.is_dir():
        return []
    problems = _copy_problems(located.target, located.expected)
    if problems:
        download_compressed_dir(model_name, version, cache_dir=cache_dir, tracking_uri=tracking_uri)
    return problems


@dataclass(frozen=True)
class _Located:
    """Where a registered version's files are stored, what they must be, and where its cached copy goes."""

    tracking_uri: str
    registry_uri: str
    storage_uri: str
    expected: Manifest | None
    target: Path


def _locate(model_name: str, version: str, *, cache_dir: Path, tracking_uri: str | None) -> _Located:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registry_uri = tracking_uri or mlflow.get_registry_uri()
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    try:
        registered = client.get_model_version(model_name, version)
        storage_uri = client.get_model_version_download_uri(model_name, version)
    except MlflowException as exc:
        raise ModelSourceError(f"cannot read {model_name} version {version}: {exc.message}") from exc
    target = model_cache_dir(cache_dir, registry_uri, model_name) / f"{version}-{registered.creation_timestamp}"
    return _Located(tracking_uri=tracking_uri, registry_uri=registry_uri, storage_uri=storage_uri,
                    expected=_registered_manifest(registered), target=target)


def model_cache_dir(cache_dir: Path, registry_uri: str, model_name: str) -> Path:
    """Where one registered model's downloads (and its server's last-served record) are kept."""
    return Path(cache_dir) / _uri_key(registry_uri) / model_name


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


def _registered_manifest(registered: ModelVersion) -> Manifest | None:
    """The version's recorded files, or None for a version registered before they were recorded.

    Raises:
        ModelSourceError: the tag is there but unreadable.
    """
    encoded = registered.tags.get(FILES_TAG)
    if encoded is None:
        return None
    try:
        return decode_manifest(encoded)
    except ValueError as exc:
        raise ModelSourceError(f"{registered.name} version {registered.version}: {exc}") from exc


def _copy_problems(root: Path, expected: Manifest | None) -> list[str]:
    """How a downloaded copy differs from the registered files; nothing to compare without a record."""
    if expected is None:
        return []
    try:
        return manifest_mismatches(find_compressed_dir(root), expected)
    except ModelSourceError as exc:
        return [str(exc)]


def _discard(target: Path) -> None:
    """Move a bad cached copy out of the way in one rename, then delete it."""
    trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.discarded."))
    try:
        target.rename(trash / target.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename a finished download into the cache; another process that got there first wins."""
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
