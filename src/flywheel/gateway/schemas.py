"""Request bodies of the OpenAI-compatible endpoints.

Unknown fields are kept and passed upstream (providers add parameters faster than we could
list them); known fields are type-checked strictly, so ``"temperature": "hot"`` is a 400.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROMPT_PREFIX = "prompt:"
RAG_PREFIX = "rag:"
PIPELINE_PREFIX = "pipeline:"


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIBody):
    model: str = Field(min_length=1, max_length=256)
    # May be empty when ``model`` is a prompt (or a prompt route): its template supplies them.
    messages: list[ChatMessage] = Field(default_factory=list)
    # Flywheel's extension: the variables of a prompt target (``extra_body`` in the SDK).
    variables: dict[str, Any] | None = None
    # Flywheel's extension for ``rag:`` targets: top_k, mode and filters of the retrieval.
    retrieval: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None

    @cached_property
    def params(self) -> dict[str, Any]:
        """Everything but ``model``, as received: dumped once per request (hot path)."""
        return self.model_dump(exclude_none=True, exclude={"model", "variables", "retrieval"})

    def upstream_body(self, model_name: str) -> dict[str, Any]:
        """The body to send a target: as received, with the target's own model name."""
        return {**self.params, "model": model_name}

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class EmbeddingRequest(_OpenAIBody):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and (not value or any(v == "" or v == [] for v in value)):
            raise ValueError("input must not be empty")
        return value

    def upstream_body(self, model_name: str) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True, exclude={"model", "encoding_format"})
        body["model"] = model_name
        return body
