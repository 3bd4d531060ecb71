"""The picture of a job from its saved state: per target and in total, cumulative over all runs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from crawler.config import Job
from crawler.state import JobState, TargetState


def target_status(job_target_max_pages: int | None, saved: TargetState) -> str:
    """A target's status as far as the saved state tells (a run may know more: budget stops)."""
    if saved.exhausted or (
        job_target_max_pages is not None and saved.pages >= job_target_max_pages
    ):
        return "done"
    if saved.failed:
        return "failed"
    return "pending"


def build(
    job: Job,
    state: JobState,
    *,
    live_status: dict[str, tuple[str, str | None]] | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run report / status document. ``live_status`` overrides what the state alone says."""
    targets = []
    totals: dict[str, Any] = dict.fromkeys(
        ("pages", "items", "records", "duplicates", "credits", "retries", "rate_limited"), 0
    )
    totals["seconds"] = 0.0
    counts: dict[str, int] = {}
    for target in job.targets:
        saved = state.targets.get(target.key, TargetState())
        status = target_status(target.max_pages, saved)
        reason = saved.failed if status == "failed" else None
        if live_status and target.key in live_status and status != "done":
            status, reason = live_status[target.key]
        counts[status] = counts.get(status, 0) + 1
        row = {"product_id": target.product_id, "region": target.region, "status": status}
        if reason:
            row["reason"] = reason
        figures = asdict(saved)
        for name in ("cursor", "exhausted", "failed"):
            figures.pop(name)
        figures["seconds"] = round(figures["seconds"], 3)
        row.update(figures)
        for name in totals:
            totals[name] += figures[name]
        targets.append(row)
    totals["seconds"] = round(totals["seconds"], 3)
    # every request sent, retries, failures and a crash's unused lease included: an upper bound
    totals["credits_charged"] = max(state.leased, state.credits)
    totals["max_credits"] = job.budget.max_credits
    totals["runs"] = state.runs
    totals["shards"] = len(state.shards) + (state.open_shard is not None)
    return {
        "job": str(job.path),
        "output_dir": str(job.output.dir),
        "targets_total": len(job.targets),
        "targets_by_status": counts,
        "totals": totals,
        **({"run": run} if run else {}),
        "targets": targets,
    }
