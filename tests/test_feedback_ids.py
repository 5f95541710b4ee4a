"""Feedback names exactly one scored text, over real HTTP: the server issues its own id for every request
whatever the client sends, checks feedback against the ids it issued (across servers sharing a log folder,
as workers do, and across restarts, within ``feedback_window_hours``), refuses a client's id that several
texts carry, and the export joins each label to the text it named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

pytest_plugins = ["serving_helpers"]
from pipeline_helpers import REPO_PARAMS
from serving_helpers import free_port, serving_local, wait_until

from langops.config import MonitorConfig, ServerConfig
from langops.prediction_records import new_request_id
from langops.serving.app import ServerSettings

PARCEL = "my parcel never arrived and the tracking page is empty"
CANCEL = "please cancel my subscription today"
ISSUED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "predictions"


def settings_for(compressed_dir: Path, log_dir: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {"model_dir": compressed_dir, "port": free_port(), "prediction_log_dir": log_dir,
                                 "prediction_log_text": "raw", "max_request_texts": 8}
    return ServerSettings(**{**values, **overrides})


@pytest.fixture
def client(compressed_dir: Path, log_dir: Path) -> Iterator[httpx.Client]:
    """A fresh server with its own prediction log (texts kept), so an export holds this test's rows only."""
    with serving_local(settings_for(compressed_dir, log_dir)) as live, live.client() as http:
        yield http


def feedback_lines(log_dir: Path, count: int) -> list[dict]:
    def lines() -> list[dict]:
        return [json.loads(line) for path in sorted(log_dir.glob("feedback*.jsonl"))
                for line in path.read_text().splitlines()]

    wait_until(lambda: len(lines()) >= count, what=f"{count} feedback lines")
    return lines()


def logged_records(log_dir: Path, count: int) -> list[dict]:
    def records() -> list[dict]:
        return [json.loads(line) for path in sorted(log_dir.glob("predictions*.jsonl"))
                for line in path.read_text().splitlines()]

    wait_until(lambda: len(records()) >= count, what=f"{count} logged predictions")
    return records()


def langops_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["project"]["state_dir"] = str(cwd / ".langops")
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "langops.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.model
def test_a_reused_client_id_gets_an_issued_id_per_request_and_feedback_lands_on_each_text(
    client: httpx.Client, log_dir: Path, tmp_path: Path
) -> None:
    answers = [client.post("/predict", json={"text": text}, headers={"X-Request-Id": "order-4711"})
               for text in (PARCEL, CANCEL)]
    issued = [answer.headers["X-Request-Id"] for answer in answers]
    assert all(ISSUED.fullmatch(value) for value in issued) and issued[0] != issued[1]
    for answer, request_id in zip(answers, issued, strict=True):
        body = answer.json()
        assert answer.status_code == 200 and answer.headers["X-Client-Request-Id"] == "order-4711"
        assert (body["request_id"], body["client_request_id"]) == (request_id, "order-4711")
        assert body["predictions"][0]["request_id"] == f"{request_id}-0"

    for name in ("order-4711", "order-4711-0"):  # the client's id, bare or as the old '<id>-<index>'
        refused = client.post("/feedback", json={"request_id": name, "label": "shipping"})
        detail = refused.json()["detail"]
        assert refused.status_code == 409, refused.text
        assert f"request_id {name!r} is ambiguous" in detail and "2 scored texts" in detail
        assert "the id the server issued" in detail and "Nothing was recorded" in detail

    accepted = client.post("/feedback", json=[{"request_id": f"{issued[0]}-0", "label": "shipping"},
                                              {"request_id": f"{issued[1]}-0", "label": "billing"}])
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"accepted": 2, "request_ids": [f"{issued[0]}-0", f"{issued[1]}-0"]}
    assert [(line["request_id"], line["label"]) for line in feedback_lines(log_dir, 2)] == [
        (f"{issued[0]}-0", "shipping"), (f"{issued[1]}-0", "billing")]  # the refused labels wrote nothing

    records = logged_records(log_dir, 2)
    assert [(r["request_id"], r["client_request_id"], r["text"]) for r in records] == [
        (f"{issued[0]}-0", "order-4711", PARCEL), (f"{issued[1]}-0", "order-4711", CANCEL)]
    exported = langops_cli("feedback", "export", "--log-dir", str(log_dir), "--output", "feedback.csv", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    dataset = pd.read_csv(tmp_path / "feedback.csv")
    assert sorted(dataset.itertuples(index=False, name=None)) == [(PARCEL, "shipping"), (CANCEL, "billing")]


@pytest.mark.model
def test_feedback_for_an_id_never_issued_is_refused_naming_it(client: httpx.Client, log_dir: Path) -> None:
    one = client.post("/predict", json={"text": PARCEL}, headers={"X-Request-Id": "ticket-7"})
    issued = one.headers["X-Request-Id"]
    for name in ("order-9999-0", "order-9999", f"{new_request_id()}-0", f"{issued}-1"):  # no text 1 in that request
        refused = client.post("/feedback", json={"request_id": name, "label": "billing"})
        assert refused.status_code == 404, (name, refused.text)
        detail = refused.json()["detail"]
        assert f"request_id {name!r} names no text this server scored in the last 168 hours" in detail
        assert "feedback_window_hours" in detail
    mixed = client.post("/feedback", json=[{"request_id": f"{issued}-0", "label": "shipping"},
                                           {"request_id": "order-9999-0", "label": "billing"}])
    assert mixed.status_code == 404
    assert "item 1: request_id 'order-9999-0' names no text" in mixed.json()["detail"]
    assert "item 0" not in mixed.json()["detail"]

    # The bare issued id of a request of one text, and the client's id while one text carries it, name that text.
    for name in (issued, "ticket-7", "ticket-7-0"):
        accepted = client.post("/feedback", json={"request_id": name, "label": "shipping"})
        assert accepted.status_code == 202 and accepted.json()["request_ids"] == [f"{issued}-0"], accepted.text
    lines = feedback_lines(log_dir, 3)
    assert [line["request_id"] for line in lines] == [f"{issued}-0"] * 3  # the mixed request wrote nothing


@pytest.mark.model
def test_an_id_naming_a_request_of_several_texts_is_refused_and_each_text_is_named_alone(client: httpx.Client) -> None:
    answer = client.post("/predict", json={"texts": [PARCEL, CANCEL]}, headers={"X-Request-Id": "batch-1"})
    issued = answer.headers["X-Request-Id"]
    assert [p["request_id"] for p in answer.json()["predictions"]] == [f"{issued}-0", f"{issued}-1"]
    bare = client.post("/feedback", json={"request_id": issued, "label": "billing"})
    assert bare.status_code == 409 and "names a request of 2 texts" in bare.json()["detail"]
    client_id = client.post("/feedback", json={"request_id": "batch-1", "label": "billing"})
    assert client_id.status_code == 409 and "is the X-Request-Id 2 scored texts were sent with" in client_id.json()["detail"]
    second = client.post("/feedback", json={"request_id": "batch-1-1", "label": "billing"})
    assert second.status_code == 202 and second.json()["request_ids"] == [f"{issued}-1"]


@pytest.mark.model
def test_feedback_is_checked_by_any_server_sharing_the_log_folder_and_after_a_restart(
    compressed_dir: Path, log_dir: Path
) -> None:
    """Two servers on one log folder stand for two uvicorn workers (each its own process and files), and a
    server started after the first stopped, for a restart."""
    with serving_local(settings_for(compressed_dir, log_dir)) as first, first.client() as one, \
            serving_local(settings_for(compressed_dir, log_dir)) as second, second.client() as other:
        issued = one.post("/predict", json={"text": PARCEL}, headers={"X-Request-Id": "w-1"}).headers["X-Request-Id"]
        answered = other.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping"})
        assert answered.status_code == 202, answered.text  # at once: the id was recorded before the answer
        again = other.post("/predict", json={"text": CANCEL}, headers={"X-Request-Id": "w-1"})
        refused = one.post("/feedback", json={"request_id": "w-1", "label": "billing"})
        assert refused.status_code == 409 and "2 scored texts" in refused.json()["detail"]
    with serving_local(settings_for(compressed_dir, log_dir)) as restarted, restarted.client() as later:
        for request_id, label in ((issued, "shipping"), (again.headers["X-Request-Id"], "billing")):
            accepted = later.post("/feedback", json={"request_id": f"{request_id}-0", "label": label})
            assert accepted.status_code == 202, accepted.text
        relabel = later.post("/feedback", json={"request_id": f"{issued}-0", "label": "billing"})
        assert relabel.status_code == 409 and "was labelled 'shipping'" in relabel.json()["detail"]  # remembered
        assert later.post("/feedback", json={"request_id": "w-1", "label": "billing"}).status_code == 409


@pytest.mark.model
def test_feedback_after_the_window_is_refused(compressed_dir: Path, log_dir: Path) -> None:
    window_s = 1.5
    settings = settings_for(compressed_dir, log_dir, feedback_window_hours=window_s / 3600)
    with serving_local(settings) as live, live.client() as http:
        issued = http.post("/predict", json={"text": PARCEL}).headers["X-Request-Id"]
        assert http.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping"}).status_code == 202
        time.sleep(window_s + 0.5)
        late = http.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping"})
        assert late.status_code == 404 and f"in the last {window_s / 3600:g} hours" in late.json()["detail"]


@pytest.mark.model
def test_by_default_a_text_is_kept_only_once_feedback_labels_it(
    compressed_dir: Path, log_dir: Path, tmp_path: Path
) -> None:
    unlabelled = "nobody labels this one: card 4111 1111 1111 1111"
    default = ServerConfig().prediction_log_text
    with serving_local(settings_for(compressed_dir, log_dir, prediction_log_text=default)) as live, \
            live.client() as http:
        issued = http.post("/predict", json={"texts": [PARCEL, CANCEL]}).headers["X-Request-Id"]
        assert http.post("/predict", json={"text": unlabelled}).status_code == 200
        accepted = http.post("/feedback", json={"request_id": f"{issued}-1", "label": "billing"})
        assert accepted.status_code == 202, accepted.text
        (line,) = feedback_lines(log_dir, 1)
        assert (line["request_id"], line["label"], line["text"]) == (f"{issued}-1", "billing", CANCEL)
        records = logged_records(log_dir, 3)
    assert not [record for record in records if "text" in record or "text_sha256" in record]
    written = [path for path in log_dir.iterdir() if not path.name.startswith("issued-ids")]
    assert not [path.name for path in written if unlabelled.encode() in path.read_bytes()]

    exported = langops_cli("feedback", "export", "--log-dir", str(log_dir), "--output", "feedback.csv", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert list(pd.read_csv(tmp_path / "feedback.csv").itertuples(index=False, name=None)) == [(CANCEL, "billing")]


@pytest.mark.model
def test_a_text_is_labelled_once_unless_the_label_is_forced_and_a_retry_is_no_conflict(
    client: httpx.Client, log_dir: Path
) -> None:
    issued = client.post("/predict", json={"texts": [PARCEL, CANCEL]}).headers["X-Request-Id"]
    first = client.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping"})
    assert first.status_code == 202, first.text
    retried = client.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping"})
    assert retried.status_code == 202, retried.text  # the same label again: a client's retry

    other = client.post("/feedback", json=[{"request_id": f"{issued}-1", "label": "billing"},
                                           {"request_id": f"{issued}-0", "label": "billing"}])
    detail = other.json()["detail"]
    assert other.status_code == 409, other.text
    assert f"'{issued}-0' was labelled 'shipping', not 'billing'" in detail and '"force": true' in detail
    assert "Nothing was recorded" in detail

    forced = client.post("/feedback", json=[{"request_id": f"{issued}-1", "label": "billing"},
                                            {"request_id": f"{issued}-0", "label": "billing", "force": True}])
    assert forced.status_code == 202, forced.text
    lines = feedback_lines(log_dir, 4)
    assert [(line["request_id"], line["label"]) for line in lines] == [
        (f"{issued}-0", "shipping"), (f"{issued}-0", "shipping"), (f"{issued}-1", "billing"), (f"{issued}-0", "billing")]
    assert client.post("/feedback", json={"request_id": f"{issued}-0", "label": "shipping", "force": "yes"}
                       ).status_code == 422  # force is a JSON boolean


@pytest.mark.unit
def test_imported_labels_take_the_text_the_server_still_keeps_and_become_data(tmp_path: Path) -> None:
    from langops.serving import issued_ids

    log_dir = tmp_path / "predictions"
    index = issued_ids.IssuedIds(log_dir / issued_ids.INDEX_FILE, window_hours=1.0, max_requests=100, queue_size=10)
    try:
        pair, single = new_request_id(), new_request_id()
        assert index.add(pair, "batch-7", [PARCEL, CANCEL]).result(timeout=10)
        assert index.add(single, "ticket-3", ["the app crashes at login"]).result(timeout=10)
    finally:
        index.close()
    labels = tmp_path / "labels.csv"
    labels.write_text(f"request_id,label\n{pair}-1,billing\nticket-3,technical\nbatch-7,shipping\n")
    imported = langops_cli("feedback", "import", str(labels), "--log-dir", str(log_dir), cwd=tmp_path)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    lines = [json.loads(line) for line in (log_dir / "feedback-import.jsonl").read_text().splitlines()]
    assert [(line["request_id"], line.get("text")) for line in lines] == [
        (f"{pair}-1", CANCEL), (f"{single}-0", "the app crashes at login"),
        ("batch-7", None)]  # a client's id of two texts names no one text: kept as given, no text

    exported = langops_cli("feedback", "export", "--log-dir", str(log_dir), "--output", "feedback.csv", cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr  # no prediction log at all
    assert sorted(pd.read_csv(tmp_path / "feedback.csv").itertuples(index=False, name=None)) == [
        (CANCEL, "billing"), ("the app crashes at login", "technical")]


@pytest.mark.unit
def test_two_workers_claiming_one_text_at_once_record_one_label(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from langops.serving import issued_ids

    path = tmp_path / "ids.sqlite3"
    workers = [issued_ids.IssuedIds(path, window_hours=1.0, max_requests=100, queue_size=10) for _ in range(2)]
    try:
        text = f"{new_request_id()}-0"
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda pair: pair[0].claim_labels([(text, pair[1])]),
                                     zip(workers, ["billing", "shipping"], strict=True)))
        assert sorted(len(conflicts) for conflicts in outcomes) == [0, 1]  # one won, the other was told
        (conflict,) = next(conflicts for conflicts in outcomes if conflicts)
        assert conflict[0] == text and {conflict[1], conflict[2]} == {"billing", "shipping"}
    finally:
        for worker in workers:
            worker.close()


@pytest.mark.unit
def test_a_kept_text_is_named_by_its_id_until_its_window_ends_and_then_leaves_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langops.serving import issued_ids

    monkeypatch.setattr(issued_ids, "PRUNE_EVERY_S", 0.0)  # prune after every batch
    window_s = 1.0
    path = tmp_path / "ids.sqlite3"
    index = issued_ids.IssuedIds(path, window_hours=window_s / 3600, max_requests=100, queue_size=10)
    secret = "my card 4111 1111 1111 1111 was charged twice"
    try:
        pair, single = new_request_id(), new_request_id()
        assert index.add(pair, "client-9", ["where is my parcel", secret]).result(timeout=10)
        assert index.add(single, None, ["cancel it"]).result(timeout=10)
        found = index.lookup([f"{pair}-1", "client-9-1", pair, single, f"{single}-0"])
        assert [lookup.text for lookup in found] == [secret, secret, None, "cancel it", "cancel it"]
        assert any(secret.encode() in file.read_bytes() for file in tmp_path.iterdir())

        time.sleep(window_s + 0.2)
        assert index.add(new_request_id(), None, 1).result(timeout=10)  # a write, then a prune
        wait_until(lambda: index.lookup([f"{pair}-1"], now=0)[0].texts == 0, what="the old ids to be pruned")
        # While the server runs (its connections open, the write-ahead log in use), not only once it closed;
        # the prune's checkpoint follows its delete.
        holding = lambda: [file.name for file in tmp_path.iterdir() if secret.encode() in file.read_bytes()]  # noqa: E731
        wait_until(lambda: not holding(), timeout=5, what="the pruned text to leave the index's files")
    finally:
        index.close()


@pytest.mark.unit
def test_an_index_written_before_texts_were_kept_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    from langops.serving import issued_ids

    path = tmp_path / "ids.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE issued (request_id TEXT PRIMARY KEY, client_request_id TEXT, "
                    "texts INTEGER NOT NULL, issued_at REAL NOT NULL)")
        old.execute("INSERT INTO issued VALUES ('abc', NULL, 1, ?)", (time.time(),))
    old.close()
    index = issued_ids.IssuedIds(path, window_hours=1.0, max_requests=100, queue_size=10)
    try:
        kept = new_request_id()
        assert index.add(kept, None, ["a new text"]).result(timeout=10)
        assert [(lookup.texts, lookup.text) for lookup in index.lookup(["abc-0", f"{kept}-0"])] == [
            (1, None), (1, "a new text")]
    finally:
        index.close()


@pytest.mark.unit
def test_the_index_forgets_the_oldest_ids_beyond_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from langops.serving import issued_ids

    monkeypatch.setattr(issued_ids, "PRUNE_EVERY_S", 0.0)  # prune after every batch
    index = issued_ids.IssuedIds(tmp_path / "ids.sqlite3", window_hours=1.0, max_requests=2, queue_size=10)
    try:
        ids = [new_request_id() for _ in range(3)]
        for request_id in ids:
            written = index.add(request_id, "same-client", 1)
            assert written is not None and written.result(timeout=10)
        wait_until(lambda: index.lookup([f"{ids[0]}-0"])[0].texts == 0, what="the oldest id to be pruned")
        assert [lookup.text_id for lookup in index.lookup([f"{ids[1]}-0", f"{ids[2]}-0"])] == [
            f"{ids[1]}-0", f"{ids[2]}-0"]
        (client,) = index.lookup(["same-client"])
        assert client.texts == 2 and client.by_client_id and client.text_id is None
        assert index.lookup([f"{ids[2]}-0"], now=time.time() + 2 * 3600)[0].texts == 0  # past the window
    finally:
        index.close()


@pytest.mark.model
def test_an_index_that_cannot_open_leaves_predictions_served_refuses_feedback_with_the_reason_and_heals(
    compressed_dir: Path, log_dir: Path
) -> None:
    (log_dir / "issued-ids.sqlite3").mkdir(parents=True)  # a folder where the file should be: SQLite cannot open it
    with serving_local(settings_for(compressed_dir, log_dir)) as live, live.client() as http:
        answer = http.post("/predict", json={"text": PARCEL})
        assert answer.status_code == 200, answer.text
        refused = http.post("/feedback", json={"request_id": f"{answer.headers['X-Request-Id']}-0", "label": "billing"})
        assert refused.status_code == 503 and "the index of issued ids cannot be read" in refused.json()["detail"]
        assert "unable to open database file" in refused.json()["detail"]
        (log_dir / "issued-ids.sqlite3").rmdir()  # the folder is moved away: the index opens on the next use
        again = http.post("/predict", json={"text": PARCEL})
        labelled = http.post("/feedback", json={"request_id": f"{again.headers['X-Request-Id']}-0", "label": "billing"})
        assert labelled.status_code == 202, labelled.text


@pytest.mark.model
def test_servers_on_two_machines_sharing_the_store_check_feedback_and_export_as_one(
    compressed_dir: Path, tmp_path: Path
) -> None:
    """Two servers with their own log folders stand for two replicas on different machines; one store (a
    SQLite file standing in for the team's PostgreSQL) is all they share."""
    from langops.fleet_store import StoreLogs
    from langops.monitoring import load_window, read_feedback
    from langops.prediction_records import labelled_texts

    store = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    here, there = tmp_path / "machine-a", tmp_path / "machine-b"
    labelled = settings_for(compressed_dir, here, prediction_store=store, prediction_log_text="labelled")
    with serving_local(labelled) as first, first.client() as one, \
            serving_local(settings_for(compressed_dir, there, prediction_store=store)) as second, \
            second.client() as other:
        pair = one.post("/predict", json={"texts": [PARCEL, CANCEL]}, headers={"X-Request-Id": "ticket-9"})
        single = other.post("/predict", json={"text": "the app crashes at login"})
        assert pair.status_code == single.status_code == 200
        issued = pair.headers["X-Request-Id"]
        accepted = other.post("/feedback", json=[{"request_id": f"{issued}-1", "label": "billing"},
                                                 {"request_id": f"{issued}-0", "label": "shipping"}])
        assert accepted.status_code == 202, accepted.text  # scored on one machine, labelled through the other
        relabel = one.post("/feedback", json={"request_id": f"{issued}-1", "label": "shipping"})
        assert relabel.status_code == 409 and "was labelled 'billing'" in relabel.json()["detail"]
        ambiguous = other.post("/predict", json={"text": CANCEL}, headers={"X-Request-Id": "ticket-9"})
        assert ambiguous.status_code == 200
        refused = one.post("/feedback", json={"request_id": "ticket-9", "label": "billing"})
        assert refused.status_code == 409 and "3 scored texts" in refused.json()["detail"]  # both machines' texts
    logs = StoreLogs(store)
    wait_until(lambda: sum(1 for _ in logs.prediction_lines()) == 4, what="4 predictions in the store")
    found = labelled_texts(logs)  # texts kept by machine A's index, labels taken by machine B
    assert sorted(found.rows) == [(PARCEL, "shipping"), (CANCEL, "billing")]
    window = load_window(logs, MonitorConfig(), version="local", feedback=read_feedback(logs.feedback_lines())).frame
    assert len(window) == 4 and window["true_label"].notna().sum() == 2
    written = sorted(path.name for folder in (here, there) if folder.exists() for path in folder.iterdir())
    assert written == [], f"the store was configured, yet files were written: {written}"


@pytest.mark.unit
def test_the_store_comes_from_the_environment_before_params_and_never_shows_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langops.config import load_params
    from langops.fleet_store import StoreLogs, redacted
    from langops.monitor import prediction_logs
    from langops.prediction_records import LogFiles

    monkeypatch.delenv("LANGOPS_PREDICTION_STORE", raising=False)
    params = load_params(REPO_PARAMS)
    assert isinstance(prediction_logs(params), LogFiles)  # the embedded default: the log folder
    secret = "postgresql+psycopg2://langops:s3cret@db.internal:5432/langops"
    monkeypatch.setenv("LANGOPS_PREDICTION_STORE", secret)
    chosen = prediction_logs(params)
    assert isinstance(chosen, StoreLogs) and chosen.url == secret
    assert isinstance(prediction_logs(params, tmp_path / "logs"), LogFiles)  # an explicit --log-dir wins
    assert "s3cret" not in str(chosen) and "s3cret" not in redacted(secret) and "db.internal" in redacted(secret)
    settings = ServerSettings(model_dir=tmp_path, prediction_store="sqlite:///elsewhere.db")
    assert settings.tuning()["prediction_store"] == redacted(secret)  # the environment wins, shown redacted


@pytest.mark.model
def test_a_store_that_does_not_answer_leaves_predictions_served_and_refuses_feedback_naming_it(
    compressed_dir: Path, log_dir: Path
) -> None:
    down = f"postgresql+psycopg2://langops:s3cret@127.0.0.1:{free_port()}/langops"  # nothing listens there
    with serving_local(settings_for(compressed_dir, log_dir, prediction_store=down)) as live, live.client() as http:
        answer = http.post("/predict", json={"text": PARCEL})
        assert answer.status_code == 200, answer.text
        refused = http.post("/feedback", json={"request_id": f"{answer.headers['X-Request-Id']}-0", "label": "billing"})
        assert refused.status_code == 503 and "OperationalError" in refused.json()["detail"], refused.text
        assert "s3cret" not in refused.text
        wait_until(lambda: 'langops_prediction_log_dropped_total 1.0' in http.get("/metrics").text,
                   what="the unlogged prediction to be counted")
        assert http.get("/ready").status_code == 200
