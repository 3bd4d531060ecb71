"""The rate gate of one API key across every worker of every job on one Redis: GCRA in a script.

Slots are handed out by Redis, on Redis's clock, spaced 1/rate apart; a worker asks for as many
as it has walkers waiting (one round trip for several requests) and sends each at its slot. The
429 pause and the slow-down after it are shared the same way. Within a process no request leaves
during a pause; across processes, only slots already handed out (at most the gate's 35 ms of
slack) can.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from crawler import logs
from crawler.coordination.link import Link
from crawler.coordination.scripts import RATE, RATE_LIMITED, RATE_SAID
from crawler.pacing.limits import WINDOW_MARGIN, slack_requests

log = logs.get_logger("crawler.limits")
_DEFAULT_PAUSE = 1.0


class SharedRateGate:
    """Same surface as ``RateGate``: ``acquire``, ``on_rate_limited``, ``episodes``, ``paused``."""

    def __init__(
        self,
        link: Link,
        key_fingerprint: str,
        rate: float,
        *,
        job: str = "",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.configured = rate
        self.current = rate
        self.episodes = 0
        self.limited_at: float | None = None
        self._key = f"crawler:rate:{key_fingerprint}"
        self._slack = slack_requests(rate)
        self._rate = link.script(RATE)
        self._limited = link.script(RATE_LIMITED)
        self._said = link.script(RATE_SAID)
        self._job = job
        self._checked = False
        self._sleep = sleep
        self._clock = asyncio.get_running_loop().time
        self._slots: deque[float] = deque()  # local times of slots Redis handed out
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._paused_until = 0.0

    @property
    def paused(self) -> bool:
        return self._paused_until > self._clock()

    def held(self) -> float | None:
        return None  # the key's rate moves in Redis, with every worker's 429s: not known here

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            while True:
                if not self._slots:
                    async with self._lock:
                        if not self._slots:
                            await self._ask()
                    continue
                wait = self._slots.popleft() - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                if not self.paused:  # a 429 while waiting for the slot: the slot is void
                    return
        finally:
            self._waiting -= 1

    async def _ask(self) -> None:
        if not self._checked:
            await self._check_said()
        if (pause := self._paused_until - self._clock()) > 0:
            await self._sleep(pause)
        wanted = max(1, min(self._waiting, int(self._slack) + 1))
        answer = await self._rate(
            keys=[self._key, self._key + ":sent"],
            args=[self.configured, self._slack, wanted, WINDOW_MARGIN],
        )
        now = self._clock()
        if int(answer[0]) < 0:  # paused, or no slot free before the next one comes
            await self._sleep(int(answer[1]) / 1e6)
            return
        self._slots.extend(now + int(delay) / 1e6 for delay in answer)

    async def _check_said(self) -> None:
        """Says once if another job on this key said another rate within the hour: the key
        allows one."""
        others = await self._said(keys=[self._key + ":said"], args=[self.configured, self._job])
        self._checked = True
        for job, said in zip(others[::2], others[1::2], strict=True):
            if float(said) != self.configured:
                log.warning(
                    "another job on this API key says another rate: the key's rate is shared, "
                    "so give every job on it the rate the key allows",
                    this_job=self._job,
                    requests_per_second=self.configured,
                    other_job=job,
                    other_requests_per_second=float(said),
                )

    async def on_rate_limited(self, retry_after: float | None, sent_ago: float = 0.0) -> None:
        pause = retry_after if retry_after is not None else max(_DEFAULT_PAUSE, 1 / self.current)
        self._slots.clear()
        self._paused_until = max(self._paused_until, self._clock() + pause)
        episode, ceiling = await self._limited(
            keys=[self._key], args=[int(pause * 1e6), int(sent_ago * 1e6)]
        )
        self.limited_at = self.configured * float(ceiling)  # whichever worker began it
        if int(episode):
            self.episodes += 1
            log.warning(
                "rate limited: pausing every walker of every worker on this key",
                pause_seconds=round(pause, 3),
                episode=self.episodes,
            )
