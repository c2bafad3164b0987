"""API keys: generated once, shown once, stored as SHA-256, verified with a short cache.

Replicas share the cache's invalidations: a change to access bumps a generation stored in
the database, and every replica drops its cached verifications within about a second of
seeing it change."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from flywheel.security.rbac import ROLE_RANK, ROLES
from flywheel.store import ApiKey, Database, RoleBinding, User
from flywheel.store.db import changed_rows
from flywheel.store.models import SharedState

KEY_PREFIX = "fw-"
# The shared_state row whose value changes with every change to access (any replica's).
GENERATION_KEY = "access.generation"


def generate_key() -> str:
    """A new random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuthenticatedKey:
    """A verified key: who it is, where it acts (``project_id`` None: instance-wide), with
    what role and scope, until when, and what it may call."""

    id: str
    name: str
    role: str
    project_id: str | None = None
    scope: str = "admin"
    expires_at: float | None = None
    allowed_models: tuple[str, ...] | None = None
    limits: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    user_id: str | None = None

    @property
    def instance_admin(self) -> bool:
        return self.project_id is None and self.role == "admin" and self.scope == "admin"

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


def key_to_dict(record: ApiKey) -> dict[str, Any]:
    """A key's metadata for the API and UI: never the key or its hash."""
    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "project_id": record.project_id,
        "role": record.role,
        "scope": record.scope,
        "user_id": record.user_id,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "allowed_models": record.allowed_models,
        "limits": record.limits,
    }


def _effective(session: Session, record: ApiKey) -> AuthenticatedKey | None:
    """The key as it may act now: a key owned by a user never outranks that user's current
    role in the project, and dies with the user's access."""
    if record.revoked_at is not None:
        return None
    role = record.role
    if record.user_id is not None:
        user = session.get(User, record.user_id)
        if user is None or user.disabled_at is not None:
            return None
        if not user.is_admin:
            binding = session.scalars(
                select(RoleBinding).where(
                    RoleBinding.user_id == record.user_id,
                    RoleBinding.project_id == record.project_id,
                )
            ).first()
            if binding is None:
                return None
            if ROLE_RANK.get(binding.role, -1) < ROLE_RANK.get(role, 99):
                role = binding.role
    allowed = record.allowed_models
    return AuthenticatedKey(
        id=record.id,
        name=record.name,
        role=role,
        project_id=record.project_id,
        scope=record.scope,
        expires_at=record.expires_at,
        allowed_models=tuple(allowed) if allowed is not None else None,
        limits=record.limits,
        user_id=record.user_id,
    )


class ApiKeyStore:
    """Creates and verifies keys. Verified keys are cached for ``cache_seconds`` so the hot
    path of the gateway does not read the database on every request; revoking a key (or any
    change to access) clears the cache in this process, and in every other replica once it
    next reads the shared generation (every ``generation_seconds``)."""

    def __init__(
        self, db: Database, cache_seconds: float = 30.0, generation_seconds: float = 1.0
    ) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self.generation_seconds = generation_seconds
        self._cache: dict[str, tuple[float, AuthenticatedKey | None]] = {}
        self._lock = threading.Lock()
        # The shared generation last read, and when the cache must read it again.
        self._generation: str | None = None
        self._generation_due = 0.0

    def new_record(
        self,
        name: str,
        *,
        role: str = "admin",
        raw: str | None = None,
        project_id: str | None = None,
        scope: str = "admin",
        expires_at: float | None = None,
        allowed_models: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new ``(raw key, unsaved record)``; the raw key is never stored."""
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'")
        raw = raw or generate_key()
        record = ApiKey(
            id=uuid.uuid4().hex,
            name=name,
            prefix=raw[:10],
            key_hash=hash_key(raw),
            role=role,
            created_at=time.time(),
            project_id=project_id,
            scope=scope,
            expires_at=expires_at,
            allowed_models=allowed_models,
            limits=limits,
            user_id=user_id,
        )
        return raw, record

    def create(self, name: str, role: str = "admin", raw: str | None = None) -> tuple[str, ApiKey]:
        """Store a new instance-wide key (no project) and return ``(raw key, record)``."""
        raw, record = self.new_record(name, role=role, raw=raw)
        with self.db.session() as session:
            session.add(record)
        return raw, record

    def has_any(self) -> bool:
        with self.db.session() as session:
            return session.scalars(select(ApiKey.id).limit(1)).first() is not None

    def ensure_admin(self, bootstrap_key: str | None) -> str | None:
        """Make sure an admin key exists. Returns a newly generated raw key to print once, or
        None when one existed already or ``bootstrap_key`` (from settings) was used."""
        if bootstrap_key:
            with self.db.session() as session:
                known = session.scalars(
                    select(ApiKey).where(ApiKey.key_hash == hash_key(bootstrap_key))
                ).first()
            if known is None:
                self.create("bootstrap admin", "admin", raw=bootstrap_key)
            return None
        if self.has_any():
            return None
        raw, _ = self.create("admin", "admin")
        return raw

    def forget_cached(self) -> None:
        """Drop every cached verification (after a revocation or a role change), here and,
        through the shared generation, on every replica."""
        with self._lock:
            self._cache.clear()
        token = uuid.uuid4().hex
        try:
            with self.db.session() as session:
                changed = session.execute(
                    update(SharedState).where(SharedState.key == GENERATION_KEY).values(value=token)
                )
                if changed_rows(changed) == 0:
                    session.add(
                        SharedState(
                            key=GENERATION_KEY, value=token, created_at=time.time(), expires_at=None
                        )
                    )
        except IntegrityError:
            # Another replica created the row at the same moment: change it after all.
            with self.db.session() as session:
                session.execute(
                    update(SharedState).where(SharedState.key == GENERATION_KEY).values(value=token)
                )

    def _follow_generation(self) -> None:
        """Drop the cache when another replica changed access since the last look (called
        off the event loop, at most every ``generation_seconds``)."""
        now = time.monotonic()
        if now < self._generation_due:
            return
        try:
            with self.db.session() as session:
                row = session.get(SharedState, GENERATION_KEY)
                current = row.value if row is not None else None
        except OperationalError:
            with self._lock:
                self._generation_due = now + 1.0
            return
        with self._lock:
            if current != self._generation:
                self._cache.clear()
                self._generation = current
            self._generation_due = now + self.generation_seconds

    def revoke(self, key_id: str) -> bool:
        with self.db.session() as session:
            record = session.get(ApiKey, key_id)
            if record is None or record.revoked_at is not None:
                return False
            record.revoked_at = time.time()
        self.forget_cached()
        return True

    def list(self, project_id: str | None = None) -> list[ApiKey]:
        """Keys, oldest first; only one project's when ``project_id`` is given."""
        query = select(ApiKey).order_by(ApiKey.created_at)
        if project_id is not None:
            query = query.where(ApiKey.project_id == project_id)
        with self.db.session() as session:
            return list(session.scalars(query))

    def get_active(self, key_id: str) -> AuthenticatedKey | None:
        """An unrevoked, unexpired key by id (UI sessions hold the id, never the key)."""
        with self.db.session() as session:
            record = session.get(ApiKey, key_id)
            found = _effective(session, record) if record is not None else None
        return None if found is None or found.expired() else found

    def cached(self, raw: str) -> AuthenticatedKey | None:
        """The key's identity if it was verified recently; None means "ask :meth:`verify`"."""
        now = time.monotonic()
        with self._lock:
            if now >= self._generation_due:
                return None  # time to look for changes made elsewhere: verify() does
            hit = self._cache.get(hash_key(raw))
        if hit is None or hit[0] <= now:
            return None
        key = hit[1]
        return None if key is None or key.expired() else key

    def verify(self, raw: str) -> AuthenticatedKey | None:
        """The key's identity, or None for an unknown, revoked or expired key."""
        self._follow_generation()
        digest = hash_key(raw)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            found = cached[1]
        else:
            try:
                with self.db.session() as session:
                    query = select(ApiKey).where(ApiKey.key_hash == digest)
                    record = session.scalars(query).first()
                    found = _effective(session, record) if record is not None else None
            except OperationalError:
                # The database is down: a key verified before keeps working (one revoked
                # meanwhile too, until the database is back) rather than every call failing.
                if cached is None:
                    raise
                found = cached[1]
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + self.cache_seconds, found)
        return None if found is None or found.expired() else found
