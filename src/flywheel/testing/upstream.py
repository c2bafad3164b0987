"""A scriptable OpenAI-compatible upstream, for fault tests and gateway benchmarks.

The requested ``model`` picks the behaviour, so one server plays every failure:

- ``echo``: answers ``echo: <last user message>`` (streams word by word when asked).
- ``fail-500``: HTTP 500.  ``rate-limit``: HTTP 429 with ``Retry-After: 1``.
- ``rate-limit-long``: HTTP 429 with ``Retry-After: 120`` (longer than a route would wait).
- ``hang``: waits 60 s before answering (for timeouts), streamed or not.
- ``reset``: resets the TCP connection (RST) without answering anything.
- ``cut-stream``: streams two chunks, then drops the connection without ``[DONE]``.
- ``stall-stream``: streams two chunks, then goes silent for 60 s (a timeout mid-stream).
- ``garbage``: HTTP 200 whose body is not JSON (or an SSE line that is not JSON).
- ``garbage-stream``: streams two chunks, then a ``data:`` line that is not JSON.
- ``no-choices``: HTTP 200 with a JSON object that is not a completion (no ``choices``).
- ``flaky-N``: HTTP 503 for the first N calls carrying the same ``user`` field, then echoes.

``GET /calls`` returns how many calls each model received (``DELETE /calls`` resets it).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def _completion(model: str, text: str, prompt_words: int) -> dict[str, Any]:
    completion_words = len(text.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": completion_words,
            "total_tokens": prompt_words + completion_words,
        },
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


class _DropConnection(Exception):
    """Raised inside a streaming body to make the server abort the connection."""


# Streamed models that misbehave after their second chunk, and how.
_MID_STREAM_FAULTS = {"cut-stream": "cut", "stall-stream": "stall", "garbage-stream": "garbage"}


async def _reset_connection(request: Request) -> None:
    """Abort the request's TCP connection with a RST, as a crashed or overloaded peer (or a
    middlebox) does. uvicorn hands the app its own ``receive``, whose owner holds the
    transport; linger 0 turns the close into a reset."""
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("the fake upstream's 'reset' needs uvicorn")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await asyncio.sleep(0.05)  # let uvicorn see the disconnect before the app returns


def create_upstream_app() -> Starlette:
    """The upstream as an ASGI app; ``app.state.calls`` counts calls per model."""
    calls: Counter[str] = Counter()
    per_user: Counter[tuple[str, str]] = Counter()

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "bad json"}}, status_code=400)
        model = str(body.get("model", ""))
        calls[model] += 1
        stream = bool(body.get("stream"))
        if model == "fail-500":
            return JSONResponse({"error": {"message": "upstream exploded"}}, status_code=500)
        if model in ("rate-limit", "rate-limit-long"):
            wait = "1" if model == "rate-limit" else "120"
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": wait}
            )
        if model == "hang":
            await asyncio.sleep(60)
        if model == "reset":
            await _reset_connection(request)
            return Response(status_code=204)  # never sent: the connection is gone
        if model == "no-choices":
            return JSONResponse({"object": "chat.completion", "result": "not what you want"})
        if model == "garbage":
            if stream:
                return StreamingResponse(
                    iter([b"data: {not json\n\n"]), media_type="text/event-stream"
                )
            return Response("<html>definitely not json", media_type="text/html")
        if model.startswith("flaky-"):
            key = (model, str(body.get("user", "")))
            per_user[key] += 1
            if per_user[key] <= int(model.split("-", 1)[1]):
                return JSONResponse({"error": {"message": "try again"}}, status_code=503)
        prompt = _last_user_text(body)
        text = f"echo: {prompt}"
        if model == "rank-reverse":
            # A reranker that puts the numbered passages ("[n] ...") in reverse order.
            count = sum(1 for line in prompt.splitlines() if re.match(r"^\[\d+\]", line))
            text = json.dumps(list(range(count, 0, -1)))
        if not stream:
            return JSONResponse(_completion(model, text, len(prompt.split())))
        return StreamingResponse(
            _stream(model, text, len(prompt.split()), _MID_STREAM_FAULTS.get(model), body),
            media_type="text/event-stream",
        )

    async def _stream(
        model: str, text: str, prompt_words: int, fault: str | None, body: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        yield _sse(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        )
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
            if fault is not None and i == 1:
                if fault == "cut":
                    raise _DropConnection
                if fault == "stall":
                    await asyncio.sleep(60)
                if fault == "garbage":
                    yield b'data: {"choices": [oops\n\n'
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            completion = len(text.split())
            usage = {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion,
                "total_tokens": prompt_words + completion,
            }
            yield _sse({**base, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        calls[str(body.get("model", ""))] += 1
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(t))), 1.0, 0.0]}
            for i, t in enumerate(inputs)
        ]
        return JSONResponse(
            {
                "object": "list",
                "model": body.get("model"),
                "data": data,
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )

    async def get_calls(request: Request) -> Response:
        if request.method == "DELETE":
            calls.clear()
            per_user.clear()
        return JSONResponse(dict(calls))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/calls", get_calls, methods=["GET", "DELETE"]),
        ]
    )
    app.state.calls = calls
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeUpstream:
    """Runs :func:`create_upstream_app` with uvicorn in a background thread on loopback."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.app = create_upstream_app()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> Counter[str]:
        calls: Counter[str] = self.app.state.calls
        return calls

    def start(self) -> FakeUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main() -> None:
    """``python -m flywheel.testing.upstream --port N``: serve the fake upstream until killed."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    port = args.port or free_port()
    print(f"fake upstream on http://127.0.0.1:{port}/v1", flush=True)
    uvicorn.run(
        create_upstream_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
