"""Every move of the ``champion`` alias, serialised and written down.

The model server follows ``champion``; ``previous_champion`` is what a rollback restores. Both aliases
change only through ``move_champion`` (and ``rollback``, which is a ``move_champion`` whose target is
read under the same lock), so two promotions started at the same moment cannot interleave their
read-champion / write-aliases steps and leave ``previous_champion`` pointing at the wrong version.

Each move is also appended to a promotion log kept in MLflow itself, one run per event in the
experiment ``<tracking.experiment>-promotions``. Keeping the log in the tracking store (not a local
file) means it is shared by everyone who shares the registry, on the embedded SQLite store and on a
tracking server alike, and it is browsable in the MLflow UI next to the models it describes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlparse

from langops.aliases import CHALLENGER, CHAMPION, CHAMPION_SINCE_TAG, PREVIOUS_CHAMPION, ROLLOUT_EFFECT_TAG
from langops.config import Params
from langops.faults import crash_point
from langops.io import jsonable
from langops.tracking import owner_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from langops.tasks.promote import Decision

log = logging.getLogger(__name__)

EventKind = Literal["promote", "rollback", "force"]
EVENTS: tuple[str, ...] = get_args(EventKind)
# Steps of a shadow or canary rollout (langops.rollouts): recorded in the same log, no champion move.
RolloutEventKind = Literal[
    "shadow-start", "shadow-stop", "canary-start", "canary-step", "canary-rollback", "canary-abort"
]
ROLLOUT_EVENTS: tuple[str, ...] = get_args(RolloutEventKind)

LOCK_TIMEOUT_S = 120.0
"""How long a promotion waits for another one to finish. Holding the lock takes a few registry calls
(well under a second on SQLite), so a wait this long means a holder is stuck, not busy."""

EVIDENCE_FILE = "evidence.json"
ANY_CHAMPION = object()  # move_champion's default: move whatever the champion is now
_LOCAL_SCHEMES = {"", "file", "sqlite"}
_MAX_TAG_CHARS = 5000
_HOLDERS = {"champion": "another promotion or rollback", "monitor-event": "another monitor run's event decision"}
CAUSE_TAG = "langops.cause"  # what started the run that asked for the move (a monitor event, its report)


class PromotionError(RuntimeError):
    """A promotion or rollback was refused; the aliases were left as they were."""


class StaleDecision(PromotionError):
    """The champion moved between the gate's decision and the alias change."""


class ChampionLockTimeout(PromotionError, TimeoutError):
    """Another promotion held the champion lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class PromotionEvent:
    """One entry of the promotion log: who moved ``champion`` from which version to which, and why."""

    event: str
    model_name: str
    from_version: str | None
    to_version: str
    reason: str
    actor: str
    at: str
    record_id: str
    cause: str = ""  # what started the run that asked, e.g. a monitor event with its drift report

    @property
    def changed(self) -> bool:
        """False for a no-op event (the target already was the champion)."""
        return self.from_version != self.to_version


def promotions_experiment_name(params: Params) -> str:
    return f"{params.tracking.experiment}-promotions"


def lock_name(params: Params, model_name: str | None = None, *, purpose: str = "champion") -> str:
    """Where a model's lock for ``purpose`` lives: a lock file path, or a Prefect concurrency limit name."""
    name = model_name or params.register.model_name
    if _uses_local_store(params):
        file = f"{name}.lock" if purpose == "champion" else f"{name}.{purpose}.lock"
        return str(params.project.state_dir / "locks" / file)
    return f"langops-{purpose}-{name}"


@contextlib.contextmanager
def champion_lock(
    params: Params, model_name: str | None = None, *, timeout_s: float = LOCK_TIMEOUT_S, purpose: str = "champion"
) -> Iterator[str]:
    """Hold the lock that serialises every change of one registered model's champion aliases.

    Why two kinds of lock: the lock must be visible to every process that can write the aliases.

    - Embedded store (``sqlite:`` or a file store): every writer runs on this machine against the same
      ``project.state_dir``, so an OS file lock (``filelock``, ``flock`` underneath) under
      ``state_dir/locks/<model>.lock`` is enough. The OS releases it when its holder dies, so a crashed
      promotion never leaves a stale lock behind.
    - Tracking server (http, https, databricks, postgres ...): writers may be on different machines, so
      a local file proves nothing. A Prefect global concurrency limit with one slot, on the Prefect
      server the team already shares (``PREFECT_API_URL``), is the cross-machine mutex. The limit is
      created (limit 1, active) when missing and acquired with ``strict=True``: Prefect silently skips
      acquisition of a limit that does not exist, which would be no lock at all. Its slot is a lease
      (300 s, renewed while held), so a holder that dies frees it when the lease expires.
      Without ``PREFECT_API_URL`` Prefect would start a temporary server private to this process,
      which excludes nobody else; that is refused with an error rather than pretending to lock.

    Args:
        params: resolved params; the tracking URI chooses the kind of lock.
        model_name: the registered model (default ``register.model_name``).
        timeout_s: how long to wait for another holder.
        purpose: another name serialises something else of the model the same way (``monitor-event``: the
            monitor's cool-down check and emission).

    Yields:
        The lock's name (file path or concurrency limit name), for messages.

    Raises:
        ChampionLockTimeout: the lock was not acquired within ``timeout_s``; the message names it.
        PromotionError: a remote store is configured but no Prefect server is.
    """
    name = lock_name(params, model_name, purpose=purpose)
    if _uses_local_store(params):
        with _file_lock(name, timeout_s, purpose):
            yield name
    else:
        with _prefect_lock(name, timeout_s, purpose):
            yield name


def move_champion(
    params: Params,
    *,
    model_name: str,
    new_champion: str,
    event: str,
    reason: str,
    actor: str,
    evidence: dict[str, Any] | None = None,
    expected_champion: str | None | object = ANY_CHAMPION,
    cause: str = "",
) -> PromotionEvent:
    """Make ``new_champion`` the champion, keep the old one as ``previous_champion``, and log the event.

    The current champion is read inside the lock: a value read before it may already be stale.
    Promoting the version that already is champion changes no alias but is still recorded, so the log
    holds every request that was made.

    The log record is written first (an MLflow run left RUNNING), then the aliases move, then the run is
    marked FINISHED; ``read_history`` lists finished records only. A failure while moving marks the
    record FAILED, so the log never claims a move that did not happen.

    Args:
        params: resolved params (tracking store, experiment, state folder).
        model_name: the registered model.
        new_champion: the model version to serve.
        event: ``promote`` (the gate passed), ``rollback`` or ``force`` (a person overrode the gate).
        reason: why, in words; kept in the log.
        actor: who or what asked (a user name, ``pipeline``).
        evidence: anything worth keeping beside the event (gate checks, metrics), logged as JSON.
        expected_champion: the champion the caller's decision was made against (None: no champion).
            If another promotion moved the alias since, nothing changes and ``StaleDecision`` is raised.
        cause: what started the run that asks (a monitor event and its drift report), shown by history.

    Returns:
        The recorded event.

    Raises:
        PromotionError: unknown event, blank reason or actor, or no such model version.
        StaleDecision: the champion is no longer ``expected_champion``.
        ChampionLockTimeout: another promotion held the lock too long.
    """
    event = _check_request(event=event, reason=reason, actor=actor)
    new_champion = str(new_champion)
    client = _client(params)
    with champion_lock(params, model_name):
        return _move_locked(
            client, params, model_name=model_name, new_champion=new_champion, event=event,
            reason=reason, actor=actor, evidence=evidence or {}, expected_champion=expected_champion, cause=cause,
        )


def record_decision(decision: Decision, *, params: Params, actor: str = "pipeline", cause: str = "") -> str | None:
    """Record the gate's decision on the challenger's model version and, if it passed, make it champion.

    The alias moves through ``move_champion``: under the champion lock, logged in the promotion history,
    and only if the champion is still the one the decision compared against (a promotion that raced this
    one makes the decision stale, and nothing moves). The version's decision tags and the ``challenger``
    alias are written after that move, so the loser of a race leaves no trace on the version. A failed
    gate writes tags only. Returns the version that is champion afterwards.
    """
    model_name = params.register.model_name
    version = decision.challenger_version
    if version is None:
        raise ValueError("the decision names no challenger version")
    if version == decision.champion_version:
        # already champion: its aliases and its own decision's tags stay as they are; a forced request is
        # still logged (a no-op move), so the history holds what a person asked for and why
        if decision.forced:
            move_champion(params, model_name=model_name, new_champion=version, event="force", reason=decision.reason,
                          actor=actor, evidence=decision.to_dict(), expected_champion=version, cause=cause)
        return version
    if decision.promote:
        move_champion(
            params,
            model_name=model_name,
            new_champion=version,
            event="force" if decision.forced else "promote",
            reason=decision.reason,
            actor=actor,
            evidence=decision.to_dict(),
            expected_champion=decision.champion_version,
            cause=cause,
        )
    client = _client(params)
    client.set_registered_model_alias(model_name, CHALLENGER, version)  # the latest version the gate judged
    client.set_model_version_tag(model_name, version, "langops.decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(model_name, version, "langops.decision_reason", decision.reason[:_MAX_TAG_CHARS])
    client.set_model_version_tag(model_name, version, "langops.decided_at", decision.decided_at)
    if cause:
        client.set_model_version_tag(model_name, version, CAUSE_TAG, cause[:_MAX_TAG_CHARS])
    return version if decision.promote else decision.champion_version


def current_alias_version(model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def rollback(params: Params, *, model_name: str, reason: str, actor: str) -> PromotionEvent:
    """Serve ``previous_champion`` again; the version rolled back from becomes ``previous_champion``.

    So a second rollback undoes the first. Both aliases are read inside the lock, like any promotion.

    Raises:
        PromotionError: there is no ``previous_champion``, or it already is the champion; nothing changes.
    """
    _check_request(event="rollback", reason=reason, actor=actor)
    client = _client(params)
    with champion_lock(params, model_name):
        champion = current_alias_version(model_name, CHAMPION)
        previous = current_alias_version(model_name, PREVIOUS_CHAMPION)
        if previous is None:
            raise PromotionError(
                f"cannot roll back {model_name}: it has no {PREVIOUS_CHAMPION!r} alias "
                f"(champion is {_show(champion)}); nothing was changed"
            )
        if previous == champion:
            raise PromotionError(
                f"cannot roll back {model_name}: {PREVIOUS_CHAMPION!r} and {CHAMPION!r} are both version "
                f"{champion}; nothing was changed"
            )
        return _move_locked(
            client, params, model_name=model_name, new_champion=previous, event="rollback",
            reason=reason, actor=actor, evidence={"rolled_back_from": champion, "restored": previous},
        )


def read_history(params: Params, model_name: str, limit: int = 50) -> list[PromotionEvent]:
    """The model's promotion events, newest first (at most ``limit``); empty when none was recorded."""
    client = _client(params)
    experiment = client.get_experiment_by_name(promotions_experiment_name(params))
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`langops.model_name` = '{model_name}' and attributes.status = 'FINISHED'",
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    return [_event_from_run(run) for run in runs]


def versions_tag(params: Params, model_name: str, versions: set[str], key: str) -> dict[str, str]:
    """Tag ``key`` of each of ``versions`` that has it (a deleted version, or one without it, is left out)."""
    from mlflow.exceptions import MlflowException

    client = _client(params)
    found = {}
    for version in sorted(versions):
        try:
            value = client.get_model_version(model_name, version).tags.get(key)
        except MlflowException:
            continue
        if value:
            found[version] = value
    return found


def read_evidence(params: Params, record_id: str) -> dict[str, Any]:
    """The evidence logged with one event (``PromotionEvent.record_id``)."""
    import mlflow

    _client(params)
    return mlflow.artifacts.load_dict(f"runs:/{record_id}/{EVIDENCE_FILE}")


def _move_locked(
    client: MlflowClient,
    params: Params,
    *,
    model_name: str,
    new_champion: str,
    event: str,
    reason: str,
    actor: str,
    evidence: dict[str, Any],
    expected_champion: str | None | object = ANY_CHAMPION,
    cause: str = "",
    and_then: Callable[[], None] | None = None,
) -> PromotionEvent:
    """The body of a move; the caller holds the champion lock. ``and_then`` runs after the alias moved, before
    the record is closed (a canary's promotion ends its rollout there)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(model_name, new_champion)
    except MlflowException as exc:
        raise PromotionError(f"{model_name} has no version {new_champion!r} to make champion: {exc.message}") from None
    old = current_alias_version(model_name, CHAMPION)
    if expected_champion is not ANY_CHAMPION and old != expected_champion:
        raise StaleDecision(
            f"the champion of {model_name} is now {_show(old)}, but the decision was made against "
            f"{_show(expected_champion)}: nothing was changed; run the gate again"
        )
    run_id, at = _open_record(client, params, event=event, model_name=model_name, from_version=old,
                              to_version=new_champion, reason=reason, actor=actor, cause=cause)
    try:
        record_evidence = {"event": event, "from_version": old, "to_version": new_champion, **evidence}
        client.log_dict(run_id, jsonable(record_evidence), EVIDENCE_FILE)
        if old is not None and old != new_champion:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, old)
        client.set_registered_model_alias(model_name, CHAMPION, new_champion)
        crash_point("promote:alias-moved")
        client.set_model_version_tag(model_name, new_champion, CHAMPION_SINCE_TAG, at)
        client.set_model_version_tag(model_name, new_champion, "langops.last_event", f"{event} {run_id}")
        if and_then is not None:
            and_then()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    log.info("%s: champion of %s %s -> %s by %s (%s)", event, model_name, _show(old), new_champion, actor, reason)
    return PromotionEvent(
        event=event, model_name=model_name, from_version=old, to_version=new_champion,
        reason=reason, actor=actor, at=at, record_id=run_id, cause=cause,
    )


def record_event(
    params: Params,
    *,
    model_name: str,
    event: str,
    from_version: str | None,
    to_version: str,
    reason: str,
    actor: str,
    evidence: dict[str, Any] | None = None,
    change: Callable[[], None] | None = None,
    effect: str | None = None,
) -> PromotionEvent:
    """Write one rollout step (``ROLLOUT_EVENTS``) to the promotion log, with its evidence; no alias moves.

    ``from_version`` is the champion at the time, ``to_version`` the challenger the step is about, so
    ``langops history`` reads a rollout as it reads a promotion. Callers that change rollout state hold
    the champion lock, so the log keeps the order the steps happened in.

    ``change`` (writing the rollout tag, clearing it) runs while the record is open, owned by this process and
    tagged with ``effect``, the rollout tag the change leaves ("" for none). A process killed in between leaves
    the record RUNNING; the next langops command closes it FINISHED when the registry shows ``effect`` (the
    change happened, so the log keeps it) and KILLED otherwise (``langops.tracking.clean_up_after_dead_processes``).

    Raises:
        PromotionError: unknown event, blank reason or actor.
    """
    if event not in ROLLOUT_EVENTS:
        raise PromotionError(f"unknown rollout event {event!r}: expected one of {', '.join(ROLLOUT_EVENTS)}")
    if not reason.strip() or not actor.strip():
        raise PromotionError(f"a {event} needs a reason and an actor: the log keeps why and who")
    client = _client(params)
    run_id, at = _open_record(client, params, event=event, model_name=model_name, from_version=from_version,
                              to_version=to_version, reason=reason, actor=actor,
                              extra_tags={ROLLOUT_EFFECT_TAG: effect} if effect is not None else {})
    try:
        record_evidence = {"event": event, "from_version": from_version, "to_version": to_version, **(evidence or {})}
        client.log_dict(run_id, jsonable(record_evidence), EVIDENCE_FILE)
        if change is not None:
            change()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    log.info("%s: %s version %s (champion %s) by %s (%s)", event, model_name, to_version, _show(from_version),
             actor, reason)
    return PromotionEvent(event=event, model_name=model_name, from_version=from_version, to_version=to_version,
                          reason=reason, actor=actor, at=at, record_id=run_id)


def _open_record(
    client: MlflowClient, params: Params, *, event: str, model_name: str, from_version: str | None,
    to_version: str, reason: str, actor: str, cause: str = "", extra_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Start the log run of one event (left RUNNING); its id and its time, as the log orders them."""
    experiment_id = _promotions_experiment(client, params)
    started_ms = _next_start_ms(client, experiment_id)
    at = datetime.fromtimestamp(started_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
    record = client.create_run(
        experiment_id,
        start_time=started_ms,
        run_name=f"{event}-{model_name}-v{to_version}",
        tags={
            "langops.event": event,
            "langops.model_name": model_name,
            "langops.from_version": from_version or "",
            "langops.to_version": to_version,
            "langops.actor": actor[:_MAX_TAG_CHARS],
            "langops.reason": reason[:_MAX_TAG_CHARS],
            **({CAUSE_TAG: cause[:_MAX_TAG_CHARS]} if cause else {}),
            **(extra_tags or {}),
            **owner_tags(),
        },
    )
    return record.info.run_id, at


def _check_request(*, event: str, reason: str, actor: str) -> str:
    if event not in EVENTS:
        raise PromotionError(f"unknown promotion event {event!r}: expected one of {', '.join(EVENTS)}")
    if not reason or not reason.strip():
        raise PromotionError(f"a {event} needs a reason: the promotion log keeps why the champion moved")
    if not actor or not actor.strip():
        raise PromotionError(f"a {event} needs an actor: the promotion log keeps who moved the champion")
    return event


def _client(params: Params) -> MlflowClient:
    from mlflow import MlflowClient

    from langops.tracking import configure_mlflow

    configure_mlflow(params)
    return MlflowClient()


def _promotions_experiment(client: MlflowClient, params: Params) -> str:
    """The log's experiment id, created on first use with the artifact rules of ``configure_mlflow``.

    On the embedded store its artifacts go to ``<artifact root>/promotions``, beside the model runs'
    artifacts but apart from them; on a tracking server the server decides.
    """
    from mlflow.exceptions import MlflowException

    name = promotions_experiment_name(params)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = params.tracking_uri()
    local_store = params.tracking.uri is None and uri.startswith("sqlite:")
    location = f"{params.artifact_root()}/promotions" if local_store else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created by a promotion of another model since we looked
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise PromotionError(f"cannot create the promotion log experiment {name!r}: {exc.message}") from exc
        return experiment.experiment_id


def _next_start_ms(client: MlflowClient, experiment_id: str) -> int:
    """Now in ms, but strictly after the newest record: ordering by start time is the log's order,
    and two events within one millisecond would otherwise tie."""
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    newest = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
    if newest:
        now = max(now, newest[0].info.start_time + 1)
    return now


def _event_from_run(run: Any) -> PromotionEvent:
    tags = run.data.tags
    return PromotionEvent(
        event=tags["langops.event"],
        model_name=tags["langops.model_name"],
        from_version=tags.get("langops.from_version") or None,
        to_version=tags["langops.to_version"],
        reason=tags.get("langops.reason", ""),
        actor=tags.get("langops.actor", ""),
        at=datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="milliseconds"),
        record_id=run.info.run_id,
        cause=tags.get(CAUSE_TAG, ""),
    )



def _uses_local_store(params: Params) -> bool:
    """Embedded SQLite or file store: every writer is on this machine."""
    return urlparse(params.tracking_uri()).scheme.lower() in _LOCAL_SCHEMES


@contextlib.contextmanager
def _file_lock(path: str, timeout_s: float, purpose: str) -> Iterator[None]:
    from pathlib import Path

    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise ChampionLockTimeout(
            f"could not take the {purpose} lock {path} within {timeout_s:g}s: {_HOLDERS.get(purpose, 'another process')} "
            "of this model is still running (the lock is freed when its process exits)"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _prefect_lock(name: str, timeout_s: float, purpose: str) -> Iterator[None]:
    import httpx
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise PromotionError(
            f"the tracking store is remote, so the {purpose} lock must be shared too: set PREFECT_API_URL "
            f"to the team's Prefect server (the lock is its global concurrency limit {name!r}); without it "
            "two promotions from different machines could interleave"
        )
    held = contextlib.ExitStack()
    try:  # only acquisition is translated: a TimeoutError raised while holding the lock is the caller's
        _ensure_single_slot_limit(name)
        held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True))
    except TimeoutError as exc:
        raise ChampionLockTimeout(
            f"could not take the {purpose} lock (Prefect global concurrency limit {name!r}) within "
            f"{timeout_s:g}s: {_HOLDERS.get(purpose, 'another process')} of this model is still running"
        ) from exc
    except (ConcurrencySlotAcquisitionError, httpx.HTTPError, OSError) as exc:
        raise PromotionError(
            f"could not take the {purpose} lock (Prefect global concurrency limit {name!r}) on the Prefect "
            f"server at {api_url}: {exc}"
        ) from exc
    with held:
        yield


def _ensure_single_slot_limit(name: str) -> None:
    """Create the one-slot limit when missing, and re-arm it if someone widened or disabled it."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
            except ObjectAlreadyExists:  # another process created it first
                pass
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


def _show(version: str | None) -> str:
    return f"version {version}" if version is not None else "none"
