"""The production loop of tests/test_retrain_loop.py on a team's setup: the model server runs two workers, and
its prediction log, feedback and issued ids live in a real PostgreSQL (``deploy.prediction_store``), which the
monitor deployment and the retraining run read. Predictions answered by one worker take their labels through
either; the monitor judges one window; the event's run collects the labels from the database, versions them
with DVC, trains, passes the gate and swaps the server, with no manual step and no failed request, and the
new champion labels held-back drifted rows better than the old one."""

from __future__ import annotations

import pytest
from postgres_helpers import postgres_unavailable_reason, running_postgres
from test_retrain_loop import closes_the_loop, serving_project

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(postgres_unavailable_reason() is not None, reason=postgres_unavailable_reason() or ""),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_base_model):
    with running_postgres(["fleet"]) as cluster:
        store = cluster.url("fleet", "postgresql+psycopg2")
        with serving_project(tmp_path_factory.mktemp("retrain-loop-fleet"), tiny_base_model, workers=2,
                             prediction_store=store) as project:
            yield (*project, cluster)


def test_a_two_worker_server_on_postgresql_retrains_gates_and_swaps_by_itself(fleet):
    root, params, urls, cluster = fleet

    def logged() -> int:
        import psycopg2

        try:
            return cluster.query("fleet", "SELECT count(*) FROM prediction_log")[0][0]
        except psycopg2.errors.UndefinedTable:  # before the server's first write
            return 0

    closes_the_loop(root, params, urls, logged=logged)
    assert not list((root / ".langops" / "server" / "predictions").glob("*.jsonl"))  # all of it in the database
    (collected,) = cluster.query("fleet", "SELECT count(*) FROM feedback_log")[0]
    assert collected == 400
