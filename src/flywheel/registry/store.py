"""The model registry: registered models, immutable versions with their weights in the
artifact store, aliases that point at versions, model cards, lineage and serving.

Every change writes its audit entry in the same transaction. Aliases named in
``protected_aliases`` (``production`` by default) move only through an approved request:
the registry is an :class:`~flywheel.security.approvals.ApprovalTarget`, registered with
``ApprovalService.register("model", registry)``. The registry never loads weights.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.registry.card import model_card
from flywheel.registry.lineage import lineage as lineage_graph
from flywheel.registry.serving import RegistryError, ServingStatus, served_name, serving_patch
from flywheel.security.audit import AuditLog
from flywheel.store import (
    Database,
    Dataset,
    DatasetVersion,
    Job,
    LabelEvent,
    ModelAlias,
    ModelVersion,
    RegisteredModel,
    Run,
)
from flywheel.store.artifacts import ArtifactStore
from flywheel.store.db import lock_row

ModelKind = Literal["base", "adapter", "merged", "quantized", "pruned"]
KINDS: tuple[str, ...] = get_args(ModelKind)
# Short enough that a project-qualified served name always fits the catalog's 128 characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# "latest" always means the newest version, so it cannot be a stored alias.
RESERVED_ALIASES = frozenset({"latest"})
FORMAT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
MAX_VERSION = 999_999_999
MODEL_FIELDS = ("description", "license", "intended_use", "limitations")
_DATASET_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(@(?P<version>[0-9]{1,9}))?$"
)
_WRITE_ATTEMPTS = 3

Selector = int | str | None


def parse_model_ref(ref: str) -> tuple[str, Selector]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME@VERSION`` → (name, alias or version or None)."""
    name, _, selector = ref.strip().partition("@")
    if not NAME_PATTERN.match(name):
        raise RegistryError(400, f"'{ref}' is not a model reference.", "invalid_value", "ref")
    if not selector:
        return name, None
    if selector.isascii() and selector.isdigit():
        number = int(selector)
        if not 1 <= number <= MAX_VERSION:
            raise RegistryError(400, f"'{selector}' is not a version number.", "invalid_value")
        return name, number
    return name, selector


def artifact_key(project_id: str, model_id: str, version_id: str) -> str:
    """Where a version's files live in the artifact store: unique per version row, so two
    replicas registering at once never write to the same place."""
    return f"models/{project_id}/{model_id}/{version_id}"


def _model_dict(model: RegisteredModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "description": model.description,
        "license": model.license,
        "intended_use": model.intended_use,
        "limitations": model.limitations,
        "created_at": model.created_at,
        "created_by": model.created_by,
    }


def _bad_name(name: str) -> RegistryError:
    return RegistryError(
        400,
        f"'{name}' is not a valid model name: 1-80 letters, digits, '.', '_' or '-', starting "
        "with a letter or digit.",
        "invalid_value",
        "name",
    )


class ModelRegistry:
    """Registered models of every project; shared by the API, the CLI, the UI and jobs."""

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        artifacts: ArtifactStore,
        model_cache: Path,
        protected_aliases: Iterable[str] = ("production",),
    ) -> None:
        self.db = db
        self.audit = audit
        self.artifacts = artifacts
        self.model_cache = Path(model_cache)
        self.protected_aliases = frozenset(protected_aliases)

    # -- rows and views ----------------------------------------------------------------------

    def _model(self, session: Session, project_id: str, name: str) -> RegisteredModel:
        model = session.scalar(
            select(RegisteredModel).where(
                RegisteredModel.project_id == project_id, RegisteredModel.name == name
            )
        )
        if model is None:
            raise RegistryError(404, f"No model '{name}'.", "model_not_found", "name")
        return model

    @staticmethod
    def _aliases(session: Session, model: RegisteredModel) -> dict[str, int]:
        rows = session.execute(
            select(ModelAlias.alias, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
            .where(ModelAlias.model_id == model.id)
            .order_by(ModelAlias.alias)
        )
        return {alias: version for alias, version in rows}

    def _parent_ref(self, session: Session, project_id: str, parent_id: str | None) -> str | None:
        if parent_id is None:
            return None
        row = session.execute(
            select(RegisteredModel.name, ModelVersion.version)
            .join(ModelVersion, ModelVersion.model_id == RegisteredModel.id)
            .where(ModelVersion.id == parent_id, RegisteredModel.project_id == project_id)
        ).first()
        return f"{row[0]}@{row[1]}" if row is not None else None

    def _version_dict(
        self,
        session: Session,
        model: RegisteredModel,
        row: ModelVersion,
        aliases: Mapping[str, int],
    ) -> dict[str, Any]:
        return {
            "id": row.id,
            "name": model.name,
            "version": row.version,
            "ref": f"{model.name}@{row.version}",
            "kind": row.kind,
            "format": row.format,
            "uri": row.uri,
            "parent": self._parent_ref(session, model.project_id, row.parent_id),
            "run_id": row.run_id,
            "job_id": row.job_id,
            "datasets": list(row.datasets or []),
            "params": row.params or {},
            "metrics": row.metrics or {},
            "size_bytes": row.size_bytes,
            "description": row.description,
            "aliases": sorted(a for a, v in aliases.items() if v == row.version),
            "served_name": served_name(model.name, row.version, project_id=model.project_id),
            "created_at": row.created_at,
            "created_by": row.created_by,
            "author_id": row.author_id,
        }

    def _version_row(
        self, session: Session, model: RegisteredModel, selector: Selector
    ) -> ModelVersion:
        if isinstance(selector, str) and selector.isascii() and selector.isdigit():
            selector = int(selector)
        query = select(ModelVersion).where(ModelVersion.model_id == model.id)
        if isinstance(selector, int):
            query = query.where(ModelVersion.version == selector)
            missing = f"Model '{model.name}' has no version {selector}."
        elif selector is None or selector == "latest":
            query = query.order_by(ModelVersion.version.desc()).limit(1)
            missing = f"Model '{model.name}' has no versions."
        else:
            alias = session.scalar(
                select(ModelAlias).where(
                    ModelAlias.model_id == model.id, ModelAlias.alias == selector
                )
            )
            if alias is None:
                raise RegistryError(
                    404, f"Model '{model.name}' has no alias '{selector}'.", "alias_not_found"
                )
            query = query.where(ModelVersion.id == alias.version_id)
            missing = f"Model '{model.name}' has no version for alias '{selector}'."
        row = session.scalar(query)
        if row is None:
            raise RegistryError(404, missing, "version_not_found", "version")
        return row

    # -- models ------------------------------------------------------------------------------

    def create_model(
        self,
        project_id: str,
        name: str,
        actor: str,
        *,
        description: str = "",
        license: str = "",
        intended_use: str = "",
        limitations: str = "",
    ) -> dict[str, Any]:
        """A new registered model (no versions yet); 409 when the name is taken."""
        if not NAME_PATTERN.match(name):
            raise _bad_name(name)
        model = RegisteredModel(
            id=uuid.uuid4().hex,
            project_id=project_id,
            name=name,
            description=description,
            license=license,
            intended_use=intended_use,
            limitations=limitations,
            created_at=time.time(),
            created_by=actor,
        )
        try:
            with self.db.session() as session:
                session.add(model)
                session.flush()
                self.audit.record(
                    actor=actor,
                    action="model.create",
                    resource_type="model",
                    resource_id=name,
                    project_id=project_id,
                    after=_model_dict(model),
                    session=session,
                )
        except IntegrityError:
            raise RegistryError(
                409, f"A model named '{name}' already exists.", "conflict", "name"
            ) from None
        return {**_model_dict(model), "versions": [], "aliases": {}}

    def update_model(
        self, project_id: str, name: str, actor: str, /, **fields: str
    ) -> dict[str, Any]:
        """Change the model's description, license, intended use or limitations."""
        unknown = sorted(set(fields) - set(MODEL_FIELDS))
        if unknown:
            raise RegistryError(
                400,
                f"Cannot change '{unknown[0]}'; fields: {', '.join(MODEL_FIELDS)}.",
                "invalid_value",
                unknown[0],
            )
        for key, value in fields.items():
            if not isinstance(value, str):
                raise RegistryError(400, f"'{key}' must be text.", "invalid_value", key)
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            before = _model_dict(model)
            for key, value in fields.items():
                setattr(model, key, value)
            session.flush()
            self.audit.record(
                actor=actor,
                action="model.update",
                resource_type="model",
                resource_id=name,
                project_id=project_id,
                before=before,
                after=_model_dict(model),
                session=session,
            )
            return _model_dict(model)

    def delete_model(self, project_id: str, name: str, actor: str) -> None:
        """Delete a model, its versions, aliases and alias history, then its weights.

        Refused (409) while a version of another model names one of its versions as parent:
        that lineage would point nowhere.
        """
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            own = select(ModelVersion.id).where(ModelVersion.model_id == model.id)
            child = session.execute(
                select(RegisteredModel.name, ModelVersion.version)
                .join(ModelVersion, ModelVersion.model_id == RegisteredModel.id)
                .where(ModelVersion.parent_id.in_(own), ModelVersion.model_id != model.id)
                .limit(1)
            ).first()
            if child is not None:
                raise RegistryError(
                    409,
                    f"'{child[0]}@{child[1]}' was made from a version of '{name}'; delete it "
                    "first.",
                    "in_use",
                )
            count = session.scalar(
                select(func.count())
                .select_from(ModelVersion)
                .where(ModelVersion.model_id == model.id)
            )
            session.execute(
                delete(LabelEvent).where(
                    LabelEvent.project_id == project_id,
                    LabelEvent.resource_type == "model",
                    LabelEvent.resource_name == name,
                )
            )
            # Explicit rather than left to ON DELETE CASCADE, which SQLite applies only with
            # its foreign_keys pragma on.
            session.execute(delete(ModelAlias).where(ModelAlias.model_id == model.id))
            session.execute(delete(ModelVersion).where(ModelVersion.model_id == model.id))
            session.delete(model)
            session.flush()
            self.audit.record(
                actor=actor,
                action="model.delete",
                resource_type="model",
                resource_id=name,
                project_id=project_id,
                before={**_model_dict(model), "versions": count},
                session=session,
            )
        # After the commit: a failed delete leaves unreachable files, never a row without them.
        self.artifacts.delete(f"models/{project_id}/{model.id}")

    def list_models(self, project_id: str) -> list[dict[str, Any]]:
        """Every model of the project with its version count, latest version and aliases."""
        with self.db.session() as session:
            stats = (
                select(
                    ModelVersion.model_id,
                    func.count().label("count"),
                    func.max(ModelVersion.version).label("latest"),
                )
                .group_by(ModelVersion.model_id)
                .subquery()
            )
            rows = session.execute(
                select(RegisteredModel, stats.c.count, stats.c.latest)
                .outerjoin(stats, stats.c.model_id == RegisteredModel.id)
                .where(RegisteredModel.project_id == project_id)
                .order_by(RegisteredModel.name)
            ).all()
            aliases: dict[str, dict[str, int]] = {}
            alias_rows = session.execute(
                select(ModelAlias.model_id, ModelAlias.alias, ModelVersion.version)
                .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
                .where(ModelAlias.model_id.in_([m.id for m, _, _ in rows]))
            )
            for model_id, alias, version in alias_rows:
                aliases.setdefault(model_id, {})[alias] = version
        return [
            {
                **_model_dict(model),
                "version_count": count or 0,
                "latest_version": latest,
                "aliases": dict(sorted(aliases.get(model.id, {}).items())),
            }
            for model, count, latest in rows
        ]

    def get_model(self, project_id: str, name: str) -> dict[str, Any]:
        """A model with its versions (newest first) and aliases."""
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            aliases = self._aliases(session, model)
            rows = session.scalars(
                select(ModelVersion)
                .where(ModelVersion.model_id == model.id)
                .order_by(ModelVersion.version.desc())
            )
            versions = [self._version_dict(session, model, row, aliases) for row in rows]
            return {**_model_dict(model), "versions": versions, "aliases": aliases}

    # -- versions ----------------------------------------------------------------------------

    def version(self, project_id: str, name: str, selector: Selector = None) -> dict[str, Any]:
        """A version by number, by alias, or the latest (``None`` or ``"latest"``)."""
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            row = self._version_row(session, model, selector)
            return self._version_dict(session, model, row, self._aliases(session, model))

    def resolve(self, project_id: str, ref: str) -> dict[str, Any]:
        """The version ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS`` points at now."""
        name, selector = parse_model_ref(ref)
        return self.version(project_id, name, selector)

    def register_version(
        self,
        project_id: str,
        name: str,
        *,
        kind: ModelKind,
        source: Path,
        format: str,
        actor: str,
        author_id: str | None = None,
        parent: str | None = None,
        run_id: str | None = None,
        job_id: str | None = None,
        datasets: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        description: str = "",
        create: bool = True,
    ) -> dict[str, Any]:
        """Copy the folder ``source`` into the artifact store as the next version of ``name``
        (the model too, when it is new and ``create``).

        ``parent`` is a reference (``base@3``, ``base@production``) to any model version of
        the project: an adapter must have one. ``datasets`` are ``name@version`` references
        (a bare name pins the dataset's newest version now). ``author_id`` is the author's
        identity for the four-eyes rule (``Principal.identity``) and is what the version
        records as its author; it defaults to ``actor``.
        """
        if kind not in KINDS:
            raise RegistryError(
                400, f"kind is one of {', '.join(KINDS)}, not '{kind}'.", "invalid_value", "kind"
            )
        if not FORMAT_PATTERN.match(format):
            raise RegistryError(
                400,
                f"'{format}' is not a format name (e.g. safetensors, peft, gguf, bnb-int8).",
                "invalid_value",
                "format",
            )
        if kind == "adapter" and not parent:
            raise RegistryError(
                400, "An adapter needs its base model as parent.", "invalid_value", "parent"
            )
        if not NAME_PATTERN.match(name):
            raise _bad_name(name)
        folder = Path(source)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise RegistryError(
                400, f"'{source}' is not a folder of model files.", "invalid_value", "source"
            )
        clean_params = _json_object(params, "params")
        clean_metrics = _json_object(metrics, "metrics")

        with self.db.session() as session:
            existing = session.scalar(
                select(RegisteredModel).where(
                    RegisteredModel.project_id == project_id, RegisteredModel.name == name
                )
            )
            parent_id = self._resolve_parent(session, project_id, parent)
            pinned = [self._pin_dataset(session, project_id, ref) for ref in datasets]
            self._check_owned(session, Run, run_id, project_id, "run_id")
            self._check_owned(session, Job, job_id, project_id, "job_id")
        if existing is None:
            if not create:
                raise RegistryError(404, f"No model '{name}'.", "model_not_found", "name")
            try:
                self.create_model(project_id, name, actor)
            except RegistryError as exc:
                if exc.code != "conflict":  # another writer created it just now: use theirs
                    raise
        with self.db.session() as session:
            model_id = self._model(session, project_id, name).id

        version_id = uuid.uuid4().hex
        key = artifact_key(project_id, model_id, version_id)
        # The copy is slow, so it happens outside any transaction; the row follows it.
        uri = self.artifacts.put_folder(key, folder)
        try:
            size = self.artifacts.size(key)
            fields: dict[str, Any] = {
                "id": version_id,
                "model_id": model_id,
                "kind": kind,
                "uri": uri,
                "format": format,
                "parent_id": parent_id,
                "run_id": run_id,
                "job_id": job_id,
                "datasets": pinned,
                "params": clean_params,
                "metrics": clean_metrics,
                "size_bytes": size,
                "description": description,
                "created_by": actor,
                "author_id": author_id or actor,
            }
            for _ in range(_WRITE_ATTEMPTS):
                try:
                    return self._insert_version(project_id, name, fields, actor)
                except IntegrityError:
                    continue  # another writer took the version number: read again and retry
            raise RegistryError(409, f"Model '{name}' changed while saving; retry.", "conflict")
        except BaseException:
            self.artifacts.delete(key)
            raise

    def _insert_version(
        self, project_id: str, name: str, fields: Mapping[str, Any], actor: str
    ) -> dict[str, Any]:
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            # Concurrent registrations queue on the model's row for the next number.
            lock_row(session, RegisteredModel.id, model.id)
            latest = session.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
            )
            row = ModelVersion(**fields, version=(latest or 0) + 1, created_at=time.time())
            session.add(row)
            session.flush()
            view = self._version_dict(session, model, row, {})
            self.audit.record(
                actor=actor,
                action="model.version.create",
                resource_type="model",
                resource_id=view["ref"],
                project_id=project_id,
                after=view,
                session=session,
            )
            return view

    def _resolve_parent(self, session: Session, project_id: str, ref: str | None) -> str | None:
        if not ref:
            return None
        parent_name, selector = parse_model_ref(ref)
        try:
            model = self._model(session, project_id, parent_name)
            return self._version_row(session, model, selector).id
        except RegistryError as exc:
            raise RegistryError(404, f"Parent '{ref}': {exc.message}", exc.code, "parent") from None

    @staticmethod
    def _pin_dataset(session: Session, project_id: str, ref: str) -> str:
        match = _DATASET_REF.match(ref)
        if match is None:
            raise RegistryError(
                400,
                f"'{ref}' is not a dataset reference (name@version).",
                "invalid_value",
                "datasets",
            )
        query = (
            select(DatasetVersion.version)
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
            .where(Dataset.project_id == project_id, Dataset.name == match["name"])
        )
        if match["version"] is not None:
            query = query.where(DatasetVersion.version == int(match["version"]))
        version = session.scalar(query.order_by(DatasetVersion.version.desc()).limit(1))
        if version is None:
            raise RegistryError(
                404,
                f"No dataset version '{ref}' in this project.",
                "dataset_not_found",
                "datasets",
            )
        return f"{match['name']}@{version}"

    @staticmethod
    def _check_owned(
        session: Session,
        table: type[Run] | type[Job],
        row_id: str | None,
        project_id: str,
        param: str,
    ) -> None:
        if row_id is None:
            return
        owner = session.scalar(select(table.project_id).where(table.id == row_id))
        if owner != project_id:
            raise RegistryError(404, f"No {param[:-3]} '{row_id}'.", "not_found", param)

    def local_path(self, project_id: str, ref: str) -> Path:
        """A local folder holding the version's files (downloaded once from a remote store)."""
        with self.db.session() as session:
            name, selector = parse_model_ref(ref)
            model = self._model(session, project_id, name)
            row = self._version_row(session, model, selector)
            key = artifact_key(project_id, model.id, row.id)
        return self.artifacts.local_folder(key, self.model_cache)

    # -- aliases (the ApprovalTarget protocol) -----------------------------------------------

    def _check_alias(self, alias: str, *, via_approval: bool) -> None:
        if not ALIAS_PATTERN.match(alias) or alias in RESERVED_ALIASES:
            raise RegistryError(
                400,
                f"'{alias}' is not a valid alias: 1-64 lowercase letters, digits, '-' or '_', "
                "starting with a letter ('latest' is reserved).",
                "invalid_value",
                "alias",
            )
        if alias in self.protected_aliases and not via_approval:
            raise RegistryError(
                409,
                f"The '{alias}' alias moves only through an approval: request one with "
                "POST /api/approvals (resource_type 'model').",
                "approval_required",
                "alias",
            )

    def is_protected(self, label: str) -> bool:
        return label in self.protected_aliases

    def author_of(self, project_id: str, name: str, version: int) -> str:
        """The identity that registered ``name@version`` (never its approver)."""
        return str(self.version(project_id, name, version)["author_id"])

    def set_alias(
        self, project_id: str, name: str, alias: str, version: int, actor: str
    ) -> dict[str, Any]:
        """Point an unprotected alias at ``version``; rollback is moving it back."""
        with self.db.session() as session:
            return self.move_label(session, project_id, name, alias, version, actor, None)

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
        """Move an alias inside the caller's transaction (the approval workflow's hook)."""
        self._check_alias(label, via_approval=approval_id is not None)
        model = self._model(session, project_id, name)
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version == version
            )
        )
        if row is None:
            raise RegistryError(
                404, f"Model '{name}' has no version {version}.", "version_not_found", "version"
            )
        return self._move(session, project_id, model, label, row, actor, approval_id)

    def revert_label(
        self,
        project_id: str,
        name: str,
        label: str,
        version: int | None,
        actor: str,
        approval_id: str,
    ) -> dict[str, Any]:
        """Put a label an approval moved back onto ``version`` (None removes it), citing that
        approval: what a canary that lost does to the move its approval made."""
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            row = None
            if version is not None:
                row = session.scalar(
                    select(ModelVersion).where(
                        ModelVersion.model_id == model.id, ModelVersion.version == version
                    )
                )
            return self._move(session, project_id, model, label, row, actor, approval_id)

    def remove_alias(self, project_id: str, name: str, alias: str, actor: str) -> None:
        """Remove an unprotected alias (a protected one only moves, through approvals)."""
        self._check_alias(alias, via_approval=False)
        with self.db.session() as session:
            model = self._model(session, project_id, name)
            current = session.scalar(
                select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
            )
            if current is None:
                raise RegistryError(
                    404, f"Model '{name}' has no alias '{alias}'.", "alias_not_found"
                )
            self._move(session, project_id, model, alias, None, actor, None)

    def alias_history(self, project_id: str, name: str) -> list[dict[str, Any]]:
        """Every alias move of a model, newest first."""
        with self.db.session() as session:
            self._model(session, project_id, name)
            events = session.scalars(
                select(LabelEvent)
                .where(
                    LabelEvent.project_id == project_id,
                    LabelEvent.resource_type == "model",
                    LabelEvent.resource_name == name,
                )
                .order_by(LabelEvent.id.desc())
            )
            return [_event_dict(e) for e in events]

    def _move(
        self,
        session: Session,
        project_id: str,
        model: RegisteredModel,
        alias: str,
        row: ModelVersion | None,
        actor: str,
        approval_id: str | None,
    ) -> dict[str, Any]:
        current = session.scalar(
            select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
        )
        before = None
        if current is not None:
            before = session.scalar(
                select(ModelVersion.version).where(ModelVersion.id == current.version_id)
            )
        now = time.time()
        if row is None:
            if current is not None:
                session.delete(current)
        elif current is None:
            session.add(
                ModelAlias(
                    model_id=model.id,
                    alias=alias,
                    version_id=row.id,
                    updated_at=now,
                    updated_by=actor,
                )
            )
        else:
            current.version_id, current.updated_at, current.updated_by = row.id, now, actor
        event = LabelEvent(
            project_id=project_id,
            resource_type="model",
            resource_name=model.name,
            label=alias,
            from_version=before,
            to_version=row.version if row is not None else None,
            actor=actor,
            approval_id=approval_id,
            ts=now,
        )
        session.add(event)
        session.flush()
        self.audit.record(
            actor=actor,
            action="model.alias.move" if row is not None else "model.alias.remove",
            resource_type="model",
            resource_id=f"{model.name}:{alias}",
            project_id=project_id,
            before={"alias": alias, "version": before},
            after={"alias": alias, "version": event.to_version, "approval_id": approval_id},
            session=session,
        )
        return _event_dict(event)

    # -- cards, lineage and serving ----------------------------------------------------------

    def lineage(
        self, project_id: str, ref: str, routes: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """The lineage graph of the version ``ref`` (see :func:`flywheel.registry.lineage`);
        ``routes`` are the running config's routes as plain dicts."""
        with self.db.session() as session:
            name, selector = parse_model_ref(ref)
            row = self._version_row(session, self._model(session, project_id, name), selector)
        return lineage_graph(self.db, project_id, row, routes)

    def card(self, project_id: str, ref: str, routes: Sequence[Mapping[str, Any]] = ()) -> str:
        """The markdown model card of the version ``ref``."""
        name, _ = parse_model_ref(ref)
        version = self.resolve(project_id, ref)
        graph = self.lineage(project_id, version["ref"], routes)
        # The training data of the version and of the versions it was made from.
        feeds = {"trained_on", "input"}
        refs = [
            node["ref"]
            for node in graph["nodes"]
            if node["type"] == "dataset"
            and any(e["source"] == node["id"] and e["relation"] in feeds for e in graph["edges"])
        ]
        with self.db.session() as session:
            model = _model_dict(self._model(session, project_id, name))
            datasets = [d for ref_ in refs if (d := _dataset_dict(session, project_id, ref_))]
        return model_card(model, version, graph, datasets)

    def serving_source(self, project_id: str, ref: str) -> str:
        """What a local provider loads for the version ``ref``: its folder (config.json and
        safetensors) or its ``.gguf`` file. An adapter must be merged first (400)."""
        folder = self.local_path(project_id, ref)
        if (folder / "adapter_config.json").is_file():
            raise RegistryError(
                400,
                f"'{ref}' is an adapter; merge it into its base to serve it.",
                "not_servable",
                "ref",
            )
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return str(folder)
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
        raise RegistryError(
            400,
            f"'{ref}' holds neither a model folder (config.json and *.safetensors) nor a "
            "single .gguf file, so a local provider cannot load it.",
            "not_servable",
            "ref",
        )

    def serve(
        self,
        project_id: str,
        ref: str,
        document: Mapping[str, Any],
        *,
        route: str | None,
        provider: str = "local",
        weight: float | None = None,
        replace: bool = False,
        status: ServingStatus = "experimental",
    ) -> dict[str, Any]:
        """The config ``document`` patched to serve ``ref`` on ``route`` (see
        :func:`~flywheel.registry.serving.serving_patch`): ``{"served_name", "source",
        "version", "document"}``. The caller applies the document as a config revision."""
        version = self.resolve(project_id, ref)
        source = self.serving_source(project_id, version["ref"])
        patched = serving_patch(
            document,
            served_name=version["served_name"],
            source=source,
            route=route,
            provider=provider,
            weight=weight,
            replace=replace,
            status=status,
        )
        return {
            "served_name": version["served_name"],
            "source": source,
            "version": version,
            "document": patched,
        }


def _json_object(value: Mapping[str, Any] | None, param: str) -> dict[str, Any]:
    data = dict(value or {})
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError):
        raise RegistryError(
            400, f"'{param}' must be a JSON object of finite values.", "invalid_value", param
        ) from None
    return data


def _dataset_dict(session: Session, project_id: str, ref: str) -> dict[str, Any] | None:
    name, _, number = ref.rpartition("@")
    found = session.execute(
        select(Dataset, DatasetVersion)
        .join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        .where(
            Dataset.project_id == project_id,
            Dataset.name == name,
            DatasetVersion.version == int(number),
        )
    ).first()
    if found is None:
        return None
    dataset, row = found
    return {
        "dataset": dataset.name,
        "version": row.version,
        "items": row.item_count,
        "content_hash": row.content_hash,
        "source": row.source,
        "message": row.message,
    }


def _event_dict(event: LabelEvent) -> dict[str, Any]:
    return {
        "resource_type": event.resource_type,
        "name": event.resource_name,
        "alias": event.label,
        "label": event.label,
        "from_version": event.from_version,
        "to_version": event.to_version,
        "actor": event.actor,
        "approval_id": event.approval_id,
        "ts": event.ts,
    }


__all__ = [
    "KINDS",
    "ModelKind",
    "ModelRegistry",
    "RegistryError",
    "artifact_key",
    "parse_model_ref",
]
