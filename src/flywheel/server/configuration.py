"""Config as code over HTTP: export the running state as YAML, plan a file, apply it.

The instance sections of a file (providers, models, routes) become a new config revision
that every replica switches to; its ``prompts`` and eval ``suites`` are applied to the
caller's project. A
section left out of a file is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from flywheel.config import ConfigError, FlywheelConfig, describe_problem, load_config_text
from flywheel.config.revisions import SECTIONS, Change, ConfigRevisions, plan_instance
from flywheel.errors import ServiceError
from flywheel.evals.suites import EvalSuites, SuiteSpec
from flywheel.prompts.declare import PromptDeclarations, PromptSteps
from flywheel.security.approvals import ApprovalService
from flywheel.security.audit import AuditLog
from flywheel.security.rbac import Permission, Principal

# Switches this process to a config and its revision number.
Activate = Callable[[FlywheelConfig, int], None]


class ConfigFileError(ServiceError):
    """An invalid file: ``problems`` holds one ``file:line: where: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(400, "\n".join(problems), "invalid_config", "yaml")
        self.problems = problems


def _parse(text: str, filename: str) -> FlywheelConfig:
    try:
        return load_config_text(text, filename)
    except ConfigError as exc:
        raise ConfigFileError(exc.problems) from None


@dataclass(frozen=True)
class _Plan:
    """A checked file: the instance config it leads to (None when it declares no instance
    section), those sections' changes, and its prompts' steps (None: no ``prompts:``)."""

    merged: FlywheelConfig | None
    instance: list[Change]
    prompts: list[PromptSteps] | None
    # Suites to write (unchanged ones left out) and every suite's line of the plan.
    suites: list[SuiteSpec]
    suite_changes: list[Change]

    def changes(self, declarations: PromptDeclarations) -> list[Change]:
        prompts = declarations.changes(self.prompts) if self.prompts else []
        return self.instance + prompts + self.suite_changes


class ConfigService:
    """Plan, apply and export; shared by the API and (through it) the CLI."""

    def __init__(
        self,
        revisions: ConfigRevisions,
        declarations: PromptDeclarations,
        approvals: ApprovalService,
        audit: AuditLog,
        running: Callable[[], FlywheelConfig],
        activate: Activate,
        suites: EvalSuites,
    ) -> None:
        self.suites = suites
        self.revisions = revisions
        self.declarations = declarations
        self.approvals = approvals
        self.audit = audit
        self.running = running
        self.activate = activate

    def _instance_part(self, caller: Principal, config: FlywheelConfig) -> dict[str, Any]:
        document = config.instance_document()
        wanted = {
            section: document.get(section, {} if section == "providers" else [])
            for section in SECTIONS
            if section in config.model_fields_set
        }
        if wanted and not caller.can(Permission.CONFIG_WRITE):
            raise ServiceError(
                403,
                "Providers, models and routes serve every project: only an instance admin may "
                "apply them. Leave those sections out to apply only this project's prompts.",
                "permission_denied",
                "yaml",
            )
        for name, provider in config.providers.items():
            if provider.api_key is not None and "providers" in wanted:
                raise ServiceError(
                    400,
                    f"Provider '{name}' has an inline api_key, which is never stored: store the "
                    "key as a secret and name it in api_key_secret (or use api_key_env).",
                    "invalid_value",
                    f"providers.{name}.api_key",
                )
        return wanted

    def _merged(
        self, running: FlywheelConfig, wanted: dict[str, Any], text: str, filename: str
    ) -> FlywheelConfig:
        """The running config with the file's instance sections replacing its own."""
        document = running.instance_document() | wanted
        try:
            merged = FlywheelConfig.model_validate(document)
        except ValidationError as exc:
            raise ConfigFileError([f"{filename}: {e['msg']}" for e in exc.errors()]) from None
        # A declared section is the file's own, so its locations point into the file.
        problems = [
            describe_problem(text if loc[0] in wanted else "", filename, loc, msg)
            for loc, msg in merged.reference_errors()
        ]
        if problems:
            raise ConfigFileError(problems)
        # Keys the running process holds in memory (inline in its start-up file) stay with
        # providers whose settings did not change.
        providers = {
            name: running.providers[name]
            if name in running.providers
            and running.providers[name].model_copy(update={"api_key": None}) == spec
            else spec
            for name, spec in merged.providers.items()
        }
        return merged.model_copy(update={"providers": providers})

    def _plan(self, caller: Principal, text: str, filename: str) -> _Plan:
        """Parse and check the whole file, and read what it would change, before anything
        is written."""
        config = _parse(text, filename)
        wanted = self._instance_part(caller, config)
        merged, instance = None, []
        if wanted:
            running = self.running()
            merged = self._merged(running, wanted, text, filename)
            instance = plan_instance(running.instance_document(), wanted)
        prompts = (
            self.declarations.plan(caller.project_id, config.prompts)
            if "prompts" in config.model_fields_set
            else None
        )
        suites, suite_changes = self._plan_suites(caller.project_id, config, text, filename)
        return _Plan(merged, instance, prompts, suites, suite_changes)

    def _plan_suites(
        self, project_id: str, config: FlywheelConfig, text: str, filename: str
    ) -> tuple[list[SuiteSpec], list[Change]]:
        """The file's suites checked (scorers built, thresholds matched), against the
        stored ones."""
        if "suites" not in config.model_fields_set:
            return [], []
        problems: list[str] = []
        specs: list[SuiteSpec] = []
        for index, data in enumerate(config.suites):
            try:
                spec = SuiteSpec.model_validate(data)
                spec.build_scorers()
            except ValidationError as exc:
                for error in exc.errors():
                    loc = ("suites", index, *error["loc"])
                    problems.append(describe_problem(text, filename, loc, error["msg"]))
                continue
            except ServiceError as exc:
                loc = ("suites", index, exc.param or "scorers")
                problems.append(describe_problem(text, filename, loc, exc.message))
                continue
            specs.append(spec)
        names = [spec.name for spec in specs]
        for index, name in enumerate(names):
            if name in names[:index]:
                problems.append(
                    describe_problem(
                        text, filename, ("suites", index, "name"), f"duplicate suite '{name}'"
                    )
                )
        if problems:
            raise ConfigFileError(problems)
        stored = {s.name: s for s in self.suites.specs(project_id)}
        writes, changes = [], []
        for spec in specs:
            before = stored.get(spec.name)
            if before is None:
                changes.append(Change("suite", spec.name, "create"))
            elif before != spec:
                changes.append(Change("suite", spec.name, "update"))
            else:
                changes.append(Change("suite", spec.name, "unchanged"))
                continue
            writes.append(spec)
        return writes, changes

    def plan(self, caller: Principal, text: str, filename: str) -> list[Change]:
        """What applying ``text`` would change; changes nothing."""
        return self._plan(caller, text, filename).changes(self.declarations)

    def apply(
        self, caller: Principal, text: str, filename: str, bypass_approvals: bool = False
    ) -> dict[str, Any]:
        """Apply ``text`` idempotently; protected labels are requested for approval unless an
        instance admin bypasses them explicitly (audited)."""
        if bypass_approvals and not caller.instance_admin:
            raise ServiceError(
                403, "Only an instance admin may bypass approvals.", "permission_denied"
            )
        plan = self._plan(caller, text, filename)
        changes = plan.changes(self.declarations)
        revision = None
        if plan.merged is not None:
            before = self.revisions.latest_number()
            revision, created = self.revisions.save(plan.merged, filename, caller.actor)
            if created:
                self.audit.record(
                    actor=caller.actor,
                    action="config.apply",
                    resource_type="config",
                    resource_id=str(revision),
                    before={"revision": before},
                    after={
                        "revision": revision,
                        "source": filename,
                        "changes": [c.to_dict() for c in plan.instance],
                    },
                )
                self.activate(plan.merged, revision)
        approvals: list[str] = []

        def request(name: str, version: int, label: str) -> str:
            approval = self.approvals.request(caller, "prompt", name, version, label)
            approvals.append(approval["id"])
            return str(approval["id"])

        if plan.prompts is not None:
            self.declarations.apply(
                caller.project_id,
                plan.prompts,
                actor=caller.actor,
                author_id=caller.identity,
                request_approval=None if bypass_approvals else request,
            )
        for spec in plan.suites:
            self.suites.put(caller.project_id, spec, caller.actor)
        return {
            "revision": revision,
            "changes": [c.to_dict() for c in changes],
            "approvals": approvals,
        }

    def export(self, project_id: str) -> str:
        """The running instance config and the project's prompts, as ``flywheel.yaml``."""
        document: dict[str, Any] = self.running().instance_document()
        prompts = self.declarations.export(project_id)
        if prompts:
            document["prompts"] = prompts
        suites = [
            spec.model_dump(mode="json", exclude_defaults=True)
            for spec in self.suites.specs(project_id)
        ]
        if suites:
            document["suites"] = suites
        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
