"""Estimates of a job's pages, credits and time, from the job file and what the state knows."""

from __future__ import annotations

import math
from typing import Any

from crawler.config import Job
from crawler.state import JobState, TargetState


def estimate(job: Job, state: JobState | None) -> dict[str, Any]:
    """Per target: pages left (None when unknown without a probe); in total: credits and time."""
    targets = state.targets if state else {}
    sizes = [t.items / t.pages for t in targets.values() if t.pages]
    per_page = sum(sizes) / len(sizes) if sizes else None
    rows = []
    known_pages = 0
    unknown = 0
    for target in job.targets:
        saved = targets.get(target.key, TargetState())
        left = _pages_left(saved, target.max_pages, per_page)
        if left is None:
            unknown += 1
        else:
            known_pages += left
        rows.append(
            {
                "product_id": target.product_id,
                "region": target.region,
                "review_count": saved.review_count,
                "pages_done": saved.pages,
                "pages_left": left,
            }
        )
    cost = job.budget.credits_per_request
    spent = max(state.leased, state.credits) if state else 0
    credits_needed = known_pages * cost
    available = job.budget.max_credits - spent
    return {
        "targets": rows,
        "pages_left": known_pages,
        "targets_unknown": unknown,
        "credits_needed": credits_needed,
        "credits_spent": spent,
        "credits_available": available,
        "budget_covers": None if unknown else credits_needed <= available,
        "seconds": math.ceil(known_pages / job.api.requests_per_second),
    }


def _pages_left(saved: TargetState, max_pages: int | None, per_page: float | None) -> int | None:
    if saved.exhausted:
        return 0
    total: int | None = None
    if saved.review_count is not None and per_page:
        total = max(1, math.ceil(saved.review_count / per_page)) if saved.review_count else 1
    if max_pages is not None:
        total = max_pages if total is None else min(total, max_pages)
    return None if total is None else max(0, total - saved.pages)
