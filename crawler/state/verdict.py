"""Whether a finished walk got all of its target: the verdicts, their tolerance, the shortfall.

A walk's page 1 says how many reviews the target has (``review_count``); a feed may still end
(``has_more: false``) well below it (listings capped at about 5,000 reviews per sort order, say).
``rules`` records a verdict when a walk ends; this module says what it is. Pure functions only.
"""

from __future__ import annotations

from enum import StrEnum

from crawler.state.events import Finish


class Verdict(StrEnum):
    """How complete a finished target's harvest is."""

    COMPLETE = "complete"  # what the feed gave reaches its count, within the tolerance
    SHORT = "short"  # the feed ended below its count
    CAPPED = "capped"  # max_pages or the target's credit cap ended the walk
    UNKNOWN = "unknown"  # the API gave no count


VERDICTS = tuple(Verdict)
# a feed may fall this short of its count and still be complete: counts move while a walk goes
# on (reviews added or removed meanwhile), and a few hidden reviews are counted but never shown
TOLERANCE_SHARE = 0.01
TOLERANCE_REVIEWS = 5


def tolerance(count: int) -> int:
    """Reviews a complete feed may lack: 1% of its count, and never fewer than 5."""
    return max(TOLERANCE_REVIEWS, int(count * TOLERANCE_SHARE))


def judged(finish: Finish | None, count: int | None, seen: int | None) -> Verdict:
    """The verdict of a walk that ended with ``finish``, given the count its page 1 said and the
    reviews it accounted for (written, with the other targets' duplicates it met, each review
    once; None: not the whole feed)."""
    if finish is Finish.CAP or seen is None:
        return Verdict.CAPPED
    if count is None:
        return Verdict.UNKNOWN
    return Verdict.COMPLETE if seen >= count - tolerance(count) else Verdict.SHORT


def seen_after(
    finish: Finish | None, walk_shown: int, walk_new: int, before: int | None
) -> int | None:
    """The reviews a finished walk accounts for. A whole feed (``END``): every review it showed,
    once each, written or met as another target's duplicate. A refresh's early stop (``GOAL``,
    ``SAME``): the last harvest's figure plus the new reviews it found, as many as the count
    grew by. A cap: None (part of a feed)."""
    if finish is Finish.END:
        return walk_shown
    if finish in (Finish.GOAL, Finish.SAME) and before is not None:
        return before + walk_new
    return None


def missing(verdict: str | None, count: int | None, seen: int | None) -> int:
    """Reviews a short target lacks (0 for any other verdict)."""
    if verdict != Verdict.SHORT or count is None or seen is None:
        return 0
    return max(0, count - seen)


# ``missing`` as SQL over the targets table, for sums that must not read every row in Python
MISSING_SQL = "CASE WHEN verdict = 'short' THEN max(0, base_count - seen) ELSE 0 END"
