"""The model registry: models, versions, aliases, model cards, lineage and serving."""

from flywheel.registry.card import model_card
from flywheel.registry.lineage import lineage
from flywheel.registry.serving import RegistryError, served_name, serving_patch
from flywheel.registry.store import (
    KINDS,
    ModelKind,
    ModelRegistry,
    artifact_key,
    parse_model_ref,
)

__all__ = [
    "KINDS",
    "ModelKind",
    "ModelRegistry",
    "RegistryError",
    "artifact_key",
    "lineage",
    "model_card",
    "parse_model_ref",
    "served_name",
    "serving_patch",
]
