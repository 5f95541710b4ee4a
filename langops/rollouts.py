"""The state of a shadow or canary rollout, kept in the registry, and every change of it, written down.

A rollout lives on the registered model: the ``challenger`` alias names the version being tried, and
one registered-model tag (``langops.rollout``, JSON) says how (mode, canary step and percent, the
champion it started against, when). Keeping it in the registry, not in the server, means it survives
a server restart, every worker and every ``langops`` command read the same state, and the server
follows it on the poll it already makes for the champion alias (or at once on ``POST /reload``).

Every change goes through the champion lock and is checked against the state the caller saw
(``expected``): the server's judge and a person's ``langops canary abort`` cannot both act on the same
step. Each change is one event in the promotion log (``langops history``) with its evidence; the end of
a passed canary is a ``promote`` through the same locked move as every promotion.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from langops.aliases import CHALLENGER, CHAMPION, ROLLOUT_TAG
from langops.faults import crash_point
from langops.promotions import (
    PromotionError,
    PromotionEvent,
    _client,
    _move_locked,
    champion_lock,
    current_alias_version,
    record_event,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from langops.config import Params, RolloutConfig

log = logging.getLogger(__name__)

Mode = Literal["shadow", "canary"]


class RolloutError(PromotionError):
    """A rollout change was refused; the registry was left as it was."""


class StaleRollout(RolloutError):
    """The rollout changed (another step, an abort, a new rollout) since the caller looked at it."""


@dataclass(frozen=True)
class Rollout:
    """A rollout in progress: ``version`` tried beside ``champion_version``, in ``mode``.

    For a canary, ``percent`` is the share of requests the challenger answers (``steps[step]``); a
    shadow answers none (percent 0). ``rollout_id`` names this rollout across its steps.
    """

    mode: Mode
    version: str
    champion_version: str | None
    steps: tuple[float, ...]
    step: int
    started_at: str
    step_started_at: str
    rollout_id: str

    @property
    def percent(self) -> float:
        return self.steps[self.step] if self.mode == "canary" else 0.0

    @property
    def last_step(self) -> bool:
        return self.step == len(self.steps) - 1

    def to_tag(self) -> str:
        return json.dumps({**asdict(self), "steps": list(self.steps)}, sort_keys=True)

    @classmethod
    def from_tag(cls, raw: str) -> Rollout:
        """Raises: ValueError: the tag is not a rollout this version of langops wrote."""
        try:
            data = json.loads(raw)
            return cls(**{**data, "steps": tuple(float(step) for step in data["steps"])})
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable {ROLLOUT_TAG} tag {raw[:200]!r}: {exc}") from exc

    def summary(self) -> dict[str, Any]:
        """What the log and ``/rollout`` show of it."""
        return {**asdict(self), "steps": list(self.steps), "percent": self.percent}


def read_rollout(client: MlflowClient, model_name: str) -> Rollout | None:
    """The rollout in progress for ``model_name``; None when there is none (or no such model).

    Raises:
        ValueError: the tag is unreadable.
        mlflow.exceptions.MlflowException: the registry cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    raw = registered.tags.get(ROLLOUT_TAG)
    rollout = Rollout.from_tag(raw) if raw else None
    if rollout is not None and str(registered.aliases.get(CHAMPION)) == rollout.version:
        return None  # promoted: the process that promoted it died before it cleared the tag
    return rollout


def current_rollout(params: Params) -> Rollout | None:
    """The rollout in progress for ``register.model_name``, read from the project's registry."""
    return read_rollout(_client(params), params.register.model_name)


def start_rollout(
    params: Params, *, mode: Mode, version: str, cfg: RolloutConfig, actor: str, reason: str
) -> tuple[Rollout, PromotionEvent]:
    """Try ``version`` beside the champion: as a shadow, or as a canary at its first step.

    Sets the ``challenger`` alias and the rollout tag, and logs ``shadow-start`` / ``canary-start``.
    A shadow may be turned into a canary of the same version (its evidence so far is kept in the log).

    Raises:
        RolloutError: no such version, it is the champion, there is no champion, or another rollout
            is in progress.
    """
    from mlflow.exceptions import MlflowException

    model_name, version = params.register.model_name, str(version)
    client = _client(params)
    with champion_lock(params, model_name):
        try:
            client.get_model_version(model_name, version)
        except MlflowException as exc:
            raise RolloutError(f"{model_name} has no version {version!r}: {exc.message}") from None
        champion = current_alias_version(model_name, CHAMPION)
        if champion is None:
            raise RolloutError(f"{model_name} has no champion to compare version {version} with: promote one first")
        if champion == version:
            raise RolloutError(f"version {version} already is the champion of {model_name}")
        running = read_rollout(client, model_name)
        if running is not None and not (running.mode == "shadow" and mode == "canary" and running.version == version):
            raise RolloutError(
                f"a {running.mode} of version {running.version} is in progress (since {running.started_at}); "
                f"end it first: langops {running.mode} {'abort' if running.mode == 'canary' else 'stop'}"
            )
        now = _now()
        rollout = Rollout(mode=mode, version=version, champion_version=champion,
                          steps=tuple(cfg.canary_steps) if mode == "canary" else (0.0,), step=0,
                          started_at=now, step_started_at=now, rollout_id=uuid.uuid4().hex[:12])

        def begin() -> None:
            client.set_registered_model_alias(model_name, CHALLENGER, version)
            client.set_registered_model_tag(model_name, ROLLOUT_TAG, rollout.to_tag())

        event = record_event(params, model_name=model_name, event=f"{mode}-start", from_version=champion,
                             to_version=version, reason=reason, actor=actor,
                             evidence={"rollout": rollout.summary(), "settings": cfg.model_dump(mode="json")},
                             change=begin, effect=rollout.to_tag())
    return rollout, event


def step_up(params: Params, *, expected: Rollout, actor: str, evidence: dict[str, Any]) -> tuple[Rollout, PromotionEvent]:
    """Move a canary that passed its step to the next percent; logs ``canary-step`` with the evidence.

    Raises:
        StaleRollout: the rollout is no longer ``expected``.
        RolloutError: it is a shadow, or already at its last step.
    """
    if expected.mode != "canary" or expected.last_step:
        raise RolloutError(f"cannot step up a {expected.mode} at step {expected.step + 1} of {len(expected.steps)}")
    model_name = params.register.model_name
    client = _client(params)
    with champion_lock(params, model_name):
        _check_unchanged(client, model_name, expected)
        stepped = replace(expected, step=expected.step + 1, step_started_at=_now())

        def step() -> None:
            client.set_registered_model_tag(model_name, ROLLOUT_TAG, stepped.to_tag())
            crash_point("canary:stepped")

        event = record_event(
            params, model_name=model_name, event="canary-step", from_version=expected.champion_version,
            to_version=expected.version, actor=actor,
            reason=f"passed {expected.percent:g}% (step {expected.step + 1} of {len(expected.steps)}): now {stepped.percent:g}%",
            evidence={"rollout": stepped.summary(), **evidence}, change=step, effect=stepped.to_tag(),
        )
    return stepped, event


def end_rollout(
    params: Params, *, expected: Rollout | None, event: str, reason: str, actor: str,
    evidence: dict[str, Any] | None = None,
) -> tuple[Rollout, PromotionEvent]:
    """Stop the rollout and clear the ``challenger`` alias; the champion is not touched.

    ``event`` is ``canary-rollback`` (the judge failed it), ``canary-abort`` (a person stopped it) or
    ``shadow-stop``. ``expected`` None ends whatever rollout is in progress.

    Raises:
        RolloutError: no rollout is in progress, or it is not of the mode the event names.
        StaleRollout: the rollout is no longer ``expected``.
    """
    model_name = params.register.model_name
    client = _client(params)
    with champion_lock(params, model_name):
        running = _check_unchanged(client, model_name, expected)
        if running.mode != event.split("-")[0]:
            raise RolloutError(f"a {running.mode} of version {running.version} is in progress, not a "
                               f"{event.split('-')[0]}: use langops {running.mode}")
        logged = record_event(params, model_name=model_name, event=event, from_version=running.champion_version,
                              to_version=running.version, reason=reason, actor=actor,
                              evidence={"rollout": running.summary(), **(evidence or {})},
                              change=lambda: _clear(client, model_name, running), effect="")
    return running, logged


def promote_rollout(
    params: Params, *, expected: Rollout | None, reason: str, actor: str, evidence: dict[str, Any] | None = None
) -> PromotionEvent:
    """Make the canary's version champion through the locked move every promotion takes, and end the rollout.

    The move is refused (``StaleDecision``) if the champion changed since the canary started: the canary
    was judged against that champion, not the new one.

    Raises:
        RolloutError: no canary is in progress.
        StaleRollout: the rollout is no longer ``expected``.
        StaleDecision: the champion moved since the canary started.
    """
    model_name = params.register.model_name
    client = _client(params)
    with champion_lock(params, model_name):
        running = _check_unchanged(client, model_name, expected)
        if running.mode != "canary":
            raise RolloutError(f"version {running.version} runs as a shadow: start a canary of it before promoting")

        def end() -> None:  # the champion moved: a leftover tag no longer counts (read_rollout), so it may fail
            crash_point("canary:promoted")
            try:
                _clear(client, model_name, running)
            except Exception as exc:  # noqa: BLE001 - the move happened and its record must say so
                log.warning("promoted version %s but could not clear its rollout tag: %s", running.version, exc)

        return _move_locked(
            client, params, model_name=model_name, new_champion=running.version, event="promote", reason=reason,
            actor=actor, evidence={"rollout": running.summary(), **(evidence or {})},
            expected_champion=running.champion_version, and_then=end,
        )


def _check_unchanged(client: MlflowClient, model_name: str, expected: Rollout | None) -> Rollout:
    running = read_rollout(client, model_name)
    if running is None:
        raise RolloutError(f"no shadow or canary of {model_name} is in progress")
    if expected is not None and running != expected:
        raise StaleRollout(
            f"the rollout of {model_name} changed since it was judged (now: {running.mode} of version "
            f"{running.version} at step {running.step + 1}); nothing was changed"
        )
    return running


def _clear(client: MlflowClient, model_name: str, running: Rollout) -> None:
    """Delete the rollout tag, and the challenger alias if it still names the rollout's version."""
    client.delete_registered_model_tag(model_name, ROLLOUT_TAG)
    if current_alias_version(model_name, CHALLENGER) == running.version:
        client.delete_registered_model_alias(model_name, CHALLENGER)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
