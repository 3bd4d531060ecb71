"""What the person and the logs see while a job runs: a live line on a terminal, else a log line."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from rich.console import Console
from rich.live import Live
from rich.text import Text

log = structlog.get_logger("crawler.progress")


@dataclass(frozen=True)
class Figures:
    targets_done: int
    targets_total: int
    pages: int
    records: int
    duplicates: int
    credits: int
    max_credits: int
    requests: int  # this run, for the rate
    rate_limited: int
    retries: int
    failed: int
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
    ) -> None:
        self._figures = figures
        self._live = live
        self._interval = interval
        self._log_every = log_every
        self._console = console or Console(stderr=True)
        self._samples: deque[tuple[float, int]] = deque(maxlen=20)

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _sample(self) -> Figures:
        figures = self._figures()
        self._samples.append((time.monotonic(), figures.requests))
        return figures

    async def run(self) -> None:
        """Until cancelled by its owner at the end of the run."""
        if self._live:
            with Live(console=self._console, refresh_per_second=4, transient=False) as live:
                try:
                    while True:
                        live.update(self.render(self._sample()))
                        await asyncio.sleep(self._interval)
                finally:
                    live.update(self.render(self._sample()))
        else:
            next_log = time.monotonic() + self._log_every
            while True:
                await asyncio.sleep(min(self._interval, self._log_every))
                figures = self._sample()
                if time.monotonic() >= next_log:
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

    def render(self, f: Figures) -> Text:
        width = 30
        share = f.targets_done / f.targets_total if f.targets_total else 1.0
        bar = "#" * round(share * width) + "-" * (width - round(share * width))
        eta = self.eta(f)
        eta_text = "--:--" if eta is None else f"{eta // 60:02d}:{eta % 60:02d}"
        text = Text()
        text.append(f"targets [{bar}] {f.targets_done}/{f.targets_total}", style="bold")
        if f.failed:
            text.append(f"  failed {f.failed}", style="red")
        text.append(f"  ETA {eta_text}\n")
        text.append(
            f"pages {f.pages:,}  reviews {f.records:,}  duplicates dropped {f.duplicates:,}\n"
        )
        text.append(f"credits {f.credits:,} / {f.max_credits:,}  ")
        text.append(f"rate {self.rate():.1f} req/s  429s {f.rate_limited}  retries {f.retries}")
        return text
