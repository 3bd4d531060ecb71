"""What the person and the logs see while a job runs: a live summary on a terminal, else logs.

The live display (rich, imported only then) is drawn when the command line asks for it: a run
of one process whose stderr is a terminal. Every line of it fits the terminal's width (the
less useful figures are left out when it is narrow). Elsewhere, and for the workers of a
coordinated job, which may share one terminal, it is one log line every ``log_every`` seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crawler import logs
from crawler.screen import fit_parts, lines

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

log = logs.get_logger("crawler.progress")


@dataclass(frozen=True)
class Figures:
    targets_done: int
    targets_total: int
    failed: int
    capped: int  # stopped at their own credit cap
    pages: int
    records: int
    duplicates: int
    credits: int
    max_credits: int
    requests: int  # this run, for the rate
    rate_limited: int
    retries: int
    episodes: int  # 429 episodes this run
    paused: bool  # a 429 pause is in force now
    pages_left: int | None  # estimate; None when nothing is known yet


class Progress:
    """Samples the figures every ``interval`` seconds and shows them; owns no other state."""

    def __init__(
        self,
        figures: Callable[[], Figures],
        *,
        live: bool,
        interval: float = 0.5,
        log_every: float = 10.0,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._figures = figures
        self._clock = clock
        self._sleep = sleep
        self._live = live
        self._interval = interval
        self._log_every = log_every
        self._console = console
        self._samples: deque[tuple[float, int]] = deque(maxlen=20)

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _sample(self) -> Figures:
        figures = self._figures()
        self._samples.append((self._clock(), figures.requests))
        return figures

    async def run(self) -> None:
        """Until cancelled by its owner at the end of the run."""
        if self._live:
            from rich.console import Console  # noqa: PLC0415 -- only a live display needs rich
            from rich.live import Live  # noqa: PLC0415

            self._console = self._console or Console(stderr=True)
            with Live(console=self._console, refresh_per_second=4, transient=False) as live:
                try:
                    while True:
                        live.update(self.render(self._sample()))
                        await self._sleep(self._interval)
                finally:
                    live.update(self.render(self._sample()))
        else:
            next_log = self._clock() + self._log_every
            while True:
                await self._sleep(min(self._interval, self._log_every))
                figures = self._sample()
                if self._clock() >= next_log:
                    next_log += self._log_every
                    log.info("progress", **self.summary(figures))

    def summary(self, f: Figures) -> dict[str, object]:
        return {
            "targets_done": f.targets_done,
            "targets_total": f.targets_total,
            "pages": f.pages,
            "reviews": f.records,
            "duplicates": f.duplicates,
            "credits": f.credits,
            "max_credits": f.max_credits,
            "rate": round(self.rate(), 2),
            "rate_limited": f.rate_limited,
            "retries": f.retries,
            "failed": f.failed,
            "eta_seconds": self.eta(f),
        }

    def eta(self, f: Figures) -> int | None:
        rate = self.rate()
        if f.pages_left is None or rate <= 0:
            return None
        return math.ceil(f.pages_left / rate)

    def render(self, f: Figures, width: int | None = None) -> RenderableType:
        """The live display: every line within ``width`` (the console's)."""
        from rich.text import Text  # noqa: PLC0415 -- as in run

        if width is None:
            width = self._console.width if self._console is not None else 80
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("\n".join(self.text_lines(f, width)))
        attention = self._attention(f)
        if attention:
            text.append("\n")
            text.append("\n".join(lines(attention, width, sep="  ")), style="yellow")
        return text

    def text_lines(self, f: Figures, width: int) -> list[str]:
        """The figures, fit to ``width``: each part has a priority, and the least useful go
        first when the line is too long (0: always shown)."""
        eta = self.eta(f)
        done = f"{f.targets_done:,}/{f.targets_total:,}"
        room = width - len(f"targets  {done}  ETA --:--") - 2
        bar = _bar(f.targets_done, f.targets_total, min(30, room)) if room >= 10 else ""
        return [
            fit_parts(
                [
                    (0, "targets"),
                    (2, bar),
                    (0, done),
                    (1, f"ETA {'--:--' if eta is None else _clock(eta)}"),
                ],
                width,
            ),
            fit_parts(
                [
                    (0, f"pages {f.pages:,}"),
                    (0, f"reviews {f.records:,}"),
                    (2, f"duplicates {f.duplicates:,}"),
                ],
                width,
            ),
            fit_parts(
                [
                    (0, f"credits {f.credits:,} / {f.max_credits:,}"),
                    (1, f"rate {self.rate():.1f} req/s"),
                    (2, f"retries {f.retries:,}"),
                ],
                width,
            ),
        ]

    @staticmethod
    def _attention(f: Figures) -> list[str]:
        """What a person should notice: failures, 429s, the budget."""
        parts = []
        if f.failed:
            parts.append(f"failed {f.failed:,} (crawler status lists them)")
        if f.capped:
            parts.append(f"at their credit cap {f.capped:,}")
        if f.rate_limited:
            now = ", pausing now" if f.paused else ""
            parts.append(f"rate_limited {f.rate_limited:,} ({f.episodes:,} episodes{now})")
        if f.max_credits and f.credits >= 0.9 * f.max_credits:
            parts.append(f"budget {f.credits / f.max_credits:.0%} spent")
        return parts


def _bar(done: int, total: int, width: int) -> str:
    filled = round(width * done / total) if total else 0
    return "━" * filled + "─" * (width - filled)


def _clock(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )
