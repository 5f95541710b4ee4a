"""The promotion gate: a pure ``decide`` and a small step that writes its outcome to the registry.

``decide`` sees only evidence (metrics of the shipped int8 model on one test split, latency, size)
and the policy from ``params.yaml``; it never touches MLflow, so every case is a plain unit test.
``apply_decision`` is the only place that moves the ``champion`` alias.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from langops.config import PromoteConfig

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"


@dataclass(frozen=True)
class ModelEvidence:
    """What the gate knows about one model, measured on the challenger's test split."""

    version: str | None
    metrics: dict[str, float]
    latency_ms: float | None = None
    size_mb: float | None = None
    parity_passed: bool = True


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_version: str | None
    champion_version: str | None
    primary_metric: str
    checks: tuple[Check, ...]
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        verdict = "PROMOTED" if self.promote else "NOT PROMOTED"
        lines = [
            f"# Promotion decision: {verdict}",
            "",
            f"- challenger: version {self.challenger_version}",
            f"- champion before: {('version ' + self.champion_version) if self.champion_version else 'none'}",
            f"- primary metric: `{self.primary_metric}`",
            f"- reason: {self.reason}",
            f"- decided at: {self.decided_at}",
            "",
            "| check | result | detail |",
            "|---|---|---|",
        ]
        lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in self.checks]
        return "\n".join(lines) + "\n"


def decide(challenger: ModelEvidence, champion: ModelEvidence | None, policy: PromoteConfig) -> Decision:
    """Promote only if every absolute check passes and, when a champion exists, the challenger beats it
    on the primary metric by at least ``policy.min_improvement`` on the same test rows."""
    checks: list[Check] = [Check("parity", challenger.parity_passed, "compressed model matches the torch model" if challenger.parity_passed else "compressed model disagrees with the torch model")]
    for metric, threshold in sorted(policy.thresholds.items()):
        value = challenger.metrics.get(metric)
        if value is None or math.isnan(value):
            checks.append(Check(f"threshold:{metric}", False, f"{metric} is absent from the challenger's evaluation"))
        else:
            checks.append(Check(f"threshold:{metric}", value >= threshold, f"{value:.4f} >= {threshold:.4f}"))
    checks.append(_budget("latency_ms", challenger.latency_ms, policy.max_latency_ms))
    checks.append(_budget("size_mb", challenger.size_mb, policy.max_size_mb))

    primary = policy.primary_metric
    if champion is not None:
        checks.append(_beats_champion(challenger, champion, primary, policy.min_improvement))

    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
    elif champion is None:
        reason = "no champion yet and every absolute check passes"
    else:
        reason = f"beats champion version {champion.version} on {primary} by at least {policy.min_improvement}"
    return Decision(
        promote=not failed,
        reason=reason,
        challenger_version=challenger.version,
        champion_version=champion.version if champion else None,
        primary_metric=primary,
        checks=tuple(checks),
    )


def _budget(name: str, value: float | None, limit: float) -> Check:
    if value is None:
        return Check(f"budget:{name}", False, f"{name} was not measured")
    return Check(f"budget:{name}", value <= limit, f"{value:.2f} <= {limit:.2f}")


def _beats_champion(challenger: ModelEvidence, champion: ModelEvidence, metric: str, margin: float) -> Check:
    name = f"beats_champion:{metric}"
    ours, theirs = challenger.metrics.get(metric), champion.metrics.get(metric)
    if ours is None:
        return Check(name, False, f"{metric} is absent from the challenger's evaluation")
    if theirs is None:
        return Check(name, False, f"champion version {champion.version} has no {metric} on this test split")
    delta = ours - theirs
    if abs(delta) < 1e-12:
        return Check(name, False, f"tie: both {ours:.4f}; a tie never replaces the champion")
    return Check(name, delta >= margin, f"{ours:.4f} - {theirs:.4f} = {delta:+.4f} (needs >= {margin:+.4f})")


def apply_decision(decision: Decision, *, model_name: str) -> str | None:
    """Record the decision on the challenger's model version and, if it passed, move the aliases.

    Returns the version that is champion afterwards. A failed gate writes tags only: the champion
    alias is untouched.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = decision.challenger_version
    if version is None:
        raise ValueError("the decision names no challenger version")
    client.set_model_version_tag(model_name, version, "langops.decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(model_name, version, "langops.decision_reason", decision.reason[:5000])
    client.set_model_version_tag(model_name, version, "langops.decided_at", decision.decided_at)
    if not decision.promote:
        return decision.champion_version
    if decision.champion_version is not None:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, decision.champion_version)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return version
