"""Iteration-level (continuous) batching for a local causal language model.

One scheduler thread owns the model. Requests arrive from asyncio code through
:meth:`BatchingEngine.submit`; at every step the thread admits waiting requests (prefilling them as
one left-padded batch and merging their KV cache into the running batch), then decodes one token
for every active request in a single forward pass and hands each token to its request's asyncio
queue. Finished and cancelled rows leave the batch between steps, so a slot frees as soon as its
request ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger("flywheel.providers.local_engine")

FinishReason = Literal["stop", "length"]
_T = TypeVar("_T")
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature`` 0 means greedy decoding; ``seed`` makes sampling reproducible for the request;
    ``stop`` strings end the output (OpenAI semantics: the stop string itself is not returned).
    ``max_tokens`` counts every generated token, the end-of-sequence token included.
    ``logprobs`` asks for each picked token's log-probability and ``top_logprobs`` for the
    likeliest alternatives (0-20), both under the model's own distribution (before temperature
    and top_p), as OpenAI reports them.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer, not {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number, not {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float):
            raise ValueError(f"top_p must be a number, not {self.top_p!r}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, not {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | None):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        self.stop = [s for s in self.stop if s]
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a boolean, not {self.logprobs!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int):
            raise ValueError(f"top_logprobs must be an integer, not {self.top_logprobs!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {self.top_logprobs}"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token; ``finish_reason`` is set on the request's last token.

    For a request that asked for ``logprobs``, ``logprob`` is the token's log-probability and
    ``top_logprobs`` the ``(token_id, logprob)`` pairs of the likeliest tokens, best first;
    otherwise they are ``None`` and empty.
    """

    token_id: int
    finish_reason: FinishReason | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class EngineClosedError(RuntimeError):
    """The engine is not running (never started, or closed), so the request cannot be served."""


class EngineStepError(RuntimeError):
    """A model step failed; every request in that step gets this error (the cause is chained)."""


class _Cancelled:
    """Queue sentinel: the request was cancelled, so its iteration ends quietly."""


_CANCELLED = _Cancelled()
_QueueItem = TokenEvent | BaseException | _Cancelled
# A picked token's log-probability and the top alternatives, for a row that asked for them.
_Logprobs = tuple[float, tuple[tuple[int, float], ...]]
_Call = tuple[Callable[[], Any], concurrent.futures.Future[Any]]


class _Request:
    """Engine-side state of one request. Scheduling fields belong to the engine thread."""

    __slots__ = (
        "cancelled",
        "done",
        "generated",
        "generator",
        "id",
        "last_token",
        "length",
        "loop",
        "params",
        "prompt_ids",
        "queue",
    )

    def __init__(
        self,
        request_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self.generator: torch.Generator | None = None
        # Written by any thread; a plain bool store is atomic, and the engine only reads it.
        self.cancelled = False
        self.done = False
        self.generated = 0
        self.last_token = 0
        # Real (non-padding) tokens of this request in the KV cache.
        self.length = 0


class RequestHandle:
    """A submitted request: iterate it (``async for``) for :class:`TokenEvent`s.

    Iteration ends after the event that carries a ``finish_reason``, or quietly after
    :meth:`cancel`; an engine failure is raised from the iteration as :class:`EngineStepError`
    (or :class:`EngineClosedError` when the engine shuts down first).
    """

    def __init__(self, engine: BatchingEngine, request: _Request) -> None:
        self._engine = engine
        self._request = request
        self._finished = False

    @property
    def id(self) -> int:
        """The engine-wide request number."""
        return self._request.id

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens."""
        return len(self._request.prompt_ids)

    @property
    def finished(self) -> bool:
        """Whether the iteration has ended (last token seen, cancelled, or failed)."""
        return self._finished

    def cancel(self) -> None:
        """Abandon the request: its batch slot frees at the next step. Idempotent, thread-safe."""
        self._engine._cancel(self._request)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        item = await self._request.queue.get()
        if isinstance(item, _Cancelled):
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item


class _SlackLayer(DynamicLayer):
    """A KV-cache layer that appends into spare capacity instead of concatenating every step.

    ``keys``/``values`` are views of the filled part of larger buffers, so a decode step writes
    one column in place. Whenever the buffers are full, or ``keys``/``values`` were replaced from
    outside (the engine merges, selects and trims rows by assigning them), the next update copies
    the contents into fresh buffers with room to spare.
    """

    slack = 128

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._key_view: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        buffers_valid = self._key_view is not None and self.keys is self._key_view
        if not buffers_valid or self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._rebuild(key_states, value_states, length, end + self.slack)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        keys, values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        self.keys, self.values, self._key_view = keys, values, keys
        return keys, values

    def _rebuild(
        self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int
    ) -> None:
        batch, heads, _, key_dim = key_states.shape
        keys = key_states.new_empty((batch, heads, capacity, key_dim))
        values = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if length:
            keys[:, :, :length] = _tensor(self.keys)
            values[:, :, :length] = _tensor(self.values)
        self._key_buffer, self._value_buffer = keys, values


def _new_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlackLayer
    return cache


class BatchingEngine:
    """Serves concurrent generation requests on one model with continuous batching.

    ``model`` is a Hugging Face causal LM with full attention whose forward accepts
    ``attention_mask``, ``position_ids``, a ``DynamicCache`` and ``logits_to_keep``. The engine
    thread owns it from :meth:`start` until :meth:`close`; nothing else may run it meanwhile.
    :meth:`submit` and :meth:`RequestHandle.cancel` are thread-safe; :meth:`submit` must be called
    from a running event loop, which receives the tokens.
    """

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Iterable[int],
        context_length: int,
        pad_token_id: int = 0,
        max_batch_size: int = 8,
        num_threads: int | None = None,
        prefill_token_budget: int = 4096,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {num_threads}")
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.prefill_token_budget = prefill_token_budget
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: deque[_Call] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        # The running batch; touched by the engine thread only.
        self._rows: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self.steps = 0
        self.tokens_generated = 0

    @property
    def running(self) -> bool:
        """Whether the engine thread is serving requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def active(self) -> int:
        """Rows in the running batch (batch slots in use; a finished row leaves at the next
        step)."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        return len(self._waiting)

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine was closed and cannot be restarted")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="flywheel-local-engine", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the engine thread after its current step; pending requests get
        :class:`EngineClosedError`. Idempotent; blocks until the thread has exited."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._fail_waiting(EngineClosedError("the local model engine was closed"))

    def call(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Run ``fn`` on the engine thread between two steps; thread-safe.

        Other torch work in the process (a reference generation, an embedding model) belongs
        here: every thread that runs multi-threaded torch ops keeps its own OpenMP worker team,
        and with more teams than cores the engine's steps get several times slower.
        Await the result from asyncio with ``asyncio.wrap_future``.
        """
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._cond:
            if not self.running:
                raise EngineClosedError("the local model engine is not running")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; call from a running event loop, which receives its tokens."""
        loop = asyncio.get_running_loop()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; the context length is {self.context_length}"
            )
        request = _Request(next(self._ids), ids, params, loop)
        with self._cond:
            if not self.running:
                raise EngineClosedError("the local model engine is not running")
            self._waiting.append(request)
            self._cond.notify()
        return RequestHandle(self, request)

    def _cancel(self, request: _Request) -> None:
        if request.cancelled or request.done:
            return
        request.cancelled = True
        self._deliver(request, _CANCELLED)
        with self._cond:
            self._cond.notify()

    # -- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while True:
                work = self._next_work()
                if work is None:
                    break
                newcomers, calls = work
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:
                            future.set_exception(exc)
                if not newcomers and not self._rows:
                    continue
                try:
                    self._step(newcomers)
                except Exception as exc:
                    # A bug outside the guarded model calls: fail what is in flight, keep serving.
                    log.exception("local engine step crashed")
                    failed = self._rows + [r for r in newcomers if r not in self._rows]
                    self._fail(failed, exc)
                    self._reset_batch()
        closed = EngineClosedError("the local model engine was closed")
        self._fail(self._rows, closed)
        self._reset_batch()
        self._fail_waiting(closed)

    def _next_work(self) -> tuple[list[_Request], list[_Call]] | None:
        """Block until there is something to do; return the requests to admit now and the
        calls to run, or ``None`` when the engine is closing."""
        self._compact()
        with self._cond:
            while not (self._closing or self._waiting or self._rows or self._calls):
                self._cond.wait()
            if self._closing:
                return None
            calls = list(self._calls)
            self._calls.clear()
            newcomers: list[_Request] = []
            longest = 0
            free = self.max_batch_size - len(self._rows)
            while self._waiting and len(newcomers) < free:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    continue
                padded = max(longest, len(request.prompt_ids)) * (len(newcomers) + 1)
                if newcomers and padded > self.prefill_token_budget:
                    break
                longest = max(longest, len(request.prompt_ids))
                newcomers.append(self._waiting.popleft())
            return newcomers, calls

    def _step(self, newcomers: list[_Request]) -> None:
        if newcomers:
            try:
                self._prefill(newcomers)
            except Exception as exc:
                log.exception("local model prefill failed for %d request(s)", len(newcomers))
                self._fail(newcomers, exc)
        self._compact()
        if self._rows:
            try:
                self._decode()
            except Exception as exc:
                log.exception("local model decode failed for %d request(s)", len(self._rows))
                self._fail(self._rows, exc)
                self._reset_batch()
        self.steps += 1

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """One forward pass; returns float32 logits of the last position, shape [B, vocab]."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _prefill(self, newcomers: list[_Request]) -> None:
        width = max(len(r.prompt_ids) for r in newcomers)
        input_ids = torch.full((len(newcomers), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(newcomers), width), dtype=torch.bool)
        for i, request in enumerate(newcomers):
            n = len(request.prompt_ids)
            input_ids[i, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = True
        # Positions count real tokens only, so a left-padded row sees the positions it would alone.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, positions = (t.to(self.device) for t in (input_ids, mask, positions))
        cache = _new_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        for request in newcomers:
            request.length = len(request.prompt_ids)
            if request.generator is None:
                seed = request.params.seed
                generator = torch.Generator(device=self.device)
                # Any integer seeds the request; torch takes 64 bits, so wrap bigger/negative ones.
                generator.manual_seed(secrets.randbits(63) if seed is None else seed % 2**64)
                request.generator = generator
        tokens = self._sample(logits, newcomers)
        logprobs = self._logprobs(logits, newcomers, tokens)
        self._merge(cache, mask)
        self._rows.extend(newcomers)
        self._emit(newcomers, tokens, logprobs)

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None
        rows = self._rows
        input_ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        # A ready 4D mask [B, 1, q=1, T] skips the model's mask construction on every step; one
        # query per row is never fully masked, so no row can produce NaNs.
        logits = self._forward(
            input_ids.to(self.device),
            mask[:, None, None, :],
            positions.to(self.device),
            self._cache,
        )
        self._mask = mask
        for request in rows:
            request.length += 1
        tokens = self._sample(logits, rows)
        self._emit(rows, tokens, self._logprobs(logits, rows, tokens))

    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """Pick each row's next token: greedy rows by argmax, the others by inverse-CDF sampling
        with one uniform draw from the request's own generator (reproducible per seed)."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if r.params.temperature > 0]
        if not rows:
            return list(tokens.tolist())
        device = logits.device
        temperature = torch.tensor(
            [requests[i].params.temperature for i in rows], dtype=logits.dtype, device=device
        )
        probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)
        draws = torch.cat(
            [torch.rand(1, generator=requests[i].generator, device=device) for i in rows]
        )
        top_p = torch.tensor([requests[i].params.top_p for i in rows], device=device)
        nucleus = top_p < 1.0
        choice = torch.empty(len(rows), dtype=torch.long, device=device)
        if bool(nucleus.any()):
            part = nucleus.nonzero().squeeze(1)
            sorted_probs, order = probs[part].sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p, and always the likeliest token.
            outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[part, None]
            outside[:, 0] = False
            picked = _inverse_cdf(sorted_probs.masked_fill(outside, 0.0), draws[part])
            choice[part] = order.gather(1, picked[:, None]).squeeze(1)
        if not bool(nucleus.all()):
            part = (~nucleus).nonzero().squeeze(1)
            choice[part] = _inverse_cdf(probs[part], draws[part])
        tokens[rows] = choice
        return list(tokens.tolist())

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, requests: list[_Request], tokens: list[int]
    ) -> list[_Logprobs | None] | None:
        """Per row, the picked token's log-probability and the top alternatives; computed for
        the rows that asked only (``None`` when none did, the usual case: no extra work)."""
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs]
        if not wanted:
            return None
        device = logits.device
        rows = torch.tensor(wanted, dtype=torch.long, device=device)
        logp = torch.log_softmax(logits.index_select(0, rows), dim=-1)
        picked = torch.tensor([[tokens[i]] for i in wanted], dtype=torch.long, device=device)
        chosen: list[float] = logp.gather(1, picked).squeeze(1).tolist()
        k = max(requests[i].params.top_logprobs for i in wanted)
        top_values: list[list[float]] = [[] for _ in wanted]
        top_ids: list[list[int]] = [[] for _ in wanted]
        if k:
            values, ids = logp.topk(k, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        out: list[_Logprobs | None] = [None] * len(requests)
        for j, i in enumerate(wanted):
            n = requests[i].params.top_logprobs
            out[i] = (chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
        return out

    def _emit(
        self,
        requests: list[_Request],
        tokens: list[int],
        logprobs: list[_Logprobs | None] | None = None,
    ) -> None:
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if request.done or request.cancelled:
                continue
            request.generated += 1
            request.last_token = token
            self.tokens_generated += 1
            finish: FinishReason | None = None
            if token in self.eos_token_ids:
                finish = "stop"
            elif (
                request.generated >= request.params.max_tokens
                # The sequence fills the context: no position is left for another token.
                or request.length + 1 >= self.context_length
            ):
                finish = "length"
            if finish is not None:
                request.done = True
            scored = logprobs[i] if logprobs is not None else None
            event = (
                TokenEvent(token, finish)
                if scored is None
                else TokenEvent(token, finish, scored[0], scored[1])
            )
            self._deliver(request, event)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever is shorter."""
        if self._cache is None or self._mask is None or not self._rows:
            self._cache, self._mask = cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            old.keys = _concat_left_padded(_tensor(old.keys), _tensor(new.keys), width)
            old.values = _concat_left_padded(_tensor(old.values), _tensor(new.values), width)
        self._mask = torch.cat(
            [_left_pad(self._mask, width - old_len, dim=1), _left_pad(mask, width - new_len, dim=1)]
        )

    def _compact(self) -> None:
        """Drop finished and cancelled rows, then columns that are padding in every row."""
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.cancelled)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).to(torch.int8).argmax().item())
        for layer in _layers(self._cache):
            layer.keys = _tensor(layer.keys).index_select(0, index)[:, :, first:, :]
            layer.values = _tensor(layer.values).index_select(0, index)[:, :, first:, :]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]

    def _reset_batch(self) -> None:
        self._rows = []
        self._cache = None
        self._mask = None

    def _fail(self, requests: Iterable[_Request], exc: BaseException) -> None:
        for request in requests:
            if request.done or request.cancelled:
                continue
            request.done = True
            error: BaseException = exc
            if not isinstance(exc, EngineClosedError):
                error = EngineStepError(f"local model step failed: {exc}")
                error.__cause__ = exc
            self._deliver(request, error)

    def _fail_waiting(self, exc: EngineClosedError) -> None:
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        self._fail(pending, exc)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    @staticmethod
    def _deliver(request: _Request, item: _QueueItem) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
        except RuntimeError:
            # The consumer's event loop is closed: nobody is listening any more.
            request.cancelled = True


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # Every layer is a DynamicLayer: the engine builds its caches with _SlackLayer only.
    return cast(list[DynamicLayer], cache.layers)


def _tensor(value: Any) -> torch.Tensor:
    return cast(torch.Tensor, value)


def _inverse_cdf(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the cumulative mass first exceeds ``draw`` x the row's total."""
    cdf = probs.cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)
    # A draw rounding up to the full mass lands past the end: take the likeliest token instead.
    return torch.where(picked < probs.shape[-1], picked, probs.argmax(dim=-1))


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _concat_left_padded(old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    """Stack two [B, heads, T, head_dim] caches on the batch axis, right-aligned to ``width``."""
    batch = old.shape[0] + new.shape[0]
    out = old.new_zeros((batch, old.shape[1], width, old.shape[3]))
    out[: old.shape[0], :, width - old.shape[2] :, :] = old
    out[old.shape[0] :, :, width - new.shape[2] :, :] = new
    return out
