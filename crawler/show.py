"""``status`` and ``plan`` for people: the summary first, then what needs attention, a screenful."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from crawler.config import Job
from crawler.report import CSV_COLUMNS
from crawler.state import StateView

_COLUMNS = ("pages", "records", "duplicates", "credits", "retries", "rate_limited")
_HEADERS = ("pages", "reviews", "dups", "credits", "retries", "429s")


def print_summary(job: Job, doc: dict[str, Any], view: StateView, *, every: bool) -> None:
    console = Console(width=120, soft_wrap=True)  # a summary line is one line, for grep too
    totals, estimate = doc["totals"], doc["estimate"]
    console.print(
        f"[bold]{job.path}[/bold]: {_plural(totals['runs'], 'run')}, "
        f"{totals['credits_charged']:,} of {totals['max_credits']:,} credits"
        + (
            f" ({totals['credits_forfeited']:,} leased by runs that died: maybe unsent)"
            if totals.get("credits_forfeited")
            else ""
        )
        + f", {_plural(totals['shards'], 'shard')}"
    )
    by_status = ", ".join(f"{n:,} {s}" for s, n in doc["targets_by_status"].items())
    console.print(f"targets  {doc['targets_total']:,}: {by_status}")
    console.print(
        f"reviews  {totals['records']:,} written, {totals['duplicates']:,} duplicates dropped; "
        f"pages {totals['pages']:,}; retries {totals['retries']:,}; 429s "
        f"{totals['rate_limited']:,}"
    )
    for source in doc.get("sources", ()):
        console.print(
            f"source   {source['source']}: {source['targets_done'] or 0:,} of "
            f"{source['targets']:,} targets done, {source['pages'] or 0:,} pages, "
            f"{source['products_found'] or 0:,} products found, {source['items'] or 0:,} items, "
            f"{source['credits'] or 0:,} credits"
        )
    if stages := estimate.get("stages"):
        console.print(
            f"stages   sources: {stages['source_pages_walked']:,} pages walked, "
            f"{stages['source_targets_left']:,} targets left; {stages['products_found']:,} "
            f"products found; reviews: {_pages(stages['review_pages_left'])} left"
        )
    console.print(_estimate_line(job, estimate))
    for refresh in doc["refreshes"]:
        console.print(
            f"refresh  #{refresh['refresh']} ({refresh['mode']}): {refresh['targets'] or 0:,} "
            f"targets, {refresh['probed'] or 0:,} probed, {refresh['changed'] or 0:,} changed, "
            f"{refresh['new_reviews']:,} new reviews, {refresh['credits']:,} credits"
        )
    if every:
        rows = [dict(zip(CSV_COLUMNS, r, strict=True)) for r in view.rows(CSV_COLUMNS)]
    else:
        rows = doc["attention"]
    if rows:
        console.print(_table(rows, "every target" if every else "needs attention"))
    elif not every:
        console.print("nothing needs attention")
    if not every and doc["targets_total"] > len(rows):
        console.print(
            f"{doc['targets_total'] - len(rows):,} targets not listed: --all lists every one, "
            "--csv gives every target's figures as CSV"
        )


def print_workers(workers: list[dict[str, Any]]) -> None:
    """A coordinated job's workers: who is alive, what each holds, how fast it goes."""
    table = Table(
        "worker", "last heartbeat", "products held", "pages/s", "open shard",
        title="workers", title_justify="left",
    )  # fmt: skip
    for w in workers:
        table.add_row(
            w["worker"],
            "stopped" if w["stopped"] else f"{w['seconds_since_heartbeat']:,.1f} s ago",
            str(w["products_held"]),
            f"{w['rate']:.1f}",
            w["open_shard"] or "-",
        )
    Console(width=120).print(table)


def _estimate_line(job: Job, estimate: dict[str, Any]) -> str:
    if not estimate["targets_left"]:
        return "left     nothing"
    if estimate["pages_left"] is None:
        return (
            f"left     {estimate['targets_left']:,} targets of unknown size: "
            "`crawler plan --probe` fetches page 1 of each (kept as part of the crawl)"
        )
    covers = {None: "unknown", True: "yes", False: "NO"}[estimate["budget_covers"]]
    guessed = (
        f" ({estimate['targets_unknown']:,} targets guessed at the typical size)"
        if estimate["targets_unknown"]
        else ""
    )
    return (
        f"left     about {estimate['pages_left']:,} pages{guessed}: "
        f"{estimate['credits_needed']:,} credits needed, {estimate['credits_available']:,} "
        f"available (budget covers it: {covers}); about {_duration(estimate['seconds'])} at "
        f"{job.api.requests_per_second:g}/s"
    )


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table("product_id", "region", "status", *_HEADERS, title=title, title_justify="left")
    for row in rows:
        status = row["status"]
        if row.get("reason"):
            status += f" ({row['reason']})"
        elif status == "pending" and row.get("walk_pages"):
            status = "in progress"
        figures = (f"{row.get(k) or 0:,}" for k in _COLUMNS)
        table.add_row(row["product_id"], row["region"], status, *figures)
    return table


def _pages(pages: int | None) -> str:
    return "unknown pages" if pages is None else f"about {pages:,} pages"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
