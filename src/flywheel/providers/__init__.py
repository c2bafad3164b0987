"""Providers: where completions and embeddings come from, behind one small interface."""

from flywheel.providers.base import InvalidRequest, Provider, ProviderError, parse_retry_after
from flywheel.providers.registry import ProviderRegistry

__all__ = ["InvalidRequest", "Provider", "ProviderError", "ProviderRegistry", "parse_retry_after"]
