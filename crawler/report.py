"""The picture of a job from its saved state: totals by status, what needs attention, runs and
refreshes (``run-report.json``, ``status``); every target's figures as CSV beside it."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from crawler import planner
from crawler.config import Job
from crawler.errors import OutputError
from crawler.state_sqlite import SqliteView

ATTENTION = 20  # targets listed by name: a screenful; the CSV and --all have them all
CSV_COLUMNS = (
    "product_id",
    "region",
    "status",
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
    "max_pages",
)
_SUMMED = ("pages", "items", "records", "duplicates", "credits", "retries", "rate_limited")


def build(job: Job, view: SqliteView, *, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status / run report document: small whatever the number of targets."""
    totals = view.totals()
    ledger = view.ledger
    unlisted = max(0, len(job.targets) - totals.targets)  # added to the job since its last run
    figures: dict[str, Any] = {name: int(totals.total(name)) for name in _SUMMED}
    figures["seconds"] = round(totals.total("seconds"), 3)
    figures["credits_charged"] = max(ledger.leased, ledger.credits)  # an upper bound
    figures["max_credits"] = job.budget.max_credits
    figures["runs"] = view.job["runs"]
    shards = view.shards()
    figures["shards"] = len(shards) + (view.job["open_shard"] is not None)
    by_status = {str(s): n.count for s, n in totals.by_status.items() if n.count}
    if unlisted:
        by_status["pending"] = by_status.get("pending", 0) + unlisted
    return {
        "job": str(job.path),
        "output_dir": str(job.output.dir),
        "targets_total": totals.targets + unlisted,
        "targets_by_status": by_status,
        "totals": figures,
        "estimate": planner.estimate(job, totals, ledger, unlisted=unlisted),
        "refreshes": view.refreshes(),
        **({"run": run} if run else {}),
        "attention": [_row(r) for r in view.attention(ATTENTION)],
        "targets_report": "targets-report.csv",
    }


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in CSV_COLUMNS if row.get(name) is not None}


def write_targets_csv(view: SqliteView, path: Path) -> int:
    """Every target's figures, one row each: what pandas and DuckDB read. Written beside the
    final file and renamed over it, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", newline="", encoding="utf-8") as file:
            out = csv.writer(file)
            out.writerow(CSV_COLUMNS)
            for row in view.rows():
                out.writerow([_cell(row[name]) for name in CSV_COLUMNS])
                count += 1
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError.from_os(exc, path) from None
    return count


def _cell(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else ("" if value is None else value)


def read_targets_csv(path: Path) -> list[dict[str, Any]]:
    """The per-target CSV back as dicts with numbers (for scripts and tests)."""
    with path.open(newline="", encoding="utf-8") as file:
        return [
            {
                k: (_number(v) if k not in ("product_id", "region", "status", "reason") else v)
                for k, v in row.items()
            }
            for row in csv.DictReader(file)
        ]


def _number(value: str) -> int | float | None:
    if value == "":
        return None
    return float(value) if "." in value else int(value)
