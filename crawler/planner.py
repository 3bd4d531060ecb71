"""Estimates of a job's pages, credits and time, from the totals the state keeps."""

from __future__ import annotations

import math
from typing import Any

from crawler.config import Job
from crawler.state import Ledger, Totals
from crawler.state.events import WALKABLE


def pages_left(totals: Totals, unlisted: int = 0) -> int | None:
    """Pages still to walk: the estimates of walks whose page 1 told their size, plus the typical
    size of those for targets not started (``unlisted``: targets the state has not seen yet).
    None while no walk has told its size."""
    walkable = [totals.by_status[s] for s in WALKABLE]
    left = sum(s.pages_left for s in walkable)
    unknown = unlisted + sum(s.count - s.expected_known for s in walkable)
    known = sum(s.expected_known for s in totals.by_status.values())
    if not known:
        return None if unknown else 0
    typical = totals.total("expected") / known
    return left + math.ceil(unknown * typical)


def estimate(job: Job, totals: Totals, ledger: Ledger, *, unlisted: int = 0) -> dict[str, Any]:
    """What is left of the job: pages, credits (against the budget) and time."""
    pages = pages_left(totals, unlisted)
    walkable = sum(totals.by_status[s].count for s in WALKABLE) + unlisted
    unknown = unlisted + sum(
        totals.by_status[s].count - totals.by_status[s].expected_known for s in WALKABLE
    )
    spent = max(ledger.leased, ledger.credits)
    available = job.budget.max_credits - spent
    needed = None if pages is None else pages * job.budget.credits_per_request
    return {
        "targets_left": walkable,
        "targets_unknown": unknown,
        "pages_left": pages,
        "credits_needed": needed,
        "credits_spent": spent,
        "credits_available": available,
        "budget_covers": None if needed is None else needed <= available,
        "seconds": None if pages is None else math.ceil(pages / job.api.requests_per_second),
        "estimate": "measured" if not unknown else ("typical" if pages is not None else None),
    }


def stages(sources: list[dict[str, Any]], estimate: dict[str, Any]) -> dict[str, Any]:
    """A discovery job's stages: the sources' pages walked and targets left (their length is
    unknown until walked), the products they found, the review pages left of those."""
    return {
        "source_pages_walked": sum(s["pages"] or 0 for s in sources),
        "source_targets_left": sum(s["targets"] - (s["targets_done"] or 0) for s in sources),
        "products_found": sum(s["products_found"] or 0 for s in sources),
        "review_pages_left": estimate["pages_left"],
    }
