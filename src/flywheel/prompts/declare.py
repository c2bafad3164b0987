"""Prompts declared in ``flywheel.yaml``: plan and apply them against the registry, and
export the registry back as specs (the round trip ``flywheel export`` → ``apply``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel.config.revisions import Change
from flywheel.config.schema import PromptSpec, PromptVersionSpec
from flywheel.prompts.registry import (
    PromptError,
    PromptParams,
    PromptRegistry,
    VersionView,
    content_hash,
)
from flywheel.prompts.templates import TemplateError, infer_schema

# Asks for a protected label to move (name, version, label) and returns the request's id.
ApprovalRequester = Callable[[str, int, str], str]


def _spec_hash(spec: PromptVersionSpec) -> str:
    try:
        schema = infer_schema(spec.template) if spec.variables is None else spec.variables
    except TemplateError as exc:
        raise PromptError(400, exc.message, exc.code, "template") from None
    params = PromptParams.model_validate(spec.params).model_dump(exclude_none=True)
    return content_hash(spec.template, schema, spec.model, params)


def _view_hash(view: VersionView) -> str:
    return content_hash(view.template, view.variables, view.model, view.params)


def _wanted_labels(spec: PromptSpec, top: int) -> dict[str, int]:
    if isinstance(spec.labels, dict):
        return dict(spec.labels)
    return dict.fromkeys(spec.labels, top)


@dataclass(frozen=True)
class PromptSteps:
    """What applying one prompt spec does: versions to create after the ``stored`` ones, and
    the labels it wants (label → version) next to where they point now."""

    spec: PromptSpec
    stored: int
    to_create: list[PromptVersionSpec]
    labels: dict[str, int]
    current: dict[str, int]


class PromptDeclarations:
    """Plans and applies a project's declared prompts; never deletes anything."""

    def __init__(self, registry: PromptRegistry) -> None:
        self.registry = registry

    def _existing(self, project_id: str, name: str) -> list[VersionView]:
        try:
            return list(reversed(self.registry.versions(project_id, name)))
        except PromptError as exc:
            if exc.code == "prompt_not_found":
                return []
            raise

    def _steps(self, project_id: str, spec: PromptSpec) -> PromptSteps:
        existing = self._existing(project_id, spec.name)
        wanted = spec.version_specs()
        if spec.versions is None:
            same = existing and _view_hash(existing[-1]) == _spec_hash(wanted[0])
            to_create = [] if same else wanted
            top = len(existing) + len(to_create)
        else:
            for number, (view, version) in enumerate(zip(existing, wanted, strict=False), 1):
                if _view_hash(view) != _spec_hash(version):
                    raise PromptError(
                        409,
                        f"Version {number} of prompt '{spec.name}' differs from the stored one; "
                        "versions are immutable, so append a new version instead.",
                        "version_conflict",
                        "prompts",
                    )
            to_create = wanted[len(existing) :]
            top = max(len(existing), len(wanted))
        return PromptSteps(
            spec=spec,
            stored=len(existing),
            to_create=to_create,
            labels=_wanted_labels(spec, top),
            current={label: v.version for v in existing for label in v.labels},
        )

    def plan(self, project_id: str, specs: list[PromptSpec]) -> list[PromptSteps]:
        """What each spec needs, read once and checked before anything is written."""
        return [self._steps(project_id, spec) for spec in specs]

    def changes(self, steps: list[PromptSteps]) -> list[Change]:
        """The plan's lines: one per prompt, one per declared label."""
        changes: list[Change] = []
        for step in steps:
            name = step.spec.name
            if step.to_create:
                first = step.stored + 1
                numbers = ", ".join(f"v{first + i}" for i in range(len(step.to_create)))
                action = "create" if first == 1 else "update"
                changes.append(Change("prompt", name, action, f"new {numbers}"))
            else:
                changes.append(Change("prompt", name, "unchanged"))
            for label, version in sorted(step.labels.items()):
                where = f"{name}:{label}"
                if step.current.get(label) == version:
                    changes.append(Change("label", where, "unchanged", f"v{version}"))
                elif self.registry.is_protected(label):
                    changes.append(Change("label", where, "approval", f"→ v{version}"))
                else:
                    changes.append(Change("label", where, "update", f"→ v{version}"))
        return changes

    def apply(
        self,
        project_id: str,
        steps: list[PromptSteps],
        *,
        actor: str,
        author_id: str,
        request_approval: ApprovalRequester | None,
    ) -> None:
        """Carry out :meth:`plan`'s steps: create missing versions and move labels. A
        protected label is handed to ``request_approval``; without one (an instance admin's
        explicit bypass) it moves now."""
        for step in steps:
            spec = step.spec
            for version in step.to_create:
                self.registry.create(
                    project_id,
                    spec.name,
                    template=version.template,
                    author=actor,
                    author_id=author_id,
                    variables=version.variables,
                    model=version.model,
                    params=version.params,
                    # A history is reproduced as it was; new inline content says where it came from.
                    message=version.message
                    if spec.versions is not None
                    else (version.message or "flywheel apply"),
                    description=spec.description,
                )
            for label, number in step.labels.items():
                if step.current.get(label) == number:
                    continue
                if not self.registry.is_protected(label):
                    self.registry.set_label(project_id, spec.name, label, number, actor)
                elif request_approval is not None:
                    request_approval(spec.name, number, label)
                else:
                    with self.registry.db.session() as session:
                        self.registry.move_label(
                            session, project_id, spec.name, label, number, actor, "bypass"
                        )

    def export(self, project_id: str) -> list[dict[str, Any]]:
        """Every prompt of the project with its whole history, as ``prompts:`` entries."""
        out: list[dict[str, Any]] = []
        for summary in self.registry.overview(project_id):
            versions = list(reversed(self.registry.versions(project_id, summary["name"])))
            entry: dict[str, Any] = {"name": summary["name"]}
            if summary["description"]:
                entry["description"] = summary["description"]
            entry["versions"] = [
                {
                    k: v
                    for k, v in {
                        "template": view.template,
                        "variables": view.variables,
                        "model": view.model,
                        "params": view.params,
                        "message": view.message,
                    }.items()
                    if v not in (None, {}, "")
                }
                for view in versions
            ]
            if summary["labels"]:
                entry["labels"] = dict(sorted(summary["labels"].items()))
            out.append(entry)
        return out
