"""What the person and the logs see while a job runs: a live summary on a terminal, else logs."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.progress import Progress as Bar
from rich.text import Text

log = structlog.get_logger("crawler.progress")


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
        self._console = console or Console(stderr=True)
        self._samples: deque[tuple[float, int]] = deque(maxlen=20)
        self._bar = Bar(
            TextColumn("targets"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self._console,
        )
        self._task = self._bar.add_task("targets", total=None, eta="--:--")

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

    def render(self, f: Figures) -> Group:
        eta = self.eta(f)
        self._bar.update(
            self._task,
            completed=f.targets_done,
            total=f.targets_total,
            eta="--:--" if eta is None else _clock(eta),
        )
        text = Text()
        text.append(
            f"pages {f.pages:,}  reviews {f.records:,}  duplicates dropped {f.duplicates:,}\n"
        )
        text.append(f"credits {f.credits:,} / {f.max_credits:,}  ")
        text.append(f"rate {self.rate():.1f} req/s  retries {f.retries:,}")
        attention = self._attention(f)
        if attention.plain:
            text.append("\n")
            text.append_text(attention)
        return Group(self._bar.get_renderable(), text)

    @staticmethod
    def _attention(f: Figures) -> Text:
        """What a person should notice: failures, 429s, the budget."""
        parts = Text()
        if f.failed:
            parts.append(f"failed {f.failed:,} (crawler status lists them)  ", style="red")
        if f.capped:
            parts.append(f"at their credit cap {f.capped:,}  ", style="yellow")
        if f.rate_limited:
            style = "bold yellow" if f.paused else "yellow"
            now = " - pausing now" if f.paused else ""
            parts.append(
                f"429s {f.rate_limited:,} ({f.episodes} episodes this run){now}  ", style=style
            )
        if f.max_credits and f.credits >= 0.9 * f.max_credits:
            parts.append(f"budget {f.credits / f.max_credits:.0%} spent", style="yellow")
        return parts


def _clock(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )
