"""Secrets encrypted at rest: a master key, AES-256-GCM sealing, a store and log redaction.

* :func:`load_master_key` reads the 32-byte master key from ``FLYWHEEL_MASTER_KEY`` or from
  ``<home>/master.key`` (created on first use, mode 0600).
* :class:`SecretBox` seals values with AES-256-GCM. The associated data is
  ``"<project_id>/<name>"``, so a ciphertext copied into another secret's row does not decrypt.
* :class:`SecretStore` keeps the sealed values in the ``secrets`` table; only :meth:`reveal`
  returns a value, and every value it sees is registered with :data:`REDACTOR`.
* :class:`SecretRedactor` is a logging filter that replaces known secret values with
  ``[REDACTED]``; :func:`install_redactor` puts it on the handlers that write the logs.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import dataclasses
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from flywheel.store import Database, Project, StoredSecret

MASTER_KEY_ENV = "FLYWHEEL_MASTER_KEY"
MASTER_KEY_FILENAME = "master.key"
MASTER_KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # 96-bit nonce, the size GCM is specified for
TAG_SIZE = 16
TOKEN_VERSION = "v1"  # noqa: S105 (a format tag, not a password)
REDACTED = "[REDACTED]"
MIN_REDACT_LENGTH = 6
SECRET_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")

_KEY_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
_GENERATE_HINT = (
    'generate one with: python -c "import base64, os; '
    'print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
)


class MasterKeyError(Exception):
    """The master key is missing, malformed or stored unsafely; the message says what to fix."""


class SecretDecryptError(Exception):
    """A stored secret could not be decrypted (wrong master key, altered or moved ciphertext)."""


# --- master key ------------------------------------------------------------------------------


def generate_master_key() -> str:
    """A new random master key as urlsafe base64 text (the format of ``FLYWHEEL_MASTER_KEY``)."""
    return base64.urlsafe_b64encode(os.urandom(MASTER_KEY_SIZE)).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode urlsafe base64, with or without padding; raises ``binascii.Error``."""
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _decode_master_key(text: str, source: str) -> bytes:
    # The error messages never echo the text: it may be a real key with a typo.
    text = text.strip()
    if not text:
        raise MasterKeyError(f"{source} is empty; it must hold a master key ({_GENERATE_HINT})")
    try:
        key = _b64decode(text)
    except (binascii.Error, ValueError):
        raise MasterKeyError(
            f"{source} is not valid urlsafe base64; it must be 32 random bytes encoded as "
            f"urlsafe base64 (44 characters); {_GENERATE_HINT}"
        ) from None
    if len(key) != MASTER_KEY_SIZE:
        raise MasterKeyError(
            f"{source} decodes to {len(key)} bytes, but a master key is exactly "
            f"{MASTER_KEY_SIZE} bytes (44 characters of urlsafe base64); {_GENERATE_HINT}"
        )
    return key


def _create_key_file(path: Path) -> bytes | None:
    """Write a new key to ``path`` unless it exists. Returns the key, or None when another
    process created the file first (then the caller reads theirs)."""
    key = os.urandom(MASTER_KEY_SIZE)
    data = base64.urlsafe_b64encode(key) + b"\n"
    # mkstemp creates the file 0600 whatever the umask, so it is never readable by others;
    # the complete file then appears under its name in one step (link), and link refuses to
    # replace an existing file, so a key in use is never overwritten, even in a race.
    fd, tmp_name = tempfile.mkstemp(prefix=".master.key.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return None
        except OSError:
            # Filesystems without hard links: exclusive create, still 0600 and no overwrite.
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return None
            with os.fdopen(out, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        os.unlink(tmp_name)
    return key


def _read_key_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        # fstat the open file, not the path, so the checked file is the one that is read.
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise MasterKeyError(f"{path} is not a regular file; it must hold the master key")
        if os.name == "posix" and info.st_mode & 0o077:
            raise MasterKeyError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
                f" the master key must be private to its owner: run `chmod 600 {path}`"
            )
        raw = handle.read()
    try:
        # Non-ASCII bytes become U+FFFD, which the base64 check then rejects.
        return _decode_master_key(raw.decode("ascii", errors="replace"), str(path))
    except MasterKeyError as exc:
        raise MasterKeyError(
            f"{exc}. If secrets were stored with it, restore {path} from your backup (they "
            "cannot be read without it); if none were, delete it and a new key is created"
        ) from None


def load_master_key(home: Path, env_value: str | None) -> bytes:
    """Return the 32-byte master key.

    ``env_value`` (the value of ``FLYWHEEL_MASTER_KEY``, urlsafe base64 of 32 bytes) wins when
    it is not None. Otherwise the key is read from ``<home>/master.key``, which is created on
    first use with mode 0600 and never overwritten. A key file that group or others can access
    is refused. Raises :class:`MasterKeyError` with a message that says what to fix.
    """
    if env_value is not None:
        # An empty variable is an error, not "unset": falling back to a different key would
        # make the stored secrets unreadable without saying why.
        return _decode_master_key(env_value, MASTER_KEY_ENV)
    path = Path(home) / MASTER_KEY_FILENAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = _create_key_file(path)
        if created is not None:
            return created
    return _read_key_file(path)


# --- encryption ------------------------------------------------------------------------------


def key_id_of(master_key: bytes) -> str:
    """The public id of a master key: the first 8 hex characters of its SHA-256."""
    return hashlib.sha256(master_key).hexdigest()[:8]


def _token_key_id(token: str) -> str | None:
    parts = token.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == TOKEN_VERSION else None


class SecretBox:
    """Seals strings with AES-256-GCM under one master key.

    Tokens read ``v1.<key_id>.<urlsafe-b64(nonce + ciphertext + tag)>``; the key id lets a
    wrong master key be reported as such instead of as a generic authentication failure.
    """

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_SIZE:
            raise MasterKeyError(
                f"a master key must be exactly {MASTER_KEY_SIZE} bytes; use load_master_key()"
            )
        # The raw key is kept only inside AESGCM, so it cannot leak through attributes or repr.
        self._aead = AESGCM(master_key)
        self.key_id = key_id_of(master_key)

    def __repr__(self) -> str:
        return f"SecretBox(key_id={self.key_id!r})"

    def encrypt(self, plaintext: str, context: str) -> str:
        """Seal ``plaintext``; ``context`` (``"project_id/name"``) is bound as associated data
        and must be given again to decrypt. A fresh random nonce is used every time."""
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        body = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        return f"{TOKEN_VERSION}.{self.key_id}.{body}"

    def decrypt(self, token: str, context: str) -> str:
        """Open a token made by :meth:`encrypt` with the same ``context``.

        Raises :class:`SecretDecryptError` when the token is malformed, was sealed with another
        master key, was altered, or belongs to another secret (different context).
        """
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_VERSION or not _KEY_ID_PATTERN.fullmatch(parts[1]):
            raise SecretDecryptError(
                f"secret {context!r} is not a {TOKEN_VERSION} token (expected "
                f"'{TOKEN_VERSION}.<key id>.<data>'); the stored value is damaged"
            )
        _, key_id, body = parts
        if key_id != self.key_id:
            raise SecretDecryptError(
                f"secret {context!r} was encrypted with master key {key_id}, but the configured "
                f"key is {self.key_id}; set {MASTER_KEY_ENV} (or restore master.key) to the key "
                "it was encrypted with"
            )
        try:
            raw = _b64decode(body)
        except (binascii.Error, ValueError):
            raise SecretDecryptError(f"secret {context!r} has damaged data (bad base64)") from None
        if len(raw) < NONCE_SIZE + TAG_SIZE:
            raise SecretDecryptError(f"secret {context!r} has damaged data (too short)")
        try:
            plaintext = self._aead.decrypt(
                raw[:NONCE_SIZE], raw[NONCE_SIZE:], context.encode("utf-8")
            )
        except InvalidTag:
            raise SecretDecryptError(
                f"secret {context!r} failed authentication: its ciphertext was altered or "
                "belongs to another secret"
            ) from None
        return plaintext.decode("utf-8")


# --- redaction -------------------------------------------------------------------------------


class SecretRedactor(logging.Filter):
    """A logging filter that replaces known secret values with ``[REDACTED]``.

    It checks the fully formatted message (so both ``log.warning("%s", secret)`` and
    f-strings are caught) and the exception and stack text. Values shorter than
    ``min_length`` are ignored: replacing e.g. "abc" everywhere would mangle the logs while
    protecting nothing. With no values registered, :meth:`filter` returns at once.
    """

    def __init__(self, min_length: int = MIN_REDACT_LENGTH) -> None:
        super().__init__()
        self.min_length = min_length
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()
        # Rebuilt on add and swapped in one assignment, so readers never take the lock.
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        """Remember ``value`` as a secret to redact (ignored when shorter than min_length)."""
        if len(value) < self.min_length or value in self._values:
            return
        with self._lock:
            values = self._values | {value}
            # Longest first, so a secret that contains another one is replaced as a whole.
            ordered = sorted(values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            self._values = values

    def clear(self) -> None:
        """Forget every registered value."""
        with self._lock:
            self._pattern = None
            self._values = frozenset()

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def redact_text(self, text: str) -> str:
        """``text`` with every known secret replaced by ``[REDACTED]`` (e.g. trace payloads)."""
        pattern = self._pattern
        if pattern is None:
            return text
        return pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always lets it through."""
        pattern = self._pattern
        if pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:
            # A bad format string: logging's error report prints msg and args, so redact each.
            record.msg = self._redact_value(record.msg, pattern)
            record.args = self._redact_args(record.args, pattern)
        else:
            if pattern.search(message):
                # Freeze the formatted text: a secret may sit in msg, in args or in an arg's str.
                record.msg = pattern.sub(REDACTED, message)
                record.args = None
        if record.exc_info:
            exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            if pattern.search(exc_text):
                # Formatters append exc_text as is; dropping exc_info stops any formatter from
                # rendering the unredacted traceback again.
                record.exc_text = pattern.sub(REDACTED, exc_text)
                record.exc_info = None
        elif record.exc_text:
            record.exc_text = pattern.sub(REDACTED, record.exc_text)
        if record.stack_info:
            record.stack_info = pattern.sub(REDACTED, record.stack_info)
        return True

    @staticmethod
    def _redact_value(value: Any, pattern: re.Pattern[str]) -> Any:
        try:
            text = value if isinstance(value, str) else str(value)
        except Exception:
            return value
        return pattern.sub(REDACTED, text) if pattern.search(text) else value

    def _redact_args(self, args: Any, pattern: re.Pattern[str]) -> Any:
        if isinstance(args, tuple):
            return tuple(self._redact_value(arg, pattern) for arg in args)
        if isinstance(args, Mapping):
            return {key: self._redact_value(arg, pattern) for key, arg in args.items()}
        return args


REDACTOR = SecretRedactor()
"""The process-wide redactor; :class:`SecretStore` registers every value it sets or reveals."""


def install_redactor(
    logger: logging.Logger | None = None, redactor: SecretRedactor = REDACTOR
) -> int:
    """Attach ``redactor`` to the handlers of ``logger`` (default: the root logger, plus
    logging's last-resort handler used when no handler is configured). Returns how many
    handlers it was attached to; attaching twice is harmless.

    Why handlers and not loggers: a logger's filters run only for records logged on that very
    logger, not for records propagated up from its children, while a handler's filters run for
    every record the handler writes. So a filter on the root handlers covers the whole tree.
    Call it again after adding handlers, and pass any logger that has its own handlers and
    ``propagate = False`` (e.g. uvicorn's).
    """
    target = logging.getLogger() if logger is None else logger
    handlers = builtins.list(target.handlers)
    if logger is None and logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        handler.addFilter(redactor)
    return len(handlers)


# --- storage ---------------------------------------------------------------------------------


def validate_secret_name(name: str) -> str:
    """Return ``name`` if it is a valid secret name, else raise ValueError saying why."""
    if not isinstance(name, str) or not SECRET_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid secret name {name!r}: use 1 to 128 characters from A-Z, a-z, 0-9, "
            "'_', '.' and '-' (e.g. OPENAI_API_KEY)"
        )
    return name


def secret_context(project_id: str, name: str) -> str:
    """The associated data that binds a ciphertext to its row. Names cannot contain '/', so
    the split is unambiguous."""
    return f"{project_id}/{name}"


_SIZE_BUCKETS = ((16, "under 16 bytes"), (32, "16-31 bytes"), (64, "32-63 bytes"))


def _size_hint(token: str) -> str:
    """A coarse size bucket read from the ciphertext length, which already shows the size
    (GCM does not pad); no byte of the value is used and nothing is decrypted."""
    try:
        size = len(_b64decode(token.rsplit(".", 1)[-1])) - NONCE_SIZE - TAG_SIZE
    except (binascii.Error, ValueError):
        return "unreadable"
    if size < 0:
        return "unreadable"
    for limit, label in _SIZE_BUCKETS:
        if size < limit:
            return label
    return "64+ bytes"


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: never its value or any part of it."""

    project_id: str
    name: str
    created_at: float
    updated_at: float
    created_by: str | None
    hint: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for APIs."""
        return dataclasses.asdict(self)


def _info(row: StoredSecret) -> SecretInfo:
    return SecretInfo(
        project_id=row.project_id,
        name=row.name,
        created_at=row.created_at,
        updated_at=row.updated_at,
        created_by=row.created_by,
        hint=_size_hint(row.ciphertext),
    )


class SecretStore:
    """Named secrets per project, encrypted with :class:`SecretBox` in the ``secrets`` table.

    Every value that passes through :meth:`set`, :meth:`reveal` or :meth:`rotate` is
    registered with ``redactor`` (default :data:`REDACTOR`), so it is masked in the logs.
    """

    def __init__(
        self, db: Database, box: SecretBox, redactor: SecretRedactor | None = None
    ) -> None:
        self.db = db
        self.box = box
        self.redactor = REDACTOR if redactor is None else redactor

    def set(self, project_id: str, name: str, value: str, actor: str | None = None) -> SecretInfo:
        """Create or replace the secret ``name`` in ``project_id``. Raises ValueError for an
        invalid name, an empty value or an unknown project."""
        validate_secret_name(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"secret {name!r} has an empty value; pass the secret itself "
                "(to remove a secret, delete it)"
            )
        self.redactor.add(value)
        token = self.box.encrypt(value, secret_context(project_id, name))
        try:
            return self._upsert(project_id, name, token, actor)
        except IntegrityError:
            # A concurrent set() inserted the same name between our read and insert; the
            # second attempt finds that row and replaces it.
            return self._upsert(project_id, name, token, actor)

    def _upsert(self, project_id: str, name: str, token: str, actor: str | None) -> SecretInfo:
        with self.db.session() as session:
            if session.get(Project, project_id) is None:
                raise ValueError(f"project {project_id!r} does not exist")
            row = session.scalars(
                select(StoredSecret)
                .where(StoredSecret.project_id == project_id, StoredSecret.name == name)
                .with_for_update()
            ).first()
            now = time.time()
            if row is None:
                row = StoredSecret(
                    id=uuid.uuid4().hex,
                    project_id=project_id,
                    name=name,
                    ciphertext=token,
                    created_at=now,
                    updated_at=now,
                    created_by=actor,
                )
                session.add(row)
            else:
                row.ciphertext = token
                row.updated_at = now
            session.flush()
            return _info(row)

    def reveal(self, project_id: str, name: str) -> str:
        """The plaintext value, for providers only (never return it from an API).

        Raises KeyError naming the secret when it does not exist, and
        :class:`SecretDecryptError` when it cannot be decrypted with the configured key.
        """
        with self.db.session() as session:
            token = session.scalars(
                select(StoredSecret.ciphertext).where(
                    StoredSecret.project_id == project_id, StoredSecret.name == name
                )
            ).first()
        if token is None:
            raise KeyError(f"no secret named {name!r} in project {project_id!r}")
        value = self.box.decrypt(token, secret_context(project_id, name))
        self.redactor.add(value)
        return value

    def list(self, project_id: str) -> builtins.list[SecretInfo]:
        """Metadata of the project's secrets, by name; nothing is decrypted."""
        with self.db.session() as session:
            rows = session.scalars(
                select(StoredSecret)
                .where(StoredSecret.project_id == project_id)
                .order_by(StoredSecret.name)
            ).all()
            return [_info(row) for row in rows]

    def delete(self, project_id: str, name: str) -> bool:
        """Delete the secret; False when there was none."""
        with self.db.session() as session:
            row = session.scalars(
                select(StoredSecret).where(
                    StoredSecret.project_id == project_id, StoredSecret.name == name
                )
            ).first()
            if row is None:
                return False
            session.delete(row)
            return True

    def rotate(self, new_box: SecretBox) -> int:
        """Re-encrypt every stored secret (all projects) with ``new_box`` in one transaction
        and switch this store to it. Returns how many were re-encrypted; secrets already under
        the new key are checked and skipped, so a repeated rotation is harmless.

        If any secret fails to decrypt, nothing is changed. Other processes must be restarted
        with the new key: secrets they write with the old one afterwards will not decrypt.
        """
        count = 0
        with self.db.session() as session:
            rows = session.scalars(
                select(StoredSecret).order_by(StoredSecret.id).with_for_update()
            ).all()
            for row in rows:
                context = secret_context(row.project_id, row.name)
                if _token_key_id(row.ciphertext) == new_box.key_id:
                    self.redactor.add(new_box.decrypt(row.ciphertext, context))
                    continue
                value = self.box.decrypt(row.ciphertext, context)
                self.redactor.add(value)
                row.ciphertext = new_box.encrypt(value, context)
                count += 1
        self.box = new_box
        return count


__all__ = [
    "MASTER_KEY_ENV",
    "REDACTED",
    "REDACTOR",
    "MasterKeyError",
    "SecretBox",
    "SecretDecryptError",
    "SecretInfo",
    "SecretRedactor",
    "SecretStore",
    "generate_master_key",
    "install_redactor",
    "key_id_of",
    "load_master_key",
    "secret_context",
    "validate_secret_name",
]
