"""Prometheus metrics of one server app, kept in the app's own registry.

A registry per app (not prometheus_client's global one) lets a process build many apps, as the tests
do, and keeps ``/metrics`` to what this server did. With ``--workers N`` the server runs prometheus_client's
multiprocess mode (``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start): each worker writes
its values to files in that folder, and a scrape, whichever worker answers it, reads them all: counters and
histograms summed over the workers, the queue depth summed over the live ones, the info gauges their maximum.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServerMetrics:
    """Requests by endpoint and status, errors, latency, batch sizes, queue depth and the live version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "langops_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=self.registry,
        )
        self.errors = Counter(
            "langops_errors", "requests answered with an error, by endpoint and kind",
            ["endpoint", "kind"], registry=self.registry,
        )
        self.latency = Histogram(
            "langops_request_latency_seconds", "time from request to response, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.batch_size = Histogram(
            "langops_batch_size", "texts per onnxruntime call (formed by the micro-batcher)",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "langops_queue_depth", "texts waiting for inference", registry=self.registry, multiprocess_mode="livesum",
        )
        self.texts = Counter(
            "langops_texts_scored", "texts scored, by endpoint", ["endpoint"], registry=self.registry,
        )
        self.model_info = Gauge(
            "langops_model_info", "1 for the model version being served (by any worker)", ["model_name", "version"],
            registry=self.registry, multiprocess_mode="livemax",
        )
        self.prediction_log_dropped = Counter(
            "langops_prediction_log_dropped", "prediction log records dropped because the writer lagged",
            registry=self.registry,
        )
        self.prediction_log_written = Counter(
            "langops_prediction_log_written", "prediction log records written", registry=self.registry,
        )
        self.predictions = Counter(
            "langops_predictions", "texts scored, by the model version that answered and the label it gave",
            ["version", "label"], registry=self.registry,
        )
        self.confidence = Histogram(
            "langops_prediction_confidence", "probability of the predicted label, by model version",
            ["version"], buckets=CONFIDENCE_BUCKETS, registry=self.registry,
        )
        self.cache_repairs = Counter(
            "langops_model_cache_repairs", "cached copies of the live model found damaged (a file's size or sha256 "
            "differs from the registry's record) and downloaded again", registry=self.registry,
        )
        self.feedback = Counter(
            "langops_feedback", "feedback labels accepted by POST /feedback", registry=self.registry,
        )
        self.issued_ids_unrecorded = Counter(
            "langops_issued_ids_unrecorded", "scored requests answered before their issued id was recorded for "
            "feedback: queue_full and error (never recorded: feedback naming them is refused), late (recorded after "
            "the answer)", ["reason"], registry=self.registry,
        )
        self.rollout_requests = Counter(
            "langops_rollout_requests", "requests answered (champion, challenger) or mirrored (shadow) while a "
            "rollout runs, by version, role and outcome (ok, error, timeout, stalled)",
            ["version", "role", "outcome"], registry=self.registry,
        )
        self.rollout_latency = Histogram(
            "langops_rollout_latency_seconds", "scoring latency while a rollout runs, by version and role",
            ["version", "role"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.shadow_comparisons = Counter(
            "langops_shadow_comparisons", "texts scored by both the champion and the challenger, by whether "
            "their labels agreed", ["champion_version", "challenger_version", "agreed"], registry=self.registry,
        )
        self.mirror_dropped = Counter(
            "langops_mirror_dropped", "mirrored requests dropped instead of waiting (queue_full, stalled)",
            ["reason"], registry=self.registry,
        )
        self.rollout_events = Counter(
            "langops_rollout_events", "rollout steps the server took (canary-step, canary-rollback, promote)",
            ["event"], registry=self.registry,
        )
        self.rollout_info = Gauge(
            "langops_rollout_info", "the rollout in progress: the challenger's traffic percent (0 for a "
            "shadow), by mode and version", ["mode", "version"], registry=self.registry, multiprocess_mode="livemax",
        )
        self._live: tuple[str, str] | None = None
        self._rollout: tuple[str, str] | None = None

    def observe_predictions(self, version: str, labels: list[str], best: list[int], confidence: list[float]) -> None:
        """Count each text's label and its confidence under the version that answered."""
        histogram = self.confidence.labels(version)
        for index, value in zip(best, confidence, strict=True):
            self.predictions.labels(version, labels[index]).inc()
            histogram.observe(value)

    def set_model(self, model_name: str, version: str) -> None:
        """Point the info gauge at the live version (only one series is 1 at a time)."""
        if self._live == (model_name, version):
            return
        if self._live is not None:
            self.model_info.labels(*self._live).set(0)  # a worker's file keeps a removed series: 0 says it is gone
            self.model_info.remove(*self._live)
        self.model_info.labels(model_name, version).set(1)
        self._live = (model_name, version)

    def set_rollout(self, mode: str | None, version: str | None, percent: float) -> None:
        """Point the rollout gauge at the rollout in progress (none: no series)."""
        wanted = (mode, version) if mode and version else None
        if self._rollout is not None and self._rollout != wanted:
            self.rollout_info.labels(*self._rollout).set(0)
            self.rollout_info.remove(*self._rollout)
        if wanted is not None:
            self.rollout_info.labels(*wanted).set(percent)
        self._rollout = wanted

    def render(self) -> bytes:
        """The exposition text: this app's registry, or every worker's values in multiprocess mode."""
        folder = os.environ.get(MULTIPROCESS_ENV)
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=folder)
        return generate_latest(every_worker)

    def close(self) -> None:
        """A worker that stops takes its live gauges out of the aggregate (multiprocess mode)."""
        if os.environ.get(MULTIPROCESS_ENV):
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid())
