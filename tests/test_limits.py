"""Gateway limits and budgets: every behaviour runs against the in-process and Redis limiters.

Redis is a real ``redis-server`` on loopback, started once per run (``make test`` installs
it). Windows and periods are driven by an injected clock unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pydantic
import pytest
import redis.asyncio as aioredis

from flywheel.gateway.limits import (
    DEFAULT_LEASE_S,
    BudgetAlert,
    InProcessLimiter,
    Limiter,
    LimitExceeded,
    Limits,
    RedisLimiter,
    Reservation,
    SpentLoader,
    Subject,
    make_limiter,
    period_bounds,
)


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


START = ts(2026, 11, 10, 12, 0, 0)
NOV_1, DEC_1 = ts(2026, 11, 1), ts(2026, 12, 1)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key(ident: str = "k", **limits: object) -> Subject:
    return Subject("key", ident, Limits.model_validate(limits))


def project(ident: str = "p", **limits: object) -> Subject:
    return Subject("project", ident, Limits.model_validate(limits))


async def refused(
    limiter: Limiter, subjects: list[Subject], tokens: int = 0, cost: float = 0.0
) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        await limiter.acquire(subjects, tokens, cost)
    return caught.value


class Limiters:
    """Builds limiters of one implementation for one test and closes them afterwards.

    Redis limiters of one test share a fresh key prefix: several are "replicas".
    """

    def __init__(self, impl: str, redis_url: str | None) -> None:
        self.impl = impl
        self.redis_url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex}:"
        self.made: list[Limiter] = []

    def new(
        self,
        clock: Callable[[], float] | None = None,
        spent_loader: SpentLoader | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> Limiter:
        """``clock=None``: real time (in-process) or the Redis server's clock."""
        limiter: Limiter
        if self.impl == "memory":
            limiter = InProcessLimiter(spent_loader, clock or time.time, lease_s)
        else:
            assert self.redis_url is not None
            limiter = RedisLimiter(self.redis_url, self.prefix, spent_loader, clock, lease_s)
        self.made.append(limiter)
        return limiter

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            try:
                await asyncio.wait_for(scenario(), timeout=15)
            finally:
                for limiter in self.made:
                    await limiter.aclose()

        asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def limiters(request: pytest.FixtureRequest) -> Limiters:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Limiters(request.param, url)


@pytest.fixture
def redis_limiters(redis_url: str) -> Limiters:
    return Limiters("redis", redis_url)


# --------------------------------------------------------------------------- rpm


def test_rpm_refuses_within_the_window_and_admits_after_it(limiters: Limiters) -> None:
    async def scenario() -> None:
        clock = Clock()
        limiter = limiters.new(clock)
        subject = key(rpm=3)
        for _ in range(3):  # at +0, +10, +20
            await limiter.release(await limiter.acquire([subject], 0, 0))
            clock.advance(10)
        error = await refused(limiter, [subject])  # at +30: releasing gave no request back
        assert (error.kind, error.subject) == ("rpm", "key:k")
        assert error.retry_after == pytest.approx(30, abs=1e-3)
        assert "3 requests per minute for key 'k'" in error.message
        clock.now = START + 59.5
        assert (await refused(limiter, [subject])).retry_after == pytest.approx(0.5, abs=1e-3)
        clock.now = START + 60  # the first request leaves the window
        await limiter.acquire([subject], 0, 0)
        error = await refused(limiter, [subject])
        assert error.retry_after == pytest.approx(10, abs=1e-3)

    limiters.run(scenario)


def test_windows_on_the_real_or_server_clock(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new()  # Redis: the scripts read the server's TIME
        subject = key(rpm=2, budget_usd=1.0)
        for _ in range(2):
            await limiter.settle(await limiter.acquire([subject], 0, 0.1), 0, 0.25)
        error = await refused(limiter, [subject])
        assert error.kind == "rpm"
        assert error.retry_after is not None and 55 < error.retry_after <= 60
        assert await limiter.spend(subject) == pytest.approx(0.5)

    limiters.run(scenario)


# --------------------------------------------------------------------------- tpm


def test_tpm_reserves_estimates_and_settles_to_actual_usage(limiters: Limiters) -> None:
    async def scenario() -> None:
        clock = Clock()
        limiter = limiters.new(clock)
        subject = key(tpm=1000)
        first = await limiter.acquire([subject], 600, 0)
        clock.advance(5)
        error = await refused(limiter, [subject], 500)  # 600 reserved + 500 > 1000
        assert (error.kind, error.subject) == ("tpm", "key:k")
        assert error.retry_after == pytest.approx(56, abs=1e-3)  # 600 expire at START + 61
        await limiter.settle(first, 100, 0)  # the estimate was 600, the call used 100
        second = await limiter.acquire([subject], 500, 0)  # 100 + 500
        await refused(limiter, [subject], 401)  # 100 + 500 + 401 > 1000
        await limiter.acquire([subject], 400, 0)  # exactly 1000
        too_big = await refused(limiter, [subject], 1001)
        assert too_big.retry_after is None and "more than the limit" in too_big.message
        await limiter.settle(second, 900, 0)  # used more than estimated: 100 + 900 + 400
        await refused(limiter, [subject], 0)
        clock.now = START + 5 + 61  # everything recorded at START + 5 has left the window
        await limiter.acquire([subject], 1000, 0)

    limiters.run(scenario)


# --------------------------------------------------------------------------- concurrency


def test_max_concurrent_frees_slots_on_settle_and_release(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new(Clock())
        subject = key(max_concurrent=2)
        first = await limiter.acquire([subject], 0, 0)
        second = await limiter.acquire([subject], 0, 0)
        error = await refused(limiter, [subject])
        assert (error.kind, error.retry_after) == ("concurrency", 1.0)
        await limiter.settle(first, 0, 0)
        await limiter.acquire([subject], 0, 0)
        await refused(limiter, [subject])
        await limiter.settle(first, 0, 0)  # settling twice frees nothing more
        await refused(limiter, [subject])
        await limiter.release(second)
        await limiter.acquire([subject], 0, 0)
        await refused(limiter, [subject])

    limiters.run(scenario)


def test_abandoned_slots_and_reservations_expire_with_their_lease(limiters: Limiters) -> None:
    async def scenario() -> None:
        clock = Clock()
        limiter = limiters.new(clock, lease_s=30)
        subject = key(max_concurrent=1, budget_usd=1.0)
        abandoned = await limiter.acquire([subject], 0, 0.8)  # its caller "crashes"
        assert (await refused(limiter, [subject], 0, 0.3)).kind == "concurrency"
        clock.advance(31)
        late = await limiter.acquire([subject], 0, 0.3)  # slot and $0.80 both freed
        await limiter.settle(abandoned, 0, 0)  # a late settle must not free `late`
        assert (await refused(limiter, [subject], 0, 0.3)).kind == "concurrency"
        await limiter.settle(late, 0, 0.3)
        assert await limiter.spend(subject) == pytest.approx(0.3)

    limiters.run(scenario)


# --------------------------------------------------------------------------- budgets


async def drain_budget(replicas: list[Limiter], subject: Subject) -> tuple[int, int]:
    """50 tasks loop acquire -> sleep -> settle until the budget is used up.

    Returns the nano-dollars settled and the most requests that were in flight at once.
    """
    settled: list[int] = []
    in_flight = peak = 0

    async def worker(limiter: Limiter, rng: random.Random) -> None:
        nonlocal in_flight, peak
        while True:
            try:
                reservation = await limiter.acquire([subject], 10, 0.03)
            except LimitExceeded as error:
                assert error.kind == "budget"
                if error.exhausted:
                    return
                assert error.retry_after == 1.0  # held by requests in flight: retry shortly
                await asyncio.sleep(rng.uniform(0, 0.002))
                continue
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(rng.uniform(0, 0.005))
            cost = rng.uniform(0.01, 0.03)
            in_flight -= 1
            await limiter.settle(reservation, 10, cost)
            settled.append(round(cost * 1e9))

    await asyncio.gather(
        *(worker(replicas[i % len(replicas)], random.Random(i)) for i in range(50))
    )
    return sum(settled), peak


async def check_drained(replicas: list[Limiter], subject: Subject, settled: int) -> None:
    assert settled <= 1_000_000_000  # never over the budget
    assert 1_000_000_000 - settled < 30_000_000  # and it stopped within one request of it
    for limiter in replicas:
        assert await limiter.spend(subject) == pytest.approx(settled / 1e9, abs=1e-9)
        error = await refused(limiter, [subject], 10, 0.03)
        assert (error.kind, error.exhausted) == ("budget", True)
        period_end = period_bounds("month", time.time())[1]
        assert error.retry_after == pytest.approx(period_end - time.time(), abs=60)


def test_budget_holds_under_concurrent_load(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new()
        subject = key(budget_usd=1.0)
        settled, peak = await drain_budget([limiter], subject)
        assert peak >= 20  # the load really was concurrent
        await check_drained([limiter], subject, settled)

    limiters.run(scenario)


def test_budget_holds_across_two_redis_replicas(redis_limiters: Limiters) -> None:
    async def scenario() -> None:
        replicas = [redis_limiters.new(), redis_limiters.new()]  # server time, one store
        subject = key(budget_usd=1.0)
        settled, peak = await drain_budget(replicas, subject)
        assert peak >= 20
        await check_drained(replicas, subject, settled)

    redis_limiters.run(scenario)


def test_budget_refuses_what_may_not_fit(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new(Clock())
        subject = key(budget_usd=1.0)
        held = await limiter.acquire([subject], 0, 0.9)
        error = await refused(limiter, [subject], 0, 0.2)  # only in-flight money is in the way
        assert (error.kind, error.exhausted, error.retry_after) == ("budget", False, 1.0)
        assert "held by requests in flight" in error.message
        await limiter.settle(held, 0, 0.98)
        error = await refused(limiter, [subject], 0, 0.03)  # $0.02 left
        assert error.exhausted and error.retry_after == pytest.approx(DEC_1 - START)
        assert error.message == (
            "Budget of $1.00 per month for key 'k' has $0.02 left ($0.98 spent) and this "
            "request may cost up to $0.03; it resets 2026-12-01T00:00:00Z."
        )
        await limiter.settle(await limiter.acquire([subject], 0, 0.02), 0, 0.02)
        error = await refused(limiter, [subject])  # used up: even a free request waits
        assert error.message == (
            "Budget of $1.00 per month for key 'k' is used up ($1.00 spent); "
            "it resets 2026-12-01T00:00:00Z."
        )
        other = key("big", budget_usd=1.0)
        error = await refused(limiter, [other], 0, 1.5)  # can never fit
        assert error.exhausted and error.retry_after is None

    limiters.run(scenario)


def test_budget_amounts_are_exact_at_large_scale(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new(Clock())
        subject = key(budget_usd=5_000_000.0)
        reservation = await limiter.acquire([subject], 0, 3_000_000.0)
        await limiter.settle(reservation, 0, 2_999_999.99)
        assert await limiter.spend(subject) == pytest.approx(2_999_999.99, abs=1e-6)
        rest = await limiter.acquire([subject], 0, 2_000_000.01)  # exactly the rest
        error = await refused(limiter, [subject], 0, 0.01)
        assert (error.kind, error.exhausted) == ("budget", False)
        alerts = await limiter.settle(rest, 0, 2_000_000.01)
        assert alerts == [BudgetAlert("key:k", 5_000_000.0, 5_000_000.0, "2026-11")]
        assert (await refused(limiter, [subject])).exhausted

    limiters.run(scenario)


def test_admission_is_all_or_nothing(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new(Clock())
        the_key = key(rpm=2, tpm=100, max_concurrent=1, budget_usd=1.0)
        the_project = project(max_concurrent=1)
        busy = await limiter.acquire([the_project], 0, 0)  # the project has no room
        for _ in range(3):
            error = await refused(limiter, [the_key, the_project], 100, 1.0)
            assert (error.kind, error.subject) == ("concurrency", "project:p")
        await limiter.release(busy)
        # Nothing was taken from the key: its whole tpm, slot and budget are still there...
        await limiter.release(await limiter.acquire([the_key], 100, 1.0))
        await limiter.release(await limiter.acquire([the_key], 100, 1.0))
        # ...and the refusals were not counted as requests: exactly two were admitted.
        assert (await refused(limiter, [the_key], 0, 0)).kind == "rpm"
        assert await limiter.spend(the_key) == 0.0

    limiters.run(scenario)


def test_soft_alert_fires_once_per_period(limiters: Limiters) -> None:
    async def scenario() -> None:
        clock = Clock()
        limiter = limiters.new(clock)
        subject, other = key(budget_usd=1.0, soft_pct=0.5), project(budget_usd=10.0)

        async def call(cost: float) -> list[BudgetAlert]:
            return await limiter.settle(await limiter.acquire([subject, other], 0, cost), 0, cost)

        assert await call(0.3) == []
        assert await call(0.3) == [BudgetAlert("key:k", 0.6, 1.0, "2026-11")]
        assert await call(0.1) == []
        assert await call(0.1) == []
        clock.now = DEC_1 + 5  # a new period arms the alert again
        assert await call(0.45) == []
        alerts = await call(0.05)
        assert alerts == [BudgetAlert("key:k", 0.5, 1.0, "2026-12")]
        assert alerts[0].message == "key 'k' has spent $0.50 of its $1.00 budget for 2026-12 (50%)."

    limiters.run(scenario)


@pytest.mark.parametrize(
    ("period", "before", "after"),
    [
        ("month", ts(2026, 11, 30, 23, 59, 50), DEC_1),
        ("day", ts(2026, 12, 31, 23, 59, 50), ts(2027, 1, 1)),
    ],
)
def test_budget_resets_with_the_calendar_period(
    limiters: Limiters, period: str, before: float, after: float
) -> None:
    async def scenario() -> None:
        clock = Clock(before)
        limiter = limiters.new(clock)
        subject = key(budget_usd=1.0, budget_period=period)
        await limiter.settle(await limiter.acquire([subject], 0, 1.0), 0, 1.0)
        straddling = await limiter.acquire([key("s", budget_usd=1.0)], 0, 0.5)
        error = await refused(limiter, [subject], 0, 0.01)
        assert error.exhausted and error.retry_after == pytest.approx(10, abs=1e-3)
        assert f"per {period}" in error.message
        assert datetime.fromtimestamp(after, UTC).strftime("resets %Y-%m-%dT%H:%M:%SZ") in (
            error.message
        )
        clock.now = after
        assert await limiter.spend(subject) == 0.0
        await limiter.settle(await limiter.acquire([subject], 0, 1.0), 0, 0.25)
        assert await limiter.spend(subject) == 0.25
        await limiter.settle(straddling, 0, 0.5)  # charged to the period it was admitted in
        assert await limiter.spend(straddling.subjects[0].subject) == 0.0

    limiters.run(scenario)


def test_spent_loader_seeds_each_budget_once(limiters: Limiters) -> None:
    async def scenario() -> None:
        clock = Clock()
        calls: list[tuple[str, float]] = []

        def loader(subject: Subject, period_start: float) -> float:
            calls.append((subject.key, period_start))
            time.sleep(0.01)  # a database read: concurrent requests wait for this one
            return 0.9

        limiter = limiters.new(clock, spent_loader=loader)
        await limiter.acquire([key("free", rpm=10)], 0, 0)  # no budget: nothing to load
        assert calls == []
        subject = key(budget_usd=1.0, soft_pct=0.8)
        outcomes = await asyncio.gather(
            *(limiter.acquire([subject], 0, 0.05) for _ in range(10)), return_exceptions=True
        )
        assert calls == [("key:k", NOV_1)]
        admitted = [o for o in outcomes if isinstance(o, Reservation)]
        assert len(admitted) == 2  # 0.90 seeded + 2 x 0.05 = the budget
        assert all(isinstance(o, LimitExceeded) for o in outcomes if o not in admitted)
        assert await limiter.spend(subject) == pytest.approx(0.9)
        # The seed was already past soft_pct: that alert belongs to before the restart.
        assert await limiter.settle(admitted[0], 0, 0.05) == []
        if limiters.impl == "redis":  # a second replica finds the budget already seeded
            others: list[tuple[str, float]] = []

            def other_loader(subject: Subject, period_start: float) -> float:
                others.append((subject.key, period_start))
                return 0.0

            replica = limiters.new(clock, spent_loader=other_loader)
            assert await replica.spend(subject) == pytest.approx(0.95)
            assert others == []
        clock.now = DEC_1 + 1
        assert await limiter.spend(subject) == pytest.approx(0.9)
        assert calls == [("key:k", NOV_1), ("key:k", DEC_1)]

    limiters.run(scenario)


def test_release_frees_what_was_reserved(limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = limiters.new(Clock())
        subject = key(rpm=2, tpm=100, max_concurrent=1, budget_usd=1.0)
        first = await limiter.acquire([subject], 100, 1.0)
        error = await refused(limiter, [subject], 100, 1.0)
        assert error.kind == "tpm"  # tpm, slot and budget are all full; tpm waits longest
        await limiter.release(first)
        await limiter.release(first)  # twice is harmless
        second = await limiter.acquire([subject], 100, 1.0)
        await limiter.release(second)
        assert await limiter.spend(subject) == 0.0
        assert (await refused(limiter, [subject], 0, 0)).kind == "rpm"  # requests stay counted

    limiters.run(scenario)


def test_redis_keys_all_expire(redis_limiters: Limiters) -> None:
    async def scenario() -> None:
        limiter = redis_limiters.new()
        subjects = [key(rpm=5, tpm=1000, max_concurrent=3, budget_usd=2.0), project(tpm=1000)]
        await limiter.settle(await limiter.acquire(subjects, 10, 0.5), 20, 0.25)
        held = await limiter.acquire(subjects, 10, 0.5)
        assert isinstance(limiter, RedisLimiter)
        client = aioredis.Redis.from_url(redis_limiters.redis_url or "")
        try:
            names = [n async for n in client.scan_iter(match=f"{redis_limiters.prefix}*")]
            assert len(names) >= 6
            month_left = period_bounds("month", time.time())[1] - time.time()
            for name in names:
                ttl = await client.ttl(name)
                assert 0 < ttl <= month_left + 86_400 + 5, (name, ttl)
                if b":budget:" not in name and b":leases:" not in name:
                    assert ttl <= DEFAULT_LEASE_S + 60, (name, ttl)
        finally:
            await client.aclose()
        await limiter.release(held)

    redis_limiters.run(scenario)


# --------------------------------------------------------------------------- the rest


def test_period_bounds_are_utc_calendar_periods() -> None:
    assert period_bounds("month", ts(2026, 11, 30, 23, 59, 59)) == (NOV_1, DEC_1)
    assert period_bounds("month", ts(2026, 12, 15)) == (DEC_1, ts(2027, 1, 1))
    assert period_bounds("day", ts(2028, 2, 28, 12)) == (ts(2028, 2, 28), ts(2028, 2, 29))
    assert period_bounds("day", ts(2028, 2, 29)) == (ts(2028, 2, 29), ts(2028, 3, 1))
    with pytest.raises(ValueError):
        period_bounds("week", START)


def test_limits_and_arguments_are_validated() -> None:
    for bad in ({"rpm": 0}, {"tpm": -1}, {"budget_usd": 0}, {"soft_pct": 1.5}, {"rps": 3}):
        with pytest.raises(pydantic.ValidationError):
            Limits.model_validate(bad)
    assert Limits(soft_pct=1.0).budget_period == "month"
    with pytest.raises(ValueError):
        Subject("team", "t", Limits())
    assert key("abc").key == "key:abc"

    async def scenario() -> None:
        limiter = InProcessLimiter()
        with pytest.raises(ValueError):
            await limiter.acquire([key(), key()], 0, 0)
        with pytest.raises(ValueError):
            await limiter.acquire([key()], -1, 0)
        with pytest.raises(ValueError):
            await limiter.settle(await limiter.acquire([key()], 0, 0), 0, float("nan"))

    asyncio.run(scenario())


def test_make_limiter_picks_the_store(redis_url: str) -> None:
    assert isinstance(make_limiter(None), InProcessLimiter)
    remote = make_limiter(redis_url)
    assert isinstance(remote, RedisLimiter)
    asyncio.run(remote.aclose())


def test_in_process_hot_path_is_cheap() -> None:
    async def scenario() -> float:
        limiter = InProcessLimiter()
        subjects = [
            key(rpm=10**9, tpm=10**12, max_concurrent=100, budget_usd=1e6),
            project(rpm=10**9, tpm=10**12, max_concurrent=1000, budget_usd=1e7),
        ]
        rounds = 20_000
        began = time.perf_counter()
        for _ in range(rounds):
            await limiter.settle(await limiter.acquire(subjects, 500, 0.001), 400, 0.0008)
        return (time.perf_counter() - began) / rounds

    per_call = asyncio.run(scenario())
    assert per_call < 50e-6, f"acquire + settle for two subjects took {per_call * 1e6:.1f} µs"
