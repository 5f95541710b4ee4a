"""The model server over real HTTP: endpoints, input validation, and hot swaps that follow the registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from langops.serving.__main__ import parse_settings
from langops.serving.app import ServerSettings
from langops.serving.registry import (
    LocalModelSource,
    ModelSourceError,
    download_compressed_dir,
    find_compressed_dir,
)

# serving_helpers holds the shared fixtures (compressed_dir, registered); registering it for assertion
# rewriting before importing it keeps pytest's detailed assert messages there, and silences a warning.
pytest_plugins = ["serving_helpers"]
from conftest import LABELS
from serving_helpers import (
    LiveServer,
    RegisteredModels,
    empty_registry,
    free_port,
    running_server,
    served_version,
    serving_local,
    wait_for_version,
    wait_until,
)


@pytest.fixture(scope="module")
def server(compressed_dir: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(model_dir=compressed_dir, port=free_port(), max_request_texts=8, max_text_chars=200)
    with serving_local(settings) as live:
        yield live


def check_predictions(body: dict, count: int) -> None:
    assert len(body["predictions"]) == count
    for prediction in body["predictions"]:
        assert prediction["label"] in LABELS
        assert set(prediction["probabilities"]) == set(LABELS)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)


@pytest.mark.model
def test_health_ready_version(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "version": "local"}
    version = client.get("/version").json()
    assert version["version"] == "local" and version["source"] == "local" and version["loaded_at"]
    assert health.headers["X-Model-Version"] == "local"


@pytest.mark.model
def test_predict_one_text(client: httpx.Client) -> None:
    response = client.post("/predict", json={"text": "my invoice is wrong"})
    assert response.status_code == 200
    body = response.json()
    check_predictions(body, 1)
    assert body["version"] == response.headers["X-Model-Version"] == "local"


@pytest.mark.model
def test_predict_many_texts(client: httpx.Client) -> None:
    texts = ["where is my parcel", "the app crashes", "refund please", "hello"]
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200
    check_predictions(response.json(), len(texts))


@pytest.mark.model
@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"content": b'{"texts": ["x"', "headers": {"content-type": "application/json"}}, 400, "valid JSON"),
        ({"json": {}}, 422, 'either "text"'),
        ({"json": {"text": "a", "texts": ["b"]}}, 422, "not both"),
        ({"json": {"texts": "not a list"}}, 422, "texts"),
        ({"json": {"texts": ["ok", 3]}}, 422, "texts.1"),
        ({"json": {"text": 42}}, 422, "text"),
        ({"json": {"texts": []}}, 422, "empty"),
        ({"json": {"text": "   "}}, 422, "text 0 is empty"),
        ({"json": {"texts": ["fine", ""]}}, 422, "text 1 is empty"),
        ({"json": {"txt": "typo"}}, 422, "txt"),
        ({"json": ["a", "list"]}, 422, "request body"),
        ({"json": {"texts": ["x"] * 9}}, 413, "limit is 8"),
        ({"json": {"text": "x" * 201}}, 413, "limit is 200"),
    ],
    ids=["malformed-json", "missing", "both", "texts-not-list", "text-item-not-str", "text-not-str",
         "empty-list", "blank-text", "empty-item", "unknown-field", "not-an-object", "too-many", "too-long"],
)
def test_bad_requests_get_a_clear_4xx(
    client: httpx.Client, request_kwargs: dict, status: int, message: str
) -> None:
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.post("/predict", json={"text": "still alive?"}).status_code == 200


@pytest.mark.unit
def test_settings_need_a_model() -> None:
    with pytest.raises(ValueError, match="model_dir, or both tracking_uri and model_name"):
        ServerSettings(model_name="only-a-name")


@pytest.mark.unit
def test_command_line_passes_only_given_options(tmp_path: Path) -> None:
    settings = parse_settings(["--model-dir", str(tmp_path), "--port", "9000", "--max-request-texts", "3"])
    assert (settings.model_dir, settings.port, settings.max_request_texts) == (tmp_path, 9000, 3)
    assert settings.host == ServerSettings.model_fields["host"].default


@pytest.mark.unit
def test_command_line_takes_the_settings_whole_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the deploy step starts the server with: every setting in one file; options still override it."""
    settings = ServerSettings(tracking_uri="sqlite:///registry.db", model_name="m", max_batch_size=8,
                              prediction_log_text="raw", cache_dir=tmp_path / "models")
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")  # the file's URI wins over the variable

    assert parse_settings(["--settings", str(settings_file)]) == settings
    assert parse_settings(["--settings", str(settings_file), "--port", "9001"]) == settings.model_copy(
        update={"port": 9001}
    )
    settings_file.write_text('{"model_dir": "/models", "max_batch_size": 0}')
    with pytest.raises(SystemExit):
        parse_settings(["--settings", str(settings_file)])  # checked like an option: --max-batch-size: ...


@pytest.mark.unit
def test_find_compressed_dir_searches_for_serving_json(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no serving.json"):
        find_compressed_dir(tmp_path)
    (tmp_path / "artifacts" / "deep").mkdir(parents=True)
    (tmp_path / "artifacts" / "deep" / "serving.json").write_text("{}")
    assert find_compressed_dir(tmp_path) == tmp_path / "artifacts" / "deep"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "serving.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="several"):
        find_compressed_dir(tmp_path)


@pytest.mark.unit
def test_local_source_has_one_version(tmp_path: Path) -> None:
    (tmp_path / "serving.json").write_text("{}")
    source = LocalModelSource(tmp_path)
    assert source.current_version() == "local" and source.fetch("local") == tmp_path
    with pytest.raises(ModelSourceError, match="only has version"):
        source.fetch("2")


@pytest.mark.model
def test_not_ready_without_a_champion(registered: RegisteredModels) -> None:
    settings = registered.registry.settings(alias="no-such-alias")
    with running_server(settings) as server, server.client() as client:
        assert client.get("/health").status_code == 200
        wait_until(lambda: "no-such-alias" in client.get("/ready").text, what="the alias error on /ready")
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        response = client.post("/predict", json={"text": "hello"})
        assert response.status_code == 503 and "no-such-alias" in response.json()["detail"]
        assert client.post("/reload").status_code == 502


@pytest.mark.model
def test_reload_follows_the_alias(registered: RegisteredModels) -> None:
    registry, (first, second) = registered.registry, registered.good
    registry.set_champion(first)
    with running_server(registry.settings()) as server, server.client() as client:
        wait_for_version(client, first)
        registry.set_champion(second)
        response = client.post("/reload")
        assert response.status_code == 200
        assert response.json() == {
            "old_version": first, "new_version": second, "target_version": second, "swapped": True
        }
        prediction = client.post("/predict", json={"text": "hello"})
        assert prediction.json()["version"] == prediction.headers["X-Model-Version"] == second
        assert client.post("/reload").json()["swapped"] is False


@pytest.mark.model
def test_poller_follows_the_alias(registered: RegisteredModels) -> None:
    registry, (first, second) = registered.registry, registered.good
    registry.set_champion(first)
    with running_server(registry.settings(poll_seconds=0.2)) as server, server.client() as client:
        wait_for_version(client, first)
        registry.set_champion(second)
        wait_for_version(client, second)
        assert client.get("/version").json()["alias"] == "champion"


@pytest.mark.model
def test_broken_version_is_refused_and_the_old_one_keeps_serving(
    registered: RegisteredModels, caplog: pytest.LogCaptureFixture
) -> None:
    registry, (first, _), broken = registered.registry, registered.good, registered.broken
    registry.set_champion(first)
    with running_server(registry.settings(poll_seconds=0.1)) as server, server.client() as client:
        wait_for_version(client, first)
        with caplog.at_level(logging.ERROR, logger="langops.serving.app"):
            registry.set_champion(broken)
            wait_until(lambda: broken in client.get("/version").json()["refused"], what="a refusal")
            time.sleep(1.0)  # ten more polls: the refused version must not be loaded again
        refusals = [r for r in caplog.records if f"version {broken}" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert served_version(client) == first
        assert client.get("/ready").status_code == 200

        reload = client.post("/reload")  # an explicit reload retries, and refuses again
        assert reload.status_code == 409
        assert f"version {broken} refused" in reload.json()["detail"]
        assert reload.json()["new_version"] == first
        prediction = client.post("/predict", json={"texts": ["still", "serving"]})
        assert prediction.status_code == 200 and prediction.json()["version"] == first


def wait_for_more_answers(seen: list, count: int = 5) -> None:
    target = len(seen) + count
    wait_until(lambda: len(seen) >= target, what=f"{count} more answers")


@pytest.mark.model
def test_requests_never_fail_during_swaps(registered: RegisteredModels) -> None:
    registry, (first, second) = registered.registry, registered.good
    registry.set_champion(first)
    seen: list[tuple[str, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def send_requests(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30.0, trust_env=False) as client:
            while not stop.is_set():
                try:
                    response = client.post("/predict", json={"texts": ["where is my parcel", "refund"]})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                else:
                    seen.append((response.headers["X-Model-Version"], response.json()["version"]))

    with running_server(registry.settings()) as server, server.client() as client:
        wait_for_version(client, first)
        senders = [threading.Thread(target=send_requests, args=(server.url,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            wait_for_more_answers(seen)
            for version in (second, first, second):
                registry.set_champion(version)
                assert client.post("/reload").json()["new_version"] == version
                wait_for_more_answers(seen)
        finally:
            stop.set()
            for sender in senders:
                sender.join(30)
    assert failures == []
    assert {header for header, _ in seen} == {first, second}
    assert all(header == body for header, body in seen)


@pytest.mark.model
def test_a_download_that_differs_from_the_registered_files_is_refused_and_not_cached(
    registered: RegisteredModels, tmp_path: Path
) -> None:
    registry = registered.registry
    with pytest.raises(ModelSourceError, match=r"model\.onnx: size 25 bytes, expected \d+"):
        download_compressed_dir(registry.model_name, registered.broken, cache_dir=tmp_path,
                                tracking_uri=registry.tracking_uri)
    assert not list(tmp_path.rglob("model.onnx")), "a refused download must not stay in the cache"


@pytest.mark.model
def test_a_tampered_cached_copy_is_downloaded_again(registered: RegisteredModels, tmp_path: Path) -> None:
    registry, version = registered.registry, registered.good[0]

    def fetch() -> Path:
        return download_compressed_dir(registry.model_name, version, cache_dir=tmp_path,
                                       tracking_uri=registry.tracking_uri)

    cached = fetch() / "model.onnx"
    original = cached.read_bytes()
    cached.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # same size: only the digest tells
    assert (fetch() / "model.onnx").read_bytes() == original


@pytest.mark.model
def test_a_cached_copy_damaged_while_the_server_runs_is_repaired_while_it_keeps_serving(
    compressed_dir: Path, tmp_path: Path
) -> None:
    registry = empty_registry(tmp_path)
    version = registry.register(compressed_dir)
    registry.set_champion(version)
    settings = registry.settings(poll_seconds=0.2, cache_check_s=0.5)
    with running_server(settings) as server, server.client() as client:
        wait_for_version(client, version)
        (cached,) = settings.cache_dir.rglob("model.onnx")
        original = cached.read_bytes()
        cached.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # same size: only the digest tells

        def repaired() -> bool:
            assert client.post("/predict", json={"text": "hello"}).status_code == 200  # served from memory
            return "langops_model_cache_repairs_total 1.0" in client.get("/metrics").text.splitlines()

        wait_until(repaired, what="the damaged cached copy to be downloaded again", timeout=30)
        assert [path.read_bytes() for path in settings.cache_dir.rglob("model.onnx")] == [original]
    # A restart loads the repaired copy as it is: nothing refused, nothing to fall back from.
    with running_server(settings.model_copy(update={"port": free_port()})) as server, server.client() as client:
        wait_for_version(client, version)
        assert client.get("/ready").json() == {"ready": True, "version": version}


@pytest.mark.model
def test_a_corrupt_champion_falls_back_to_the_last_served_version_until_restored(
    compressed_dir: Path, tmp_path: Path
) -> None:
    registry = empty_registry(tmp_path)
    first = registry.register(compressed_dir)
    registry.set_champion(first)
    settings = registry.settings()
    with running_server(settings) as server, server.client() as client:
        wait_for_version(client, first)
        second = registry.register(compressed_dir)
        original = registry.corrupt(second)
        registry.set_champion(second)
        reload = client.post("/reload")
        assert reload.status_code == 409
        assert f"version {second} refused, still serving {first}" in reload.json()["detail"]
        assert served_version(client) == first
        assert client.get("/ready").json() == {"ready": True, "version": first}  # not a fallback: it was live

    # A restart with the same (warm) cache: nothing is live, the alias's version is refused.
    with running_server(settings.model_copy(update={"port": free_port()})) as server, server.client() as client:
        wait_for_version(client, first)
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["version"] == first
        assert f"names version {second}, which was refused" in ready.json()["detail"]
        assert "model.onnx: size 25 bytes" in ready.json()["detail"]
        assert f"falling back to version {first}" in ready.json()["detail"]
        info = client.get("/version").json()
        assert info["version"] == first and info["fallback_for"] == second
        assert client.post("/predict", json={"text": "hello"}).json()["version"] == first

        registry.stored_model_file(second).write_bytes(original)
        reload = client.post("/reload")
        assert reload.status_code == 200, reload.text
        assert reload.json()["new_version"] == second
        assert client.get("/ready").json() == {"ready": True, "version": second}
        assert client.get("/version").json()["fallback_for"] is None


@pytest.mark.model
def test_a_server_with_no_history_falls_back_to_the_previous_champion(compressed_dir: Path, tmp_path: Path) -> None:
    registry = empty_registry(tmp_path)
    first, second = registry.register(compressed_dir), registry.register(compressed_dir)
    registry.promote(first)
    registry.promote(second)
    registry.corrupt(second)
    with running_server(registry.settings(cache_dir=tmp_path / "empty-cache")) as server, server.client() as client:
        wait_for_version(client, first)
        info = client.get("/version").json()
        assert info["fallback_for"] == second and "model.onnx" in info["refused"][second]
        assert client.get("/ready").status_code == 200
