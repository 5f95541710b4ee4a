"""The promotion gate: a pure ``decide`` and a small step that writes its outcome to the registry.

``decide`` sees only evidence — the per-row predictions of the shipped (int8) model and of the
champion on the same test rows, latency and size — and the policy from ``params.yaml``. It never
touches MLflow, so every case is a plain unit test. ``apply_decision`` writes the outcome; it moves the
``champion`` alias only through ``langops.promotions`` (locked and logged, like ``langops rollback``).

Point values are not enough to replace a model: on a few hundred rows a one-point gain in macro-F1 is
often noise. The primary metric is therefore judged by a paired bootstrap interval of the difference
on the same rows (and, for accuracy, McNemar's exact test), and promoted only when the interval's
lower bound clears the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from langops.config import PromoteConfig
from langops.io import write_json
from langops.label_keys import label_keys

DECISION_FILE = "decision.json"
DECISION_REPORT = "decision.md"
BOOTSTRAP_SEED = 20240601  # fixed: the same evidence always gives the same decision
LOWER_IS_BETTER = frozenset({"ece"})
BASELINE_MARGIN = "baseline_margin"  # the key of promote.thresholds that is the floor against the baseline
BASELINE_NAME = "TF-IDF + logistic regression"


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


@dataclass(frozen=True)
class ModelEvidence:
    """What the gate knows about one model, measured on the challenger's test rows.

    ``y_true``/``y_pred`` are label ids in ``labels`` order, row by row; they are what the paired
    interval resamples. A champion without them ("no evaluation") cannot be compared and says so.
    """

    version: str | None
    labels: tuple[str, ...] = ()
    y_true: tuple[int, ...] | None = None
    y_pred: tuple[int, ...] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    size_mb: float | None = None
    parity_passed: bool = True
    servable: bool | None = None
    servable_detail: str = "not checked"
    text_lengths: tuple[int, ...] | None = None
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_probabilities(
        cls, version: str | None, labels: Sequence[str], y_true: Sequence[int], probs: np.ndarray, **extra: Any
    ) -> ModelEvidence:
        """Evidence from a model's class probabilities on the test rows (metrics computed here)."""
        from langops.metrics import classification_metrics

        probs = np.asarray(probs, dtype=float)
        metrics = classification_metrics(np.asarray(y_true), probs, labels)
        flat = {k: float(metrics[k]) for k in ("accuracy", "macro_f1", "ece")}
        flat |= {f"recall_{key}": row["recall"] for key, row in metrics["per_class"].items()}
        return cls(
            version=version, labels=tuple(labels), y_true=tuple(int(y) for y in y_true),
            y_pred=tuple(int(p) for p in probs.argmax(axis=1)), metrics=flat, probabilities=probs, **extra,
        )

    def on_rows(self, keep: np.ndarray) -> ModelEvidence:
        """The same model's evidence on the rows ``keep`` marks, its metrics computed on them alone.

        Raises:
            ValueError: the evidence has no per-row probabilities to recompute from.
        """
        if self.probabilities is None or self.y_true is None:
            raise ValueError(f"version {self.version}'s evidence has no per-row probabilities to restrict")
        keep = np.asarray(keep, dtype=bool)
        lengths = tuple(np.asarray(self.text_lengths)[keep].tolist()) if self.text_lengths is not None else None
        subset = ModelEvidence.from_probabilities(
            self.version, self.labels, np.asarray(self.y_true)[keep], self.probabilities[keep], text_lengths=lengths
        )
        return replace(self, y_true=subset.y_true, y_pred=subset.y_pred, metrics=subset.metrics,
                       text_lengths=lengths, probabilities=subset.probabilities)

    @property
    def evaluated(self) -> bool:
        return self.y_true is not None and self.y_pred is not None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    reference: float | None = None
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class ComparedRows:
    """The test rows two models are compared on: only texts neither trained nor was selected on.

    A champion judged on texts it trained on gets the gap between its training and test accuracy for free;
    every such row is removed first, by the models' training manifests (``langops.text_hashes``).
    ``removed`` counts each removed row once, under the first reason that holds, in the order
    champion train, champion validation, challenger train, challenger validation.
    """

    keep: tuple[bool, ...]
    removed: dict[str, int] = field(default_factory=dict)
    without_manifest: tuple[str, ...] = ()  # versions whose training texts are unknown (shipped before manifests)

    @property
    def total(self) -> int:
        return len(self.keep)

    @property
    def compared(self) -> int:
        return int(sum(self.keep))

    def describe(self) -> str:
        return describe_compared(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"test_rows": self.total, "compared": self.compared, "removed": dict(self.removed),
                "without_manifest": list(self.without_manifest)}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_version: str | None
    champion_version: str | None
    primary_metric: str
    checks: tuple[Check, ...]
    forced: bool = False
    force_reason: str | None = None
    approval: dict[str, Any] | None = None
    compared_rows: dict[str, Any] | None = None  # ComparedRows.to_dict() when there was a champion
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def already_champion(self) -> bool:
        """The challenger is the champion already: nothing was judged and nothing moved."""
        return self.challenger_version is not None and self.challenger_version == self.champion_version

    def to_markdown(self) -> str:
        verdict = "ALREADY CHAMPION" if self.already_champion else "PROMOTED" if self.promote else "NOT PROMOTED"
        if self.forced:
            verdict += " (FORCED)"
        lines = [
            f"# Promotion decision: {verdict}",
            "",
            f"- challenger: version {self.challenger_version}",
            f"- champion before: {('version ' + self.champion_version) if self.champion_version else 'none'}",
            f"- primary metric: `{self.primary_metric}`",
            *([f"- compared on: {describe_compared(self.compared_rows)}"] if self.compared_rows else []),
            f"- reason: {self.reason}",
            f"- decided at: {self.decided_at}",
        ]
        if self.forced:
            lines.append(f"- forced because: {self.force_reason}")
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in self.checks]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path, *, champion_after: str | None) -> tuple[Path, Path]:
        """``decision.json`` (with the champion after it was applied) and ``decision.md``, in ``out_dir``."""
        out_dir = Path(out_dir)
        record = write_json(out_dir / DECISION_FILE, {**self.to_dict(), "champion_after": champion_after})
        report = out_dir / DECISION_REPORT
        report.write_text(self.to_markdown())
        return record, report


def describe_compared(compared: dict[str, Any]) -> str:
    """``ComparedRows.to_dict()`` in words: what was compared, what was removed as trained on, and why."""
    removed = ", ".join(f"{n} in {why}" for why, n in compared["removed"].items() if n)
    line = (f"{compared['compared']} of {compared['test_rows']} test rows"
            + (f" (removed as trained on: {removed})" if removed else ", none trained on by either model"))
    if compared["without_manifest"]:
        line += (f"; version {', '.join(compared['without_manifest'])} has no training manifest (shipped before "
                 "manifests), so rows it trained on could not be removed")
    return line


@dataclass(frozen=True)
class ShadowEvidence:
    """The challenger's last shadow run beside the current champion, judged on its live window by
    ``deploy.rollout``'s thresholds: each check as ``(name, passed, detail)``, ``passed`` None when the
    window was too small to judge it."""

    record_id: str
    requests: int
    checks: tuple[tuple[str, bool | None, str], ...]


NOT_GATED_SHADOW_CHECKS = frozenset({"agreement"})  # a better model disagrees exactly where the champion is wrong


def decide(
    challenger: ModelEvidence,
    champion: ModelEvidence | None,
    policy: PromoteConfig,
    *,
    baseline: ModelEvidence | None = None,
    compared: ComparedRows | None = None,
    force_reason: str | None = None,
    shadow: ShadowEvidence | None = None,
) -> Decision:
    """Judge the challenger; every check is spelled out in the decision, passed or not.

    Absolute checks (any model): parity with the torch model, servable (loaded and answered in a fresh
    process, as the server loads it), ``thresholds``, latency and size budgets, on the whole test split;
    and, with ``thresholds.baseline_margin``, the floor: the primary metric's paired bootstrap interval of
    challenger - ``baseline`` (TF-IDF + logistic regression on the same test rows) must clear the margin.
    Against a champion (on the same rows, less those ``compared`` removes because either model trained on
    them; fewer than ``min_compared_rows`` left is a refusal to judge): the primary metric's paired
    bootstrap interval must clear ``min_absolute_change`` and ``min_relative_change`` (for accuracy
    McNemar's test must also reject), and every guard metric must not regress by more than its margin.

    Live evidence: with ``shadow`` (the challenger ran as a shadow beside this champion), every check its
    window could judge joins the gate as ``shadow:<check>``; agreement with the champion is reported, not gated.

    Args:
        force_reason: promote whatever the checks say; the reason is mandatory and recorded.
        shadow: the challenger's judged shadow window, if there is one.

    Raises:
        ValueError: ``force_reason`` is given but blank.
    """
    if force_reason is not None and not force_reason.strip():
        raise ValueError("forcing a promotion needs a reason")
    checks = [
        _parity(challenger),
        Check("servable", challenger.servable is True, challenger.servable_detail),
        *_thresholds(challenger, policy),
        *_beats_baseline(challenger, baseline, policy),
        *_budgets(challenger, policy),
    ]
    if champion is not None:
        checks += _against_champion(challenger, champion, policy, compared)
    if shadow is not None:
        checks += _shadow_checks(shadow)

    failed = [c for c in checks if not c.passed]
    primary = policy.primary_metric
    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
    elif champion is None:
        reason = "no champion yet and every absolute check passes"
    else:
        reason = f"beats champion version {champion.version} on {primary} beyond noise and the margin; guards hold"
    if force_reason is not None:
        reason = f"forced ({force_reason.strip()})" + (f" despite: {reason}" if failed else "")
    return Decision(
        promote=not failed or force_reason is not None,
        reason=reason,
        challenger_version=challenger.version,
        champion_version=champion.version if champion else None,
        primary_metric=primary,
        checks=tuple(checks),
        forced=force_reason is not None,
        force_reason=force_reason.strip() if force_reason else None,
        compared_rows=compared.to_dict() if compared is not None and champion is not None else None,
    )


def _shadow_checks(shadow: ShadowEvidence) -> list[Check]:
    where = f"shadow record {shadow.record_id[:8]}, {shadow.requests} mirrored requests"
    judged = [(name, passed, detail) for name, passed, detail in shadow.checks if passed is not None]
    if not judged:
        return [Check("shadow", True, f"{where}: too few to judge anything (reported, not gated)")]
    return [Check(f"shadow:{name}", True, f"{detail} ({where}; reported, not gated)")
            if name in NOT_GATED_SHADOW_CHECKS else Check(f"shadow:{name}", bool(passed), f"{detail} ({where})")
            for name, passed, detail in judged]


def already_champion(version: str, policy: PromoteConfig, *, force_reason: str | None = None) -> Decision:
    """The decision when the registered version is the champion already (a rerun that reused a cached
    model, or ``promote`` run twice): nothing to judge and nothing moves. A forced request is kept as one,
    with its reason, so the record shows what was asked.

    Raises:
        ValueError: ``force_reason`` is given but blank.
    """
    if force_reason is not None and not force_reason.strip():
        raise ValueError("forcing a promotion needs a reason")
    reason = f"version {version} is already the champion; nothing to decide"
    return Decision(
        promote=False,
        reason=f"forced ({force_reason.strip()}), but {reason}" if force_reason else reason,
        challenger_version=version,
        champion_version=version,
        primary_metric=policy.primary_metric,
        checks=(Check("already_champion", True, f"the champion alias names version {version}"),),
        forced=force_reason is not None,
        force_reason=force_reason.strip() if force_reason else None,
    )


def with_approval(decision: Decision, *, approved: bool, reviewer: str, comment: str = "") -> Decision:
    """The decision after a person's review: a rejection stops a passing challenger, and is recorded."""
    detail = f"{'approved' if approved else 'rejected'} by {reviewer}" + (f": {comment}" if comment else "")
    return replace(
        decision,
        promote=decision.promote and approved,
        reason=decision.reason if approved else f"{detail} (gate: {decision.reason})",
        checks=(*decision.checks, Check("approval", approved, detail)),
        approval={"approved": approved, "reviewer": reviewer, "comment": comment},
    )


def _parity(challenger: ModelEvidence) -> Check:
    detail = "shipped model matches the torch model" if challenger.parity_passed else "shipped model disagrees with the torch model"
    return Check("parity", challenger.parity_passed, detail)


def _thresholds(challenger: ModelEvidence, policy: PromoteConfig) -> list[Check]:
    checks = []
    for metric, threshold in sorted(policy.thresholds.items()):
        if metric == BASELINE_MARGIN:
            continue
        value = challenger.metrics.get(metric)
        name = f"threshold:{metric}"
        if value is None or math.isnan(value):
            checks.append(Check(name, False, f"{metric} is absent from the challenger's evaluation"))
        elif greater_is_better(metric):
            checks.append(Check(name, value >= threshold, f"{value:.4f} >= {threshold:.4f}", value, threshold))
        else:
            checks.append(Check(name, value <= threshold, f"{value:.4f} <= {threshold:.4f}", value, threshold))
    return checks


def _beats_baseline(challenger: ModelEvidence, baseline: ModelEvidence | None, policy: PromoteConfig) -> list[Check]:
    """The floor: a model that a linear model on n-grams matches is not worth serving."""
    margin = policy.thresholds.get(BASELINE_MARGIN)
    if margin is None:
        return []
    name = f"beats_baseline:{policy.primary_metric}"
    if baseline is None or not baseline.evaluated:
        return [Check(name, False, f"no {BASELINE_NAME} predictions on the test rows to compare with: run the "
                                   "baseline step (langops baseline)")]
    if not challenger.evaluated or baseline.y_true != challenger.y_true or baseline.labels != challenger.labels:
        return [Check(name, False, "the baseline was scored on other test rows or labels than the challenger: "
                                   "run the baseline step again on this prepared data")]
    check = _paired_difference(name, challenger, baseline, policy, required=margin, against=BASELINE_NAME)
    if check.passed:
        return [check]
    return [replace(check, detail=check.detail + (
        f"; the fine-tuned model does not beat a linear model on word and character n-grams here. Try a longer or "
        "stronger recipe (train.method: full, a higher train.learning_rate, more data), a larger base model "
        f"(train.base_model), or lower promote.thresholds.{BASELINE_MARGIN} if a tie with the baseline is "
        f"acceptable (null turns the floor off: --set promote.thresholds.{BASELINE_MARGIN}=null)"))]


def _budgets(challenger: ModelEvidence, policy: PromoteConfig) -> list[Check]:
    budgets = [(f"latency_ms:{key}", challenger.latency_ms.get(key), limit) for key, limit in sorted(policy.max_latency_ms.items())]
    budgets.append(("size_mb", challenger.size_mb, policy.max_size_mb))
    checks = []
    for name, value, limit in budgets:
        if value is None:
            checks.append(Check(f"budget:{name}", False, f"{name} was not measured"))
        else:
            checks.append(Check(f"budget:{name}", value <= limit, f"{value:.2f} <= {limit:.2f}", value, limit))
    return checks


def _against_champion(
    challenger: ModelEvidence, champion: ModelEvidence, policy: PromoteConfig, compared: ComparedRows | None
) -> list[Check]:
    if champion.labels and tuple(champion.labels) != tuple(challenger.labels):
        return [Check("same_labels", False, describe_label_change(champion, challenger))]
    if not champion.evaluated:
        return [Check("champion_evaluated", False, f"champion version {champion.version} has no evaluation on these rows")]
    if not challenger.evaluated:
        return [Check("challenger_evaluated", False, "the challenger has no per-row predictions")]
    if champion.y_true != challenger.y_true or tuple(champion.labels) != tuple(challenger.labels):
        return [Check("same_rows", False, "champion and challenger were scored on different rows or label sets")]
    checks: list[Check] = []
    if compared is not None:
        if compared.total != len(challenger.y_true):
            return [Check("compared_rows", False, f"the row selection covers {compared.total} rows, the evidence "
                          f"{len(challenger.y_true)}")]
        enough = compared.compared >= policy.min_compared_rows
        detail = f"compared on {compared.describe()}"
        if not enough:
            detail += (f": fewer than promote.min_compared_rows ({policy.min_compared_rows}), too few to judge. Add "
                       "labelled rows neither model has seen (a new text lands in test with probability "
                       "prepare.test_size), lower promote.min_compared_rows, or ship it anyway with "
                       "`langops promote --force REASON`")
        checks.append(Check("compared_rows", enough, detail, float(compared.compared), float(policy.min_compared_rows)))
        if not enough:
            return checks
        if compared.compared < compared.total:
            keep = np.asarray(compared.keep, dtype=bool)
            challenger, champion = challenger.on_rows(keep), champion.on_rows(keep)
    checks.append(_primary(challenger, champion, policy))
    if policy.primary_metric == "accuracy":
        checks.append(_mcnemar(challenger, champion, policy.mcnemar_alpha))
    checks += _guards(challenger, champion, policy)
    checks += _slices(challenger, champion, policy)
    return checks


def describe_label_change(champion: ModelEvidence, challenger: ModelEvidence, shown: int = 5) -> str:
    """Why a new label set is never promoted automatically, what changed, and how to ship it anyway."""
    old, new = set(champion.labels), set(challenger.labels)

    def listed(labels: set[str]) -> str:
        names = sorted(labels)
        return ", ".join(repr(n) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

    changes = [f"{len(new - old)} new ({listed(new - old)})" if new - old else "",
               f"{len(old - new)} gone ({listed(old - new)})" if old - new else "",
               "the same labels in another order" if old == new else ""]
    return (f"champion version {champion.version} serves another label set: {'; '.join(c for c in changes if c)}. "
            "Clients would get different classes, so the gate does not compare them: promote it with "
            "`langops promote --force REASON` if the change is meant, or register it under another "
            "register.model_name")


def _primary(challenger: ModelEvidence, champion: ModelEvidence, policy: PromoteConfig) -> Check:
    required = max(policy.min_absolute_change,
                   policy.min_relative_change * _metric(policy.primary_metric, np.asarray(challenger.y_true),
                                                        np.asarray(champion.y_pred), len(challenger.labels)))
    check = _paired_difference(f"beats_champion:{policy.primary_metric}", challenger, champion, policy,
                               required=required, against=f"champion version {champion.version}")
    if check.interval == (0.0, 0.0) and check.value == check.reference:
        return replace(check, detail=f"tie: identical predictions ({check.value:.4f}); a tie never replaces the champion")
    return check


def _paired_difference(
    name: str, ours: ModelEvidence, theirs: ModelEvidence, policy: PromoteConfig, *, required: float, against: str
) -> Check:
    """Passes when the lower bound of the paired bootstrap interval of ours - theirs on the primary metric
    (the same rows resampled for both) reaches ``required``, and ours is ahead on the point values."""
    metric = policy.primary_metric
    y_true = np.asarray(ours.y_true)
    ours_pred, theirs_pred = np.asarray(ours.y_pred), np.asarray(theirs.y_pred)
    k = len(ours.labels)
    point_ours, point_theirs = _metric(metric, y_true, ours_pred, k), _metric(metric, y_true, theirs_pred, k)
    if np.array_equal(ours_pred, theirs_pred):
        return Check(name, False, f"identical predictions ({point_ours:.4f} each)", point_ours, point_theirs, (0.0, 0.0))
    low, high = paired_bootstrap_interval(
        metric, y_true, ours_pred, theirs_pred, k, samples=policy.bootstrap_samples, confidence=policy.confidence
    )
    delta = point_ours - point_theirs
    detail = (
        f"{point_ours:.4f} vs {against} {point_theirs:.4f}: difference {delta:+.4f}, {policy.confidence:.0%} "
        f"interval [{low:+.4f}, {high:+.4f}] (lower bound needs >= {required:+.4f}"
        + (", and a point difference above 0" if required < 0 else "") + ")"
    )
    return Check(name, low >= required and delta > 0, detail, point_ours, point_theirs, (low, high))


def _mcnemar(challenger: ModelEvidence, champion: ModelEvidence, alpha: float) -> Check:
    from scipy.stats import binomtest

    y_true = np.asarray(challenger.y_true)
    ours_right = np.asarray(challenger.y_pred) == y_true
    theirs_right = np.asarray(champion.y_pred) == y_true
    wins, losses = int(np.sum(ours_right & ~theirs_right)), int(np.sum(~ours_right & theirs_right))
    p_value = binomtest(min(wins, losses), wins + losses, 0.5).pvalue if wins + losses else 1.0
    detail = f"challenger right where champion wrong on {wins} rows, the reverse on {losses}: p = {p_value:.4f} (needs < {alpha})"
    return Check("mcnemar:accuracy", wins > losses and p_value < alpha, detail, float(p_value), alpha)


def _guards(challenger: ModelEvidence, champion: ModelEvidence, policy: PromoteConfig) -> list[Check]:
    """Each guard metric's regression against the champion; a class's recall on fewer than
    ``min_class_rows`` rows is reported, not gated (three rows of thirty are already a 0.10 move)."""
    checks = []
    keys = label_keys(challenger.labels)
    class_rows = {f"recall_{keys[label]}": int(n) for label, n in
                  zip(challenger.labels, np.bincount(np.asarray(challenger.y_true, dtype=int),
                                                     minlength=len(challenger.labels)), strict=True)}
    for pattern, margin in sorted(policy.guards.items()):
        metrics = [f"{pattern[:-1]}{key}" for key in keys.values()] if pattern.endswith("*") else [pattern]
        for metric in metrics:
            ours, theirs = challenger.metrics.get(metric), champion.metrics.get(metric)
            name = f"guard:{metric}"
            if ours is None or theirs is None:
                missing = "challenger" if ours is None else f"champion version {champion.version}"
                checks.append(Check(name, False, f"{metric} is absent for the {missing}"))
                continue
            regression = (theirs - ours) if greater_is_better(metric) else (ours - theirs)
            detail = f"{ours:.4f} vs champion {theirs:.4f}: regression {regression:+.4f}"
            rows = class_rows.get(metric)
            if rows is not None and rows < policy.min_class_rows:
                checks.append(Check(name, True, f"{detail} on {rows} rows of the class (reported, not gated: fewer "
                                                 f"than promote.min_class_rows, {policy.min_class_rows})", ours, theirs))
                continue
            checks.append(Check(name, regression <= margin + 1e-12, f"{detail} (allowed <= {margin:.4f})", ours, theirs))
    return checks


def _slices(challenger: ModelEvidence, champion: ModelEvidence, policy: PromoteConfig) -> list[Check]:
    """Accuracy per text-length bucket; a slice smaller than ``min_rows`` is reported, never gated."""
    if challenger.text_lengths is None:
        return []
    cfg = policy.slices
    lengths = np.asarray(challenger.text_lengths)
    bucket = np.digitize(lengths, cfg.length_edges)
    bounds = [0, *cfg.length_edges, None]
    y_true = np.asarray(challenger.y_true)
    ours_right = np.asarray(challenger.y_pred) == y_true
    theirs_right = np.asarray(champion.y_pred) == y_true
    checks = []
    for b in range(len(bounds) - 1):
        rows = bucket == b
        low, high = bounds[b], bounds[b + 1]
        name = f"slice:length_{low}_{high - 1}" if high is not None else f"slice:length_{low}_up"
        n = int(rows.sum())
        if n == 0:
            continue
        ours, theirs = float(ours_right[rows].mean()), float(theirs_right[rows].mean())
        regression = theirs - ours
        detail = f"accuracy {ours:.4f} vs champion {theirs:.4f} on {n} rows: regression {regression:+.4f}"
        if n < cfg.min_rows:
            checks.append(Check(name, True, f"{detail} (reported, not gated: fewer than {cfg.min_rows} rows)", ours, theirs))
        else:
            checks.append(Check(name, regression <= cfg.max_regression + 1e-12, f"{detail} (allowed <= {cfg.max_regression:.4f})", ours, theirs))
    return checks


def paired_bootstrap_interval(
    metric: str, y_true: np.ndarray, ours: np.ndarray, theirs: np.ndarray, n_labels: int, *, samples: int, confidence: float
) -> tuple[float, float]:
    """Percentile interval of metric(ours) - metric(theirs), resampling the same rows for both models."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rows = rng.integers(0, len(y_true), size=(samples, len(y_true)))
    diffs = _metric_batch(metric, y_true[rows], ours[rows], n_labels) - _metric_batch(metric, y_true[rows], theirs[rows], n_labels)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return float(low), float(high)


def _metric(metric: str, y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> float:
    return float(_metric_batch(metric, y_true[None, :], y_pred[None, :], n_labels)[0])


def _metric_batch(metric: str, y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Accuracy or macro-F1 for each row of (samples, rows) label-id matrices, vectorised."""
    if metric == "accuracy":
        return (y_true == y_pred).mean(axis=1)
    if metric != "macro_f1":
        raise ValueError(f"no resampled form for metric {metric!r}")
    samples = y_true.shape[0]
    cell = (np.arange(samples)[:, None] * n_labels + y_true) * n_labels + y_pred
    confusion = np.bincount(cell.ravel(), minlength=samples * n_labels * n_labels).reshape(samples, n_labels, n_labels)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=2) + confusion.sum(axis=1)  # (tp + fn) + (tp + fp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=float), where=denominator > 0)
    return f1.mean(axis=1)
