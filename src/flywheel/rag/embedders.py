"""Embedding text for knowledge bases: the bundled MiniLM locally, or any catalog embedding
model through the gateway (``/v1/embeddings`` of its provider, traced and budgeted)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from flywheel.providers.minilm import MINILM_SOURCE, embed

# (project_id, model, texts) -> one vector per text, through the gateway.
RemoteEmbed = Callable[[str, str, list[str]], Awaitable[list[list[float]]]]
LOCAL_EMBEDDER = MINILM_SOURCE
LOCAL_BATCH = 64
REMOTE_BATCH = 256


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32: cosine by inner product."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


class Embedder:
    """Embeds batches for one project with one embedder name (``builtin:minilm`` or a catalog
    model); ``progress(done, total)`` is called after each batch."""

    def __init__(self, name: str, project_id: str, remote: RemoteEmbed | None) -> None:
        self.name = name
        self.project_id = project_id
        self.remote = remote

    @property
    def is_local(self) -> bool:
        return self.name == LOCAL_EMBEDDER

    async def embed(
        self,
        texts: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Unit vectors, one row per text, in order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        batch = LOCAL_BATCH if self.is_local else REMOTE_BATCH
        parts: list[np.ndarray] = []
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            if self.is_local:
                parts.append(await asyncio.to_thread(embed, chunk, LOCAL_BATCH))
            else:
                if self.remote is None:
                    raise ValueError(f"embedder '{self.name}' needs the gateway")
                rows = await self.remote(self.project_id, self.name, chunk)
                parts.append(unit_rows(np.asarray(rows, dtype=np.float32)))
            if progress is not None:
                progress(min(start + batch, len(texts)), len(texts))
        return unit_rows(np.vstack(parts))


__all__ = ["LOCAL_EMBEDDER", "Embedder", "RemoteEmbed", "unit_rows"]
