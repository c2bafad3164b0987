"""API keys: generated once, shown once, stored as SHA-256, verified with a short cache."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from flywheel.store import ApiKey, Database

KEY_PREFIX = "fw-"


def generate_key() -> str:
    """A new random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuthenticatedKey:
    """Who is calling: the key's id, name and role."""

    id: str
    name: str
    role: str


class ApiKeyStore:
    """Creates and verifies keys. Verified keys are cached for ``cache_seconds`` so the hot
    path of the gateway does not read the database on every request."""

    def __init__(self, db: Database, cache_seconds: float = 30.0) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, AuthenticatedKey | None]] = {}
        self._lock = threading.Lock()

    def create(self, name: str, role: str = "admin", raw: str | None = None) -> tuple[str, ApiKey]:
        """Store a new key and return ``(raw key, record)``; the raw key is never stored."""
        raw = raw or generate_key()
        record = ApiKey(
            id=uuid.uuid4().hex,
            name=name,
            prefix=raw[:10],
            key_hash=hash_key(raw),
            role=role,
            created_at=time.time(),
        )
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

    def revoke(self, key_id: str) -> bool:
        with self.db.session() as session:
            record = session.get(ApiKey, key_id)
            if record is None or record.revoked_at is not None:
                return False
            record.revoked_at = time.time()
        with self._lock:
            self._cache.clear()
        return True

    def list(self) -> list[ApiKey]:
        with self.db.session() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def get_active(self, key_id: str) -> AuthenticatedKey | None:
        """An unrevoked key by id (UI sessions hold the id, never the key)."""
        with self.db.session() as session:
            record = session.get(ApiKey, key_id)
            if record is None or record.revoked_at is not None:
                return None
            return AuthenticatedKey(record.id, record.name, record.role)

    def cached(self, raw: str) -> AuthenticatedKey | None:
        """The key's identity if it was verified recently; None means "ask :meth:`verify`"."""
        with self._lock:
            hit = self._cache.get(hash_key(raw))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def verify(self, raw: str) -> AuthenticatedKey | None:
        """The key's identity, or None for an unknown or revoked key."""
        digest = hash_key(raw)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.db.session() as session:
            record = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
            found = (
                AuthenticatedKey(record.id, record.name, record.role)
                if record is not None and record.revoked_at is None
                else None
            )
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_seconds, found)
        return found
