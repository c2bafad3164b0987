"""Alert rules on metric windows, their events, and signed webhook deliveries.

A rule tests one metric (see :mod:`flywheel.monitor.metrics`) over the last ``window`` seconds
against a threshold. :meth:`AlertEvaluator.check`, run periodically by the server, moves each
rule between ``ok`` and ``firing``: the change to firing records a ``firing`` event (unless the
rule fired less than ``cooldown`` seconds ago: then the event waits until the cooldown is over,
if the condition still holds), and the change back to ok records a ``resolved`` event when the
firing was announced. Several replicas may check at once: each check locks the rule's row
before reading its state, the state change is a conditional UPDATE, and an event's
``dedup_key`` is unique per rule, so each change is recorded once.

Webhook deliveries
------------------
An event of a rule with a ``webhook_url`` is POSTed there as JSON::

    {"rule", "project_id", "status", "metric", "route", "value", "threshold", "operator",
     "window_seconds", "message", "event_id", "fired_at"}

with the headers ``X-Flywheel-Timestamp: <unix seconds>`` and
``X-Flywheel-Signature: sha256=<hex>``, where ``<hex>`` is the HMAC-SHA256, keyed with the
value of the project secret the rule names in ``webhook_secret``, of the bytes
``f"{timestamp}.".encode() + raw_body``. A receiver recomputes it over the raw body it got
(:func:`verify_signature` does, in constant time) and rejects timestamps older than a few
minutes, so a captured request cannot be replayed later. A 2xx answer is a delivery; anything
else (or no answer) is retried by later checks with exponential backoff from the event's
creation (``retry_base_seconds * (2**attempts - 1)``), up to ``max_attempts`` attempts.
``event_id`` lets a receiver drop the rare duplicate (a delivery whose answer was lost);
``fired_at`` is when the event was recorded (for a ``resolved`` event, when it resolved).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import json
import logging
import math
import operator as op
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.config.schema import parse_duration as config_duration
from flywheel.errors import ServiceError
from flywheel.monitor.metrics import parse_metric, window_metric
from flywheel.security.audit import AuditLog
from flywheel.security.secrets import validate_secret_name
from flywheel.store import Database, Project, StoredSecret
from flywheel.store.db import changed_rows
from flywheel.store.models import AlertEvent, AlertRule

log = logging.getLogger("flywheel.monitor.alerts")

SIGNATURE_HEADER = "X-Flywheel-Signature"
TIMESTAMP_HEADER = "X-Flywheel-Timestamp"
SIGNATURE_PREFIX = "sha256="

MAX_WINDOW_SECONDS = 90 * 86_400
MAX_COOLDOWN_SECONDS = 30 * 86_400
DEFAULT_COOLDOWN_SECONDS = 15 * 60
MAX_EVENTS_LIMIT = 1000
# Undelivered events one check looks at, oldest first, and how many of them it sends.
_DELIVERY_SCAN = 500
_DELIVERIES_PER_CHECK = 50
_DELIVERY_CONCURRENCY = 8

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": op.gt,
    ">=": op.ge,
    "<": op.lt,
    "<=": op.le,
}


class AlertError(ServiceError):
    """A refused alert operation."""


# --- signing ---------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Flywheel-Signature`` value for ``body`` sent at ``timestamp``:
    ``sha256=`` and the hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify_signature(
    secret: str,
    signature: str,
    timestamp: str,
    body: bytes,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` (the header value) signs ``body`` at ``timestamp`` with ``secret``,
    and ``timestamp`` (unix seconds) is within ``tolerance`` seconds of ``now``. The comparison
    takes the same time wherever the signatures differ."""
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


# --- rules -----------------------------------------------------------------------------------


def parse_duration(value: Any) -> Any:
    """Whole seconds from an int or a string such as ``"300"``, ``"30s"``, ``"5m"``, ``"1h"``,
    ``"1d"`` (the config's duration syntax; ``0`` is allowed, for no cooldown); anything else
    is passed on for the field to reject."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '5m'")
    if isinstance(value, str):
        if value.strip() in ("0", "0s"):
            return 0
        seconds = config_duration(value)
        if seconds != int(seconds):
            raise ValueError(f"{value!r} is not a whole number of seconds")
        return int(seconds)
    return value


def format_duration(seconds: int) -> str:
    """``"5m"`` for 300, ``"1h"`` for 3600, ``"90s"`` for 90: the largest unit that divides."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[int, BeforeValidator(parse_duration)]


class RuleSpec(BaseModel):
    """What a rule declares. ``window`` and ``cooldown`` take seconds or ``"30s"``, ``"5m"``,
    ``"1h"``, ``"1d"`` and are kept in seconds; ``webhook_secret`` names a project secret and
    is required with ``webhook_url``."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN)]
    metric: Annotated[str, Field(max_length=128)]
    route: Annotated[str | None, Field(min_length=1, max_length=128)] = None
    window: Annotated[Duration, Field(ge=1, le=MAX_WINDOW_SECONDS)]
    operator: Literal[">", ">=", "<", "<="]
    threshold: Annotated[float, Field(allow_inf_nan=False)]
    cooldown: Annotated[Duration, Field(ge=0, le=MAX_COOLDOWN_SECONDS)] = DEFAULT_COOLDOWN_SECONDS
    webhook_url: Annotated[str | None, Field(max_length=2048)] = None
    webhook_secret: Annotated[str | None, Field(validate_default=True)] = None
    enabled: bool = True

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return parse_metric(value).name

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_with_webhook(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("webhook_url") is not None:
                raise ValueError(
                    "required with webhook_url: name the project secret that signs deliveries"
                )
            return None
        return validate_secret_name(value)


def parse_rule(data: Any) -> RuleSpec:
    """A checked rule from a request body or a config file (a 400 naming the field)."""
    try:
        return RuleSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "rule"
        raise AlertError(
            400, f"Invalid alert rule field '{where}': {first['msg']}", "invalid_value", where
        ) from None


def _definition(row: AlertRule) -> dict[str, Any]:
    return {
        "name": row.name,
        "metric": row.metric,
        "route": row.route,
        "window": row.window_seconds,
        "operator": row.operator,
        "threshold": row.threshold,
        "cooldown": row.cooldown_seconds,
        "webhook_url": row.webhook_url,
        "webhook_secret": row.webhook_secret,
        "enabled": row.enabled,
    }


def _rule_view(row: AlertRule) -> dict[str, Any]:
    return {
        **_definition(row),
        "state": row.state,
        "last_value": row.last_value,
        "last_checked_at": row.last_checked_at,
        "last_fired_at": row.last_fired_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "updated_by": row.updated_by,
    }


def _event_view(event: AlertEvent, rule_name: str) -> dict[str, Any]:
    return {
        "id": event.id,
        "rule": rule_name,
        "project_id": event.project_id,
        "status": event.status,
        "value": event.value,
        "threshold": event.threshold,
        "message": event.message,
        "delivery": event.delivery,
        "attempts": event.attempts,
        "last_error": event.last_error,
        "created_at": event.created_at,
        "delivered_at": event.delivered_at,
    }


def _not_found(name: str) -> AlertError:
    return AlertError(404, f"No alert rule '{name}'.", "not_found", "rule")


class AlertRules:
    """Stored alert rules of every project, and their events."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    @staticmethod
    def _row(session: Session, project_id: str, name: str) -> AlertRule | None:
        return session.scalar(
            select(AlertRule).where(AlertRule.project_id == project_id, AlertRule.name == name)
        )

    def list(self, project_id: str) -> builtins.list[dict[str, Any]]:
        """Every rule of the project, by name, with its state and last value."""
        query = select(AlertRule).where(AlertRule.project_id == project_id).order_by(AlertRule.name)
        with self.db.session() as session:
            return [_rule_view(row) for row in session.scalars(query)]

    def get(self, project_id: str, name: str) -> dict[str, Any]:
        """One rule; a 404 when the project has none of that name."""
        with self.db.session() as session:
            row = self._row(session, project_id, name)
            if row is None:
                raise _not_found(name)
            return _rule_view(row)

    def put(self, project_id: str, spec: RuleSpec, actor: str) -> tuple[dict[str, Any], bool]:
        """Create or replace a rule; returns it and whether it was created. An unchanged rule
        is returned as it is, without an audit entry. A 404 for an unknown project, a 400
        when ``webhook_secret`` names no secret of the project."""
        for attempt in range(3):
            try:
                return self._put(project_id, spec, actor)
            except IntegrityError:
                # A concurrent put created the same name (or appended to the audit log)
                # first; the next attempt sees its row.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _put(self, project_id: str, spec: RuleSpec, actor: str) -> tuple[dict[str, Any], bool]:
        definition = spec.model_dump(mode="json")
        with self.db.session() as session:
            if session.get(Project, project_id) is None:
                raise AlertError(404, f"No project '{project_id}'.", "not_found", "project")
            if spec.webhook_secret is not None and not session.scalar(
                select(StoredSecret.id).where(
                    StoredSecret.project_id == project_id,
                    StoredSecret.name == spec.webhook_secret,
                )
            ):
                raise AlertError(
                    400,
                    f"No secret '{spec.webhook_secret}' in this project: store the webhook's "
                    "signing key as a project secret first.",
                    "unknown_secret",
                    "webhook_secret",
                )
            row = self._row(session, project_id, spec.name)
            before = _definition(row) if row is not None else None
            if row is not None and before == definition:
                return _rule_view(row), False
            now = time.time()
            created = row is None
            if row is None:
                row = AlertRule(
                    id=uuid.uuid4().hex,
                    project_id=project_id,
                    name=spec.name,
                    state="ok",
                    created_at=now,
                )
                session.add(row)
            row.metric, row.route = spec.metric, spec.route
            row.window_seconds, row.operator = spec.window, spec.operator
            row.threshold, row.cooldown_seconds = spec.threshold, spec.cooldown
            row.webhook_url, row.webhook_secret = spec.webhook_url, spec.webhook_secret
            row.enabled, row.updated_at, row.updated_by = spec.enabled, now, actor
            session.flush()
            self.audit.record(
                actor=actor,
                action="alert_rule.create" if created else "alert_rule.update",
                resource_type="alert_rule",
                resource_id=spec.name,
                project_id=project_id,
                before=before,
                after=definition,
                session=session,
            )
            return _rule_view(row), created

    def delete(self, project_id: str, name: str, actor: str) -> None:
        """Delete a rule and its events; a 404 when there is none of that name."""
        with self.db.session() as session:
            row = self._row(session, project_id, name)
            if row is None:
                raise _not_found(name)
            before = _definition(row)
            session.delete(row)
            session.flush()
            self.audit.record(
                actor=actor,
                action="alert_rule.delete",
                resource_type="alert_rule",
                resource_id=name,
                project_id=project_id,
                before=before,
                session=session,
            )

    def events(
        self, project_id: str, *, rule: str | None = None, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """The project's events, newest first (of one rule, when named: a 404 if unknown)."""
        if not 1 <= limit <= MAX_EVENTS_LIMIT:
            raise AlertError(
                400, f"limit must be between 1 and {MAX_EVENTS_LIMIT}", "invalid_value", "limit"
            )
        query = (
            select(AlertEvent, AlertRule.name)
            .join(AlertRule, AlertRule.id == AlertEvent.rule_id)
            .where(AlertEvent.project_id == project_id)
            .order_by(AlertEvent.created_at.desc(), AlertEvent.id.desc())
            .limit(limit)
        )
        with self.db.session() as session:
            if rule is not None:
                if self._row(session, project_id, rule) is None:
                    raise _not_found(rule)
                query = query.where(AlertRule.name == rule)
            return [_event_view(event, name) for event, name in session.execute(query)]


# --- evaluation and delivery -----------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """What a check needs of a rule, read once per check."""

    id: str
    project_id: str
    name: str
    metric: str
    route: str | None
    window: int
    operator: str
    threshold: float
    cooldown: int
    webhook_url: str | None


@dataclass(frozen=True)
class _Delivery:
    """A claimed delivery: ``attempt`` is the attempt number it was claimed as."""

    event_id: int
    project_id: str
    attempt: int
    url: str
    secret_name: str | None
    payload: dict[str, Any]


def _describe(rule: _Rule, value: float | None, status: str) -> str:
    where = f" on route '{rule.route}'" if rule.route else ""
    shown = "no data" if value is None else f"{value:.6g}"
    window = format_duration(rule.window)
    condition = f"{rule.operator} {rule.threshold:g}"
    if status == "firing":
        return f"{rule.name}: {rule.metric}{where} is {shown} over {window} ({condition})"
    return f"{rule.name} resolved: {rule.metric}{where} is {shown} over {window} (not {condition})"


class AlertEvaluator:
    """Checks every enabled rule and delivers events to webhooks; safe to run on several
    replicas at once. ``reveal_secret(project_id, name)`` returns a secret's value (e.g.
    ``SecretStore.reveal``); ``client`` is used for deliveries when given (else one is made
    per check)."""

    def __init__(
        self,
        db: Database,
        rules: AlertRules,
        reveal_secret: Callable[[str, str], str],
        *,
        client: httpx.AsyncClient | None = None,
        max_attempts: int = 5,
        retry_base_seconds: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.db = db
        self.rules = rules
        self.reveal_secret = reveal_secret
        self.client = client
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds
        self.timeout = timeout

    async def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """Evaluate every enabled rule over ``[now - window, now)``, record state changes as
        events, then deliver pending events and retry due failed ones. Returns the events this
        check recorded, as their delivery stands afterwards. A failing rule or delivery is
        logged and skipped, never raised."""
        at = time.time() if now is None else float(now)
        new_ids: list[int] = []
        try:
            new_ids = await asyncio.to_thread(self._evaluate_all, at)
        except Exception:
            log.exception("alert check: could not read the rules")
        try:
            await self._deliver(at)
        except Exception:
            log.exception("alert check: deliveries failed")
        if not new_ids:
            return []
        return await asyncio.to_thread(self._views, new_ids)

    # Evaluation (in a worker thread).

    def _evaluate_all(self, now: float) -> list[int]:
        with self.db.session() as session:
            rules = [
                _Rule(
                    row.id,
                    row.project_id,
                    row.name,
                    row.metric,
                    row.route,
                    row.window_seconds,
                    row.operator,
                    row.threshold,
                    row.cooldown_seconds,
                    row.webhook_url,
                )
                for row in session.scalars(
                    select(AlertRule)
                    .where(AlertRule.enabled.is_(True))
                    .order_by(AlertRule.project_id, AlertRule.name)
                )
            ]
        new_ids: list[int] = []
        for rule in rules:
            try:
                event_id = self._evaluate(rule, now)
            except Exception:
                log.exception("alert rule %s/%s could not be checked", rule.project_id, rule.name)
                continue
            if event_id is not None:
                new_ids.append(event_id)
        return new_ids

    def _evaluate(self, rule: _Rule, now: float) -> int | None:
        value = window_metric(
            self.db,
            rule.project_id,
            rule.metric,
            route=rule.route,
            start=now - rule.window,
            end=now,
        )
        breach = value is not None and _OPERATORS[rule.operator](value, rule.threshold)
        try:
            return self._record(rule, now, value, breach)
        except IntegrityError:
            log.info("alert rule %s/%s: another replica recorded it", rule.project_id, rule.name)
            return None

    def _record(self, rule: _Rule, now: float, value: float | None, breach: bool) -> int | None:
        with self.db.session() as session:
            # Writing first locks the rule's row (SQLite: the database) until commit, so
            # replicas checking it at once take turns and each reads what the last committed.
            touched = session.execute(
                update(AlertRule)
                .where(AlertRule.id == rule.id)
                .values(last_value=value, last_checked_at=now)
            )
            if changed_rows(touched) == 0:
                return None  # deleted since the rules were read
            state, last_fired = session.execute(
                select(AlertRule.state, AlertRule.last_fired_at).where(AlertRule.id == rule.id)
            ).one()
            latest = session.execute(
                select(AlertEvent.id, AlertEvent.status)
                .where(AlertEvent.rule_id == rule.id)
                .order_by(AlertEvent.id.desc())
                .limit(1)
            ).first()
            announced = latest is not None and latest.status == "firing"
            if breach:
                cooling = last_fired is not None and now - last_fired < rule.cooldown
                if announced or cooling:
                    # Already announced, or within the cooldown: only the state moves (an
                    # unannounced firing is announced by a later check once the cooldown ends).
                    if state == "ok":
                        session.execute(
                            update(AlertRule)
                            .where(AlertRule.id == rule.id, AlertRule.state == "ok")
                            .values(state="firing")
                        )
                    return None
                fired = session.execute(
                    update(AlertRule)
                    .where(
                        AlertRule.id == rule.id,
                        AlertRule.state == state,
                        AlertRule.last_fired_at.is_not_distinct_from(last_fired),
                    )
                    .values(state="firing", last_fired_at=now)
                )
                if changed_rows(fired) != 1:
                    return None
                status, dedup_key = "firing", f"firing:{int(now // max(rule.cooldown, 1))}"
            else:
                if state == "firing":
                    session.execute(
                        update(AlertRule)
                        .where(AlertRule.id == rule.id, AlertRule.state == "firing")
                        .values(state="ok")
                    )
                if latest is None or not announced:
                    return None
                status, dedup_key = "resolved", f"resolved:{latest.id}"
            event = AlertEvent(
                rule_id=rule.id,
                project_id=rule.project_id,
                status=status,
                value=value,
                threshold=rule.threshold,
                message=_describe(rule, value, status),
                dedup_key=dedup_key,
                delivery="pending" if rule.webhook_url else "none",
                attempts=0,
                created_at=now,
            )
            session.add(event)
            session.flush()
            log.info("alert %s: %s", status, event.message)
            return event.id

    def _views(self, event_ids: list[int]) -> list[dict[str, Any]]:
        query = (
            select(AlertEvent, AlertRule.name)
            .join(AlertRule, AlertRule.id == AlertEvent.rule_id)
            .where(AlertEvent.id.in_(event_ids))
            .order_by(AlertEvent.id)
        )
        with self.db.session() as session:
            return [_event_view(event, name) for event, name in session.execute(query)]

    # Delivery.

    def _due_at(self, created_at: float, attempts: int) -> float:
        return created_at + self.retry_base_seconds * (2**attempts - 1)

    def _claim(self, now: float) -> list[_Delivery]:
        """Take the due deliveries: each is claimed by raising its attempt count from the
        value read, so a replica checking at the same time skips it."""
        query = (
            select(AlertEvent, AlertRule)
            .join(AlertRule, AlertRule.id == AlertEvent.rule_id)
            .where(
                AlertEvent.delivery.in_(("pending", "failed")),
                AlertEvent.attempts < self.max_attempts,
            )
            .order_by(AlertEvent.created_at, AlertEvent.id)
            .limit(_DELIVERY_SCAN)
        )
        claimed: list[_Delivery] = []
        with self.db.session() as session:
            for event, rule in session.execute(query).all():
                if len(claimed) >= _DELIVERIES_PER_CHECK:
                    break
                # Read before the UPDATEs below, which also refresh the loaded object.
                attempts = event.attempts
                if self._due_at(event.created_at, attempts) > now:
                    continue
                if not rule.webhook_url:  # the webhook was removed from the rule since
                    session.execute(
                        update(AlertEvent)
                        .where(AlertEvent.id == event.id, AlertEvent.attempts == attempts)
                        .values(delivery="none")
                    )
                    continue
                taken = session.execute(
                    update(AlertEvent)
                    .where(AlertEvent.id == event.id, AlertEvent.attempts == attempts)
                    .values(attempts=attempts + 1)
                )
                if changed_rows(taken) != 1:
                    continue
                payload = {
                    "rule": rule.name,
                    "project_id": event.project_id,
                    "status": event.status,
                    "metric": rule.metric,
                    "route": rule.route,
                    "value": event.value,
                    "threshold": event.threshold,
                    "operator": rule.operator,
                    "window_seconds": rule.window_seconds,
                    "message": event.message,
                    "event_id": event.id,
                    "fired_at": event.created_at,
                }
                claimed.append(
                    _Delivery(
                        event.id,
                        event.project_id,
                        attempts + 1,
                        rule.webhook_url,
                        rule.webhook_secret,
                        payload,
                    )
                )
        return claimed

    def _finish(self, delivery: _Delivery, error: str | None, now: float) -> None:
        values: dict[str, Any] = (
            {"delivery": "delivered", "delivered_at": now, "last_error": None}
            if error is None
            else {"delivery": "failed", "last_error": error[:1000]}
        )
        with self.db.session() as session:
            session.execute(
                update(AlertEvent)
                .where(AlertEvent.id == delivery.event_id, AlertEvent.attempts == delivery.attempt)
                .values(**values)
            )

    async def _deliver(self, now: float) -> None:
        claimed = await asyncio.to_thread(self._claim, now)
        if not claimed:
            return
        limit = asyncio.Semaphore(_DELIVERY_CONCURRENCY)

        async def one(client: httpx.AsyncClient, delivery: _Delivery) -> None:
            async with limit:
                try:
                    error = await self._send(client, delivery, now)
                except Exception as exc:  # a bug must not stop the other deliveries
                    log.exception("alert event %s: delivery crashed", delivery.event_id)
                    error = f"{type(exc).__name__}: {exc}"
                if error is not None:
                    log.warning(
                        "alert event %s: delivery attempt %s failed: %s",
                        delivery.event_id,
                        delivery.attempt,
                        error,
                    )
                await asyncio.to_thread(self._finish, delivery, error, now)

        if self.client is not None:
            await asyncio.gather(*(one(self.client, d) for d in claimed))
            return
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            await asyncio.gather(*(one(client, d) for d in claimed))

    async def _send(self, client: httpx.AsyncClient, delivery: _Delivery, now: float) -> str | None:
        """POST one signed event; None when the receiver took it, else the reason."""
        if delivery.secret_name is None:
            return "the rule names no webhook_secret to sign with"
        try:
            secret = await asyncio.to_thread(
                self.reveal_secret, delivery.project_id, delivery.secret_name
            )
        except Exception as exc:
            return f"webhook secret '{delivery.secret_name}' unavailable: {type(exc).__name__}"
        body = json.dumps(delivery.payload, separators=(",", ":"), allow_nan=False).encode()
        timestamp = str(math.floor(now))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "flywheel-alerts",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
        }
        try:
            response = await client.post(
                delivery.url, content=body, headers=headers, timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"
