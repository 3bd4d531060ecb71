"""The share of the configured rate to send at after 429s: halve, climb back, hold, probe.

Halving on each 429 episode and climbing straight back to the configured rate (what the gates
did first) settles at about two thirds of what the API allows when the job asks for more: every
climb runs into the limit again, and every 429 costs a pause and a halving. So the rate that drew
a 429 is remembered (the ceiling):

- a 429 halves the share; the climb back (a tenth of the configured rate per quiet second)
  stops under the ceiling, at ``SAFE_AFTER_CLIMB`` of it, and stays there ``HOLD_SECONDS``. A
  429 is met some time after the limit is passed (the server's burst drains first, the answer
  takes its time), so a fast climb meets it above the limit: 0.95 of such a ceiling was still
  above it in a test asking 60/s of a key allowing 40, and drew a third halving.
- then it probes upwards slowly (``PROBE_PER_SECOND``), up to the configured rate;
- a 429 met while probing above the safe share says that the limit lies just below: the share
  steps back to ``SAFE_AFTER_PROBE`` of this rate, without halving.

A job asking 50/s of an API allowing 45 settles just under the 45 (one 429 episode every half
minute or so; ``docs/benchmarks.md``) where it got 0.66; a job asking no more than the API allows
never meets a 429 and never leaves the configured rate. ``coordination/scripts.py`` keeps the
same rules in Redis for every worker on a key.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

HALVE = 0.5  # share factor on a 429 episode not met while probing
FLOOR = 0.05  # never below this share of the configured rate
RECOVERY_PER_SECOND = 0.1  # share won back per quiet second, up to the safe share
SAFE_AFTER_CLIMB = 0.9  # share of the ceiling the climb back stops at
SAFE_AFTER_PROBE = 0.95  # the same, for a ceiling met while probing slowly: a closer one
HOLD_SECONDS = 30.0  # time at the safe share before probing above it
PROBE_PER_SECOND = 0.01  # share won per second while probing above the safe share


@dataclass
class Slowdown:
    """Shares of the configured rate, times on the caller's clock (seconds)."""

    share: float = 1.0
    ceiling: float = 1.0  # the share that last drew a 429 (1: none yet)
    margin: float = SAFE_AFTER_CLIMB  # the share of the ceiling that is safe
    changed: float = -math.inf  # when the share last went down or took a recovery step
    reached: float = math.inf  # when the climb back reached the safe share

    @property
    def safe(self) -> float:
        return self.margin * self.ceiling

    def limited(self, now: float) -> None:
        """A new 429 episode, begun at ``now``."""
        probing = self.share > self.safe * (1 + 1e-9)
        self.ceiling = self.share
        if probing and self.reached <= now:
            self.margin = SAFE_AFTER_PROBE
            self.share = max(FLOOR, self.safe)  # at the floor, "probing" is the floor's own
            self.reached = now
        else:
            self.margin = SAFE_AFTER_CLIMB
            self.share = max(FLOOR, self.share * HALVE)
            # at the floor, the share can be above the safe one already: it holds, then probes
            self.reached = now if self.share >= self.safe else math.inf
        self.changed = now

    def recover(self, now: float, paused_until: float) -> bool:
        """Win back what the time since the last change (and the pause) allows; True if the
        share changed."""
        if self.share >= 1.0:
            return False
        if self.share < self.safe:
            quiet = now - max(self.changed, paused_until)
            if quiet < 1.0:
                return False
            self.share = min(self.safe, self.share + RECOVERY_PER_SECOND * quiet)
            self.changed = now
            if self.share >= self.safe:
                self.reached = now
            return True
        # held from the end of the pause, if later (a long Retry-After is no time at the safe
        # share); a step a second, not a new rate at every request
        held = now - max(self.reached, paused_until)
        probed = min(1.0, self.safe + PROBE_PER_SECOND * (held - HOLD_SECONDS))
        if probed < min(1.0, self.share + PROBE_PER_SECOND):
            return False
        self.share = probed
        return True


@dataclass
class HeldRate:
    """The highest share that held ``HOLD_SECONDS`` without a 429: what the run's end tells a
    user the key is likely to allow (the share that drew the last 429 is half an episode too
    high, and the halved one after it far too low). Between 429s the share only rises, so a
    share held if the next 429 came ``HOLD_SECONDS`` or more after it was reached."""

    best: float = 0.0
    _steps: deque[tuple[float, float]] = field(default_factory=deque)

    def reached(self, now: float, share: float) -> None:
        self.settle(now)
        self._steps.append((now, share))

    def limited(self, now: float) -> None:
        """A 429 episode: what had held until now counts; the rest did not hold."""
        self.settle(now)
        self._steps.clear()

    def settle(self, now: float) -> float:
        """The best share held as of ``now``."""
        while self._steps and self._steps[0][0] <= now - HOLD_SECONDS:
            self.best = max(self.best, self._steps.popleft()[1])
        return self.best
