"""The prompt registry: immutable versions, labels that point at them, diffs and history.

Every change writes its audit entry in the same transaction. Labels named in
``protected_labels`` (``production`` by default) move only through an approved request
(:mod:`flywheel.security.approvals` calls :meth:`PromptRegistry.move_label` with its id).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.errors import ServiceError
from flywheel.prompts.templates import (
    Template,
    TemplateError,
    check_schema,
    check_template,
    infer_schema,
    render_messages,
)
from flywheel.security.audit import AuditLog
from flywheel.store import Database, LabelEvent, Prompt, PromptLabel, PromptVersion

NAME_PATTERN = re.compile(RESOURCE_NAME_PATTERN)
LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# "latest" always means the newest version, so it cannot be a stored label.
RESERVED_LABELS = frozenset({"latest"})


class PromptError(ServiceError):
    """A refused prompt operation."""


class PromptParams(BaseModel):
    """The call parameters a version carries; a request's own values override them."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class VersionView:
    """A prompt version as the edges show it."""

    name: str
    version: int
    template: Template
    variables: dict[str, Any]
    model: str | None
    params: dict[str, Any]
    message: str
    author: str
    author_id: str
    created_at: float
    labels: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("author_id")
        return out

    def render(self, variables: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages for ``variables``; raises :class:`PromptError` (400) on bad ones."""
        try:
            return render_messages(self.template, variables, self.variables)
        except TemplateError as exc:
            raise PromptError(400, exc.message, exc.code, exc.param) from None


MAX_VERSION = 999_999_999


def parse_ref(ref: str) -> tuple[str, str | int | None]:
    """``NAME``, ``NAME@LABEL`` or ``NAME@VERSION`` → (name, label or version or None)."""
    name, _, selector = ref.partition("@")
    if not selector:
        return name, None
    if selector.isascii() and selector.isdigit():
        number = int(selector)
        if not 1 <= number <= MAX_VERSION:
            raise PromptError(400, f"'{selector}' is not a version number.", "invalid_value")
        return name, number
    return name, selector


def content_hash(
    template: Template, variables: dict[str, Any], model: str | None, params: dict[str, Any]
) -> str:
    """A version's identity by content: two versions with equal hashes behave the same."""
    canonical = json.dumps(
        {"template": template, "variables": variables, "model": model, "params": params},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _lines(text: str) -> list[str]:
    # Every line ends with a newline, so the diff never glues one line to the next.
    return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(True)]


def _template_text(template: Template) -> list[str]:
    if isinstance(template, str):
        return _lines(template)
    lines: list[str] = []
    for message in template:
        lines += [f"[{message['role']}]\n", *_lines(message["content"])]
    return lines


def diff_versions(old: VersionView, new: VersionView) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: a unified diff of the template, and the fields
    (model, parameters, variables schema) whose values differ, as ``[old, new]``."""
    template_diff = "".join(
        difflib.unified_diff(
            _template_text(old.template),
            _template_text(new.template),
            fromfile=old.ref,
            tofile=new.ref,
        )
    )
    changes: dict[str, Any] = {}
    if old.model != new.model:
        changes["model"] = [old.model, new.model]
    for key in sorted(set(old.params) | set(new.params)):
        if old.params.get(key) != new.params.get(key):
            changes[f"params.{key}"] = [old.params.get(key), new.params.get(key)]
    if old.variables != new.variables:
        changes["variables"] = [old.variables, new.variables]
    return {"from": old.ref, "to": new.ref, "template": template_diff, "changes": changes}


class PromptRegistry:
    """Prompts of every project; shared by the API, the CLI, the UI and the gateway."""

    CACHE_SECONDS = 2.0

    def __init__(
        self, db: Database, audit: AuditLog, protected_labels: Iterable[str] = ("production",)
    ) -> None:
        self.db = db
        self.audit = audit
        self.protected_labels = frozenset(protected_labels)
        # The gateway resolves a prompt on every call; replicas see a change within seconds.
        self._cache: dict[tuple[str, str], tuple[float, VersionView]] = {}
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------

    def _prompt(self, session: Session, project_id: str, name: str) -> Prompt:
        prompt = session.scalar(
            select(Prompt).where(Prompt.project_id == project_id, Prompt.name == name)
        )
        if prompt is None:
            raise PromptError(404, f"No prompt '{name}'.", "prompt_not_found", "name")
        return prompt

    @staticmethod
    def _labels(session: Session, prompt: Prompt) -> dict[int, list[str]]:
        by_version: dict[int, list[str]] = {}
        rows = session.scalars(
            select(PromptLabel)
            .where(PromptLabel.prompt_id == prompt.id)
            .order_by(PromptLabel.label)
        )
        for row in rows:
            by_version.setdefault(row.version, []).append(row.label)
        return by_version

    @staticmethod
    def _view(prompt: Prompt, row: PromptVersion, labels: dict[int, list[str]]) -> VersionView:
        return VersionView(
            name=prompt.name,
            version=row.version,
            template=row.template,
            variables=row.variables,
            model=row.model,
            params=row.params,
            message=row.message,
            author=row.author,
            author_id=row.author_id,
            created_at=row.created_at,
            labels=labels.get(row.version, []),
        )

    def exists(self, project_id: str, name: str) -> bool:
        with self.db.session() as session:
            found = session.scalar(
                select(Prompt.id).where(Prompt.project_id == project_id, Prompt.name == name)
            )
            return found is not None

    def get(self, project_id: str, name: str, selector: str | int | None = None) -> VersionView:
        """A version by number, by label, or the latest (``None`` or ``"latest"``)."""
        with self.db.session() as session:
            prompt = self._prompt(session, project_id, name)
            query = select(PromptVersion).where(PromptVersion.prompt_id == prompt.id)
            if isinstance(selector, int):
                query = query.where(PromptVersion.version == selector)
                missing = f"Prompt '{name}' has no version {selector}."
            elif selector is None or selector == "latest":
                query = query.order_by(PromptVersion.version.desc()).limit(1)
                missing = f"Prompt '{name}' has no versions."
            else:
                label = session.get(PromptLabel, (prompt.id, selector))
                if label is None:
                    raise PromptError(
                        404, f"Prompt '{name}' has no label '{selector}'.", "label_not_found"
                    )
                query = query.where(PromptVersion.version == label.version)
                missing = f"Prompt '{name}' has no version {label.version}."
            row = session.scalar(query)
            if row is None:
                raise PromptError(404, missing, "version_not_found")
            return self._view(prompt, row, self._labels(session, prompt))

    def resolve(self, project_id: str, ref: str) -> VersionView:
        """``NAME@LABEL`` / ``NAME@VERSION`` / ``NAME`` for the gateway, cached briefly."""
        key = (project_id, ref)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        name, selector = parse_ref(ref)
        view = self.get(project_id, name, selector)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self.CACHE_SECONDS, view)
        return view

    def overview(self, project_id: str) -> list[dict[str, Any]]:
        """Every prompt of the project with its latest version number and its labels."""
        with self.db.session() as session:
            latest = (
                select(PromptVersion.prompt_id, func.max(PromptVersion.version).label("latest"))
                .group_by(PromptVersion.prompt_id)
                .subquery()
            )
            rows = session.execute(
                select(Prompt, latest.c.latest)
                .join(latest, latest.c.prompt_id == Prompt.id)
                .where(Prompt.project_id == project_id)
                .order_by(Prompt.name)
            ).all()
            labels: dict[str, dict[str, int]] = {}
            for label in session.scalars(
                select(PromptLabel).where(PromptLabel.prompt_id.in_([p.id for p, _ in rows]))
            ):
                labels.setdefault(label.prompt_id, {})[label.label] = label.version
        return [
            {
                "name": prompt.name,
                "description": prompt.description,
                "latest_version": version,
                "labels": labels.get(prompt.id, {}),
                "created_at": prompt.created_at,
                "created_by": prompt.created_by,
            }
            for prompt, version in rows
        ]

    def versions(self, project_id: str, name: str) -> list[VersionView]:
        """Every version of a prompt, newest first."""
        with self.db.session() as session:
            prompt = self._prompt(session, project_id, name)
            labels = self._labels(session, prompt)
            rows = session.scalars(
                select(PromptVersion)
                .where(PromptVersion.prompt_id == prompt.id)
                .order_by(PromptVersion.version.desc())
            )
            return [self._view(prompt, row, labels) for row in rows]

    def label_history(self, project_id: str, name: str) -> list[dict[str, Any]]:
        """Every label move of a prompt, newest first."""
        with self.db.session() as session:
            self._prompt(session, project_id, name)
            events = session.scalars(
                select(LabelEvent)
                .where(
                    LabelEvent.project_id == project_id,
                    LabelEvent.resource_type == "prompt",
                    LabelEvent.resource_name == name,
                )
                .order_by(LabelEvent.id.desc())
            )
            return [label_event_to_dict(e) for e in events]

    def diff(self, project_id: str, name: str, old: int, new: int) -> dict[str, Any]:
        return diff_versions(self.get(project_id, name, old), self.get(project_id, name, new))

    # -- writing -----------------------------------------------------------------------------

    def create(
        self,
        project_id: str,
        name: str,
        *,
        template: Template,
        author: str,
        author_id: str,
        variables: dict[str, Any] | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        message: str = "",
        description: str | None = None,
        labels: Iterable[str] = (),
    ) -> VersionView:
        """A new version (the prompt too, on its first version), optionally labelled.

        Protected labels cannot be set here: they move through an approval request.
        """
        if not NAME_PATTERN.match(name):
            raise PromptError(
                400,
                "A prompt name is 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit.",
                "invalid_value",
                "name",
            )
        labels = list(dict.fromkeys(labels))
        for label in labels:
            self._check_label(label, via_approval=False)
        try:
            check_template(template)
            schema = infer_schema(template) if variables is None else variables
            check_schema(schema)
        except TemplateError as exc:
            raise PromptError(400, exc.message, exc.code, exc.param or "template") from None
        try:
            checked = PromptParams.model_validate(params or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PromptError(
                400, f"Invalid prompt parameter '{where}': {first['msg']}", "invalid_value", where
            ) from None
        clean_params = checked.model_dump(exclude_none=True)
        now = time.time()
        try:
            with self.db.session() as session:
                prompt = session.scalar(
                    select(Prompt).where(Prompt.project_id == project_id, Prompt.name == name)
                )
                if prompt is None:
                    prompt = Prompt(
                        id=uuid.uuid4().hex,
                        project_id=project_id,
                        name=name,
                        description=description or "",
                        created_at=now,
                        created_by=author,
                    )
                    session.add(prompt)
                elif description is not None:
                    prompt.description = description
                latest = session.scalar(
                    select(func.max(PromptVersion.version)).where(
                        PromptVersion.prompt_id == prompt.id
                    )
                )
                row = PromptVersion(
                    prompt_id=prompt.id,
                    version=(latest or 0) + 1,
                    template=template,
                    variables=schema,
                    model=model,
                    params=clean_params,
                    message=message,
                    author=author,
                    author_id=author_id,
                    content_hash=content_hash(template, schema, model, clean_params),
                    created_at=now,
                )
                session.add(row)
                session.flush()
                view = self._view(prompt, row, {})
                self.audit.record(
                    actor=author,
                    action="prompt.version.create",
                    resource_type="prompt",
                    resource_id=view.ref,
                    project_id=project_id,
                    after=view.to_dict(),
                    session=session,
                )
                for label in labels:
                    self._move(session, project_id, prompt, label, row.version, author, None)
        except IntegrityError:
            # Two writers raced for the same version number; the caller retries.
            raise PromptError(
                409, f"Prompt '{name}' changed while saving; retry.", "conflict"
            ) from None
        self._cache.clear()
        # A new version carries exactly the labels just pointed at it.
        return replace(view, labels=sorted(labels))

    def _check_label(self, label: str, *, via_approval: bool) -> None:
        if not LABEL_PATTERN.match(label) or label in RESERVED_LABELS:
            raise PromptError(
                400,
                f"'{label}' is not a valid label: 1-64 lowercase letters, digits, '-' or '_', "
                "starting with a letter ('latest' is reserved).",
                "invalid_value",
                "label",
            )
        if label in self.protected_labels and not via_approval:
            raise PromptError(
                409,
                f"The '{label}' label moves only through an approval: request one with "
                "POST /api/approvals (or `flywheel prompts label --request`).",
                "approval_required",
                "label",
            )

    def is_protected(self, label: str) -> bool:
        return label in self.protected_labels

    def author_of(self, project_id: str, name: str, version: int) -> str:
        """The identity that created ``name@version`` (approvals are never theirs to give)."""
        return self.get(project_id, name, version).author_id

    def set_label(
        self, project_id: str, name: str, label: str, version: int, actor: str
    ) -> dict[str, Any]:
        """Point an unprotected label at ``version``; rollback is moving it back."""
        with self.db.session() as session:
            event = self.move_label(session, project_id, name, label, version, actor, None)
        return event

    def move_label(
        self,
        session: Session,
        project_id: str,
        name: str,
        label: str,
        version: int,
        actor: str,
        approval_id: str | None,
    ) -> dict[str, Any]:
        """Move a label inside the caller's transaction (the approval workflow's hook)."""
        self._check_label(label, via_approval=approval_id is not None)
        prompt = self._prompt(session, project_id, name)
        exists = session.scalar(
            select(PromptVersion.id).where(
                PromptVersion.prompt_id == prompt.id, PromptVersion.version == version
            )
        )
        if exists is None:
            raise PromptError(
                404, f"Prompt '{name}' has no version {version}.", "version_not_found", "version"
            )
        event = self._move(session, project_id, prompt, label, version, actor, approval_id)
        # Clearing before the commit would let a concurrent resolve cache the old target.
        sqlalchemy_event.listen(session, "after_commit", lambda _: self._cache.clear(), once=True)
        return event

    def remove_label(self, project_id: str, name: str, label: str, actor: str) -> None:
        self._check_label(label, via_approval=False)
        with self.db.session() as session:
            prompt = self._prompt(session, project_id, name)
            if session.get(PromptLabel, (prompt.id, label)) is None:
                raise PromptError(
                    404, f"Prompt '{name}' has no label '{label}'.", "label_not_found"
                )
            self._move(session, project_id, prompt, label, None, actor, None)
        self._cache.clear()

    def _move(
        self,
        session: Session,
        project_id: str,
        prompt: Prompt,
        label: str,
        version: int | None,
        actor: str,
        approval_id: str | None,
    ) -> dict[str, Any]:
        current = session.get(PromptLabel, (prompt.id, label))
        before = current.version if current else None
        now = time.time()
        if version is None:
            if current is not None:
                session.delete(current)
        elif current is None:
            session.add(
                PromptLabel(
                    prompt_id=prompt.id,
                    label=label,
                    version=version,
                    updated_at=now,
                    updated_by=actor,
                )
            )
        else:
            current.version, current.updated_at, current.updated_by = version, now, actor
        event = LabelEvent(
            project_id=project_id,
            resource_type="prompt",
            resource_name=prompt.name,
            label=label,
            from_version=before,
            to_version=version,
            actor=actor,
            approval_id=approval_id,
            ts=now,
        )
        session.add(event)
        session.flush()
        self.audit.record(
            actor=actor,
            action="prompt.label.move" if version is not None else "prompt.label.remove",
            resource_type="prompt",
            resource_id=f"{prompt.name}:{label}",
            project_id=project_id,
            before={"label": label, "version": before},
            after={"label": label, "version": version, "approval_id": approval_id},
            session=session,
        )
        return label_event_to_dict(event)


def label_event_to_dict(event: LabelEvent) -> dict[str, Any]:
    return {
        "resource_type": event.resource_type,
        "name": event.resource_name,
        "label": event.label,
        "from_version": event.from_version,
        "to_version": event.to_version,
        "actor": event.actor,
        "approval_id": event.approval_id,
        "ts": event.ts,
    }
