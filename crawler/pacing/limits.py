"""The rate gate shared by every walker on one API key: smooth rate, shared 429 pause, recovery."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiolimiter import AsyncLimiter

from crawler import logs
from crawler.pacing.slowdown import HeldRate, Slowdown

# aiolimiter admits a request when the bucket's level is at most max_rate - 1. With max_rate 1 the
# bucket must be empty, so every late timer wake-up (asyncio rounds waits up to the millisecond)
# and every busy moment of the event loop is time lost for good: 20% of the rate at 500/s. The
# capacity is 1.5 requests, or 35 ms of requests at high rates: lateness up to that much is made
# up, and no more than that ever goes out at once (1.5 at 5/s, 1.75 at 50/s, 17.5 at 500/s), where
# a capacity of a whole second would let a second's worth of requests through at once. 20 ms held
# only 0.96-0.98 of 500/s on a loaded 2-core machine, where a batch of answers can keep the loop
# busy for longer than that; 35 ms holds 0.999 there. It stays below a burst of 2 requests up to
# 57/s, and below a tenth of a second's requests at any rate; 50 ms would not (2.5 at 50/s).
_SLACK = 1.5
_SLACK_SECONDS = 0.035
# A server that allows "R requests per second" may count them in a sliding window: then R
# requests spaced exactly 1/R apart fill every window, and the smallest lateness (a timer, a busy
# loop, the network) puts R + 1 in one and draws a 429, which halves the rate. So besides the
# pacing above, at most R requests go out in any 1.02 s: 0.98 of the rate, with 20 ms a second
# of room for a send to arrive late relative to the one R before it.
WINDOW_MARGIN = 0.02
_DEFAULT_PAUSE = 1.0  # seconds to pause on a 429 without Retry-After

log = logs.get_logger("crawler.limits")


def slack_requests(rate: float) -> float:
    """Requests that may go out at once at ``rate``: 1.5, or 35 ms of requests (see above)."""
    return max(_SLACK, rate * _SLACK_SECONDS)


def window_of(rate: float) -> tuple[int, float]:
    """(count, seconds): at most ``count`` sends in any ``seconds`` at the configured ``rate``.
    A server's "per second" is a whole number: ``count`` is the rate's whole part (at least 1),
    over a second (or, below 1/s, the time one request takes), stretched by the margin above."""
    count = max(1, math.floor(rate))
    return count, max(1.0, count / rate) * (1 + WINDOW_MARGIN)


class SendWindow:
    """A sliding log of the last ``count`` send times: a send waits until the one ``count``
    before it is ``seconds`` old. Callers take turns (the gate holds a lock), so each records
    the time it really goes and walkers waiting together leave one by one, paced as they came."""

    def __init__(self, rate: float) -> None:
        self.count, self.seconds = window_of(rate)
        self._times: deque[float] = deque(maxlen=self.count)

    def wait(self, now: float) -> float:
        """Seconds until a send may go (0: now)."""
        if len(self._times) < self.count:
            return 0.0
        return max(0.0, self._times[0] + self.seconds - now)

    def record(self, now: float) -> None:
        self._times.append(now)


class Gate(Protocol):
    """What a walker needs of a rate gate: this module's for one process, or one shared in
    Redis by every process on the key (``coordination/gate.py``)."""

    configured: float
    current: float
    episodes: int
    limited_at: float | None  # requests/s when the last 429 episode began (None: none yet)

    def held(self) -> float | None:
        """The highest rate that held for a while without a 429, if this gate knows one."""

    @property
    def paused(self) -> bool: ...

    async def acquire(self) -> None: ...

    async def on_rate_limited(self, retry_after: float | None, sent_ago: float = 0.0) -> None:
        """A 429 for a request sent ``sent_ago`` seconds ago."""


class RateGate:
    """Admits requests at the configured rate; after a 429, pauses everyone and slows down
    (``slowdown.py``)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.configured = rate
        self.current = rate
        self.episodes = 0
        self.limited_at: float | None = None
        self._clock = clock or asyncio.get_running_loop().time
        self._sleep = sleep
        self._limiter = self._make_limiter(rate)
        self._window = SendWindow(rate)  # the configured rate's: a slower pace is the limiter's
        self._window_turn = asyncio.Lock()
        self._resume_at = 0.0
        self._began = -math.inf  # when the last episode began
        self._slowdown = Slowdown()
        self._held = HeldRate()
        self._held.reached(self._clock(), 1.0)

    @staticmethod
    def _make_limiter(rate: float) -> AsyncLimiter:
        capacity = slack_requests(rate)
        return AsyncLimiter(capacity, capacity / rate)

    async def acquire(self) -> None:
        """Wait for the shared pause to end and for a slot at the current rate.

        A 429 can arrive while a walker waits inside the limiter: the pause is checked again
        once the limiter lets it through, so no request leaves during a pause, whatever the
        walker was doing when it began.
        """
        while True:
            # the pause can be pushed later while we sleep, so re-check rather than wait on an
            # event
            while (wait := self._resume_at - self._clock()) > 0:
                await self._sleep(wait)
            self._recover()
            # one walker at a time: the window first, then the limiter, which spaces the sends
            # even when several walkers' window times have all passed (a late wake-up)
            async with self._window_turn:
                while (wait := self._window.wait(self._clock())) > 0:
                    await self._sleep(wait)
                await self._limiter.acquire()
                if self._resume_at <= self._clock():
                    self._window.record(self._clock())
                    return

    @property
    def paused(self) -> bool:
        return self._resume_at > self._clock()

    async def on_rate_limited(self, retry_after: float | None, sent_ago: float = 0.0) -> None:
        """A 429 answer: pause every walker; slow down once per episode, not per answer. A
        request sent before the last episode began (its answer late) tells nothing new of the
        rate now: it pauses, but begins no episode."""
        now = self._clock()
        pause = retry_after if retry_after is not None else max(_DEFAULT_PAUSE, 1 / self.current)
        new_episode = now >= self._resume_at and now - sent_ago >= self._began
        self._resume_at = max(self._resume_at, now + pause)
        if new_episode:
            self.episodes += 1
            self._began = now
            self.limited_at = self.current
            self._held.limited(now)
            self._slowdown.limited(now)
            self._set_rate()
            log.warning(
                "rate limited: pausing every walker",
                pause_seconds=round(pause, 3),
                rate=round(self.current, 3),
                episode=self.episodes,
            )

    def _recover(self) -> None:
        if self._slowdown.recover(self._clock(), self._resume_at):
            self._set_rate()
            if self.current == self.configured:
                log.info("rate recovered", rate=self.current)

    def held(self) -> float | None:
        best = self._held.settle(self._clock())
        return self.configured * best if best else None

    def _set_rate(self) -> None:
        self.current = self.configured * self._slowdown.share
        self._held.reached(self._clock(), self._slowdown.share)
        old, self._limiter = self._limiter, self._make_limiter(self.current)
        # a fresh bucket is empty, and would let a send go at once however recent the last one
        # (a strict server's bucket answered that with 429s): it starts as full as the old one
        # (aiolimiter has no public way to set a level, so its two fields are copied)
        old.has_capacity(0)  # leaks the old bucket up to now
        self._limiter._level = min(old._level, self._limiter.max_rate)
        self._limiter._last_check = old._last_check
