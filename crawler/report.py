"""The picture of a job from its saved state: totals by status, what needs attention, runs and
refreshes (``run-report.json``, ``status``); every target's figures as CSV on demand."""

from __future__ import annotations

import csv
from typing import Any, TextIO

from crawler import planner
from crawler.config import Job
from crawler.state import StateView

ATTENTION = 20  # targets listed by name: a screenful; the CSV and --all have them all
CSV_COLUMNS = (
    "product_id",
    "region",
    "status",
    "finish",
    "reason",
    "pages",
    "records",
    "duplicates",
    "credits",
    "retries",
    "rate_limited",
    "seconds",
    "review_count",
    "walk",
    "walk_pages",
    "walk_new",
    "walk_expected",
    "max_pages",
)
_SUMMED = ("pages", "items", "records", "duplicates", "credits", "retries", "rate_limited")


def build(job: Job, view: StateView, *, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status / run report document: small whatever the number of targets."""
    totals = view.totals()
    ledger = view.ledger
    unlisted = max(0, len(job.targets) - totals.targets)  # added to the job since its last run
    figures: dict[str, Any] = {name: int(totals.total(name)) for name in _SUMMED}
    # summed over targets, whose walks overlap: not the wall time (the runs have that)
    figures["target_seconds"] = round(totals.total("seconds"), 3)
    figures["credits_charged"] = max(ledger.leased, ledger.credits)  # an upper bound
    # leased by runs that died holding them (part of credits_charged): maybe never sent
    figures["credits_forfeited"] = ledger.forfeited
    figures["max_credits"] = job.budget.max_credits
    figures["runs"] = view.job["runs"]
    shards = view.shards()
    figures["shards"] = len(shards) + (view.job["open_shard"] is not None)
    by_status = {str(s): n.count for s, n in totals.by_status.items() if n.count}
    if unlisted:
        by_status["pending"] = by_status.get("pending", 0) + unlisted
    # while walks are under way, leased credits may still walk pending targets (RedisView)
    spent = ledger.credits if view.walking else figures["credits_charged"]
    if by_status.get("pending") and (
        view.budget_stopped or job.budget.max_credits - spent < job.budget.credits_per_request
    ):  # what one process stores at a budget stop, the workers of a coordinated job show so
        by_status["stopped_budget"] = by_status.get("stopped_budget", 0) + by_status.pop("pending")
    estimate = planner.estimate(job, totals, ledger, unlisted=unlisted)
    sources = view.sources() if job.sources else []
    if sources:  # the stages of a discovery job: sources walked, products found, reviews left
        estimate["stages"] = planner.stages(sources, estimate)
    return {
        "job": str(job.path),
        "output_dir": str(job.output.dir),
        "targets_total": totals.targets + unlisted,
        "targets_by_status": by_status,
        "totals": figures,
        "estimate": estimate,
        **({"sources": sources} if sources else {}),
        "refreshes": view.refreshes(),
        **({"run": run} if run else {}),
        "attention": [_row(r) for r in view.attention(ATTENTION)],
        # every target's figures: too many for this document at a million targets
        "targets_detail": "state/state.db, table targets (or: crawler status --csv)",
    }


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in CSV_COLUMNS if row.get(name) is not None}


def write_csv(view: StateView, out: TextIO) -> int:
    """Every target's figures as CSV, one row each (what pandas and DuckDB read); the rows."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in view.rows(CSV_COLUMNS):
        writer.writerow(row)
        count += 1
    return count
