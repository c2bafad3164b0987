"""Builds the configured providers and resolves catalog models to them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from flywheel.config import CatalogModel, FlywheelConfig
from flywheel.providers.base import Provider
from flywheel.providers.local import LocalProvider
from flywheel.providers.openai_compat import OpenAICompatibleProvider

log = logging.getLogger("flywheel.providers")


class ProviderRegistry:
    """The providers of one config, keyed by name, and the catalog's models by name."""

    def __init__(
        self,
        config: FlywheelConfig,
        model_cache: Path,
        local_dtype: str = "auto",
        local_max_batch_size: int = 8,
        local_threads: int | None = None,
    ) -> None:
        self.providers: dict[str, Provider] = {}
        for name, spec in config.providers.items():
            if spec.type == "local":
                self.providers[name] = LocalProvider(
                    name, model_cache, local_dtype, local_max_batch_size, local_threads
                )
            else:
                self.providers[name] = OpenAICompatibleProvider(name, spec)
        self.models: dict[str, CatalogModel] = {m.name: m for m in config.models}

    def provider_for(self, model: CatalogModel) -> Provider:
        return self.providers[model.provider]

    def local_models(self) -> list[tuple[LocalProvider, CatalogModel]]:
        return [
            (provider, model)
            for model in self.models.values()
            if isinstance(provider := self.providers[model.provider], LocalProvider)
        ]

    async def preload(self) -> None:
        """Load every local model in the background so the first request does not wait."""
        for provider, model in self.local_models():
            try:
                await asyncio.to_thread(provider.load, model)
            except Exception:
                log.exception("could not load local model %s", model.name)

    def ready(self) -> bool:
        return all(provider.is_ready(model) for provider, model in self.local_models())

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
