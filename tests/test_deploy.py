"""The deploy step against a real detached server process and a real MLflow registry."""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from langops.config import DeployConfig
from langops.serving.app import ServerSettings
from langops.tasks.deploy import (
    PID_FILE,
    SERVER_DIR,
    DeploymentError,
    deploy,
    server_url,
    settings_changes,
    stop_server,
)

# Shared fixtures (compressed_dir, registered) live in serving_helpers; see test_serving.py.
pytest_plugins = ["serving_helpers"]
from serving_helpers import RegisteredModels, empty_registry, free_port, running_server


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose server, if a test started one, is stopped whatever the test did."""
    yield tmp_path
    stop_server(tmp_path)


def deploy_config(port: int, **settings: object) -> DeployConfig:
    return DeployConfig(port=port, poll_seconds=3600, start_timeout_s=90, **settings)


@pytest.mark.services
def test_deploy_starts_reloads_and_stops(registered: RegisteredModels, state_dir: Path) -> None:
    registry, (first, second) = registered.registry, registered.good
    cfg = deploy_config(free_port())
    target = {"tracking_uri": registry.tracking_uri, "model_name": registry.model_name,
              "state_dir": state_dir}

    registry.set_champion(first)
    started = deploy(cfg, expected_version=first, **target)
    assert started.started and started.version == first and started.url == f"http://127.0.0.1:{cfg.port}"
    assert psutil.pid_exists(started.pid)
    assert (state_dir / SERVER_DIR / PID_FILE).read_text().strip() == str(started.pid)
    assert (state_dir / SERVER_DIR / "server.log").is_file()

    registry.set_champion(second)
    reloaded = deploy(cfg, expected_version=second, **target)
    assert (reloaded.started, reloaded.pid, reloaded.version) == (False, started.pid, second)
    with httpx.Client(base_url=reloaded.url, trust_env=False) as client:
        response = client.post("/predict", json={"text": "where is my parcel"})
        assert response.headers["X-Model-Version"] == second

    assert stop_server(state_dir) is True
    assert not psutil.pid_exists(started.pid) or psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
    assert not (state_dir / SERVER_DIR / PID_FILE).exists()
    assert stop_server(state_dir) is False


@pytest.mark.services
def test_deploy_stops_a_server_that_refuses_the_version(
    registered: RegisteredModels, state_dir: Path
) -> None:
    registry = registered.registry
    registry.set_champion(registered.broken)
    with pytest.raises(DeploymentError, match=f"refused version {registered.broken}") as failure:
        deploy(deploy_config(free_port()), tracking_uri=registry.tracking_uri, model_name=registry.model_name,
               expected_version=registered.broken, state_dir=state_dir)
    assert "last lines of" in str(failure.value)
    assert not (state_dir / SERVER_DIR / PID_FILE).exists()


@pytest.mark.model
def test_deploy_fails_fast_when_the_alias_names_another_version(
    registered: RegisteredModels, tmp_path: Path
) -> None:
    registry = registered.registry
    registry.set_champion(registered.good[0])
    with pytest.raises(DeploymentError, match="not the expected 999"):
        deploy(deploy_config(free_port()), tracking_uri=registry.tracking_uri, model_name=registry.model_name,
               expected_version="999", state_dir=tmp_path)


@pytest.mark.model
def test_deploy_refuses_a_port_held_by_something_else(registered: RegisteredModels, tmp_path: Path) -> None:
    registry, version = registered.registry, registered.good[0]
    registry.set_champion(version)
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DeploymentError, match="not a langops server"):
            deploy(deploy_config(other.server_address[1]), tracking_uri=registry.tracking_uri,
                   model_name=registry.model_name, expected_version=version, state_dir=tmp_path)
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.model
def test_deploy_refuses_a_langops_server_serving_another_model(
    registered: RegisteredModels, compressed_dir: Path, tmp_path: Path
) -> None:
    registry, version = registered.registry, registered.good[0]
    registry.set_champion(version)
    with running_server(ServerSettings(model_dir=compressed_dir, port=free_port())) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(DeploymentError, match=f"not {registry.model_name}@champion"):
            deploy(deploy_config(port), tracking_uri=registry.tracking_uri, model_name=registry.model_name,
                   expected_version=version, state_dir=tmp_path)


@pytest.mark.services
def test_deploy_restarts_the_server_when_a_deploy_setting_changes(
    registered: RegisteredModels, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A changed ``deploy.max_batch_size`` is applied: the server restarts with it (a reload could not)."""
    registry, version = registered.registry, registered.good[0]
    registry.set_champion(version)
    port = free_port()
    target = {"tracking_uri": registry.tracking_uri, "model_name": registry.model_name,
              "expected_version": version, "state_dir": state_dir}

    first = deploy(deploy_config(port), **target)
    with httpx.Client(base_url=first.url, timeout=30, trust_env=False) as client:
        assert client.get("/version").json()["settings"]["max_batch_size"] == 64
        assert onnxruntime_calls(client, texts=20) == (1, 32)  # one call of 20 texts
    again = deploy(deploy_config(port), **target)
    assert (again.started, again.restarted, again.pid, again.settings_changed) == (False, False, first.pid, ())

    with caplog.at_level(logging.INFO, logger="langops.tasks.deploy"):
        changed = deploy(deploy_config(port, max_batch_size=8), **target)
    assert (changed.started, changed.restarted, changed.version) == (True, True, version)
    assert changed.settings_changed == ("max_batch_size: 64 → 8",)
    assert "settings changed (max_batch_size: 64 → 8); restarting it" in caplog.text
    assert changed.pid != first.pid and not _alive(first.pid)
    assert (state_dir / SERVER_DIR / PID_FILE).read_text().strip() == str(changed.pid)
    with httpx.Client(base_url=changed.url, timeout=30, trust_env=False) as client:
        info = client.get("/version").json()
        assert (info["version"], info["settings"]["max_batch_size"]) == (version, 8)
        assert onnxruntime_calls(client, texts=20) == (3, 8)  # 8 + 8 + 4: the new setting at work

    # A new port moves the server: the old one answers nowhere, even though nothing answered on the new one.
    moved = deploy(deploy_config(free_port(), max_batch_size=8), **target)
    assert moved.restarted and moved.settings_changed == (f"port: {port} → {moved.url.rsplit(':', 1)[1]}",)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{changed.url}/health", timeout=5, trust_env=False)
    assert httpx.get(f"{moved.url}/ready", timeout=5, trust_env=False).status_code == 200


def onnxruntime_calls(client: httpx.Client, *, texts: int) -> tuple[int, float]:
    """Score ``texts`` copies of one text in one request on a fresh server: how many onnxruntime calls it
    took, and the smallest ``langops_batch_size`` bucket (of ``/metrics``) that holds every call."""
    from prometheus_client.parser import text_string_to_metric_families

    assert client.post("/predict", json={"texts": ["where is my parcel"] * texts}).status_code == 200
    families = text_string_to_metric_families(client.get("/metrics").text)
    (batch_size,) = [family for family in families if family.name == "langops_batch_size"]
    calls = next(int(s.value) for s in batch_size.samples if s.name.endswith("_count"))
    largest = min(float(s.labels["le"]) for s in batch_size.samples if s.name.endswith("_bucket") and s.value == calls)
    return calls, largest


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.unit
def test_settings_changes_name_what_differs(tmp_path: Path) -> None:
    wanted = ServerSettings(tracking_uri="sqlite:///new.db", model_name="m", max_batch_size=8, cache_dir=tmp_path)
    running = wanted.model_copy(update={"max_batch_size": 64, "tracking_uri": "sqlite:///old.db"})
    info = {"settings": running.tuning(), "settings_fingerprint": running.fingerprint()}

    assert settings_changes({"settings": wanted.tuning(), "settings_fingerprint": wanted.fingerprint()},
                            wanted, kept=None) == ()
    # The server reports its tuning; the settings file it was started with names the rest.
    assert settings_changes(info, wanted, kept=None) == ("max_batch_size: 64 → 8",)
    assert settings_changes(info, wanted, kept=running) == (
        "max_batch_size: 64 → 8", 'tracking_uri: "sqlite:///old.db" → "sqlite:///new.db"'
    )
    hidden = {"settings": wanted.tuning(), "settings_fingerprint": running.fingerprint()}
    assert settings_changes(hidden, wanted, kept=None)[0].startswith("one of tracking_uri, model_name")
    assert settings_changes({}, wanted, kept=None)[0].startswith("settings unknown")  # restarted too


@pytest.mark.unit
def test_stop_server_ignores_a_pid_that_is_not_a_server(tmp_path: Path) -> None:
    pid_file = tmp_path / SERVER_DIR / PID_FILE
    pid_file.parent.mkdir()
    pid_file.write_text(f"{os.getpid()}\n")  # this test process: must survive
    assert stop_server(tmp_path) is False
    assert not pid_file.exists()


@pytest.mark.unit
def test_server_url_reaches_wildcard_binds_through_loopback() -> None:
    assert server_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert server_url("::1", 80) == "http://[::1]:80"


@pytest.mark.model
def test_servable_check_loads_each_version_in_a_fresh_process(registered: RegisteredModels, tmp_path: Path) -> None:
    from langops.serving.infra_check import check_servable

    registry = registered.registry
    common = {"tracking_uri": registry.tracking_uri, "model_name": registry.model_name}
    good = check_servable(version=registered.good[0], texts=["where is my parcel", "refund please"], **common)
    assert good.ok, good.detail
    assert good.detail == "loaded in a fresh process and answered 2 texts"

    broken = check_servable(version=registered.broken, texts=["where is my parcel"], **common)
    assert not broken.ok
    assert broken.detail.startswith("fresh process failed:")
    missing = check_servable(version="999", texts=["hi"], **common)
    assert not missing.ok and "999" in missing.detail


@pytest.mark.model
def test_servable_check_judges_the_registry_files_not_a_cached_copy(compressed_dir: Path, tmp_path: Path) -> None:
    from langops.serving.infra_check import check_servable
    from langops.serving.registry import download_compressed_dir

    registry = empty_registry(tmp_path)
    version = registry.register(compressed_dir)
    cache_dir = registry.params().project.state_dir / "cache"  # where the pipeline keeps its downloads
    download_compressed_dir(registry.model_name, version, cache_dir=cache_dir, tracking_uri=registry.tracking_uri)
    registry.corrupt(version)  # the good copy stays in the cache
    result = check_servable(tracking_uri=registry.tracking_uri, model_name=registry.model_name, version=version,
                            texts=["where is my parcel"])
    assert not result.ok
    assert "model.onnx: size 25 bytes" in result.detail
