"""Per-key and per-project limits and budgets: admission before a model call, settlement after.

A request names several :class:`Subject` s (the calling API key and its project). ``acquire``
admits it against every subject's :class:`Limits` at once, all or nothing, and returns a
:class:`Reservation`; ``settle`` replaces the reservation with the actual usage; ``release``
drops it when the call failed before using anything.

Algorithms (both implementations run the same ones, so they refuse the same requests):

* **rpm** is a sliding-window *log*: the admission times of the last 60 s are kept and a
  request is admitted while fewer than ``rpm`` fall in ``(now - 60, now]``. It is exact: no
  60-second window ever holds more than ``rpm`` admissions (GCRA with a burst of ``rpm``
  would allow close to ``2 * rpm``). Memory is at most ``rpm`` timestamps per subject. The
  admission is a request made, so ``release`` does not give it back.
* **tpm** counts tokens in one-second buckets. Tokens recorded in the second starting at
  ``b`` count until ``b + 61``, so any 60-second window sees all of them (never more than
  ``tpm`` in a window, at the price of up to one extra second of waiting). ``acquire``
  records ``est_tokens`` now; ``settle`` takes them back and records the actual tokens at
  settlement time, so a long stream counts where its tokens were produced.
* **max_concurrent** is a counter of leases: each slot expires ``lease_s`` after admission
  unless settled or released first, so a crashed replica cannot hold slots forever.
* **budget** (USD per UTC calendar day or month) is a hard stop with bounded overshoot: a
  request is admitted only if ``spent < budget`` and ``spent + reserved + est_cost <=
  budget``, where ``reserved`` is the sum of the estimates of requests in flight (leases
  too). With a conservative ``est_cost`` (an upper bound) the budget is never overshot; a
  call that costs more than its estimate overshoots by the difference, and once ``spent``
  reaches the budget every request is refused until the period resets.
  Money is counted in integer nano-dollars so sums are exact and both stores agree.
  Spend is charged to the period the request was admitted in.

Limits are read from the subjects on every call, so a changed limit applies at once.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BudgetAlert",
    "InProcessLimiter",
    "LimitExceeded",
    "Limiter",
    "Limits",
    "RedisLimiter",
    "Reservation",
    "SpentLoader",
    "Subject",
    "SubjectReservation",
    "make_limiter",
    "period_bounds",
]

BudgetPeriod = Literal["day", "month"]
SubjectKind = Literal["key", "project"]
LimitKind = Literal["rpm", "tpm", "concurrency", "budget"]
SpentLoader = Callable[["Subject", float], float]
"""``spent_loader(subject, period_start)``: USD already spent this period (read from traces)."""

WINDOW_S = 60.0
TOKEN_BUCKETS = 61  # one-second buckets that count towards tpm; see the module docstring
DEFAULT_LEASE_S = 600.0
RETRY_SHORTLY_S = 1.0  # hint when a slot or in-flight budget frees once a running call ends
_NANO = 1_000_000_000  # money is kept in integer nano-dollars
_DAY_S = 86_400
_ATTEMPTS = 5  # seeding or a period boundary can each need one more pass over the store


class Limits(BaseModel):
    """The limits of one subject; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, gt=0, description="Requests per minute.")
    tpm: int | None = Field(default=None, gt=0, description="Tokens per minute.")
    max_concurrent: int | None = Field(default=None, gt=0, description="Requests in flight.")
    budget_usd: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="USD per budget period."
    )
    budget_period: BudgetPeriod = Field(default="month", description="UTC calendar period.")
    soft_pct: float = Field(
        default=0.8, gt=0, le=1, description="Share of the budget that raises a soft alert."
    )


@dataclass(frozen=True)
class Subject:
    """Something limits apply to: an API key or a project, with its current limits."""

    kind: SubjectKind
    id: str
    limits: Limits
    key: str = field(init=False, repr=False, compare=False)
    """Storage key, ``"<kind>:<id>"``, e.g. ``"key:abc"``."""

    def __post_init__(self) -> None:
        if self.kind not in ("key", "project"):
            raise ValueError(f"subject kind must be 'key' or 'project', not {self.kind!r}")
        object.__setattr__(self, "key", f"{self.kind}:{self.id}")


class LimitExceeded(Exception):
    """A request was refused; the gateway answers 429 with ``message`` and ``Retry-After``.

    ``retry_after`` is in seconds; ``None`` when waiting cannot help (the request alone is
    bigger than the limit). For a used-up budget it runs until the period resets, and
    ``exhausted`` is true; a budget held only by requests in flight says "retry shortly".
    """

    def __init__(
        self,
        kind: LimitKind,
        subject: str,
        message: str,
        retry_after: float | None,
        *,
        exhausted: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind: LimitKind = kind
        self.subject = subject
        self.message = message
        self.retry_after = retry_after
        self.exhausted = exhausted


@dataclass(frozen=True)
class BudgetAlert:
    """Spend crossed ``soft_pct`` of the budget; returned once per subject per period."""

    subject: str
    spent: float
    budget: float
    period: str

    @property
    def message(self) -> str:
        pct = 100 * self.spent / self.budget
        return (
            f"{_describe(self.subject)} has spent {_usd(self.spent)} of its "
            f"{_usd(self.budget)} budget for {self.period} ({pct:.0f}%)."
        )


@dataclass
class SubjectReservation:
    """What one admission holds for one subject."""

    subject: Subject
    tokens: int = 0
    """Estimated tokens recorded against tpm (0 without a tpm limit)."""
    tokens_at: int | None = None
    """The one-second bucket the tokens were recorded in; ``None`` without a tpm limit."""
    cost: float = 0.0
    """Estimated USD held against the budget (0 without a budget)."""
    slot: bool = False
    """Whether a concurrency slot was taken."""
    period: str | None = None
    """Budget period key, ``"2026-11"`` or ``"2026-11-30"``; ``None`` without a budget."""
    resets_at: float | None = None
    """When that budget period ends (Unix time)."""


@dataclass
class Reservation:
    """One admitted request: what it holds per subject until settled or released."""

    id: str
    admitted_at: float
    subjects: list[SubjectReservation]
    done: bool = False
    """Set once settled or released; a second settle or release does nothing."""


@runtime_checkable
class Limiter(Protocol):
    """Admission control for the gateway; see the module docstring for the semantics."""

    async def acquire(
        self, subjects: Sequence[Subject], est_tokens: int, est_cost: float
    ) -> Reservation:
        """Admit a request against every subject or raise :class:`LimitExceeded`."""
        ...

    async def settle(self, reservation: Reservation, tokens: int, cost: float) -> list[BudgetAlert]:
        """Replace the reservation by actual usage; return soft alerts crossed just now."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose call failed before using anything."""
        ...

    async def spend(self, subject: Subject) -> float:
        """USD spent by ``subject`` in its current budget period (0.0 without a budget)."""
        ...

    async def aclose(self) -> None:
        """Free connections."""
        ...


def period_bounds(period: BudgetPeriod, now: float) -> tuple[float, float]:
    """Start and end (Unix time) of the UTC calendar day or month that contains ``now``."""
    day = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1)
    elif period == "month":
        start = datetime(day.year, day.month, 1, tzinfo=UTC)
        end = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    else:
        raise ValueError(f"budget period must be 'day' or 'month', not {period!r}")
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True)
class _Period:
    id: str
    start: float
    end: float


class _Periods:
    """The current period of each kind, recomputed only when ``now`` leaves it (hot path)."""

    def __init__(self) -> None:
        self._current: dict[str, _Period] = {}

    def get(self, period: BudgetPeriod, now: float) -> _Period:
        cached = self._current.get(period)
        if cached is not None and cached.start <= now < cached.end:
            return cached
        start, end = period_bounds(period, now)
        fmt = "%Y-%m-%d" if period == "day" else "%Y-%m"
        found = _Period(datetime.fromtimestamp(start, UTC).strftime(fmt), start, end)
        self._current[period] = found
        return found


def _nanos(usd: float) -> int:
    return round(usd * _NANO)


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount == 0 or abs(amount) >= 0.01 else f"${amount:.2g}"


def _describe(subject_key: str) -> str:
    kind, _, ident = subject_key.partition(":")
    return f"{kind} '{ident}'"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_usage(tokens: int, cost: float) -> None:
    if tokens < 0 or cost < 0 or not math.isfinite(cost):
        raise ValueError(f"tokens and cost must be finite and >= 0, got {tokens} and {cost}")


def _check_subjects(subjects: Sequence[Subject]) -> None:
    if len({s.key for s in subjects}) != len(subjects):
        raise ValueError("each subject may appear once per request")


def _outranks(retry: float, best: float) -> bool:
    """Which refusal to report: one that waiting cannot fix (< 0), else the longest wait."""
    return best >= 0 and (retry < 0 or retry > best)


def _refusal(
    subject: Subject,
    kind: str,
    retry: float,
    used: float,
    held: float,
    est_tokens: int,
    est_nano: int,
    period: _Period | None,
) -> LimitExceeded:
    """Build the exception for a refusal; ``used``/``held`` depend on ``kind`` (see callers)."""
    who = _describe(subject.key)
    lim = subject.limits
    retry_after = None if retry < 0 else max(retry, 0.0)
    wait = "" if retry_after is None else f"; retry in {math.ceil(retry_after)} s"
    if kind == "rpm":
        message = f"Rate limit of {lim.rpm} requests per minute for {who} reached{wait}."
        return LimitExceeded("rpm", subject.key, message, retry_after)
    if kind == "tpm":
        if retry_after is None:
            message = (
                f"This request needs up to {est_tokens} tokens, more than the limit of "
                f"{lim.tpm} tokens per minute for {who}; lower max_tokens."
            )
        else:
            message = (
                f"Token limit of {lim.tpm} tokens per minute for {who} reached "
                f"({int(used)} used, this request needs up to {est_tokens}){wait}."
            )
        return LimitExceeded("tpm", subject.key, message, retry_after)
    if kind == "concurrency":
        message = (
            f"Concurrency limit of {lim.max_concurrent} requests in flight for {who} reached; "
            "retry when one finishes."
        )
        return LimitExceeded("concurrency", subject.key, message, retry_after)
    assert lim.budget_usd is not None and period is not None
    budget, spent, reserved, est = (
        lim.budget_usd,
        used / _NANO,
        held / _NANO,
        est_nano / _NANO,
    )
    each = f"{_usd(budget)} per {lim.budget_period} for {who}"
    resets = f"it resets {_iso(period.end)}"
    exhausted = used >= _nanos(budget) or used + est_nano > _nanos(budget)
    if retry_after is None:
        message = (
            f"This request may cost up to {_usd(est)}, more than the budget of {each}; "
            "lower max_tokens or shorten the prompt."
        )
    elif used >= _nanos(budget):
        message = f"Budget of {each} is used up ({_usd(spent)} spent); {resets}."
    elif exhausted:
        message = (
            f"Budget of {each} has {_usd(budget - spent)} left ({_usd(spent)} spent) and this "
            f"request may cost up to {_usd(est)}; {resets}."
        )
    else:
        message = (
            f"Budget of {each} is held by requests in flight ({_usd(spent)} spent, "
            f"{_usd(reserved)} reserved) and this request may cost up to {_usd(est)}; "
            "retry shortly."
        )
    return LimitExceeded("budget", subject.key, message, retry_after, exhausted=exhausted)


class _SeedOnce:
    """Calls ``spent_loader`` once per subject and period, however many requests need it.

    Concurrent callers wait for the first one, which loads and installs the value. A store
    answers "not seeded" before it is asked again, so a caller passes ``stamp`` as it was
    *before* asking: a seed installed after that moment means "ask again", not "load again".
    """

    def __init__(self, loader: SpentLoader) -> None:
        self._loader = loader
        self._pending: dict[tuple[str, str], asyncio.Event] = {}
        self._installed: dict[str, tuple[str, int]] = {}  # subject key -> (period id, stamp)
        self.stamp = 0

    async def seed(
        self,
        subject: Subject,
        period: _Period,
        asked_at: int,
        install: Callable[[float], Awaitable[None]],
    ) -> None:
        """Load ``subject``'s spend for ``period`` and ``install`` it, unless done meanwhile."""
        installed = self._installed.get(subject.key)
        if installed is not None and installed[0] == period.id and installed[1] > asked_at:
            return
        token = (subject.key, period.id)
        pending = self._pending.get(token)
        if pending is not None:
            await pending.wait()
            return
        done = self._pending[token] = asyncio.Event()
        try:
            # The loader reads the database; keep it off the event loop.
            spent = await asyncio.to_thread(self._loader, subject, period.start)
            if not (math.isfinite(spent) and spent >= 0):
                raise ValueError(f"spent_loader returned {spent!r} for {subject.key}")
            await install(spent)
            self.stamp += 1
            self._installed[subject.key] = (period.id, self.stamp)
        finally:
            del self._pending[token]
            done.set()


# --------------------------------------------------------------------------- in-process


class _Window:
    """Counters of one subject in one process."""

    __slots__ = ("hits", "slots", "tokens", "tokens_total")

    def __init__(self) -> None:
        self.hits: deque[float] = deque()  # admission times, oldest first (rpm)
        self.tokens: OrderedDict[int, int] = OrderedDict()  # bucket second -> tokens (tpm)
        self.tokens_total = 0
        self.slots: dict[str, float] = {}  # reservation id -> lease end (concurrency)


class _Budget:
    """Spend of one subject in one period, in nano-dollars."""

    __slots__ = ("alerted", "inflight", "reserved", "spent")

    def __init__(self, spent: int, alerted: bool) -> None:
        self.spent = spent
        self.reserved = 0
        self.alerted = alerted
        self.inflight: dict[str, tuple[int, float]] = {}  # reservation id -> (est, lease end)


class InProcessLimiter:
    """Limits kept in this process: for a single gateway replica.

    One ``threading.Lock`` guards the state and nothing awaits while it is held, so the
    limiter is safe for concurrent coroutines (and threads) and stays cheap.
    """

    def __init__(
        self,
        spent_loader: SpentLoader | None = None,
        clock: Callable[[], float] = time.time,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        """``spent_loader`` seeds each budget after a restart; ``clock`` is for tests.

        ``lease_s``: how long a reservation that is never settled or released keeps its
        concurrency slot and its share of the budget.
        """
        self._clock = clock
        self._lease_s = lease_s
        self._seeder = _SeedOnce(spent_loader) if spent_loader is not None else None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._periods = _Periods()
        self._windows: dict[str, _Window] = {}
        self._budgets: dict[str, dict[str, _Budget]] = {}  # subject key -> period id -> budget

    async def acquire(
        self, subjects: Sequence[Subject], est_tokens: int, est_cost: float
    ) -> Reservation:
        """Admit a request against every subject or raise :class:`LimitExceeded`."""
        _check_usage(est_tokens, est_cost)
        _check_subjects(subjects)
        est_nano = _nanos(est_cost)
        for _ in range(_ATTEMPTS):
            with self._lock:
                outcome = self._try_acquire(subjects, est_tokens, est_nano, self._clock())
            if isinstance(outcome, Reservation):
                return outcome
            await self._seed(*outcome)
        raise RuntimeError("budgets kept changing period while being seeded")

    def _try_acquire(
        self, subjects: Sequence[Subject], est_tokens: int, est_nano: int, now: float
    ) -> Reservation | tuple[Subject, _Period]:
        periods: list[_Period | None] = []
        budgets: list[_Budget | None] = []
        for subject in subjects:
            lim = subject.limits
            if lim.budget_usd is None:
                periods.append(None)
                budgets.append(None)
                continue
            period = self._periods.get(lim.budget_period, now)
            found = self._budgets.get(subject.key, {}).get(period.id)
            if found is None:
                if self._seeder is not None:
                    return subject, period  # seed outside the lock, then try again
                found = self._new_budget(subject, period, 0)
            periods.append(period)
            budgets.append(found)

        # Check every subject before changing anything: admission is all or nothing.
        bucket = math.floor(now)
        refused: tuple[int, str, float, float, float] | None = None
        windows: list[_Window] = []
        for i, subject in enumerate(subjects):
            lim = subject.limits
            window = self._windows.get(subject.key)
            if window is None:
                window = self._windows[subject.key] = _Window()
            windows.append(window)
            checks: list[tuple[str, float, float, float]] = []
            if lim.rpm is not None:
                hits = window.hits
                while hits and hits[0] <= now - WINDOW_S:
                    hits.popleft()
                if len(hits) >= lim.rpm:
                    checks.append(("rpm", hits[len(hits) - lim.rpm] + WINDOW_S - now, 0, 0))
            if lim.tpm is not None:
                retry = self._tpm_wait(window, lim.tpm, est_tokens, bucket, now)
                if retry is not None:
                    checks.append(("tpm", retry, window.tokens_total, 0))
            if lim.max_concurrent is not None and len(window.slots) >= lim.max_concurrent:
                for rid in [r for r, end in window.slots.items() if end <= now]:
                    del window.slots[rid]  # lease ran out: its holder never came back
                if len(window.slots) >= lim.max_concurrent:
                    checks.append(("concurrency", RETRY_SHORTLY_S, len(window.slots), 0))
            budget = budgets[i]
            if budget is not None:
                span = periods[i]
                assert lim.budget_usd is not None and span is not None
                retry = self._budget_wait(budget, _nanos(lim.budget_usd), est_nano, span, now)
                if retry is not None:
                    checks.append(("budget", retry, budget.spent, budget.reserved))
            for kind, retry, used, held in checks:
                if refused is None or _outranks(retry, refused[2]):
                    refused = (i, kind, retry, used, held)
        if refused is not None:
            i, kind, retry, used, held = refused
            raise _refusal(subjects[i], kind, retry, used, held, est_tokens, est_nano, periods[i])

        rid = str(next(self._ids))
        held_by: list[SubjectReservation] = []
        for subject, window, budget, span in zip(subjects, windows, budgets, periods, strict=True):
            lim = subject.limits
            item = SubjectReservation(subject)
            if lim.rpm is not None:
                window.hits.append(now)
            if lim.tpm is not None:
                if est_tokens:
                    window.tokens[bucket] = window.tokens.get(bucket, 0) + est_tokens
                    window.tokens_total += est_tokens
                item.tokens, item.tokens_at = est_tokens, bucket
            if lim.max_concurrent is not None:
                window.slots[rid] = now + self._lease_s
                item.slot = True
            if budget is not None and span is not None:
                budget.reserved += est_nano
                budget.inflight[rid] = (est_nano, now + self._lease_s)
                item.cost, item.period, item.resets_at = est_nano / _NANO, span.id, span.end
            held_by.append(item)
        return Reservation(rid, now, held_by)

    @staticmethod
    def _tpm_wait(
        window: _Window, tpm: int, est_tokens: int, bucket: int, now: float
    ) -> float | None:
        """Seconds until ``est_tokens`` fit (-1: never), or ``None`` if they fit now."""
        tokens = window.tokens
        while tokens:
            oldest = next(iter(tokens))
            if oldest > bucket - TOKEN_BUCKETS:
                break
            window.tokens_total -= tokens.pop(oldest)
        if window.tokens_total + est_tokens <= tpm:
            return None
        if est_tokens > tpm:
            return -1.0
        left = window.tokens_total
        for second in sorted(tokens):
            left -= tokens[second]
            if left + est_tokens <= tpm:
                return second + TOKEN_BUCKETS - now
        return float(TOKEN_BUCKETS)

    def _budget_wait(
        self, budget: _Budget, limit: int, est_nano: int, period: _Period, now: float
    ) -> float | None:
        """Seconds to wait (-1: never), or ``None`` if ``est_nano`` fits now."""
        if budget.spent >= limit or budget.spent + est_nano > limit:
            return -1.0 if est_nano > limit else period.end - now
        if budget.spent + budget.reserved + est_nano <= limit:
            return None
        for rid, (est, end) in list(budget.inflight.items()):
            if end <= now:  # lease ran out: its holder never came back
                del budget.inflight[rid]
                budget.reserved -= est
        if budget.spent + budget.reserved + est_nano <= limit:
            return None
        return RETRY_SHORTLY_S

    def _new_budget(self, subject: Subject, period: _Period, spent: int) -> _Budget:
        lim = subject.limits
        assert lim.budget_usd is not None
        periods = self._budgets.setdefault(subject.key, {})
        # Forget earlier periods once nothing from them is in flight, so memory stays flat.
        for old in [p for p, b in periods.items() if p != period.id and not b.inflight]:
            del periods[old]
        alerted = spent >= _nanos(lim.budget_usd) * lim.soft_pct  # crossed before a restart
        created = periods[period.id] = _Budget(spent, alerted)
        return created

    async def _seed(self, subject: Subject, period: _Period) -> None:
        assert self._seeder is not None

        async def install(spent: float) -> None:
            with self._lock:  # set-if-absent, like SETNX
                if period.id not in self._budgets.get(subject.key, {}):
                    self._new_budget(subject, period, _nanos(spent))

        # Nothing awaited since the check under the lock, so the stamp is still current.
        await self._seeder.seed(subject, period, self._seeder.stamp, install)

    async def settle(self, reservation: Reservation, tokens: int, cost: float) -> list[BudgetAlert]:
        """Replace the reservation by actual usage; return soft alerts crossed just now."""
        _check_usage(tokens, cost)
        with self._lock:
            return self._finish(reservation, tokens, _nanos(cost), settle=True)

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose call failed before using anything (rpm stays counted)."""
        with self._lock:
            self._finish(reservation, 0, 0, settle=False)

    def _finish(
        self, reservation: Reservation, tokens: int, cost_nano: int, *, settle: bool
    ) -> list[BudgetAlert]:
        if reservation.done:
            return []
        reservation.done = True
        now = self._clock()
        rid = reservation.id
        alerts: list[BudgetAlert] = []
        for item in reservation.subjects:
            key = item.subject.key
            window = self._windows.get(key)
            if window is not None:
                if item.tokens_at is not None:
                    held = window.tokens.get(item.tokens_at)
                    if held is not None and item.tokens:
                        taken = min(held, item.tokens)
                        window.tokens_total -= taken
                        if held > taken:
                            window.tokens[item.tokens_at] = held - taken
                        else:
                            del window.tokens[item.tokens_at]
                    if settle and tokens:
                        bucket = math.floor(now)
                        window.tokens[bucket] = window.tokens.get(bucket, 0) + tokens
                        window.tokens_total += tokens
                if item.slot:
                    window.slots.pop(rid, None)
            if item.period is None:
                continue
            budget = self._budgets.get(key, {}).get(item.period)
            if budget is None:
                continue
            est = budget.inflight.pop(rid, None)
            if est is not None:
                budget.reserved -= est[0]
            if settle and cost_nano:
                budget.spent += cost_nano
                alert = _soft_alert(item, budget.spent, budget.alerted)
                if alert is not None:
                    budget.alerted = True
                    alerts.append(alert)
        return alerts

    async def spend(self, subject: Subject) -> float:
        """USD spent by ``subject`` in its current budget period (0.0 without a budget)."""
        lim = subject.limits
        if lim.budget_usd is None:
            return 0.0
        for _ in range(_ATTEMPTS):
            with self._lock:
                period = self._periods.get(lim.budget_period, self._clock())
                found = self._budgets.get(subject.key, {}).get(period.id)
                if found is not None or self._seeder is None:
                    return found.spent / _NANO if found is not None else 0.0
            await self._seed(subject, period)
        raise RuntimeError("budgets kept changing period while being seeded")

    async def aclose(self) -> None:
        """Nothing to free."""


def _soft_alert(item: SubjectReservation, spent: int, alerted: bool) -> BudgetAlert | None:
    lim = item.subject.limits
    if alerted or lim.budget_usd is None or item.period is None:
        return None
    if spent < _nanos(lim.budget_usd) * lim.soft_pct:
        return None
    return BudgetAlert(item.subject.key, spent / _NANO, lim.budget_usd, item.period)


# --------------------------------------------------------------------------------- Redis

# Admission for all subjects in one atomic step. Windows use the server's clock (TIME) unless
# ARGV[1] carries a time (an injected clock), so replicas with skewed clocks agree.
# KEYS, 5 per subject: rpm log (zset), tpm buckets (hash), concurrency leases (zset),
#   budget (hash: spent, reserved, alerted, r:<id> = estimate), budget leases (zset).
# ARGV: now or '', reservation id, est tokens, est nano-USD, lease s, seeding ('1'/'0'),
#   then 6 per subject: rpm, tpm, max concurrent, budget nano-USD (0 = none), period start, end.
# Returns {'ok', now, bucket} | {'deny', i, kind, retry (-1: never), used, held}
#   | {'period', now} (the caller's period is not the server's) | {'seed', now, i...}.
_ACQUIRE_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function num(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local function fmt(x) return string.format('%.6f', x) end
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local rid, est_tok, est_cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, seeding = tonumber(ARGV[5]), ARGV[6] == '1'
local n = #KEYS / 5
local bucket = math.floor(now)
local function lim(i, j) return tonumber(ARGV[6 + (i - 1) * 6 + j]) end

local seeds = {}
for i = 1, n do
  if lim(i, 4) > 0 then
    if now < lim(i, 5) or now >= lim(i, 6) then return {'period', fmt(now)} end
    if seeding and redis.call('HEXISTS', KEYS[(i - 1) * 5 + 4], 'spent') == 0 then
      seeds[#seeds + 1] = i
    end
  end
end
if #seeds > 0 then return {'seed', fmt(now), unpack(seeds)} end

local best = nil
local function refuse(i, kind, retry, used, held)
  if best == nil or (best[3] >= 0 and (retry < 0 or retry > best[3])) then
    best = {i, kind, retry, used, held}
  end
end
for i = 1, n do
  local k = (i - 1) * 5
  local rpm, tpm, maxc, budget, pend = lim(i, 1), lim(i, 2), lim(i, 3), lim(i, 4), lim(i, 6)
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', num(now - 60))
    local count = redis.call('ZCARD', KEYS[k + 1])
    if count >= rpm then
      local at = redis.call('ZRANGE', KEYS[k + 1], count - rpm, count - rpm, 'WITHSCORES')
      refuse(i, 'rpm', tonumber(at[2]) + 60 - now, 0, 0)
    end
  end
  if tpm > 0 then
    local h = redis.call('HGETALL', KEYS[k + 2])
    local used, seconds = 0, {}
    for j = 1, #h, 2 do
      local b, t = tonumber(h[j]), tonumber(h[j + 1])
      if b <= bucket - 61 then
        redis.call('HDEL', KEYS[k + 2], h[j])
      else
        used = used + t
        seconds[#seconds + 1] = {b, t}
      end
    end
    if used + est_tok > tpm then
      if est_tok > tpm then
        refuse(i, 'tpm', -1, used, 0)
      else
        table.sort(seconds, function(x, y) return x[1] < y[1] end)
        local left, retry = used, 61
        for _, e in ipairs(seconds) do
          left = left - e[2]
          if left + est_tok <= tpm then retry = e[1] + 61 - now; break end
        end
        refuse(i, 'tpm', retry, used, 0)
      end
    end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', num(now))
    local inuse = redis.call('ZCARD', KEYS[k + 3])
    if inuse >= maxc then refuse(i, 'concurrency', 1, inuse, 0) end  -- 1: RETRY_SHORTLY_S
  end
  if budget > 0 then
    local B, L = KEYS[k + 4], KEYS[k + 5]
    for _, r in ipairs(redis.call('ZRANGEBYSCORE', L, '-inf', num(now))) do
      local est = tonumber(redis.call('HGET', B, 'r:' .. r) or '0')
      if redis.call('HDEL', B, 'r:' .. r) == 1 then
        redis.call('HINCRBY', B, 'reserved', int(-est))
      end
      redis.call('ZREM', L, r)
    end
    local spent = tonumber(redis.call('HGET', B, 'spent') or '0')
    local reserved = tonumber(redis.call('HGET', B, 'reserved') or '0')
    if spent >= budget or spent + est_cost > budget then
      local retry = pend - now
      if est_cost > budget then retry = -1 end
      refuse(i, 'budget', retry, spent, reserved)
    elseif spent + reserved + est_cost > budget then
      refuse(i, 'budget', 1, spent, reserved)
    end
  end
end
if best then
  return {'deny', best[1], best[2], fmt(best[3]), fmt(best[4]), fmt(best[5])}
end

for i = 1, n do
  local k = (i - 1) * 5
  local rpm, tpm, maxc, budget, pend = lim(i, 1), lim(i, 2), lim(i, 3), lim(i, 4), lim(i, 6)
  if rpm > 0 then
    redis.call('ZADD', KEYS[k + 1], num(now), rid)
    redis.call('EXPIRE', KEYS[k + 1], 120)
  end
  if tpm > 0 then
    if est_tok > 0 then redis.call('HINCRBY', KEYS[k + 2], int(bucket), int(est_tok)) end
    redis.call('EXPIRE', KEYS[k + 2], 120)
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[k + 3], num(now + lease), rid)
    redis.call('EXPIRE', KEYS[k + 3], int(math.ceil(lease) + 60))
  end
  if budget > 0 then
    local B, L = KEYS[k + 4], KEYS[k + 5]
    local ttl = int(math.ceil(pend - now) + 86400)
    redis.call('HINCRBY', B, 'reserved', int(est_cost))
    redis.call('HSET', B, 'r:' .. rid, int(est_cost))
    redis.call('ZADD', L, num(now + lease), rid)
    redis.call('EXPIRE', B, ttl)
    redis.call('EXPIRE', L, ttl)
  end
end
return {'ok', fmt(now), bucket}
"""

# Settle or release. KEYS, 4 per subject: tpm buckets, concurrency leases, budget, budget leases.
# ARGV: now or '', reservation id, tokens, nano-USD, 'settle' | 'release', then 5 per subject:
#   tokens bucket (-1 = none), est tokens, slot (0/1), soft threshold nano-USD (-1 = no
#   budget), budget ttl s. Returns {i, spent, ...} for soft alerts crossed now.
_SETTLE_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function int(x) return string.format('%d', x) end
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local rid, tokens, cost, settle = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == 'settle'
local bucket = int(math.floor(now))
local alerts = {}
for i = 1, #KEYS / 4 do
  local k, a = (i - 1) * 4, 5 + (i - 1) * 5
  local at, est, slot = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  local soft, ttl = tonumber(ARGV[a + 4]), ARGV[a + 5]
  if at ~= '-1' then
    local T = KEYS[k + 1]
    local held = tonumber(redis.call('HGET', T, at) or '0')
    if held > 0 and est > 0 then
      if held > est then redis.call('HINCRBY', T, at, int(-est)) else redis.call('HDEL', T, at) end
    end
    if settle and tokens > 0 then
      redis.call('HINCRBY', T, bucket, int(tokens))
      redis.call('EXPIRE', T, 120)
    end
  end
  if slot then redis.call('ZREM', KEYS[k + 2], rid) end
  if soft >= 0 then
    local B = KEYS[k + 3]
    local held = tonumber(redis.call('HGET', B, 'r:' .. rid) or '0')
    if redis.call('HDEL', B, 'r:' .. rid) == 1 then
      redis.call('HINCRBY', B, 'reserved', int(-held))
    end
    redis.call('ZREM', KEYS[k + 4], rid)
    if settle and cost > 0 then
      local spent = redis.call('HINCRBY', B, 'spent', int(cost))
      redis.call('EXPIRE', B, ttl)
      if spent >= soft and redis.call('HSETNX', B, 'alerted', '1') == 1 then
        alerts[#alerts + 1] = i
        alerts[#alerts + 1] = int(spent)
      end
    end
  end
end
return alerts
"""

# Seed a budget's spend if no replica has yet (set-if-absent); a seed already past the soft
# threshold counts as alerted (it was crossed before the restart). KEYS: budget hash.
# ARGV: spent nano-USD, soft threshold nano-USD, ttl s. Returns 1 if this call seeded.
_SEED_LUA = """
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 0 then return 0 end
if tonumber(ARGV[1]) >= tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'alerted', '1') end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisLimiter:
    """Limits shared by every gateway replica through one Redis server (not Redis Cluster).

    Each ``acquire`` is one Lua script (EVALSHA, loaded on first use) covering all subjects,
    so admission is atomic across replicas; ``settle``/``release`` are another. Every key has
    a TTL: windows 2 min, concurrency leases ``lease_s`` + 1 min, budgets until their period
    ends plus a day.

    Time: with ``clock=None`` (the default) the scripts read the server's clock (``TIME``),
    so replicas with skewed clocks agree on windows and periods. Pass ``clock`` to make the
    scripts use that time instead (tests; or a single clock shared by all replicas).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "flywheel:limits:",
        spent_loader: SpentLoader | None = None,
        clock: Callable[[], float] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        """Connect lazily to ``url``; keys start with ``prefix``.

        ``spent_loader`` and ``lease_s`` are as for :class:`InProcessLimiter`; ``clock``
        replaces the server's clock (see the class docstring).
        """
        import redis.asyncio as aioredis  # optional dependency: only needed with Redis

        self._redis: Any = aioredis.Redis.from_url(url, decode_responses=True)
        self._prefix = prefix
        self._clock = clock
        self._lease_s = lease_s
        self._seeder = _SeedOnce(spent_loader) if spent_loader is not None else None
        self._periods = _Periods()
        self._acquire_script = self._redis.register_script(_ACQUIRE_LUA)
        self._settle_script = self._redis.register_script(_SETTLE_LUA)
        self._seed_script = self._redis.register_script(_SEED_LUA)

    def _key(self, part: str, subject: Subject) -> str:
        # The variable part comes last so no subject id can collide with another key.
        return f"{self._prefix}{part}:{subject.key}"

    def _budget_keys(self, subject: Subject, period_id: str) -> tuple[str, str]:
        return (
            self._key(f"budget:{period_id}", subject),
            self._key(f"leases:{period_id}", subject),
        )

    def _script_now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    async def acquire(
        self, subjects: Sequence[Subject], est_tokens: int, est_cost: float
    ) -> Reservation:
        """Admit a request against every subject or raise :class:`LimitExceeded`."""
        _check_usage(est_tokens, est_cost)
        _check_subjects(subjects)
        est_nano = _nanos(est_cost)
        rid = uuid.uuid4().hex
        # A first guess at the period; the script checks it against the server's clock.
        guess = self._clock() if self._clock is not None else time.time()
        for _ in range(_ATTEMPTS):
            periods: list[_Period | None] = []
            keys: list[str] = []
            args: list[Any] = [
                self._script_now(),
                rid,
                est_tokens,
                est_nano,
                repr(self._lease_s),
                int(self._seeder is not None),
            ]
            for subject in subjects:
                lim = subject.limits
                period = (
                    None if lim.budget_usd is None else self._periods.get(lim.budget_period, guess)
                )
                periods.append(period)
                keys += [
                    self._key("rpm", subject),
                    self._key("tpm", subject),
                    self._key("concurrency", subject),
                    *self._budget_keys(subject, period.id if period else "-"),
                ]
                args += [
                    lim.rpm or 0,
                    lim.tpm or 0,
                    lim.max_concurrent or 0,
                    _nanos(lim.budget_usd) if lim.budget_usd is not None else 0,
                    repr(period.start) if period else 0,
                    repr(period.end) if period else 0,
                ]
            asked_at = self._seeder.stamp if self._seeder is not None else 0
            result = await self._acquire_script(keys=keys, args=args)
            tag = result[0]
            if tag == "ok":
                return self._reservation(
                    rid, float(result[1]), int(result[2]), subjects, periods, est_tokens, est_nano
                )
            if tag == "deny":
                i = int(result[1]) - 1
                raise _refusal(
                    subjects[i],
                    str(result[2]),
                    float(result[3]),
                    float(result[4]),
                    float(result[5]),
                    est_tokens,
                    est_nano,
                    periods[i],
                )
            guess = float(result[1])
            if tag == "seed":
                for index in result[2:]:
                    i = int(index) - 1
                    period = periods[i]
                    assert period is not None
                    await self._seed(subjects[i], period, guess, asked_at)
        raise RuntimeError("could not agree on the budget period with the Redis server")

    def _reservation(
        self,
        rid: str,
        now: float,
        bucket: int,
        subjects: Sequence[Subject],
        periods: list[_Period | None],
        est_tokens: int,
        est_nano: int,
    ) -> Reservation:
        held_by: list[SubjectReservation] = []
        for subject, period in zip(subjects, periods, strict=True):
            lim = subject.limits
            item = SubjectReservation(subject, slot=lim.max_concurrent is not None)
            if lim.tpm is not None:
                item.tokens, item.tokens_at = est_tokens, bucket
            if period is not None:
                item.cost, item.period, item.resets_at = est_nano / _NANO, period.id, period.end
            held_by.append(item)
        return Reservation(rid, now, held_by)

    async def _seed(self, subject: Subject, period: _Period, now: float, asked_at: int) -> None:
        assert self._seeder is not None
        lim = subject.limits
        assert lim.budget_usd is not None
        soft = _nanos(lim.budget_usd) * lim.soft_pct
        ttl = math.ceil(period.end - now) + _DAY_S
        budget_key = self._budget_keys(subject, period.id)[0]

        async def install(spent: float) -> None:
            await self._seed_script(keys=[budget_key], args=[_nanos(spent), repr(soft), ttl])

        await self._seeder.seed(subject, period, asked_at, install)

    async def settle(self, reservation: Reservation, tokens: int, cost: float) -> list[BudgetAlert]:
        """Replace the reservation by actual usage; return soft alerts crossed just now."""
        _check_usage(tokens, cost)
        return await self._finish(reservation, tokens, _nanos(cost), settle=True)

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose call failed before using anything (rpm stays counted)."""
        await self._finish(reservation, 0, 0, settle=False)

    async def _finish(
        self, reservation: Reservation, tokens: int, cost_nano: int, *, settle: bool
    ) -> list[BudgetAlert]:
        if reservation.done:
            return []
        keys: list[str] = []
        now = self._script_now()
        args: list[Any] = [
            now,
            reservation.id,
            tokens,
            cost_nano,
            "settle" if settle else "release",
        ]
        # Budget TTLs are relative to the admission time, which the reservation carries.
        for item in reservation.subjects:
            subject, lim = item.subject, item.subject.limits
            keys += [
                self._key("tpm", subject),
                self._key("concurrency", subject),
                *self._budget_keys(subject, item.period or "-"),
            ]
            soft = -1.0
            ttl = _DAY_S
            if item.period is not None and lim.budget_usd is not None:
                soft = _nanos(lim.budget_usd) * lim.soft_pct
                if item.resets_at is not None:
                    ttl += max(math.ceil(item.resets_at - reservation.admitted_at), 0)
            args += [
                -1 if item.tokens_at is None else item.tokens_at,
                item.tokens,
                int(item.slot),
                repr(soft),
                ttl,
            ]
        result = await self._settle_script(keys=keys, args=args)
        reservation.done = True
        alerts: list[BudgetAlert] = []
        for at in range(0, len(result), 2):
            item = reservation.subjects[int(result[at]) - 1]
            budget = item.subject.limits.budget_usd
            assert budget is not None and item.period is not None
            alerts.append(
                BudgetAlert(item.subject.key, int(result[at + 1]) / _NANO, budget, item.period)
            )
        return alerts

    async def spend(self, subject: Subject) -> float:
        """USD spent by ``subject`` in its current budget period (0.0 without a budget)."""
        lim = subject.limits
        if lim.budget_usd is None:
            return 0.0
        if self._clock is not None:
            now = self._clock()
        else:
            seconds, micros = await self._redis.time()
            now = seconds + micros / 1_000_000
        period = self._periods.get(lim.budget_period, now)
        budget_key = self._budget_keys(subject, period.id)[0]
        asked_at = self._seeder.stamp if self._seeder is not None else 0
        spent = await self._redis.hget(budget_key, "spent")
        if spent is None and self._seeder is not None:
            await self._seed(subject, period, now, asked_at)
            spent = await self._redis.hget(budget_key, "spent")
        return int(spent or 0) / _NANO

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def make_limiter(redis_url: str | None, spent_loader: SpentLoader | None = None) -> Limiter:
    """A :class:`RedisLimiter` when ``redis_url`` is set (several replicas), else in-process."""
    if redis_url:
        return RedisLimiter(redis_url, spent_loader=spent_loader)
    return InProcessLimiter(spent_loader=spent_loader)
