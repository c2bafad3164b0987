"""The gateway: an OpenAI-compatible front door with routes, fallbacks, retries and traces."""

from flywheel.gateway.errors import GatewayError, error_body
from flywheel.gateway.routing import RouteTable
from flywheel.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from flywheel.gateway.service import CallContext, Gateway

__all__ = [
    "CallContext",
    "ChatCompletionRequest",
    "EmbeddingRequest",
    "Gateway",
    "GatewayError",
    "RouteTable",
    "error_body",
]
