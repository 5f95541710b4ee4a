"""Shadow and canary inside the server: the challenger beside the champion, measured and judged on live traffic.

- **Shadow**: every request (or ``shadow_sample_rate`` of them) is copied onto a bounded queue after the
  champion answered it; a background thread scores the copies with the challenger and compares. A full
  queue drops copies (counted), and a challenger that raises, hangs or is slow only costs that thread:
  calls are bounded by ``challenger_timeout_ms`` and, while one hangs, new copies are dropped rather than
  queued behind it. The thread and its scoring thread run at a lower CPU priority than the request path.
- **Canary**: ``percent`` of requests, chosen by a hash of a route key (a header, else the text) into
  10,000 buckets, are answered by the challenger, through its own micro-batcher. Assignment is sticky
  and monotonic: bucket ``b`` goes to the challenger while ``b < percent * 100``, so stepping up keeps
  everyone who was already there. A challenger call that fails or times out is answered by the
  champion (the request never fails) and counted against the challenger. A share of the challenger's
  answers is mirrored to the champion, so agreement is measured on the same texts.
- **Judgement**: ``judge_canary`` is a pure function of a ``Window`` (the stats since the step began)
  and the thresholds. ``RolloutController`` runs it every ``judge_every_s`` and acts: a failed check
  stops routing to the challenger at once, then records the rollback in the registry; a passed step
  steps up; a passed last step is promoted through ``move_champion``. With the fleet's store the window
  is every worker's of every replica (``langops.serving.fleet_windows``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from langops.faults import challenger_fault
from langops.prediction_records import text_id
from langops.serving.batching import MicroBatcher

if TYPE_CHECKING:
    from langops.config import Params, RolloutConfig
    from langops.onnx_model import Scores
    from langops.rollouts import Rollout
    from langops.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

BUCKETS = 10_000
Role = Literal["champion", "challenger"]


class LoadedModel(Protocol):
    """What the server loaded (``langops.serving.app.LoadedModel``; not imported: app imports this module)."""

    @property
    def classifier(self) -> Any: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
CHAMPION_ROLE: Role = "champion"
CHALLENGER_ROLE: Role = "challenger"
LATENCY_SAMPLES = 50_000  # latencies kept per role and window for the percentiles
LATENCIES_SHARED = 5_000  # of those, the newest a worker shares with the fleet's other workers
ANSWERS_KEPT = 100_000  # text ids whose labels are kept for feedback
MIRROR_BATCH = 64  # mirrored texts scored in one call
BACKGROUND_NICE = 10  # CPU priority of the mirror threads, below the request path (Linux: per thread)


# ---------------------------------------------------------------- routing


def route_bucket(key: str) -> int:
    """The key's bucket in [0, 10000): sha256, so it is the same in every process and every run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") % BUCKETS


def routes_to_challenger(key: str, percent: float) -> bool:
    """Whether a canary at ``percent`` answers this key; monotonic in ``percent`` for every key."""
    return route_bucket(key) < round(percent * BUCKETS / 100)


def route_key(header_value: str | None, texts: Sequence[str]) -> str:
    """The caller's key when it sent one, else the request's texts: the same text always goes the same way."""
    return f"key:{header_value}" if header_value else "text:" + "\n".join(texts)


# ---------------------------------------------------------------- the window and its judgement


@dataclass(frozen=True)
class ModelStats:
    """One model's requests in the window: counts, latency percentiles, low confidence, feedback accuracy."""

    requests: int = 0
    errors: int = 0
    texts: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    low_confidence_rate: float | None = None
    feedback: int = 0
    feedback_correct: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        return self.feedback_correct / self.feedback if self.feedback else None


@dataclass(frozen=True)
class Window:
    """What both models did since the step began. ``compared`` texts were scored by both, ``agreed`` of them
    got the same label; ``disagreements`` counts, per champion label, the texts the challenger labelled
    otherwise; ``confidence_shift`` is the challenger's mean top probability minus the champion's on them."""

    champion: ModelStats = ModelStats()
    challenger: ModelStats = ModelStats()
    compared: int = 0
    agreed: int = 0
    disagreements: dict[str, int] = field(default_factory=dict)
    confidence_shift: float | None = None
    dropped: int = 0
    seconds: float = 0.0
    trained_on: int = 0  # texts either model trained on: left out of feedback accuracy

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Window:
        """The window ``to_dict`` wrote (e.g. into a ``shadow-stop`` record's evidence)."""
        def stats(values: dict[str, Any]) -> ModelStats:
            return ModelStats(**{name: values[name] for name in ModelStats.__dataclass_fields__ if name in values})

        return cls(champion=stats(data["champion"]), challenger=stats(data["challenger"]), compared=data["compared"],
                   agreed=data["agreed"], disagreements=dict(data.get("disagreements") or {}),
                   confidence_shift=data.get("confidence_shift"), dropped=data.get("dropped", 0),
                   seconds=data.get("seconds", 0.0), trained_on=data.get("trained_on", 0))

    def to_dict(self) -> dict[str, Any]:
        def stats(model: ModelStats) -> dict[str, Any]:
            return {**asdict(model), "error_rate": model.error_rate, "accuracy": model.accuracy}

        return {"champion": stats(self.champion), "challenger": stats(self.challenger), "compared": self.compared,
                "agreed": self.agreed, "agreement": self.agreement, "disagreements": dict(self.disagreements),
                "confidence_shift": self.confidence_shift, "dropped": self.dropped,
                "seconds": round(self.seconds, 3), "trained_on": self.trained_on}


@dataclass(frozen=True)
class Check:
    """One threshold: ``passed`` None means not judged yet (too little evidence), and ``detail`` says why."""

    name: str
    passed: bool | None
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class Verdict:
    """``fail`` (any check failed), ``wait`` (too few challenger requests) or ``pass``, with every check."""

    outcome: Literal["pass", "fail", "wait"]
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        """The failed checks, in words; for a pass or a wait, what was judged."""
        failed = [check.detail for check in self.checks if check.passed is False]
        return failed or [check.detail for check in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reasons": self.reasons, "checks": [asdict(check) for check in self.checks]}


def judge_canary(window: Window, limits: RolloutConfig) -> Verdict:
    """Judge the challenger's window against the thresholds; every check is spelled out in the verdict.

    Latency and low confidence are judged once the challenger has ``min_requests`` requests. Errors are
    judged as soon as they exceed the window's whole budget (``max_error_rate`` of ``min_requests``), so a
    crashing challenger fails at once rather than after the window fills. Agreement is judged once
    ``min_comparisons`` texts were scored by both, feedback accuracy once each model has ``min_feedback``
    labels; with less, those checks say so and do not hold the verdict back.
    """
    challenger, champion = window.challenger, window.champion
    n, enough = challenger.requests, challenger.requests >= limits.min_requests
    checks = [_error_check(challenger, limits)]
    checks.append(_at_most("p50_ms", challenger.p50_ms, limits.max_p50_ms, enough, n, limits, unit=" ms"))
    checks.append(_at_most("p99_ms", challenger.p99_ms, limits.max_p99_ms, enough, n, limits, unit=" ms"))
    if limits.max_p99_ratio is not None:
        ratio = (challenger.p99_ms / champion.p99_ms
                 if challenger.p99_ms is not None and champion.p99_ms else None)
        checks.append(_at_most("p99_ratio", ratio, limits.max_p99_ratio, enough and ratio is not None, n, limits))
    increase = (challenger.low_confidence_rate - champion.low_confidence_rate
                if challenger.low_confidence_rate is not None and champion.low_confidence_rate is not None else None)
    checks.append(_at_most("low_confidence_increase", increase, limits.max_low_confidence_increase,
                           enough and increase is not None, n, limits))
    checks.append(_agreement_check(window, limits))
    checks.append(_accuracy_check(window, limits))
    if any(check.passed is False for check in checks):
        outcome: Literal["pass", "fail", "wait"] = "fail"
    elif not enough:
        outcome = "wait"
    else:
        outcome = "pass"
    return Verdict(outcome, tuple(checks))


def _error_check(challenger: ModelStats, limits: RolloutConfig) -> Check:
    n, errors, limit = challenger.requests, challenger.errors, limits.max_error_rate
    rate = challenger.error_rate
    budget = limit * max(n, limits.min_requests)
    if errors > budget:
        return Check("error_rate", False, rate, limit,
                     f"error rate {rate:.2%} ({errors} of {n} requests failed or timed out) exceeds {limit:.2%}")
    if n < limits.min_requests:
        return Check("error_rate", None, rate, limit,
                     f"{errors} errors in {n} requests; judged at {limits.min_requests}")
    return Check("error_rate", True, rate, limit, f"error rate {rate:.2%} ({errors} of {n}) within {limit:.2%}")


def _at_most(name: str, value: float | None, limit: float, judged: bool, n: int, limits: RolloutConfig,
             *, unit: str = "") -> Check:
    if not judged or value is None:
        return Check(name, None, value, limit, f"{name} not judged: {n} of {limits.min_requests} challenger "
                     "requests" + ("" if value is not None or n < limits.min_requests else ", no measurement"))
    passed = value <= limit
    return Check(name, passed, value, limit,
                 f"{name} {value:.3g}{unit} {'within' if passed else 'exceeds'} {limit:g}{unit}")


def _agreement_check(window: Window, limits: RolloutConfig) -> Check:
    agreement, limit = window.agreement, limits.min_agreement
    if window.compared < limits.min_comparisons:
        return Check("agreement", None, agreement, limit, f"agreement not judged: {window.compared} of "
                     f"{limits.min_comparisons} texts scored by both models")
    assert agreement is not None
    passed = agreement >= limit
    worst = sorted(window.disagreements.items(), key=lambda item: -item[1])[:3]
    where = f"; most disagreement on champion labels {dict(worst)}" if worst and not passed else ""
    return Check("agreement", passed, agreement, limit,
                 f"agreement with the champion {agreement:.2%} on {window.compared} texts "
                 f"{'at least' if passed else 'below'} {limit:.2%}{where}")


def _accuracy_check(window: Window, limits: RolloutConfig) -> Check:
    champion, challenger, limit = window.champion, window.challenger, limits.max_accuracy_drop
    left_out = (f" ({window.trained_on} texts a model trained on left out)" if window.trained_on else "")
    if min(champion.feedback, challenger.feedback) < limits.min_feedback:
        return Check("feedback_accuracy", None, None, limit, f"feedback accuracy not judged: {champion.feedback} "
                     f"champion and {challenger.feedback} challenger labels, {limits.min_feedback} needed each"
                     + left_out)
    assert champion.accuracy is not None and challenger.accuracy is not None
    drop = champion.accuracy - challenger.accuracy
    passed = drop <= limit
    return Check("feedback_accuracy", passed, drop, limit,
                 f"feedback accuracy challenger {challenger.accuracy:.2%} ({challenger.feedback} labels) vs "
                 f"champion {champion.accuracy:.2%} ({champion.feedback}): drop {drop:.2%} "
                 f"{'within' if passed else 'exceeds'} {limit:.2%}" + left_out)


class RolloutWindow:
    """The live counters behind a ``Window``; written from the event loop and the mirror thread."""

    def __init__(self, *, low_confidence: float) -> None:
        self.low_confidence = low_confidence
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._requests = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._errors = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._texts = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._low = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._latencies: dict[str, deque[float]] = {role: deque(maxlen=LATENCY_SAMPLES)
                                                     for role in (CHAMPION_ROLE, CHALLENGER_ROLE)}
        self._feedback = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._correct = {CHAMPION_ROLE: 0, CHALLENGER_ROLE: 0}
        self._answers: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._compared = self._agreed = self._dropped = 0
        self._trained_on: set[str] = set()  # ids of texts a model trained on: no feedback counts for them
        self._shift_sum = 0.0
        self._disagreements: dict[str, int] = {}

    def record_answers(self, role: Role, *, latency_ms: float, labels: Sequence[str], confidences: Sequence[float],
                       request_id: str | None, trained_on: Sequence[bool] | None = None) -> None:
        """One request ``role`` answered (or, for a shadow, scored): its latency, labels and confidences.
        ``trained_on`` marks texts either model trained on; feedback on them is not counted."""
        with self._lock:
            self._requests[role] += 1
            self._texts[role] += len(labels)
            self._low[role] += sum(1 for value in confidences if value < self.low_confidence)
            self._latencies[role].append(latency_ms)
            if request_id is not None:
                self._remember(role, request_id, labels, trained_on)

    def record_error(self, role: Role, *, latency_ms: float | None = None) -> None:
        with self._lock:
            self._requests[role] += 1
            self._errors[role] += 1
            if latency_ms is not None:
                self._latencies[role].append(latency_ms)

    def record_comparison(self, champion_labels: Sequence[str], challenger_labels: Sequence[str],
                          champion_confidences: Sequence[float], challenger_confidences: Sequence[float]) -> None:
        with self._lock:
            for ours, theirs in zip(champion_labels, challenger_labels, strict=True):
                self._compared += 1
                if ours == theirs:
                    self._agreed += 1
                else:
                    self._disagreements[ours] = self._disagreements.get(ours, 0) + 1
            self._shift_sum += float(np.sum(challenger_confidences) - np.sum(champion_confidences))

    def record_dropped(self, count: int = 1) -> None:
        with self._lock:
            self._dropped += count

    def remember(self, role: Role, request_id: str, labels: Sequence[str],
                 trained_on: Sequence[bool] | None = None) -> None:
        """Keep the labels ``role`` gave the request's texts, for feedback that names them later."""
        with self._lock:
            self._remember(role, request_id, labels, trained_on)

    def record_feedback(self, request_id: str, label: str) -> None:
        """A true label: counted for each model whose label for that text is known."""
        with self._lock:
            for role, given in self._answers.get(request_id, {}).items():
                self._feedback[role] += 1
                self._correct[role] += given == label

    def _remember(self, role: Role, request_id: str, labels: Sequence[str], trained_on: Sequence[bool] | None) -> None:
        """A text either model trained on is left out: a model answering texts it learnt would win the
        feedback comparison on memory (the rule the promotion gate applies to test rows)."""
        known = list(trained_on) if trained_on is not None else [False] * len(labels)
        names = [[text_id(request_id, index)] for index in range(len(labels))]
        if len(labels) == 1:
            names[0].append(request_id)  # a request of one text can be named by its own id
        for keys, label, seen in zip(names, labels, known, strict=True):
            if seen:
                self._trained_on.add(keys[0])
                continue
            for key in keys:
                self._answers.setdefault(key, {})[role] = label
                self._answers.move_to_end(key)
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        while len(self._trained_on) > ANSWERS_KEPT:
            self._trained_on.pop()

    def counts(self) -> WindowCounts:
        """What this process measured, in a form another process can add to its own (the fleet's window)."""
        with self._lock:
            return WindowCounts(
                requests=dict(self._requests), errors=dict(self._errors), texts=dict(self._texts),
                low=dict(self._low), feedback=dict(self._feedback), correct=dict(self._correct),
                latencies={role: list(samples)[-LATENCIES_SHARED:] for role, samples in self._latencies.items()},
                compared=self._compared, agreed=self._agreed, dropped=self._dropped,
                trained_on=len(self._trained_on), shift_sum=self._shift_sum,
                disagreements=dict(self._disagreements), seconds=time.monotonic() - self.started,
            )

    def snapshot(self, others: Sequence[WindowCounts] = ()) -> Window:
        """The window: this process's counts, plus ``others`` (the fleet's other workers) when given."""
        return WindowCounts.total([self.counts(), *others]).window()


@dataclass(frozen=True)
class WindowCounts:
    """A ``RolloutWindow``'s counters as plain values: summed over the workers of a fleet, they are its window
    (latency percentiles over the pooled samples, each worker's newest ``LATENCIES_SHARED``)."""

    requests: dict[str, int]
    errors: dict[str, int]
    texts: dict[str, int]
    low: dict[str, int]
    feedback: dict[str, int]
    correct: dict[str, int]
    latencies: dict[str, list[float]]
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    trained_on: int = 0
    shift_sum: float = 0.0
    disagreements: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def total(cls, parts: Sequence[WindowCounts]) -> WindowCounts:
        def add(name: str) -> dict[str, int]:
            summed: dict[str, int] = {}
            for part in parts:
                for key, value in getattr(part, name).items():
                    summed[key] = summed.get(key, 0) + value
            return summed

        return cls(requests=add("requests"), errors=add("errors"), texts=add("texts"), low=add("low"),
                   feedback=add("feedback"), correct=add("correct"),
                   latencies={role: [ms for part in parts for ms in part.latencies.get(role, [])]
                              for role in (CHAMPION_ROLE, CHALLENGER_ROLE)},
                   compared=sum(part.compared for part in parts), agreed=sum(part.agreed for part in parts),
                   dropped=sum(part.dropped for part in parts), trained_on=sum(part.trained_on for part in parts),
                   shift_sum=sum(part.shift_sum for part in parts), disagreements=add("disagreements"),
                   seconds=max((part.seconds for part in parts), default=0.0))

    @classmethod
    def from_json(cls, raw: str) -> WindowCounts:
        return cls(**json.loads(raw))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def window(self) -> Window:
        stats = {}
        for role in (CHAMPION_ROLE, CHALLENGER_ROLE):
            latencies = np.asarray(self.latencies.get(role, []), dtype=float)
            p50, p99 = (np.percentile(latencies, [50, 99]).tolist() if latencies.size else (None, None))
            texts = self.texts.get(role, 0)
            stats[role] = ModelStats(
                requests=self.requests.get(role, 0), errors=self.errors.get(role, 0), texts=texts, p50_ms=p50,
                p99_ms=p99, low_confidence_rate=self.low.get(role, 0) / texts if texts else None,
                feedback=self.feedback.get(role, 0), feedback_correct=self.correct.get(role, 0),
            )
        return Window(
            champion=stats[CHAMPION_ROLE], challenger=stats[CHALLENGER_ROLE], compared=self.compared,
            agreed=self.agreed, disagreements=dict(self.disagreements),
            confidence_shift=self.shift_sum / self.compared if self.compared else None,
            dropped=self.dropped, seconds=self.seconds, trained_on=self.trained_on,
        )


# ---------------------------------------------------------------- the challenger and its isolation


class InjectedFault(RuntimeError):
    """Raised by a challenger given a fault through ``$LANGOPS_CHALLENGER_FAULT`` (tests, drills)."""


class _GuardedScorer:
    """The challenger's classifier as its callers see it: notes when a call started (to spot a hung one)
    and, when a fault is injected, crashes, hangs or slows down as asked."""

    def __init__(self, classifier: Any, *, fault: str | None, release: threading.Event) -> None:
        self.classifier = classifier
        self.labels = classifier.labels
        self.max_length = classifier.max_length
        self.fault = fault
        self.release = release
        self.busy_since: float | None = None

    def score(self, texts: Sequence[str], batch_size: int = 64) -> Scores:
        self.busy_since = time.monotonic()
        try:
            if self.fault == "crash":
                raise InjectedFault("injected fault: the challenger crashed")
            if self.fault == "hang":
                self.release.wait()
                raise InjectedFault("injected fault: the challenger hung")
            if self.fault and self.fault.startswith("slow:"):
                self.release.wait(float(self.fault.removeprefix("slow:")) / 1000)
            return self.classifier.score(texts, batch_size)
        finally:
            self.busy_since = None

    def stalled(self, timeout_s: float) -> bool:
        started = self.busy_since
        return started is not None and time.monotonic() - started > timeout_s


@dataclass(frozen=True)
class _Mirror:
    """A request to score again with the other model, off the request path."""

    texts: list[str]
    request_id: str
    answered_by: Role
    labels: list[str]
    confidences: list[float]
    scorer: Any  # the other model's scorer
    other_version: str


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority than the request path (Linux schedules threads one by one)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):  # not Linux, or not allowed: the thread runs at normal priority
        pass


@dataclass
class RolloutActions:
    """What the judge may do in the registry, for the server's project (see ``langops.rollouts``)."""

    params_factory: Callable[[], Params]
    _params: Params | None = None

    @property
    def params(self) -> Params:
        if self._params is None:
            self._params = self.params_factory()
        return self._params

    def read(self) -> Rollout | None:
        from langops.promotions import _client
        from langops.rollouts import read_rollout

        return read_rollout(_client(self.params), self.params.register.model_name)


class FleetExchange(Protocol):
    """How a worker shares its window with the fleet's other workers (``langops.serving.fleet_windows``)."""

    def new_feedback(self) -> list[tuple[str, str]]: ...

    def exchange(self, rollout_id: str, step: int, counts: WindowCounts) -> list[WindowCounts]: ...

    def close(self) -> None: ...


class RolloutController:
    """Follows the registry's rollout, holds the challenger, routes, mirrors, measures and judges.

    ``champion`` returns the live champion (``ModelHolder.current``); ``load`` loads and smoke-checks a
    version with a number of onnxruntime threads; ``actions`` is None for a server that follows no
    registry alias (a folder or a pinned version), which then has no rollouts.
    """

    def __init__(self, cfg: RolloutConfig, *, champion: Callable[[], LoadedModel | None],
                 load: Callable[[str, int], LoadedModel], actions: RolloutActions | None, metrics: ServerMetrics,
                 num_threads: int, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float, max_queue: int,
                 on_promoted: Callable[[], None] = lambda: None, fleet: FleetExchange | None = None) -> None:
        self.cfg = cfg
        self.fleet = fleet  # the fleet's store: judge every worker's window, count feedback any worker took
        self._fleet_others: list[WindowCounts] = []  # the other workers' counts, as last read
        self._champion = champion
        self._load = load
        self.actions = actions
        self.metrics = metrics
        self.num_threads = num_threads
        self._on_promoted = on_promoted
        self.timeout_s = cfg.challenger_timeout_ms / 1000
        self.rollout: Rollout | None = None
        self.challenger: LoadedModel | None = None
        self._scorer: _GuardedScorer | None = None
        self._loaded_as: tuple[str, int] | None = None
        self.refused: dict[str, str] = {}
        self.halted: str | None = None  # rollout_id the judge failed: no more routing, whatever the registry says
        self.last_verdict: Verdict | None = None
        self.last_action: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.window = RolloutWindow(low_confidence=cfg.low_confidence)
        self._lock = threading.Lock()  # state changes (refresh, judge); reads are of whole references
        self._release = threading.Event()  # frees a challenger hung by an injected fault, on close
        self._batcher = MicroBatcher(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                     max_wait_ms=max_wait_ms, max_queue=max_queue)
        self._mirror_queue: queue.Queue[_Mirror | None] = queue.Queue(maxsize=cfg.mirror_queue)
        self._mirror_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langops-mirror-score",
                                                   initializer=_lower_priority)
        self._mirror_inflight: Future[Any] | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._mirror_loop, name="langops-mirror", daemon=True),
                         threading.Thread(target=self._judge_loop, name="langops-judge", daemon=True)]
        self._random = random.Random()

    # -- lifecycle

    def start(self) -> None:
        """Start the challenger's batcher (on the running loop), the mirror and the judge."""
        self._batcher.start()
        for thread in self._threads:
            thread.start()

    async def close(self) -> None:
        self._stop.set()
        self._release.set()
        try:
            self._mirror_queue.put_nowait(None)
        except queue.Full:
            pass
        await self._batcher.close()
        self._mirror_executor.shutdown(wait=False, cancel_futures=True)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5)
        if self.fleet is not None:
            self.fleet.close()

    # -- following the registry

    def refresh(self) -> None:
        """Read the rollout from the registry and follow it: load, keep or drop the challenger.

        Raises:
            Exception: whatever the registry read raised (the poller logs it and keeps the current state).
        """
        if self.actions is None:
            return
        wanted = self.actions.read()
        self.apply(wanted)

    def apply(self, wanted: Rollout | None) -> None:
        """Follow ``wanted``: a new rollout or step starts a new window; a new version or mode loads the challenger."""
        with self._lock:
            previous = self.rollout
            if wanted is None:
                if previous is not None:
                    logger.info("rollout of version %s ended; serving the champion only", previous.version)
                self._set(None, None, None)
                self.metrics.set_rollout(None, None, 0.0)
                return
            threads = self.num_threads if wanted.mode == "canary" else 1  # a shadow never takes the champion's cores
            if self._loaded_as != (wanted.version, threads) and wanted.version not in self.refused:
                try:
                    loaded = self._load(wanted.version, threads)
                except Exception as exc:  # noqa: BLE001 - a challenger that cannot load is refused; the champion serves on
                    self.refused[wanted.version] = f"{type(exc).__name__}: {exc}"
                    logger.error("challenger version %s refused: %s", wanted.version, self.refused[wanted.version])
                    self._set(wanted, None, None)
                    return
                fault = challenger_fault()
                if fault:
                    logger.warning("challenger version %s runs with injected fault %r", wanted.version, fault)
                self._set(wanted, loaded, _GuardedScorer(loaded.classifier, fault=fault, release=self._release))
                self._loaded_as = (wanted.version, threads)
            elif wanted.version in self.refused:
                self._set(wanted, None, None)
            else:
                self.rollout = wanted
            if previous is None or (previous.rollout_id, previous.step) != (wanted.rollout_id, wanted.step):
                self.window = RolloutWindow(low_confidence=self.cfg.low_confidence)
                self._fleet_others = []
                logger.info("%s of version %s%s: new window", wanted.mode, wanted.version,
                            f" at {wanted.percent:g}%" if wanted.mode == "canary" else "")
            self.metrics.set_rollout(wanted.mode, wanted.version, wanted.percent)

    def _set(self, rollout: Rollout | None, challenger: LoadedModel | None, scorer: _GuardedScorer | None) -> None:
        self.rollout, self.challenger, self._scorer = rollout, challenger, scorer
        if challenger is None:
            self._loaded_as = None

    # -- the request path

    def canary_for(self, key_header: str | None, texts: Sequence[str]) -> tuple[LoadedModel, _GuardedScorer] | None:
        """The challenger, when this request is in the canary's share and the challenger can take it."""
        rollout, challenger, scorer = self.rollout, self.challenger, self._scorer
        if (rollout is None or rollout.mode != "canary" or challenger is None or scorer is None
                or self.halted == rollout.rollout_id
                or not routes_to_challenger(route_key(key_header, texts), rollout.percent)):
            return None
        if scorer.stalled(self.timeout_s):  # a call hangs: the champion answers, the challenger is charged
            self.window.record_error(CHALLENGER_ROLE)
            self.metrics.rollout_requests.labels(challenger.version, CHALLENGER_ROLE, "stalled").inc()
            return None
        return challenger, scorer

    async def score_canary(self, challenger: LoadedModel, scorer: _GuardedScorer, texts: list[str],
                           request_id: str) -> Scores | None:
        """The challenger's scores, or None (counted) when it fails or is too slow: the champion answers then."""
        started = time.perf_counter()
        try:
            scores = await asyncio.wait_for(self._batcher.score(scorer, texts), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - whatever the challenger does, the request is answered
            elapsed = (time.perf_counter() - started) * 1000
            outcome = "timeout" if isinstance(exc, asyncio.TimeoutError) else "error"
            self.window.record_error(CHALLENGER_ROLE, latency_ms=elapsed)
            self.metrics.rollout_requests.labels(challenger.version, CHALLENGER_ROLE, outcome).inc()
            logger.warning("challenger version %s %s on a canary request; the champion answered: %r",
                           challenger.version, outcome, exc)
            return None
        elapsed = (time.perf_counter() - started) * 1000
        self._observe(CHALLENGER_ROLE, challenger, scores, elapsed, request_id, texts)
        return scores

    def observe_champion(self, champion: LoadedModel, texts: list[str], scores: Scores, latency_ms: float,
                         request_id: str) -> None:
        """A request the champion answered, while a rollout runs: measured, and mirrored for a shadow."""
        rollout = self.rollout
        if rollout is None:
            return
        labels, confidences = self._observe(CHAMPION_ROLE, champion, scores, latency_ms, request_id, texts)
        scorer, challenger = self._scorer, self.challenger
        if rollout.mode == "shadow" and scorer is not None and challenger is not None:
            self._offer(_Mirror(texts, request_id, CHAMPION_ROLE, labels, confidences,
                                scorer, challenger.version))

    def mirror_to_champion(self, texts: list[str], request_id: str, challenger: LoadedModel, scores: Scores) -> None:
        """A canary answer, offered to the champion off the request path so agreement is measured."""
        champion = self._champion()
        if champion is None:
            return
        best = scores.probs.argmax(axis=1)
        labels = [challenger.classifier.labels[int(index)] for index in best]
        confidences = scores.probs[np.arange(len(best)), best].tolist()
        self._offer(_Mirror(texts, request_id, CHALLENGER_ROLE, labels, confidences, champion.classifier,
                            champion.version))

    def _observe(self, role: Role, model: LoadedModel, scores: Scores, latency_ms: float,
                 request_id: str, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        best = scores.probs.argmax(axis=1)
        labels = [model.classifier.labels[int(index)] for index in best]
        confidences = scores.probs[np.arange(len(best)), best].tolist()
        self.window.record_answers(role, latency_ms=latency_ms, labels=labels, confidences=confidences,
                                   request_id=request_id, trained_on=self.trained_on(texts))
        self.metrics.rollout_requests.labels(model.version, role, "ok").inc()
        self.metrics.rollout_latency.labels(model.version, role).observe(latency_ms / 1000)
        return labels, confidences

    def trained_on(self, texts: Sequence[str]) -> list[bool]:
        """Which texts the champion or the challenger trained or was selected on, by their manifests."""
        seen = np.zeros(len(texts), dtype=bool)
        for model in (self._champion(), self.challenger):
            check = getattr(model.classifier, "trained_on", None) if model is not None else None
            if check is not None:
                seen |= np.asarray(check(texts), dtype=bool)
        return seen.tolist()

    def _offer(self, item: _Mirror) -> None:
        """Queue a copy for the mirror without ever waiting: sampled, and dropped (counted) when the queue is full."""
        if self.cfg.shadow_sample_rate < 1 and self._random.random() >= self.cfg.shadow_sample_rate:
            return
        try:
            self._mirror_queue.put_nowait(item)
        except queue.Full:
            self.window.record_dropped()
            self.metrics.mirror_dropped.labels("queue_full").inc()

    def feedback(self, request_id: str, label: str) -> None:
        """A label ``/feedback`` took; with the fleet's store it is counted from there instead (once, by the
        worker that gave the answer)."""
        if self.fleet is None:
            self.window.record_feedback(request_id, label)

    # -- the mirror thread

    def _mirror_loop(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            item = self._mirror_queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MIRROR_BATCH:
                try:
                    more = self._mirror_queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stop.set()
                    break
                batch.append(more)
            groups: dict[int, list[_Mirror]] = {}
            for mirrored in batch:
                groups.setdefault(id(mirrored.scorer), []).append(mirrored)
            for group in groups.values():
                try:
                    self._score_mirrored(group)
                except Exception:  # the mirror thread must outlive anything a model does
                    logger.exception("mirroring %d requests failed", len(group))

    def _score_mirrored(self, group: list[_Mirror]) -> None:
        first = group[0]
        other_role: Role = CHALLENGER_ROLE if first.answered_by == CHAMPION_ROLE else CHAMPION_ROLE
        if self._mirror_inflight is not None and not self._mirror_inflight.done():  # a call still hangs
            self.window.record_dropped(len(group))
            self.metrics.mirror_dropped.labels("stalled").inc(len(group))
            if other_role == CHALLENGER_ROLE:
                for _ in group:
                    self.window.record_error(CHALLENGER_ROLE)
            return
        texts = [text for mirrored in group for text in mirrored.texts]
        started = time.perf_counter()
        future = self._mirror_executor.submit(first.scorer.score, texts)
        self._mirror_inflight = future
        try:
            scores = future.result(timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a hung, crashed or slow model is counted, never raised
            outcome = "timeout" if isinstance(exc, FutureTimeout) else "error"
            elapsed = (time.perf_counter() - started) * 1000
            if other_role == CHALLENGER_ROLE:
                for _ in group:
                    self.window.record_error(CHALLENGER_ROLE, latency_ms=elapsed)
            self.metrics.rollout_requests.labels(first.other_version, "shadow" if other_role == CHALLENGER_ROLE
                                                 else CHAMPION_ROLE, outcome).inc(len(group))
            logger.warning("mirrored call to version %s: %s (%r)", first.other_version, outcome, exc)
            return
        elapsed = (time.perf_counter() - started) * 1000
        best = scores.probs.argmax(axis=1)
        labels = [first.scorer.labels[int(index)] for index in best]
        confidences = scores.probs[np.arange(len(best)), best].tolist()
        start = 0
        for mirrored in group:
            end = start + len(mirrored.texts)
            theirs, their_conf = labels[start:end], confidences[start:end]
            trained_on = self.trained_on(mirrored.texts)
            if other_role == CHALLENGER_ROLE:  # shadow: the challenger's own numbers, and the comparison
                self.window.record_answers(CHALLENGER_ROLE, latency_ms=elapsed, labels=theirs,
                                           confidences=their_conf, request_id=mirrored.request_id,
                                           trained_on=trained_on)
                self.metrics.rollout_requests.labels(mirrored.other_version, "shadow", "ok").inc()
                self.metrics.rollout_latency.labels(mirrored.other_version, "shadow").observe(elapsed / 1000)
                self.window.record_comparison(mirrored.labels, theirs, mirrored.confidences, their_conf)
            else:  # canary: the champion's label for the challenger's texts
                self.window.remember(CHAMPION_ROLE, mirrored.request_id, theirs, trained_on)
                self.window.record_comparison(theirs, mirrored.labels, their_conf, mirrored.confidences)
            agreed = sum(a == b for a, b in zip(mirrored.labels, theirs, strict=True))
            champion_version = self.rollout.champion_version if self.rollout else None
            self.metrics.shadow_comparisons.labels(str(champion_version), self._version(), "true").inc(agreed)
            self.metrics.shadow_comparisons.labels(str(champion_version), self._version(), "false").inc(
                len(theirs) - agreed)
            start = end

    def _version(self) -> str:
        return self.challenger.version if self.challenger else "none"

    # -- the judge thread

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.cfg.judge_every_s):
            try:
                self.judge_once()
            except Exception as exc:  # the judge must outlive a registry hiccup
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("judging the canary failed")

    def judge_once(self) -> Verdict | None:
        """Judge the canary's window and act on the verdict: roll back, step up, promote, or wait."""
        rollout = self.rollout
        if rollout is None:
            return None
        if self.fleet is not None:
            self._exchange_with_fleet(rollout)
        window = self.window.snapshot(self._fleet_others)
        if rollout.version in self.refused:
            verdict = Verdict("fail", (Check("loads", False, None, None,
                                             f"version {rollout.version} was refused: {self.refused[rollout.version]}"),))
        else:
            verdict = judge_canary(window, self.cfg)
        self.last_verdict = verdict
        if rollout.mode != "canary" or self.halted == rollout.rollout_id or self.actions is None:
            return verdict
        evidence = {"verdict": verdict.to_dict(), "window": window.to_dict(),
                    "thresholds": self.cfg.model_dump(mode="json")}
        if verdict.outcome == "fail":
            self._roll_back(rollout, verdict, evidence)
        elif verdict.outcome == "pass" and not rollout.last_step:
            self._step_up(rollout, evidence)
        elif verdict.outcome == "pass" and self.cfg.auto_promote:
            self._promote(rollout, evidence)
        return verdict

    def _exchange_with_fleet(self, rollout: Rollout) -> None:
        """Count the labels the fleet took for answers given here, share this worker's counts, read the others'.
        A store that does not answer leaves the last counts read (and the error in ``/rollout``)."""
        assert self.fleet is not None
        window = self.window
        try:
            for request_id, label in self.fleet.new_feedback():
                window.record_feedback(request_id, label)
            others = self.fleet.exchange(rollout.rollout_id, rollout.step, window.counts())
        except Exception as exc:  # noqa: BLE001 - the judge goes on with what it has
            self.last_error = f"the fleet's windows cannot be read: {type(exc).__name__}: {exc}"
            logger.warning("%s", self.last_error)
            return
        if window is self.window:  # not a window of an earlier step, replaced meanwhile
            self._fleet_others = others

    def _roll_back(self, rollout: Rollout, verdict: Verdict, evidence: dict[str, Any]) -> None:
        from langops.rollouts import RolloutError, end_rollout

        self.halted = rollout.rollout_id  # first: from now on the champion answers everything
        self.metrics.rollout_events.labels("canary-rollback").inc()
        logger.error("canary of version %s failed at %g%%: %s; rolled back", rollout.version, rollout.percent,
                     "; ".join(verdict.reasons))
        assert self.actions is not None
        try:
            _, event = end_rollout(self.actions.params, expected=rollout, event="canary-rollback", actor="langops-server",
                                   reason="; ".join(verdict.reasons), evidence=evidence)
        except RolloutError as exc:  # someone else changed it first; the registry says what happens next
            self.last_action = {"action": "rollback", "error": str(exc)}
            self.refresh()
            return
        self.last_action = {"action": "rollback", "record_id": event.record_id, "at": event.at}
        self.apply(None)

    def _step_up(self, rollout: Rollout, evidence: dict[str, Any]) -> None:
        from langops.rollouts import RolloutError, step_up

        assert self.actions is not None
        try:
            stepped, event = step_up(self.actions.params, expected=rollout, actor="langops-server", evidence=evidence)
        except RolloutError as exc:
            self.last_action = {"action": "step", "error": str(exc)}
            self.refresh()
            return
        self.metrics.rollout_events.labels("canary-step").inc()
        self.last_action = {"action": "step", "percent": stepped.percent, "record_id": event.record_id}
        self.apply(stepped)

    def _promote(self, rollout: Rollout, evidence: dict[str, Any]) -> None:
        from langops.promotions import PromotionError
        from langops.rollouts import promote_rollout

        assert self.actions is not None
        try:
            event = promote_rollout(self.actions.params, expected=rollout, actor="langops-server", evidence=evidence,
                                    reason=f"canary passed every step ({', '.join(f'{s:g}%' for s in rollout.steps)})")
        except PromotionError as exc:
            self.halted = rollout.rollout_id
            self.last_action = {"action": "promote", "error": str(exc)}
            logger.error("canary of version %s passed but cannot be promoted: %s", rollout.version, exc)
            return
        self.metrics.rollout_events.labels("promote").inc()
        self.last_action = {"action": "promote", "record_id": event.record_id, "at": event.at}
        self._on_promoted()  # the champion alias moved: load it now, not at the next poll
        self.apply(None)

    # -- what /rollout shows

    def status(self) -> dict[str, Any]:
        rollout, challenger = self.rollout, self.challenger
        window = self.window.snapshot(self._fleet_others)
        return {
            "rollout": rollout.summary() if rollout else None,
            "challenger_version": challenger.version if challenger else None,
            "challenger_loaded_at": challenger.loaded_at if challenger else None,
            "refused": dict(self.refused),
            "halted": rollout is not None and self.halted == rollout.rollout_id,
            "window": window.to_dict(),
            "verdict": judge_canary(window, self.cfg).to_dict() if rollout else None,  # of the window shown
            "last_action": self.last_action,
            "last_error": self.last_error,
            "thresholds": self.cfg.model_dump(mode="json"),
        }


