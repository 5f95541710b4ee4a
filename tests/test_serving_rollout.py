"""Shadow and canary over real HTTP, on a real registry: the champion's answers are never touched, the split is
on target and sticky, a bad challenger is rolled back during load with no failed request, a good one is
stepped up and promoted, and the promotion log shows every step."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from langops.config import RolloutConfig
from langops.faults import CHALLENGER_FAULT_ENV
from langops.io import LABELS_FILE
from langops.promotions import read_evidence, read_history
from langops.rollouts import current_rollout, end_rollout, start_rollout

pytest_plugins = ["serving_helpers"]

from serving_helpers import Registry, empty_registry, wait_until
from serving_helpers import running_server as _running_server

pytestmark = pytest.mark.model

TEXTS = [f"ticket {index}: my card was charged twice for order {index * 7}" for index in range(2000)]


def rotated_labels_dir(compressed_dir: Path, root: Path) -> Path:
    """The same model with its labels rotated by one: a challenger that loads, answers confidently, and is wrong."""
    copy = root / "rotated"
    shutil.copytree(compressed_dir, copy)
    labels = json.loads((copy / LABELS_FILE).read_text())
    (copy / LABELS_FILE).write_text(json.dumps(labels[1:] + labels[:1]))
    return copy


@pytest.fixture
def registry(tmp_path: Path, compressed_dir: Path) -> tuple[Registry, str, str, str]:
    """Champion version 1; version 2, the same model; version 3, labels rotated."""
    registry = empty_registry(tmp_path / "registry")
    champion, same = registry.register(compressed_dir), registry.register(compressed_dir)
    rotated = registry.register(rotated_labels_dir(compressed_dir, tmp_path))
    registry.promote(champion)
    return registry, champion, same, rotated


@contextmanager
def running_server(server_settings):
    """A live server that already answers with the champion."""
    with _running_server(server_settings) as server, server.client() as client:
        wait_until(lambda: client.get("/ready").status_code == 200, what="the champion to load")
        yield server


# A shared CI machine can starve the low-priority mirror thread for seconds: tests that count every mirrored
# text give it a queue that never drops and a challenger timeout it never reaches (drops and timeouts have
# their own tests).
NEVER_DROPPED = {"mirror_queue": 10_000, "challenger_timeout_ms": 20_000.0}


def settings(registry: Registry, **rollout: object):
    return registry.settings(state_dir=registry.root, rollout=RolloutConfig(**rollout))


def start(registry: Registry, mode: str, version: str, cfg: RolloutConfig) -> None:
    start_rollout(registry.params(), mode=mode, version=version, cfg=cfg, actor="test", reason="test")


def reload(client: httpx.Client) -> None:
    assert client.post("/reload").status_code == 200


def predict(client: httpx.Client, text: str, **headers: str) -> httpx.Response:
    answer = client.post("/predict", json={"text": text}, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer


def load(url: str, texts: list[str], *, clients: int = 8, stop: threading.Event | None = None) -> list[httpx.Response]:
    """Send every text once (and go round again until ``stop`` is set) from ``clients`` keep-alive clients."""
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def worker(share: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=30.0, trust_env=False) as client:
            while True:
                for text in share:
                    answer = client.post("/predict", json={"text": text})
                    with lock:
                        answers.append(answer)
                if stop is None or stop.is_set():
                    return

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, [texts[index::clients] for index in range(clients)]))
    return answers


def bodies(answers: list[httpx.Response]) -> dict[str, list]:
    """Each text's predictions, less the ids the server issued (new for every request)."""
    return {json.loads(a.request.content)["text"]: [{k: v for k, v in p.items() if k != "request_id"}
                                                    for p in a.json()["predictions"]] for a in answers}


def events(registry: Registry) -> list[tuple[str, str]]:
    return [(event.event, event.to_version) for event in reversed(read_history(registry.params(), registry.model_name))]


def test_a_shadow_never_changes_a_response_and_reports_how_the_challenger_differs(registry):
    registry, champion, _, rotated = registry
    texts = TEXTS[:300]
    with running_server(settings(registry)) as plain:
        expected = bodies(load(plain.url, texts))
    cfg = RolloutConfig(min_comparisons=50, **NEVER_DROPPED)
    with running_server(settings(registry, min_comparisons=50, **NEVER_DROPPED)) as server, server.client() as client:
        start(registry, "shadow", rotated, cfg)
        reload(client)
        answers = load(server.url, texts)
        assert {(a.headers["X-Model-Version"], a.headers["X-Model-Role"]) for a in answers} == {(champion, "champion")}
        wait_until(lambda: client.get("/rollout").json()["window"]["compared"] >= len(texts) * 0.9,
                   what="the shadow to score the mirrored requests")
        status = client.get("/rollout").json()
        metrics = client.get("/metrics").text
    assert bodies(answers) == expected
    window = status["window"]
    assert status["rollout"]["mode"] == "shadow" and status["challenger_version"] == rotated
    assert window["agreement"] == 0.0 and sum(window["disagreements"].values()) == window["compared"]
    assert window["challenger"]["p50_ms"] is not None and window["champion"]["p50_ms"] is not None
    assert status["verdict"]["outcome"] == "fail"  # reported; a shadow is never acted on
    assert current_rollout(registry.params()).mode == "shadow"
    assert f'langops_shadow_comparisons_total{{agreed="false",challenger_version="{rotated}",champion_version="{champion}"}}' in metrics
    assert f'langops_rollout_info{{mode="shadow",version="{rotated}"}} 0.0' in metrics


def test_shadow_feedback_gives_each_models_accuracy_on_the_same_requests(registry, tmp_path):
    registry, _, _, rotated = registry
    server_settings = settings(registry, **NEVER_DROPPED).model_copy(update={"prediction_log_dir": tmp_path / "log"})
    with running_server(server_settings) as server, server.client() as client:
        start(registry, "shadow", rotated, RolloutConfig(**NEVER_DROPPED))
        reload(client)
        answers = [predict(client, text) for text in TEXTS[:40]]
        wait_until(lambda: client.get("/rollout").json()["window"]["compared"] == 40, what="the shadow")
        truth = [{"request_id": a.headers["X-Request-Id"], "label": a.json()["predictions"][0]["label"]} for a in answers]
        assert client.post("/feedback", json=truth).status_code == 202
        window = client.get("/rollout").json()["window"]
    assert (window["champion"]["feedback"], window["champion"]["accuracy"]) == (40, 1.0)
    assert (window["challenger"]["feedback"], window["challenger"]["accuracy"]) == (40, 0.0)


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_crashing_or_hanging_shadow_does_not_touch_the_champions_answers(registry, fault, monkeypatch):
    registry, _, same, _ = registry
    texts = TEXTS[:200]
    with running_server(settings(registry)) as plain:
        expected = bodies(load(plain.url, texts))
    monkeypatch.setenv(CHALLENGER_FAULT_ENV, fault)
    with running_server(settings(registry, challenger_timeout_ms=200)) as server, server.client() as client:
        start(registry, "shadow", same, RolloutConfig())
        reload(client)
        answers = load(server.url, texts)
        wait_until(lambda: client.get("/rollout").json()["window"]["challenger"]["errors"] > 0,
                   what="the challenger's failure to be counted")
        status = client.get("/rollout").json()
    assert bodies(answers) == expected
    assert {a.headers["X-Model-Role"] for a in answers} == {"champion"}
    assert status["window"]["compared"] == 0
    if fault == "hang":  # one call hangs; what comes after it is dropped, not queued behind it
        assert status["window"]["dropped"] > 0
    assert max(a.elapsed.total_seconds() for a in answers) < 5


def test_the_canary_split_is_on_target_over_2000_requests_and_sticky(registry):
    registry, champion, same, _ = registry
    cfg = RolloutConfig(canary_steps=(25.0, 100.0), min_requests=1_000_000)  # never judged here
    with running_server(settings(registry, canary_steps=(25.0, 100.0), min_requests=1_000_000)) as server, \
            server.client() as client:
        start(registry, "canary", same, cfg)
        reload(client)
        answers = load(server.url, TEXTS)
        share = Counter(a.headers["X-Model-Role"] for a in answers)["challenger"] / len(answers) * 100
        first = {json.loads(a.request.content)["text"]: a.headers["X-Model-Version"] for a in answers}
        again = {text: predict(client, text).headers["X-Model-Version"] for text in TEXTS[:200]}
        by_caller = {predict(client, text, **{"X-Langops-Route-Key": "caller-42"}).headers["X-Model-Role"]
                     for text in TEXTS[:50]}
    assert len(answers) == 2000 and all(a.status_code == 200 for a in answers)
    assert abs(share - 25) <= 3, f"challenger answered {share:.1f}% of requests, target 25%"
    assert {version for version in first.values()} == {champion, same}
    assert again == {text: first[text] for text in TEXTS[:200]}
    assert len(by_caller) == 1  # one caller, one model, whatever it sends


def test_a_bad_canary_is_rolled_back_during_load_with_no_failed_request(registry):
    registry, champion, _, rotated = registry
    knobs = {"canary_steps": (20.0, 50.0, 100.0), "min_requests": 40, "min_comparisons": 30, "judge_every_s": 0.2}
    stop = threading.Event()
    with running_server(settings(registry, **knobs)) as server, server.client() as client:
        start(registry, "canary", rotated, RolloutConfig(**knobs))
        reload(client)
        loader = ThreadPoolExecutor(1).submit(load, server.url, TEXTS[:400], stop=stop)
        try:
            wait_until(lambda: current_rollout(registry.params()) is None, what="the canary to be rolled back")
        finally:
            stop.set()
        answers = loader.result()
        after = [predict(client, text) for text in TEXTS[:100]]
        status = client.get("/rollout").json()
    assert answers and all(a.status_code == 200 for a in answers), Counter(a.status_code for a in answers)
    assert {a.headers["X-Model-Version"] for a in after} == {champion}
    assert str(registry.client().get_model_version_by_alias(registry.model_name, "champion").version) == champion
    assert status["rollout"] is None and status["last_action"]["action"] == "rollback"
    assert events(registry)[-2:] == [("canary-start", rotated), ("canary-rollback", rotated)]
    rollback = read_history(registry.params(), registry.model_name, limit=1)[0]
    assert "agreement" in rollback.reason and rollback.actor == "langops-server"
    evidence = read_evidence(registry.params(), rollback.record_id)
    assert evidence["verdict"]["outcome"] == "fail" and evidence["window"]["agreement"] < 0.9


def test_a_crashing_canary_is_answered_by_the_champion_and_rolled_back(registry, monkeypatch):
    registry, champion, same, _ = registry
    monkeypatch.setenv(CHALLENGER_FAULT_ENV, "crash")
    knobs = {"canary_steps": (50.0, 100.0), "min_requests": 100, "judge_every_s": 0.2}
    with running_server(settings(registry, **knobs)) as server, server.client() as client:
        start(registry, "canary", same, RolloutConfig(**knobs))
        reload(client)
        answers = load(server.url, TEXTS[:300])
        wait_until(lambda: current_rollout(registry.params()) is None, what="the canary to be rolled back")
    assert all(a.status_code == 200 for a in answers)
    assert {a.headers["X-Model-Version"] for a in answers} == {champion}
    assert events(registry)[-1] == ("canary-rollback", same)


def test_a_good_canary_is_stepped_up_and_promoted_with_every_step_in_the_history(registry):
    registry, champion, same, _ = registry
    # One challenger call past its timeout is an error, and one error in a 30-request window fails the step:
    # on a shared CI machine the timeout and latency limits are loose here; they have their own tests.
    knobs = {"canary_steps": (20.0, 50.0, 100.0), "min_requests": 30, "min_comparisons": 10, "judge_every_s": 0.2,
             "max_p50_ms": 5000.0, "max_p99_ms": 10000.0, **NEVER_DROPPED}
    stop = threading.Event()
    with running_server(settings(registry, **knobs)) as server, server.client() as client:
        start(registry, "canary", same, RolloutConfig(**knobs))
        reload(client)
        loader = ThreadPoolExecutor(1).submit(load, server.url, TEXTS[:400], stop=stop)
        try:
            wait_until(lambda: current_rollout(registry.params()) is None, what="the canary to end")
            wait_until(lambda: client.get("/version").json()["version"] == same, what="the promoted version to serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the server's rollout status: {client.get('/rollout').json()}") from None
        finally:
            stop.set()
        answers = loader.result()
    assert all(a.status_code == 200 for a in answers)
    assert str(registry.client().get_model_version_by_alias(registry.model_name, "champion").version) == same
    assert events(registry)[-4:] == [("canary-start", same), ("canary-step", same), ("canary-step", same),
                                     ("promote", same)]
    promoted = read_history(registry.params(), registry.model_name, limit=1)[0]
    assert promoted.from_version == champion and promoted.actor == "langops-server"
    assert read_evidence(registry.params(), promoted.record_id)["verdict"]["outcome"] == "pass"
    assert current_rollout(registry.params()) is None


def test_one_rollout_at_a_time_and_the_champion_is_never_its_own_challenger(registry):
    from langops.rollouts import RolloutError

    registry, champion, same, rotated = registry
    params = registry.params()
    with pytest.raises(RolloutError, match="already is the champion"):
        start(registry, "canary", champion, RolloutConfig())
    start(registry, "shadow", same, RolloutConfig())
    with pytest.raises(RolloutError, match="a shadow of version .* is in progress"):
        start(registry, "canary", rotated, RolloutConfig())
    start(registry, "canary", same, RolloutConfig())  # a shadow may become a canary of the same version
    end_rollout(params, expected=None, event="canary-abort", reason="test", actor="test")
    assert current_rollout(params) is None
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        registry.client().get_model_version_by_alias(registry.model_name, "challenger")


def test_the_commands_start_show_and_end_a_rollout_and_the_history_lists_them(registry, tmp_path, capsys):
    import yaml
    from pipeline_helpers import free_port

    from langops.cli import main

    registry, champion, same, rotated = registry
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"project": {"state_dir": str(registry.root)},
                                           "deploy": {"port": free_port()}}))
    common = ["--params", str(params_file)]
    assert main(["shadow", "start", "--version", rotated, *common]) == 0
    assert f"shadow of langops-classifier version {rotated} against champion {champion}" in capsys.readouterr().out
    assert main(["canary", "start", "--version", same, *common]) == 1
    assert f"a shadow of version {rotated} is in progress" in capsys.readouterr().err
    assert main(["shadow", "status", *common]) == 0
    assert "does not answer: no live window" in capsys.readouterr().out
    assert main(["shadow", "stop", *common]) == 0
    assert main(["canary", "start", "--version", same, *common]) == 0
    assert "answering 5% of requests (steps 5%, 25%, 50%, 100%" in capsys.readouterr().out
    assert main(["canary", "abort", "--reason", "drill", *common]) == 0
    assert main(["history", *common]) == 0
    shown = capsys.readouterr().out
    for event in ("shadow-start", "shadow-stop", "canary-start", "canary-abort"):
        assert event in shown
    assert main(["canary", "promote", *common]) == 1
    assert "no shadow or canary" in capsys.readouterr().err
