"""Prompts: versioned Jinja2 templates in a sandbox, labels, diffs, and rendering."""

from flywheel.prompts.registry import (
    PromptError,
    PromptParams,
    PromptRegistry,
    VersionView,
    diff_versions,
    parse_ref,
)

__all__ = [
    "PromptError",
    "PromptParams",
    "PromptRegistry",
    "VersionView",
    "diff_versions",
    "parse_ref",
]
