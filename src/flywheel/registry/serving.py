"""Making a registered model version servable: its catalog name and the config patch.

Everything here is pure (no database, no files): :func:`serving_patch` takes the running
config document and returns a new one with the version in the catalog and on a route, which
the caller applies as a new config revision like any other edit.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from flywheel.config.schema import FlywheelConfig, Name
from flywheel.errors import ServiceError
from flywheel.store import DEFAULT_PROJECT_ID

_CATALOG_NAME: TypeAdapter[str] = TypeAdapter(Name)
ServingStatus = Literal["approved", "experimental"]


class RegistryError(ServiceError):
    """A refused model-registry operation."""


def served_name(name: str, version: int, *, project_id: str) -> str:
    """The catalog model name under which ``name@version`` is served.

    The catalog is shared by the whole instance while models belong to a project, so a
    version of any project but the default one is qualified with its project
    (``team-a/support-bot-v3``): two projects' ``support-bot@3`` never take each other's
    place. Default-project versions are plain ``support-bot-v3``.
    """
    plain = f"{name}-v{version}"
    served = plain if project_id == DEFAULT_PROJECT_ID else f"{project_id}/{plain}"
    try:
        return _CATALOG_NAME.validate_python(served)
    except ValidationError:
        raise RegistryError(
            400,
            f"'{served}' is not a valid catalog model name; use a shorter model name.",
            "invalid_value",
            "name",
        ) from None


def _catalog_name(value: str, param: str) -> str:
    try:
        return _CATALOG_NAME.validate_python(value)
    except ValidationError:
        raise RegistryError(
            400,
            f"'{value}' is not a valid name: 1-128 letters, digits, '.', '_', ':', '/' or '-', "
            "starting with a letter or digit.",
            "invalid_value",
            param,
        ) from None


def serving_patch(
    document: Mapping[str, Any],
    *,
    served_name: str,
    source: str,
    route: str | None,
    provider: str = "local",
    weight: float | None = None,
    replace: bool = False,
    status: ServingStatus = "experimental",
) -> dict[str, Any]:
    """A new config document (``document`` is left untouched) that serves ``source`` as the
    catalog chat model ``served_name`` of ``provider`` and sends ``route`` to it (with no
    ``route``, only the catalog entry is added or updated: an eval or an experiment calls it).

    The catalog entry is added, or updated when it already serves the same ``source`` (a
    status change). The route is created with the model as its only target, or extended
    with it as one more weighted target; ``replace`` makes it the route's only target.
    Raises :class:`RegistryError`: 404 for a missing provider, 400 for a provider that is
    not ``local``, a pipeline or prompt route, or a result the config schema rejects (for
    instance an experimental model on a production route), 409 when ``served_name``
    already names another model or a route.
    """
    _catalog_name(served_name, "served_name")
    if route is not None:
        _catalog_name(route, "route")
    if status not in ("approved", "experimental"):
        raise RegistryError(
            400, "status is 'approved' or 'experimental'.", "invalid_value", "status"
        )
    if weight is not None and not weight > 0:
        raise RegistryError(400, "weight must be positive.", "invalid_value", "weight")
    patched = copy.deepcopy(dict(document))
    providers = patched.get("providers") or {}
    if provider not in providers:
        raise RegistryError(
            404,
            f"No provider '{provider}' in the config; add a provider of type local first.",
            "provider_not_found",
            "provider",
        )
    if (providers[provider] or {}).get("type") != "local":
        raise RegistryError(
            400,
            f"Provider '{provider}' is not of type local: registered weights are served "
            "in-process by a local provider.",
            "invalid_value",
            "provider",
        )

    models: list[dict[str, Any]] = patched.setdefault("models", [])
    routes: list[dict[str, Any]] = patched.setdefault("routes", [])
    if any(r.get("name") == served_name for r in routes):
        raise RegistryError(
            409, f"'{served_name}' is already the name of a route.", "conflict", "served_name"
        )
    entry = {"name": served_name, "provider": provider, "kind": "chat", "source": source}
    existing = next((m for m in models if m.get("name") == served_name), None)
    if existing is None:
        models.append({**entry, "status": status})
    elif existing.get("source") != source:
        raise RegistryError(
            409,
            f"The catalog model '{served_name}' already serves {existing.get('source')!r}.",
            "conflict",
            "served_name",
        )
    else:
        existing.update(entry, status=status)

    if route is None:
        _check(patched)
        return patched
    target: dict[str, Any] = {"model": served_name}
    if weight is not None:
        target["weight"] = weight
    current = next((r for r in routes if r.get("name") == route), None)
    if current is None:
        routes.append({"name": route, "targets": [target]})
    elif current.get("pipeline"):
        raise RegistryError(
            400, f"Route '{route}' runs a pipeline: it has no model targets.", "invalid_value"
        )
    elif any(t.get("prompt") for t in current.get("targets") or []) and not replace:
        raise RegistryError(
            400,
            f"Route '{route}' targets prompts; a route's targets are all prompts or all "
            "models (use replace to make the model its only target).",
            "invalid_value",
            "route",
        )
    elif replace:
        current["targets"] = [target]
    else:
        targets: list[dict[str, Any]] = current.setdefault("targets", [])
        same = next((t for t in targets if t.get("model") == served_name), None)
        if same is None:
            targets.append(target)
        elif weight is not None:
            same["weight"] = weight

    _check(patched)
    return patched


def _check(document: dict[str, Any]) -> None:
    """Refuse a document the config schema (fields and cross-references) rejects."""
    try:
        config = FlywheelConfig.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RegistryError(
            400, f"The served config is invalid at {where}: {first['msg']}", "invalid_config"
        ) from None
    problems = config.reference_errors()
    if problems:
        location, problem = problems[0]
        raise RegistryError(
            400,
            f"The served config is invalid at {'.'.join(map(str, location))}: {problem}",
            "invalid_config",
        )
