"""The picture of a job from its saved state: totals by status, what needs attention, runs and
refreshes (``run-report.json``, ``status``); every target's figures as CSV on demand.

One name per figure, the same in the status table, ``--json``, ``--csv`` and the run report
(README lists them): ``reviews`` written (new, once each), ``received`` (every review a page
carried, duplicates included), ``duplicates`` dropped, ``pages``, ``credits``, ``retries``,
``rate_limited`` (429 answers). A target is shown as one of ``STATUSES``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from crawler import planner
from crawler.config import Job
from crawler.state import StateView, Totals
from crawler.state.events import Status
from crawler.state.model import Sums
from crawler.state.verdict import VERDICTS

ATTENTION = 20  # targets listed by name: a screenful; the CSV and --all have them all
# the status a target is shown with: the saved ``pending`` is split by whether its walk has a
# page yet; ``stopped_budget`` is a walk its own cap or the job's budget cut short part way
STATUSES = ("done", "in_progress", "not_started", "stopped_budget", "failed")
# shown name -> the saved field it is read from (state.db's columns, the Redis store's fields)
SAVED = {"reviews": "records", "received": "items"}
CSV_COLUMNS = (
    "product_id",
    "region",
    "status",
    "verdict",
    "missing",
    "finish",
    "reason",
    "pages",
    "reviews",
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
_READ = tuple(dict.fromkeys((*(SAVED.get(c, c) for c in CSV_COLUMNS), "walk_pages")))
_SUMMED = ("pages", "received", "reviews", "duplicates", "credits", "retries", "rate_limited")


def shown_status(status: str, walk_pages: int | None, *, spent_out: bool = False) -> str:
    """A saved status as it is shown: ``pending`` is ``in_progress`` once its walk has a page
    (``stopped_budget`` once the budget is spent), ``not_started`` before: a budget stop cut
    no walk of theirs short, they wait for a larger budget as they were."""
    if status == Status.PENDING or (status == Status.BUDGET and not walk_pages):
        if not walk_pages:
            return "not_started"
        return "stopped_budget" if spent_out else "in_progress"
    return status


def spent_out(job: Job, view: StateView) -> bool:
    """Whether the budget is spent: what one process stores at a budget stop
    (``rules.BUDGET_STOPPED``), the workers of a coordinated job show so."""
    ledger = view.ledger
    # while walks are under way, leased credits may still walk pending targets (RedisView)
    spent = ledger.credits if view.walking else max(ledger.leased, ledger.credits)
    left = job.budget.max_credits - spent
    return view.budget_stopped or left < job.budget.credits_per_request


def build(job: Job, view: StateView, *, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status / run report document: small whatever the number of targets."""
    totals = view.totals()
    ledger = view.ledger
    unlisted = max(0, len(job.targets) - totals.targets)  # added to the job since its last run
    figures: dict[str, Any] = {name: int(totals.total(SAVED.get(name, name))) for name in _SUMMED}
    # summed over targets, whose walks overlap: not the wall time (the runs have that)
    figures["target_seconds"] = round(totals.total("seconds"), 3)
    figures["credits_charged"] = max(ledger.leased, ledger.credits)  # an upper bound
    # leased by runs that died holding them (part of credits_charged): maybe never sent
    figures["credits_forfeited"] = ledger.forfeited
    figures["max_credits"] = job.budget.max_credits
    figures["runs"] = view.job["runs"]
    shards = view.shards()
    figures["shards"] = len(shards) + (view.job["open_shard"] is not None)
    figures.update(completeness(totals, figures["credits_charged"]))
    spent = figures["budget_spent"] = spent_out(job, view)  # what is left buys no request
    estimate = planner.estimate(job, totals, ledger, unlisted=unlisted)
    sources = view.sources() if job.sources else []
    if sources:  # the stages of a discovery job: sources walked, products found, reviews left
        estimate["stages"] = planner.stages(sources, estimate)
    return {
        "job": str(job.path),
        "output_dir": job.output.bucket or str(job.output.dir),
        "targets_total": totals.targets + unlisted,
        "targets_by_status": _by_status(view, unlisted, spent_out=spent),
        # finished targets: did the feed give all the count said (``crawler.state.verdict``)
        "targets_by_verdict": {str(v): int(totals.total(v)) for v in VERDICTS},
        "totals": figures,
        "estimate": estimate,
        **({"sources": sources} if sources else {}),
        "refreshes": view.refreshes(),
        **({"run": run} if run else {}),
        "attention": [_row(r, spent_out=spent) for r in view.attention(ATTENTION)],
        # every target's figures: too many for this document at a million targets
        "targets_detail": "state/state.db, table targets (or: crawler status --csv)",
    }


def completeness(totals: Totals, credits: int) -> dict[str, Any]:
    """The job's coverage (reviews written / reviews the API said exist, over the targets it
    gave a count for), what the short targets lack, and what each review written cost."""
    said, written = int(totals.total("said")), int(totals.total("said_records"))
    records = int(totals.total("records"))
    return {
        "reviews_said": said,
        "reviews_missing": int(totals.total("missing")),
        "coverage": round(written / said, 4) if said else None,
        "credits_per_review": round(credits / records, 3) if records else None,
    }


def _by_status(view: StateView, unlisted: int, *, spent_out: bool) -> dict[str, int]:
    """Targets by shown status (``STATUSES``' order), none left out of the sum."""
    counts = shown_counts(view.totals().by_status, unlisted, spent_out=spent_out)
    return {name: count for name, count in counts.items() if count}


def shown_counts(
    by: Mapping[Status, Sums], unlisted: int = 0, *, spent_out: bool
) -> dict[str, int]:
    """Every shown status (``STATUSES``' order) and its targets, 0 included: the one set of
    names that status, the report and the metrics give a target's status."""
    pending, budget = by[Status.PENDING], by[Status.BUDGET]
    counts = {
        "done": by[Status.DONE].count,
        "in_progress": pending.started,
        "not_started": pending.count - pending.started + budget.count - budget.started + unlisted,
        "stopped_budget": budget.started,
        "failed": by[Status.FAILED].count,
    }
    if spent_out:
        counts["stopped_budget"] += counts.pop("in_progress")
    return {name: counts.get(name, 0) for name in STATUSES}


def _row(saved: dict[str, Any], *, spent_out: bool) -> dict[str, Any]:
    """A saved target as shown: shown names, shown status, nothing that is None."""
    row = {name: saved.get(SAVED.get(name, name)) for name in CSV_COLUMNS}
    row["status"] = shown_status(saved["status"], saved.get("walk_pages"), spent_out=spent_out)
    return {name: value for name, value in row.items() if value is not None}


def rows(job: Job, view: StateView) -> Iterator[dict[str, Any]]:
    """Every target as shown (``CSV_COLUMNS``), in the view's order."""
    spent = spent_out(job, view)
    for values in view.rows(_READ):
        yield _row(dict(zip(_READ, values, strict=True)), spent_out=spent)


def write_csv(job: Job, view: StateView, out: TextIO) -> int:
    """Every target's figures as CSV, one row each (what pandas and DuckDB read); the rows."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows(job, view):
        writer.writerow(row.get(name) for name in CSV_COLUMNS)
        count += 1
    return count
