"""What UI sessions share across gateway replicas: the cookie signing secret, revoked
sessions and failed-login counts.

Several replicas (each with its own home) behind one load balancer must agree on all three,
or a login on one replica is refused by the next, a logout on one is ignored by the others,
and the login throttle counts per replica:

* The **signing secret** is stored once in the database (``shared_state``), sealed with the
  master key (so a copy of the database alone cannot forge cookies). The first replica to
  start creates it; a replica starting at the same moment loses the insert race and reads
  the winner's. Every replica needs the same ``FLYWHEEL_MASTER_KEY``, as for stored secrets.
* **Revoked sessions** (logouts) are kept in Redis with a TTL of the cookie's lifetime when
  ``FLYWHEEL_REDIS_URL`` is set, and always in the database as well: the database is the
  record that survives a Redis restart and answers when Redis fails.
* **Failed logins** are counted in Redis when it is set (:class:`SharedLoginThrottle`).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from flywheel.security.secrets import SecretBox, SecretDecryptError
from flywheel.security.throttle import LoginThrottle, SharedLoginThrottle
from flywheel.store import Database
from flywheel.store.models import SharedState

log = logging.getLogger("flywheel.security")

SECRET_ROW = "ui.session_secret"  # noqa: S105 (a shared_state key, not a password)
# The secret's associated data: it has no '/', so no stored secret ("project/name") can
# stand in for it.
SECRET_CONTEXT = "flywheel:ui.session_secret"  # noqa: S105 (associated data, not a password)
REVOKED_PREFIX = "ui.session_revoked:"
REDIS_PREFIX = "flywheel:sessions:revoked:"
# A dead Redis must not hold a page for long: every call is a loopback-scale round trip.
REDIS_TIMEOUT_SECONDS = 0.5
# After a Redis error, answer from the database for this long before trying Redis again.
REDIS_RETRY_SECONDS = 5.0


def redis_client(url: str) -> Any:
    """A synchronous Redis client with short timeouts (sessions are checked inline)."""
    import redis  # optional dependency: only needed with Redis

    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )


def shared_session_secret(db: Database, box: SecretBox) -> str:
    """The secret that signs UI session cookies, the same on every replica of ``db``.

    Created on first use and stored sealed with ``box``; concurrent first starts agree on
    one (the database's primary key decides the race). A stored secret that this master key
    cannot open (the key was replaced) is replaced in turn, which only ends UI sessions."""
    for _ in range(5):
        with db.session() as session:
            row = session.get(SharedState, SECRET_ROW)
            token = row.value if row is not None else None
        if token is not None:
            try:
                return box.decrypt(token, SECRET_CONTEXT)
            except SecretDecryptError as exc:
                log.error(
                    "the stored UI session secret cannot be opened (%s); replacing it, which "
                    "ends every UI session. Replicas must share FLYWHEEL_MASTER_KEY.",
                    exc,
                )
                value = secrets.token_urlsafe(48)
                with db.session() as session:
                    # Only over the token we could not open: a replica that replaced it
                    # first wins, and the next round reads its secret.
                    session.execute(
                        update(SharedState)
                        .where(SharedState.key == SECRET_ROW, SharedState.value == token)
                        .values(value=box.encrypt(value, SECRET_CONTEXT))
                    )
                continue
        value = secrets.token_urlsafe(48)
        try:
            with db.session() as session:
                session.add(
                    SharedState(
                        key=SECRET_ROW,
                        value=box.encrypt(value, SECRET_CONTEXT),
                        created_at=time.time(),
                        expires_at=None,
                    )
                )
        except IntegrityError:
            continue  # another replica stored one first: read it
        return value
    raise RuntimeError("could not agree on a UI session secret with the other replicas")


class SessionRevocations:
    """Session ids ended before their cookie expired (logouts), seen by every replica.

    With ``redis`` (a client from :func:`redis_client`), checks ask Redis and fall back to
    the database when Redis fails; a revocation is written to both."""

    def __init__(self, db: Database, redis: Any | None = None) -> None:
        self.db = db
        self.redis: Any = redis
        self._down_until = 0.0

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._down_until

    def _redis_failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("session revocations: Redis failed (%s); using the database", exc)
        self._down_until = time.monotonic() + REDIS_RETRY_SECONDS

    def revoke(self, sid: str, ttl_seconds: float) -> None:
        """End session ``sid`` on every replica for ``ttl_seconds`` (its cookie's lifetime,
        after which the cookie is refused anyway)."""
        now = time.time()
        key = REVOKED_PREFIX + sid
        with self.db.session() as session:
            # Logouts are rare: sweeping the expired ones here keeps the table small.
            session.execute(delete(SharedState).where(SharedState.expires_at < now))
            if session.get(SharedState, key) is None:
                session.add(
                    SharedState(key=key, value="", created_at=now, expires_at=now + ttl_seconds)
                )
        if self._redis_usable():
            try:
                self.redis.set(REDIS_PREFIX + sid, b"1", ex=max(1, int(ttl_seconds)))
            except Exception as exc:  # any Redis failure; the database holds it
                self._redis_failed(exc)

    def is_revoked(self, sid: str) -> bool:
        """Whether session ``sid`` was ended (on any replica)."""
        if self._redis_usable():
            try:
                return bool(self.redis.exists(REDIS_PREFIX + sid))
            except Exception as exc:
                self._redis_failed(exc)
        with self.db.session() as session:
            row = session.get(SharedState, REVOKED_PREFIX + sid)
            return row is not None and (row.expires_at is None or row.expires_at > time.time())


class SessionStore:
    """The UI session state a server shares with its replicas: the signing ``secret``, the
    ``revocations`` and the login throttles (see the module docstring)."""

    def __init__(self, db: Database, box: SecretBox, redis_url: str | None = None) -> None:
        self.secret = shared_session_secret(db, box)
        self._redis = redis_client(redis_url) if redis_url else None
        self.revocations = SessionRevocations(db, self._redis)

    def login_throttle(self, scope: str, max_failures: int) -> LoginThrottle:
        """A throttle of ``max_failures`` per key in 5 minutes, shared through Redis when it
        is set; ``scope`` ("account", "address") keeps each throttle's counts apart."""
        if self._redis is None:
            return LoginThrottle(max_failures)
        return SharedLoginThrottle(self._redis, max_failures, prefix=f"flywheel:login:{scope}:")

    def close(self) -> None:
        """Close the Redis connection pool, if any."""
        if self._redis is not None:
            self._redis.close()
