"""Projects, users, role bindings and API keys: the access model, with every change audited.

Each mutation writes its audit entry in the same transaction as the change, so the log never
misses a change that happened and never records one that did not.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from flywheel.errors import ServiceError
from flywheel.security.audit import AuditLog
from flywheel.security.keys import ApiKeyStore, AuthenticatedKey, key_to_dict
from flywheel.security.rbac import (
    ALL_PERMISSIONS,
    ROLES,
    SCOPES,
    Principal,
    permissions_for,
    role_covers,
)
from flywheel.store import DEFAULT_PROJECT_ID, ApiKey, Database, Project, RoleBinding, User

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
MIN_PASSWORD_LENGTH = 10


class AccessError(ServiceError):
    """A refused access operation."""


def project_to_dict(project: Project) -> dict[str, Any]:
    return {
        "id": project.id,
        "name": project.name,
        "description": project.description,
        "limits": project.limits,
        "retention_days": project.retention_days,
        "created_at": project.created_at,
    }


def user_to_dict(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "is_admin": user.is_admin,
        "created_at": user.created_at,
        "disabled_at": user.disabled_at,
    }


@dataclass(frozen=True)
class Membership:
    project: Project
    role: str


def session_tag(user: User) -> str:
    """A short digest of the user's password hash, kept in UI session cookies: a new
    password changes it, which ends the sessions begun before."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


class AccessService:
    """The access model's operations, shared by the API, the CLI and the UI."""

    def __init__(self, db: Database, keys: ApiKeyStore, audit: AuditLog) -> None:
        self.db = db
        self.keys = keys
        self.audit = audit
        self._hasher = PasswordHasher()
        # Compared against when a username is unknown, so a miss costs as much as a hit.
        self._dummy_hash = self._hasher.hash("flywheel-no-such-user")
        self._project_ids: tuple[float, frozenset[str]] = (0.0, frozenset())
        self._project_limits: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    # -- principals --------------------------------------------------------------------------

    def project_exists(self, project_id: str) -> bool:
        """Cached for a few seconds: instance admins name a project on every request."""
        expires, known = self._project_ids
        if time.monotonic() > expires or project_id not in known:
            with self.db.session() as session:
                known = frozenset(session.scalars(select(Project.id)))
            with self._lock:
                self._project_ids = (time.monotonic() + 5.0, known)
        return project_id in known

    def cached_project_limits(self, project_id: str) -> tuple[bool, dict[str, Any] | None]:
        """``(found, limits)`` from the cache alone, so the event loop never waits on it."""
        hit = self._project_limits.get(project_id)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def project_limits(self, project_id: str) -> dict[str, Any] | None:
        """A project's limits, cached for a few seconds (read on every gateway call)."""
        hit = self._project_limits.get(project_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            with self.db.session() as session:
                project = session.get(Project, project_id)
                limits = project.limits if project is not None else None
        except OperationalError:
            if hit is None:
                raise
            return hit[1]  # the database is down: the limits last read still hold
        self._project_limits[project_id] = (time.monotonic() + 5.0, limits)
        return limits

    def principal_for_key(
        self, key: AuthenticatedKey, requested_project: str | None = None
    ) -> Principal:
        """The principal of a verified key. Instance keys act in ``requested_project`` (default:
        the default project); a project key acts only in its own project."""
        if key.project_id is None:
            project_id = requested_project or DEFAULT_PROJECT_ID
            if requested_project and not self.project_exists(requested_project):
                raise AccessError(404, f"No project '{requested_project}'.", "project_not_found")
            instance = key.instance_admin
            granted = ALL_PERMISSIONS if instance else permissions_for(key.role, key.scope)
        else:
            if requested_project and requested_project != key.project_id:
                raise AccessError(
                    403,
                    f"This API key belongs to project '{key.project_id}', "
                    f"not '{requested_project}'.",
                    "wrong_project",
                )
            project_id, instance = key.project_id, False
            granted = permissions_for(key.role, key.scope)
        return Principal(
            kind="key",
            id=key.id,
            name=key.name,
            project_id=project_id,
            role=key.role,
            permissions=granted,
            instance_admin=instance,
            scope=key.scope,
            key_id=key.id,
            user_id=key.user_id,
            allowed_models=key.allowed_models,
            limits=key.limits,
        )

    def principal_for_user(
        self, user_id: str, project_id: str | None, password_tag: str | None = None
    ) -> Principal | None:
        """A logged-in user acting in ``project_id`` (default: their first project); None if
        the user is gone or disabled, has no access to that project, or (with
        ``password_tag``) has changed password since the session began."""
        with self.db.session() as session:
            user = session.get(User, user_id)
            if user is None or user.disabled_at is not None:
                return None
            if password_tag is not None and password_tag != session_tag(user):
                return None
            memberships = self._memberships(session, user)
        if not memberships:
            return None
        chosen = next((m for m in memberships if m.project.id == project_id), None)
        if chosen is None:
            if project_id is not None and not user.is_admin:
                return None
            chosen = memberships[0]
        return Principal(
            kind="user",
            id=user.id,
            name=user.username,
            project_id=chosen.project.id,
            role=chosen.role,
            permissions=ALL_PERMISSIONS if user.is_admin else permissions_for(chosen.role),
            instance_admin=user.is_admin,
            user_id=user.id,
        )

    def _memberships(self, session: Any, user: User) -> list[Membership]:
        if user.is_admin:
            projects = session.scalars(select(Project).order_by(Project.name))
            return [Membership(p, "admin") for p in projects]
        rows = session.execute(
            select(Project, RoleBinding.role)
            .join(RoleBinding, RoleBinding.project_id == Project.id)
            .where(RoleBinding.user_id == user.id)
            .order_by(Project.name)
        )
        return [Membership(project, role) for project, role in rows]

    def memberships(self, user_id: str) -> list[Membership]:
        """The projects a user can act in, with their role in each."""
        with self.db.session() as session:
            user = session.get(User, user_id)
            return [] if user is None else self._memberships(session, user)

    def _add_audited(self, record: Any, conflict: str, **audit: Any) -> None:
        """Insert ``record`` and its audit entry in one transaction; a duplicate is a 409."""
        try:
            with self.db.session() as session:
                session.add(record)
                session.flush()
                self.audit.record(session=session, **audit)
        except IntegrityError:
            raise AccessError(409, conflict, "conflict") from None

    # -- projects ----------------------------------------------------------------------------

    def create_project(
        self,
        name: str,
        actor: str,
        description: str = "",
        limits: dict[str, Any] | None = None,
    ) -> Project:
        """A new project; its id is its name (names are short slugs and never change)."""
        if not NAME_PATTERN.match(name):
            raise AccessError(
                400,
                "A project name is 1-63 lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit.",
                "invalid_value",
                "name",
            )
        project = Project(
            id=name,
            name=name,
            description=description,
            limits=limits,
            created_at=time.time(),
        )
        self._add_audited(
            project,
            f"Project '{name}' already exists.",
            actor=actor,
            action="project.create",
            resource_type="project",
            resource_id=name,
            project_id=name,
            after=project_to_dict(project),
        )
        self._project_ids = (0.0, frozenset())
        return project

    def list_projects(self, principal: Principal) -> list[Project]:
        """Projects the principal can see: all for instance admins, else only their own."""
        with self.db.session() as session:
            if principal.instance_admin:
                return list(session.scalars(select(Project).order_by(Project.name)))
            if principal.kind == "user":
                user = session.get(User, principal.id)
                return [m.project for m in self._memberships(session, user)] if user else []
            project = session.get(Project, principal.project_id)
            return [project] if project else []

    def get_project(self, project_id: str) -> Project:
        with self.db.session() as session:
            project = session.get(Project, project_id)
        if project is None:
            raise AccessError(404, f"No project '{project_id}'.", "project_not_found")
        return project

    def set_project_limits(
        self, project_id: str, limits: dict[str, Any] | None, actor: str
    ) -> Project:
        """Replace a project's limits and budget (None: unlimited)."""
        project = self._update_project(project_id, actor, limits=limits)
        self._project_limits.pop(project_id, None)
        return project

    def set_project_description(self, project_id: str, description: str, actor: str) -> Project:
        return self._update_project(project_id, actor, description=description)

    def set_project_retention(self, project_id: str, days: int | None, actor: str) -> Project:
        """Keep the project's traces ``days`` days (None: forever); the purge job applies it."""
        return self._update_project(project_id, actor, retention_days=days)

    def _update_project(self, project_id: str, actor: str, **changes: Any) -> Project:
        with self.db.session() as session:
            project = session.get(Project, project_id)
            if project is None:
                raise AccessError(404, f"No project '{project_id}'.", "project_not_found")
            before = project_to_dict(project)
            for name, value in changes.items():
                setattr(project, name, value)
            self.audit.record(
                actor=actor,
                action="project.update",
                resource_type="project",
                resource_id=project_id,
                project_id=project_id,
                before=before,
                after=project_to_dict(project),
                session=session,
            )
        return project

    # -- users -------------------------------------------------------------------------------

    def create_user(self, username: str, password: str, actor: str, is_admin: bool = False) -> User:
        if not USERNAME_PATTERN.match(username):
            raise AccessError(
                400,
                "A username is 1-100 letters, digits, '.', '_', '@' or '-'.",
                "invalid_value",
                "username",
            )
        self._check_password(password)
        user = User(
            id=uuid.uuid4().hex,
            username=username,
            password_hash=self._hasher.hash(password),
            is_admin=is_admin,
            created_at=time.time(),
        )
        self._add_audited(
            user,
            f"User '{username}' already exists.",
            actor=actor,
            action="user.create",
            resource_type="user",
            resource_id=user.id,
            after=user_to_dict(user),
        )
        return user

    @staticmethod
    def _check_password(password: str) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AccessError(
                400,
                f"A password needs at least {MIN_PASSWORD_LENGTH} characters.",
                "weak_password",
                "password",
            )
        if len(password) > 1024:
            raise AccessError(400, "A password is at most 1024 characters.", param="password")

    def find_user(self, id_or_username: str) -> User:
        with self.db.session() as session:
            user = (
                session.get(User, id_or_username)
                or session.scalars(select(User).where(User.username == id_or_username)).first()
            )
        if user is None:
            raise AccessError(404, f"No user '{id_or_username}'.", "user_not_found")
        return user

    def list_users(self) -> list[User]:
        with self.db.session() as session:
            return list(session.scalars(select(User).order_by(User.username)))

    def authenticate(self, username: str, password: str) -> User | None:
        """The active user with this username and password, or None (same cost either way)."""
        with self.db.session() as session:
            user = session.scalars(select(User).where(User.username == username)).first()
        try:
            self._hasher.verify(user.password_hash if user else self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled_at is not None:
            return None
        if self._hasher.check_needs_rehash(user.password_hash):
            with self.db.session() as session:
                stored = session.get(User, user.id)
                if stored is not None:
                    stored.password_hash = self._hasher.hash(password)
        return user

    def password_tag(self, user_id: str) -> str | None:
        """What a UI session keeps of the user's password hash (see :func:`session_tag`)."""
        with self.db.session() as session:
            user = session.get(User, user_id)
            return session_tag(user) if user is not None else None

    def set_password(self, user_id: str, password: str, actor: str) -> None:
        """A new password: every UI session begun with the old one ends."""
        self._check_password(password)
        with self.db.session() as session:
            user = session.get(User, user_id)
            if user is None:
                raise AccessError(404, f"No user '{user_id}'.", "user_not_found")
            user.password_hash = self._hasher.hash(password)
            self.audit.record(
                actor=actor,
                action="user.password",
                resource_type="user",
                resource_id=user_id,
                session=session,
            )

    def set_user_disabled(self, user_id: str, disabled: bool, actor: str) -> User:
        with self.db.session() as session:
            user = session.get(User, user_id)
            if user is None:
                raise AccessError(404, f"No user '{user_id}'.", "user_not_found")
            before = user_to_dict(user)
            user.disabled_at = time.time() if disabled else None
            self.audit.record(
                actor=actor,
                action="user.disable" if disabled else "user.enable",
                resource_type="user",
                resource_id=user_id,
                before=before,
                after=user_to_dict(user),
                session=session,
            )
        self.keys.forget_cached()
        return user

    # -- members -----------------------------------------------------------------------------

    def set_member(self, project_id: str, user_id: str, role: str, actor: str) -> RoleBinding:
        """Give a user ``role`` in a project (or change it)."""
        if role not in ROLES:
            raise AccessError(
                400, f"Unknown role '{role}'; one of {', '.join(ROLES)}.", param="role"
            )
        with self.db.session() as session:
            if session.get(Project, project_id) is None:
                raise AccessError(404, f"No project '{project_id}'.", "project_not_found")
            if session.get(User, user_id) is None:
                raise AccessError(404, f"No user '{user_id}'.", "user_not_found")
            binding = session.scalars(
                select(RoleBinding).where(
                    RoleBinding.project_id == project_id, RoleBinding.user_id == user_id
                )
            ).first()
            before = {"role": binding.role} if binding else None
            if binding is None:
                binding = RoleBinding(
                    project_id=project_id, user_id=user_id, role=role, created_at=time.time()
                )
                session.add(binding)
            else:
                binding.role = role
            self.audit.record(
                actor=actor,
                action="member.set",
                resource_type="member",
                resource_id=user_id,
                project_id=project_id,
                before=before,
                after={"role": role},
                session=session,
            )
        self.keys.forget_cached()
        return binding

    def remove_member(self, project_id: str, user_id: str, actor: str) -> bool:
        with self.db.session() as session:
            binding = session.scalars(
                select(RoleBinding).where(
                    RoleBinding.project_id == project_id, RoleBinding.user_id == user_id
                )
            ).first()
            if binding is None:
                return False
            self.audit.record(
                actor=actor,
                action="member.remove",
                resource_type="member",
                resource_id=user_id,
                project_id=project_id,
                before={"role": binding.role},
                session=session,
            )
            session.delete(binding)
        self.keys.forget_cached()
        return True

    def list_members(self, project_id: str) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.execute(
                select(User, RoleBinding.role)
                .join(RoleBinding, RoleBinding.user_id == User.id)
                .where(RoleBinding.project_id == project_id)
                .order_by(User.username)
            )
            return [{**user_to_dict(user), "role": role} for user, role in rows]

    # -- keys --------------------------------------------------------------------------------

    def create_key(
        self,
        principal: Principal,
        name: str,
        *,
        role: str = "developer",
        scope: str = "gateway",
        expires_at: float | None = None,
        allowed_models: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        for_user: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A key in the principal's project. Nobody grants more than they hold: the role is
        capped by the creator's own, and a key made for a user follows that user's role."""
        if role not in ROLES:
            raise AccessError(
                400, f"Unknown role '{role}'; one of {', '.join(ROLES)}.", param="role"
            )
        if scope not in SCOPES:
            raise AccessError(
                400, f"Unknown scope '{scope}'; one of {', '.join(SCOPES)}.", param="scope"
            )
        if not name.strip() or len(name) > 200:
            raise AccessError(400, "A key needs a name of 1-200 characters.", param="name")
        if expires_at is not None and expires_at <= time.time():
            raise AccessError(400, "expires_at is in the past.", param="expires_at")
        if not principal.instance_admin and not role_covers(principal.role or "", role):
            raise AccessError(
                403,
                f"A {principal.role} cannot create a key with role '{role}'.",
                "permission_denied",
                "role",
            )
        owner = for_user or principal.user_id
        raw, record = self.keys.new_record(
            name.strip(),
            role=role,
            project_id=principal.project_id,
            scope=scope,
            expires_at=expires_at,
            allowed_models=allowed_models,
            limits=limits,
            user_id=owner,
        )
        self._add_audited(
            record,
            "A key with this value exists already.",
            actor=principal.actor,
            action="key.create",
            resource_type="api_key",
            resource_id=record.id,
            project_id=principal.project_id,
            after=key_to_dict(record),
        )
        return raw, record

    def revoke_key(self, principal: Principal, key_id: str) -> ApiKey:
        """Revoke a key of the principal's project (instance admins: any key)."""
        with self.db.session() as session:
            record = session.get(ApiKey, key_id)
            visible = record is not None and (
                principal.instance_admin or record.project_id == principal.project_id
            )
            if record is None or not visible:
                raise AccessError(404, f"No API key '{key_id}'.", "key_not_found")
            if record.revoked_at is None:
                before = key_to_dict(record)
                record.revoked_at = time.time()
                self.audit.record(
                    actor=principal.actor,
                    action="key.revoke",
                    resource_type="api_key",
                    resource_id=key_id,
                    project_id=record.project_id,
                    before=before,
                    after=key_to_dict(record),
                    session=session,
                )
        self.keys.forget_cached()
        return record
