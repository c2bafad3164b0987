"""The gateway's response cache: routes opt in with a ``cache:`` block (see
:class:`~flywheel.config.schema.RouteCacheConfig`).

* **exact**: the key is a hash of the canonical request as the model gets it (the route's
  settings, the model, the messages after retrieval, prompt rendering and input guards, and
  every parameter but ``stream``, ``stream_options`` and ``user``).
* **semantic**: an exact miss then looks for a stored answer whose last user message is a
  paraphrase: cosine similarity of MiniLM embeddings at least the route's ``similarity``,
  with everything else (system prompt, earlier turns, parameters, and the numbers in the
  last message, which embeddings barely tell apart) matching exactly. Brute force over a
  bounded set per route and project (numpy).

Answers are scoped per route *and project*: one project never sees another's answers.

Storage is in-process (:class:`MemoryCacheStore`, LRU with TTL) by default, or Redis
(:class:`RedisCacheStore`) when ``FLYWHEEL_REDIS_URL`` is set, so replicas share answers.
A store failure never fails a call: :class:`RouteCache` turns it into a miss, logs it,
counts it, and leaves the store alone for a few seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from flywheel.config import RouteConfig
from flywheel.config.schema import RouteCacheConfig

if TYPE_CHECKING:
    from flywheel.gateway.schemas import ChatCompletionRequest
    from flywheel.tracing.metrics import GatewayMetrics

log = logging.getLogger("flywheel.gateway.cache")
T = TypeVar("T")

CACHE_HEADER = "x-flywheel-cache"
HIT, MISS, BYPASS = "hit", "miss", "bypass"
# Parameters that do not change the answer: left out of the key.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})
# Answers with these endings are complete and worth serving again.
_COMPLETE = frozenset({"stop", "length"})
# OpenAI's default when a request sets no temperature.
DEFAULT_TEMPERATURE = 1.0
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# After a store error, the cache is skipped (calls are misses) for this long.
STORE_BACKOFF_S = 5.0
# A store call that takes longer than this counts as failed.
STORE_TIMEOUT_S = 1.0
# Semantic candidates tried per lookup (a stale one, purged elsewhere, falls through).
CANDIDATES = 3

# text -> unit vector, or None when the text cannot be embedded whole.
Embed = Callable[[str], "np.ndarray | None"]


def cache_directives(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """(may read the cache, may store the answer) from the request's headers:
    ``Cache-Control: no-cache`` skips the lookup but stores the fresh answer,
    ``no-store`` and ``x-flywheel-cache: bypass`` do neither."""
    control = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    if "no-store" in control or headers.get(CACHE_HEADER, "").strip().lower() == BYPASS:
        return False, False
    if "no-cache" in control:
        return False, True
    return True, True


def _digest(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).digest()


def _tag(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def route_fingerprint(route: RouteConfig) -> str:
    """What of a route shapes its answers: a changed target, fallback, prompt, retrieval or
    guard makes older answers unreachable (they expire with their TTL)."""
    shape = route.model_dump(
        mode="json", exclude={"cache", "description", "drift", "online_eval", "capture"}
    )
    return _digest(shape).hex()[:16]


@dataclass(frozen=True)
class Scope:
    """Where a route's answers for one project live."""

    route: str
    project: str

    @property
    def route_tag(self) -> str:
        return _tag(self.route)

    @property
    def project_tag(self) -> str:
        return _tag(self.project)

    @property
    def tag(self) -> str:
        return f"{self.route_tag}:{self.project_tag}"


@dataclass
class CachePlan:
    """What the cache does for one call: where to look, under which key, and the outcome."""

    config: RouteCacheConfig
    scope: Scope
    status: str
    lookup: bool
    store: bool
    key: str = ""
    context: int = 0
    text: str | None = None
    reason: str | None = None
    vector: np.ndarray | None = None
    similarity: float | None = None
    source_trace_id: str | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """The span attributes that say what the cache did."""
        out: dict[str, Any] = {
            "flywheel.cache": self.status,
            "flywheel.cache.mode": self.config.mode,
        }
        if self.reason:
            out["flywheel.cache.bypass_reason"] = self.reason
        if self.similarity is not None:
            out["flywheel.cache.similarity"] = round(self.similarity, 4)
        if self.source_trace_id:
            out["flywheel.cache.source_trace_id"] = self.source_trace_id
        return out


def uncacheable(config: RouteCacheConfig, params: Mapping[str, Any]) -> str | None:
    """Why a request must not use the cache, or None."""
    if not config.cache_tools and (params.get("tools") or params.get("functions")):
        return "tools"
    temperature = params.get("temperature")
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    if temperature > config.max_temperature:
        return "temperature"
    if int(params.get("n") or 1) > 1:
        return "n"
    return None


def _question(messages: list[Any]) -> str | None:
    """The last message's text when it is the user's (text parts only), else None."""
    if not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "\n".join(p["text"] for p in content)
    return None


def cacheable_answer(response: Mapping[str, Any], config: RouteCacheConfig) -> bool:
    """Whether a finished answer may be stored: complete choices, and tool calls only when
    the route caches tools."""
    choices = response.get("choices") or []
    if not choices:
        return False
    for choice in choices:
        finish = choice.get("finish_reason")
        message = choice.get("message") or {}
        if finish == "tool_calls" or message.get("tool_calls"):
            if not config.cache_tools:
                return False
        elif finish not in _COMPLETE:
            return False
    return True


# -- vectors --------------------------------------------------------------------------------


class VectorIndex:
    """At most ``capacity`` unit vectors with a context id and an expiry each, in a ring
    (the oldest is overwritten first); searched by brute force."""

    def __init__(self, capacity: int, dim: int = 384) -> None:
        self.capacity = capacity
        self.dim = dim
        size = min(capacity, 64)
        self._vectors = np.zeros((size, dim), np.float32)
        self._contexts = np.zeros(size, np.int64)
        self._expires = np.zeros(size, np.float64)  # 0: an empty slot
        self._keys: list[str | None] = [None] * size
        self._slots: dict[str, int] = {}
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return len(self._slots)

    def _grow(self) -> None:
        size = min(self.capacity, 2 * len(self._keys))
        extra = size - len(self._keys)
        self._vectors = np.vstack([self._vectors, np.zeros((extra, self.dim), np.float32)])
        self._contexts = np.concatenate([self._contexts, np.zeros(extra, np.int64)])
        self._expires = np.concatenate([self._expires, np.zeros(extra, np.float64)])
        self._keys += [None] * extra

    def add(self, key: str, vector: np.ndarray, context: int, expires: float) -> None:
        self.discard(key)
        if self._next >= len(self._keys) and len(self._keys) < self.capacity:
            self._grow()
        slot = self._next % self.capacity
        old = self._keys[slot]
        if old is not None:
            self._slots.pop(old, None)
        self._vectors[slot] = vector
        self._contexts[slot] = context
        self._expires[slot] = expires
        self._keys[slot] = key
        self._slots[key] = slot
        self._next = slot + 1
        self._filled = max(self._filled, slot + 1)

    def discard(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._keys[slot] = None
            self._expires[slot] = 0.0

    def search(
        self, vector: np.ndarray, context: int, threshold: float, now: float, limit: int
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` live keys of the same context with similarity >= ``threshold``,
        best first."""
        n = self._filled
        if n == 0:
            return []
        scores = self._vectors[:n] @ vector.astype(np.float32)
        live = (self._contexts[:n] == context) & (self._expires[:n] > now)
        found = np.flatnonzero(live & (scores >= threshold))
        best = found[np.argsort(-scores[found])][:limit]
        return [(k, float(scores[i])) for i in best if (k := self._keys[i]) is not None]

    def resized(self, capacity: int) -> VectorIndex:
        """A copy holding the newest ``capacity`` entries."""
        copy = VectorIndex(capacity, self.dim)
        order = sorted(self._slots.items(), key=lambda item: (item[1] - self._next) % self.capacity)
        for key, slot in order[-capacity:]:
            copy.add(key, self._vectors[slot], int(self._contexts[slot]), self._expires[slot])
        return copy


# -- stores ---------------------------------------------------------------------------------


class CacheStore(Protocol):
    """Where answers live: in this process or in Redis."""

    async def get(self, scope: Scope, key: str) -> str | None: ...

    async def put(
        self,
        scope: Scope,
        key: str,
        value: str,
        ttl: float,
        max_entries: int,
        vector: np.ndarray | None = None,
        context: int = 0,
    ) -> None: ...

    async def similar(
        self,
        scope: Scope,
        vector: np.ndarray,
        context: int,
        threshold: float,
        max_entries: int,
    ) -> list[tuple[str, float]]: ...

    async def forget(self, scope: Scope, key: str) -> None: ...

    async def count(self, scope: Scope, result: str) -> None: ...

    async def stats(self, scope: Scope) -> dict[str, int]: ...

    async def purge(self, route: str, project: str | None) -> int: ...

    async def aclose(self) -> None: ...


class MemoryCacheStore:
    """Answers in this process: per route and project an LRU of at most ``max_entries``,
    each expiring after its TTL."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, OrderedDict[str, tuple[float, str]]] = {}
        self._vectors: dict[str, VectorIndex] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._scopes: dict[str, set[str]] = {}  # route tag -> scope tags

    async def get(self, scope: Scope, key: str) -> str | None:
        entries = self._entries.get(scope.tag)
        item = entries.get(key) if entries is not None else None
        if item is None or entries is None:
            return None
        if item[0] <= self._clock():
            del entries[key]
            return None
        entries.move_to_end(key)
        return item[1]

    async def put(
        self,
        scope: Scope,
        key: str,
        value: str,
        ttl: float,
        max_entries: int,
        vector: np.ndarray | None = None,
        context: int = 0,
    ) -> None:
        expires = self._clock() + ttl
        entries = self._entries.setdefault(scope.tag, OrderedDict())
        self._scopes.setdefault(scope.route_tag, set()).add(scope.tag)
        entries[key] = (expires, value)
        entries.move_to_end(key)
        index = self._vectors.get(scope.tag)
        while len(entries) > max_entries:
            old, _ = entries.popitem(last=False)
            if index is not None:
                index.discard(old)
        if vector is not None:
            if index is None or index.capacity != max_entries:
                index = index.resized(max_entries) if index else VectorIndex(max_entries)
                self._vectors[scope.tag] = index
            index.add(key, vector, context, expires)

    async def similar(
        self,
        scope: Scope,
        vector: np.ndarray,
        context: int,
        threshold: float,
        max_entries: int,
    ) -> list[tuple[str, float]]:
        index = self._vectors.get(scope.tag)
        if index is None:
            return []
        return index.search(vector, context, threshold, self._clock(), CANDIDATES)

    async def forget(self, scope: Scope, key: str) -> None:
        index = self._vectors.get(scope.tag)
        if index is not None:
            index.discard(key)

    async def count(self, scope: Scope, result: str) -> None:
        self._counts.setdefault(scope.tag, Counter())[result] += 1

    async def stats(self, scope: Scope) -> dict[str, int]:
        counts = self._counts.get(scope.tag, Counter())
        now = self._clock()
        live = sum(1 for e, _ in self._entries.get(scope.tag, {}).values() if e > now)
        return {
            "hits": counts[HIT],
            "misses": counts[MISS],
            "bypassed": counts[BYPASS],
            "entries": live,
        }

    async def purge(self, route: str, project: str | None) -> int:
        route_tag = _tag(route)
        if project is None:
            tags = self._scopes.pop(route_tag, set())
        else:
            tags = {Scope(route, project).tag}
            self._scopes.get(route_tag, set()).discard(Scope(route, project).tag)
        removed = 0
        for tag in tags:
            removed += len(self._entries.pop(tag, {}))
            self._vectors.pop(tag, None)
        return removed

    async def aclose(self) -> None:
        return None


# Store an answer, index it for LRU eviction and (semantic) append its vector to the
# scope's stream. KEYS: entry, index, stream, projects. ARGV: value, ttl ms, now ms,
# max entries, project tag, vector bytes ('' for none), context, expiry ms.
_PUT_LUA = """
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local max = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local excess = redis.call('ZCARD', KEYS[2]) - max
while excess > 0 do
  local n = math.min(excess, 500)
  local old = redis.call('ZRANGE', KEYS[2], 0, n - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - 1)
  redis.call('UNLINK', unpack(old))
  excess = excess - n
end
redis.call('PEXPIRE', KEYS[2], ttl)
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', max, '*', 'k', KEYS[1], 'v', ARGV[6], 'c', ARGV[7],
    'x', ARGV[8])
  redis.call('PEXPIRE', KEYS[3], ttl)
end
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('PEXPIRE', KEYS[4], math.max(ttl, 2592000000))
return 1
"""

# Read an answer and mark it used (LRU). KEYS: entry, index. ARGV: now ms.
_GET_LUA = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], KEYS[1]) end
return value
"""

# Counters live 30 days after their last use.
_COUNTER_TTL_S = 30 * 86_400
# Scope mirrors (semantic vectors) a replica keeps; the least recently used go first.
MAX_MIRRORS = 256


@dataclass
class _Mirror:
    """This replica's copy of a scope's vectors, read incrementally from its stream."""

    index: VectorIndex
    last_id: bytes = b""


class RedisCacheStore:
    """Answers shared by every replica through one Redis server (not Redis Cluster).

    Keys (``prefix`` first; scope = route tag : project tag): ``e:{scope}:{key}`` an answer
    with its TTL; ``i:{scope}`` the scope's answers by last use, to evict the least
    recently used beyond ``max_entries``; ``v:{scope}`` a stream of the semantic vectors
    (capped at ``max_entries``), which each replica mirrors in memory and searches by
    brute force, reading only what is new each time; ``n:{scope}`` hit and miss counts;
    ``s:{route tag}`` the project tags of a route, for a purge across projects.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "flywheel:cache:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio as aioredis  # optional dependency: only needed with Redis

        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=STORE_TIMEOUT_S, socket_connect_timeout=STORE_TIMEOUT_S
        )
        self._prefix = prefix
        self._clock = clock
        self._put = self._redis.register_script(_PUT_LUA)
        self._get = self._redis.register_script(_GET_LUA)
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()

    def _key(self, part: str, scope: Scope, key: str | None = None) -> str:
        return f"{self._prefix}{part}:{scope.tag}" + (f":{key}" if key is not None else "")

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def get(self, scope: Scope, key: str) -> str | None:
        keys = [self._key("e", scope, key), self._key("i", scope)]
        value = await self._get(keys=keys, args=[self._now_ms()])
        return value.decode() if value is not None else None

    async def put(
        self,
        scope: Scope,
        key: str,
        value: str,
        ttl: float,
        max_entries: int,
        vector: np.ndarray | None = None,
        context: int = 0,
    ) -> None:
        now = self._now_ms()
        ttl_ms = max(1, int(ttl * 1000))
        blob = vector.astype(np.float32).tobytes() if vector is not None else b""
        keys = [
            self._key("e", scope, key),
            self._key("i", scope),
            self._key("v", scope),
            f"{self._prefix}s:{scope.route_tag}",
        ]
        args: list[Any] = [
            value,
            ttl_ms,
            now,
            max_entries,
            scope.project_tag,
            blob,
            context,
            now + ttl_ms,
        ]
        await self._put(keys=keys, args=args)

    def _mirror(self, scope: Scope, max_entries: int) -> _Mirror:
        mirror = self._mirrors.get(scope.tag)
        if mirror is None:
            mirror = self._mirrors[scope.tag] = _Mirror(VectorIndex(max_entries))
            while len(self._mirrors) > MAX_MIRRORS:
                self._mirrors.popitem(last=False)
        elif mirror.index.capacity != max_entries:
            mirror.index = mirror.index.resized(max_entries)
        self._mirrors.move_to_end(scope.tag)
        return mirror

    async def similar(
        self,
        scope: Scope,
        vector: np.ndarray,
        context: int,
        threshold: float,
        max_entries: int,
    ) -> list[tuple[str, float]]:
        mirror = self._mirror(scope, max_entries)
        stream = self._key("v", scope)
        prefix = self._key("e", scope, "")
        while True:
            start = b"(" + mirror.last_id if mirror.last_id else b"-"
            rows = await self._redis.xrange(stream, min=start, max=b"+", count=1000)
            for entry_id, fields in rows:
                mirror.last_id = entry_id
                full = fields[b"k"].decode()
                if not full.startswith(prefix):
                    continue
                mirror.index.add(
                    full[len(prefix) :],
                    np.frombuffer(fields[b"v"], dtype=np.float32),
                    int(fields[b"c"]),
                    int(fields[b"x"]) / 1000,
                )
            if len(rows) < 1000:
                break
        return mirror.index.search(vector, context, threshold, self._clock(), CANDIDATES)

    async def forget(self, scope: Scope, key: str) -> None:
        mirror = self._mirrors.get(scope.tag)
        if mirror is not None:
            mirror.index.discard(key)

    async def count(self, scope: Scope, result: str) -> None:
        name = self._key("n", scope)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(name, result, 1)
            pipe.expire(name, _COUNTER_TTL_S)
            await pipe.execute()

    async def stats(self, scope: Scope) -> dict[str, int]:
        # Entries: answers indexed for the scope (an expired one leaves the index at the
        # scope's next store).
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("n", scope))
            pipe.zcard(self._key("i", scope))
            counts, entries = await pipe.execute()
        counts = {k.decode(): int(v) for k, v in counts.items()}
        return {
            "hits": counts.get(HIT, 0),
            "misses": counts.get(MISS, 0),
            "bypassed": counts.get(BYPASS, 0),
            "entries": int(entries),
        }

    async def purge(self, route: str, project: str | None) -> int:
        route_tag = _tag(route)
        projects_key = f"{self._prefix}s:{route_tag}"
        if project is None:
            tags = [t.decode() for t in await self._redis.smembers(projects_key)]
        else:
            tags = [_tag(project)]
        removed = 0
        for project_tag in tags:
            tag = f"{route_tag}:{project_tag}"
            index = f"{self._prefix}i:{tag}"
            members = await self._redis.zrange(index, 0, -1)
            for at in range(0, len(members), 500):
                await self._redis.unlink(*members[at : at + 500])
            await self._redis.unlink(index, f"{self._prefix}v:{tag}")
            await self._redis.srem(projects_key, project_tag)
            self._mirrors.pop(tag, None)
            removed += len(members)
        return removed

    async def aclose(self) -> None:
        await self._redis.aclose()


def make_cache_store(redis_url: str | None) -> CacheStore:
    """A :class:`RedisCacheStore` when ``redis_url`` is set (replicas share it), else one
    in this process."""
    return RedisCacheStore(redis_url) if redis_url else MemoryCacheStore()


def minilm_vector(text: str) -> np.ndarray | None:
    """The unit MiniLM embedding of ``text``, or None when the text is longer than the
    model reads (it would be truncated, and two texts that differ only past the cut would
    look identical)."""
    from flywheel.providers import minilm

    model = minilm.load_minilm()
    with minilm._encode_lock:  # the fast tokenizer is not thread-safe (see minilm)
        tokens = len(model.tokenizer(text, truncation=False, verbose=False)["input_ids"])
    if tokens > int(model.max_seq_length or 256):
        return None
    return np.asarray(minilm.embed([text])[0], dtype=np.float32)


# -- the cache ------------------------------------------------------------------------------


class RouteCache:
    """Plans, looks up and stores a route's answers in a :class:`CacheStore`; a failing store
    is a miss, never an error."""

    def __init__(self, store: CacheStore | None = None, embed: Embed | None = None) -> None:
        self.store: CacheStore = store if store is not None else MemoryCacheStore()
        self.embed: Embed = embed or minilm_vector
        self.metrics: GatewayMetrics | None = None
        self._down_until = 0.0
        self._last_warning = 0.0

    # -- failures ----------------------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + STORE_BACKOFF_S
        if self.metrics is not None:
            self.metrics.cache_error(operation)
        if now - self._last_warning > 60:
            self._last_warning = now
            log.warning(
                "response cache %s failed (%s: %s); calls skip the cache for %g s",
                operation,
                type(exc).__name__,
                exc,
                STORE_BACKOFF_S,
            )

    # -- planning ----------------------------------------------------------------------------

    def plan(
        self,
        route: RouteConfig,
        fingerprint: str,
        project_id: str,
        request: ChatCompletionRequest,
        *,
        lookup: bool = True,
        store: bool = True,
    ) -> CachePlan | None:
        """What the cache does for ``request`` (as the model gets it) on ``route``; None
        when the route has no cache."""
        config = route.cache
        if config is None:
            return None
        scope = Scope(route.name, project_id)
        params = request.params
        reason = uncacheable(config, params) or (None if lookup or store else "client")
        if reason is not None:
            return CachePlan(config, scope, BYPASS, False, False, reason=reason)
        shape = {k: v for k, v in params.items() if k not in _NOT_IN_KEY}
        shape["model"] = request.model
        key = _digest({"route": fingerprint, "request": shape}).hex()
        # ``Cache-Control: no-cache`` (store but do not read) is a bypass that refreshes.
        plan = CachePlan(
            config,
            scope,
            MISS if lookup else BYPASS,
            lookup,
            store,
            key=key,
            reason=None if lookup else "client",
        )
        if config.mode == "semantic":
            messages = list(params.get("messages") or [])
            text = _question(messages)
            if text is not None and text.strip():
                # Everything but the last message's wording must match exactly, numbers
                # included: embeddings barely tell "5 km" from "50 km".
                context = {**shape, "messages": messages[:-1], "numbers": _NUMBER.findall(text)}
                digest = _digest({"route": fingerprint, "context": context})
                plan.text = text
                plan.context = int.from_bytes(digest[:8], "big", signed=True)
        return plan

    # -- lookup and store --------------------------------------------------------------------

    async def _guarded(
        self, operation: str, method: Callable[..., Awaitable[T]], *args: Any
    ) -> T | None:
        """``await method(*args)``; None when the store is failing, or fails now."""
        if not self._available():
            return None
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await method(*args)
        except Exception as exc:
            self._failed(operation, exc)
            return None

    async def _vector(self, plan: CachePlan) -> np.ndarray | None:
        if plan.text is None:
            return None
        if plan.vector is None:
            try:
                plan.vector = await asyncio.to_thread(self.embed, plan.text)
            except Exception as exc:
                log.warning("cannot embed for the semantic cache: %s", exc)
                plan.text = None
                return None
            if plan.vector is None:
                plan.text = None  # too long to embed whole: exact matches only
        return plan.vector

    async def lookup(self, plan: CachePlan) -> dict[str, Any] | None:
        """A stored answer for the plan's request (exact, then semantic), or None."""
        if not plan.lookup:
            return None
        store, scope = self.store, plan.scope
        value = await self._guarded("get", store.get, scope, plan.key)
        if value is None and plan.text is not None and self._available():
            vector = await self._vector(plan)
            if vector is not None:
                threshold = plan.config.similarity
                candidates = await self._guarded(
                    "search",
                    store.similar,
                    scope,
                    vector,
                    plan.context,
                    threshold,
                    plan.config.max_entries,
                )
                for key, score in candidates or []:
                    value = await self._guarded("get", store.get, scope, key)
                    if value is not None:
                        plan.similarity = score
                        break
                    await store.forget(scope, key)  # purged or evicted elsewhere
        if value is None:
            return None
        try:
            entry = json.loads(value)
        except ValueError:
            return None
        response = entry.get("response") if isinstance(entry, dict) else None
        if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
            return None
        plan.status = HIT
        plan.source_trace_id = entry.get("trace_id")
        return entry

    async def save(
        self, plan: CachePlan, response: Mapping[str, Any], *, model: str | None, trace_id: str
    ) -> bool:
        """Store a finished answer (when the plan and the answer allow); whether it was."""
        if not plan.store or plan.status == HIT or not cacheable_answer(response, plan.config):
            return False
        vector = await self._vector(plan) if plan.text is not None else None
        entry = {"response": response, "model": model, "trace_id": trace_id, "at": time.time()}
        value = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
        config, store = plan.config, self.store
        done = await self._guarded(
            "put",
            _stored,
            store,
            plan.scope,
            plan.key,
            value,
            config.ttl,
            config.max_entries,
            vector if plan.text is not None else None,
            plan.context,
        )
        return bool(done)

    async def count(self, plan: CachePlan) -> None:
        """Count the plan's outcome for the route's hit rate (shared through the store)."""
        await self._guarded("count", self.store.count, plan.scope, plan.status)

    # -- administration ----------------------------------------------------------------------

    async def stats(self, route: str, project_id: str) -> dict[str, Any]:
        """Hits, misses, bypassed calls, the hit rate and live entries of a route in a
        project; raises when the store cannot answer."""
        counts = await self.store.stats(Scope(route, project_id))
        looked = counts["hits"] + counts["misses"]
        return {**counts, "hit_rate": counts["hits"] / looked if looked else None}

    async def purge(self, route: str, project_id: str | None) -> int:
        """Drop a route's answers in one project (every project with None); how many."""
        return await self.store.purge(route, project_id)

    async def aclose(self) -> None:
        await self.store.aclose()


async def _stored(store: CacheStore, *args: Any) -> bool:
    await store.put(*args)
    return True


__all__ = [
    "BYPASS",
    "CACHE_HEADER",
    "HIT",
    "MISS",
    "CachePlan",
    "CacheStore",
    "MemoryCacheStore",
    "RedisCacheStore",
    "RouteCache",
    "Scope",
    "VectorIndex",
    "cache_directives",
    "make_cache_store",
    "minilm_vector",
    "route_fingerprint",
]
