"""``status``, ``plan`` and a run's closing lines for people: the summary first, then what needs
attention, a screenful, every line within the terminal's width (80 when it is not one)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from crawler.config import Job
from crawler.screen import (
    Column,
    cut,
    figure,
    lines,
    plural,
    prose,
    table,
    width_of,
    with_priority,
)

_LEAD = "         "  # the width of the labels below: continuation lines line up under them


def _status_cell(row: dict[str, Any]) -> str:
    if row.get("reason"):
        return f"{row['status']}: {row['reason']}"
    if row.get("verdict") == "short":  # done, but the feed ended below the count it gave
        return f"{row['status']} (short {row.get('missing') or 0:,})"
    return str(row["status"])


# a target's row; when the terminal is narrow the highest numbers go first (issues may add
# columns: a priority says where theirs stands)
TARGET_COLUMNS: list[Column] = [
    Column("product_id", lambda row: str(row["product_id"]), priority=0),
    Column("region", lambda row: str(row["region"]), priority=0),
    Column("status", _status_cell, priority=0, flexible=True, least=len("done (short 9,999)")),
    with_priority(figure("reviews"), 10),
    with_priority(figure("pages"), 20),
    with_priority(figure("credits"), 30),
    with_priority(figure("duplicates"), 40),
    with_priority(figure("retries"), 50),
    with_priority(figure("rate_limited"), 60),
]


def say(text_lines: Iterable[str]) -> None:
    for line in text_lines:
        print(line)


def print_summary(
    job: Job, doc: dict[str, Any], rows: list[dict[str, Any]], *, every: bool
) -> None:
    width = width_of(sys.stdout)
    totals, estimate = doc["totals"], doc["estimate"]
    head = [
        plural(totals["runs"], "run"),
        f"{totals['credits_charged']:,} of {totals['max_credits']:,} credits",
    ]
    if totals.get("credits_forfeited"):
        head.append(f"{totals['credits_forfeited']:,} leased by runs that died (maybe unsent)")
    head.append(plural(totals["shards"], "shard"))
    say(lines(head, width, lead=f"{job.path}: "))
    say(lines(status_counts(doc), width, lead=f"targets  {doc['targets_total']:,}: "))
    say(
        lines(
            [
                f"{totals['reviews']:,} written",
                f"{totals['duplicates']:,} duplicates dropped",
                plural(totals["pages"], "page"),
                plural(totals["retries"], "retry", "retries"),
                f"{totals['rate_limited']:,} rate_limited (429)",
            ],
            width,
            lead="reviews  ",
        )
    )
    say(_completeness_lines(doc))
    for source in doc.get("sources", ()):
        say(
            lines(
                [
                    f"{source['targets_done'] or 0:,} of {source['targets']:,} targets done",
                    plural(source["pages"] or 0, "page"),
                    f"{source['products_found'] or 0:,} products found",
                    plural(source["items"] or 0, "item"),
                    plural(source["credits"] or 0, "credit"),
                ],
                width,
                lead=f"source   {source['source']}: ",
            )
        )
    if stages := estimate.get("stages"):
        say(
            lines(
                [
                    f"sources {stages['source_pages_walked']:,} pages walked",
                    f"{stages['source_targets_left']:,} source targets left",
                    f"{stages['products_found']:,} products found",
                    f"reviews {_pages(stages['review_pages_left'])} left",
                ],
                width,
                lead="stages   ",
            )
        )
    say(lines(_estimate_parts(job, estimate), width, lead="left     "))
    for refresh in doc["refreshes"]:
        say(
            lines(
                [
                    plural(refresh["targets"] or 0, "target"),
                    f"{refresh['probed'] or 0:,} probed",
                    f"{refresh['changed'] or 0:,} changed",
                    f"{refresh['new_reviews']:,} new reviews",
                    plural(refresh["credits"], "credit"),
                ],
                width,
                lead=f"refresh  #{refresh['refresh']} ({refresh['mode']}): ",
            )
        )
        if refresh.get("short"):
            say([f"refresh  #{refresh['refresh']}: {refresh['short']:,} still short"])
    if rows:
        say(
            table(TARGET_COLUMNS, rows, width, title="every target" if every else "needs attention")
        )
    elif not every:
        print("nothing needs attention")
    if not every and doc["targets_total"] > len(rows):
        unlisted = plural(doc["targets_total"] - len(rows), "target")
        say(prose(f"{unlisted} not listed: --all lists every one, --csv every figure", width))


def status_counts(doc: dict[str, Any]) -> list[str]:
    """``3 done``, ``4 not_started (budget spent)``...: what keeps targets waiting is said."""
    spent = doc["totals"]["budget_spent"]
    return [
        f"{n:,} {s}" + (" (budget spent)" if s == "not_started" and spent else "")
        for s, n in doc["targets_by_status"].items()
    ]


WORKER_COLUMNS: list[Column] = [
    Column("worker", lambda w: str(w["worker"]), priority=0, flexible=True, least=12),
    Column("heartbeat", lambda w: w["heartbeat"], priority=0),
    Column("products_held", lambda w: str(w["products_held"]), priority=10, right=True),
    Column("pages/s", lambda w: f"{w['rate']:.1f}", priority=20, right=True),
    Column("open_shard", lambda w: w["open_shard"] or "-", priority=30),
]


def print_workers(workers: list[dict[str, Any]]) -> None:
    """A coordinated job's workers: who is alive, what each holds, how fast it goes."""
    for w in workers:
        w["heartbeat"] = "stopped" if w["stopped"] else f"{w['seconds_since_heartbeat']:,.1f} s ago"
    say(table(WORKER_COLUMNS, workers, width_of(sys.stdout), title="workers"))


def _completeness_lines(doc: dict[str, Any]) -> list[str]:
    """Did the harvest get it all: the verdicts, the coverage, the cost of a review (each line
    within 80 columns at a million targets)."""
    verdicts, totals = doc["targets_by_verdict"], doc["totals"]
    if not any(verdicts.values()):
        return []
    out = ["verdicts " + ", ".join(f"{n:,} {v}" for v, n in verdicts.items() if n)]
    if totals["coverage"] is not None:
        per = totals["credits_per_review"]
        out.append(
            f"coverage {totals['coverage']:.1%} of {totals['reviews_said']:,} counted"
            + (f" ({totals['reviews_missing']:,} missing)" if totals["reviews_missing"] else "")
            + (f"; {per:,.2f} credits/review" if per is not None else "")
        )
    return out


def _estimate_parts(job: Job, estimate: dict[str, Any]) -> list[str]:
    if not estimate["targets_left"]:
        return ["nothing"]
    if estimate["pages_left"] is None:
        return [
            f"{plural(estimate['targets_left'], 'target')} of unknown size:",
            "`crawler plan --probe` fetches page 1 of each (kept as part of the crawl)",
        ]
    covers = {None: "unknown", True: "yes", False: "NO"}[estimate["budget_covers"]]
    parts = [f"about {plural(estimate['pages_left'], 'page')}"]
    if estimate["targets_unknown"]:
        parts.append(f"{plural(estimate['targets_unknown'], 'target')} guessed at the typical size")
    return [
        *parts,
        f"{estimate['credits_needed']:,} credits needed",
        f"{estimate['credits_available']:,} available (budget covers it: {covers})",
        f"about {_duration(estimate['seconds'])} at {job.api.requests_per_second:g}/s",
    ]


def _pages(pages: int | None) -> str:
    return "unknown pages" if pages is None else f"about {pages:,} pages"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


# the run's closing lines: targets named at its end (status --all lists them all), and the
# 429 episodes in one run that say the configured rate is too high
_LISTED = 20
_EPISODES_HINT = 3


def print_outcome(doc: dict[str, Any], status: int) -> None:
    """The run's closing lines on stderr, each within the terminal's width."""
    width = width_of(sys.stderr)
    totals = doc["totals"]
    # a worker of a coordinated job counts the credits other workers hold leased and have not
    # accounted for yet: they may or may not be spent by the time they stop
    run = doc.get("run", {})
    coordinated = run.get("worker") is not None
    bound = "at most " if coordinated and totals["credits_charged"] > totals["credits"] else ""
    parts = [
        *status_counts(doc),
        f"{plural(totals['reviews'], 'review')} in {plural(totals['shards'], 'shard')}",
        f"{bound}{totals['credits_charged']:,} of {totals['max_credits']:,} credits",
        f"exit {status}",
    ]
    say = _lines_to_stderr
    say(lines(parts, width, lead=f"{plural(doc['targets_total'], 'target')}: "))
    failed = [row for row in doc["attention"] if row["status"] == "failed"]
    for row in failed[:_LISTED]:  # one line each: the whole reason is in `crawler status --json`
        say([cut(f"  {row['product_id']} {row['region']}: failed: {row['reason']}", width)])
    more = doc["targets_by_status"].get("failed", 0) - len(failed[:_LISTED])
    if more > 0:
        say([f"  ... and {more:,} more failed (crawler status)"])
    by_status = doc["targets_by_status"]
    spent = by_status.get("not_started") and totals["budget_spent"]
    if by_status.get("stopped_budget") or spent:
        say(
            prose(
                "stopped at the credit budget: raise budget.max_credits (or "
                "max_credits_per_target) and run again to carry on",
                width,
                lead="  ",
            )
        )
    if run.get("rate_limit_episodes", 0) >= _EPISODES_HINT:
        from crawler.pacing.slowdown import HOLD_SECONDS  # noqa: PLC0415 -- only for this hint

        text = (
            f"the API answered 429 (rate limited) {plural(run['rate_limited'], 'time')}, in "
            f"{plural(run['rate_limit_episodes'], 'episode')}: it allows less than "
            "api.requests_per_second; a lower setting would waste fewer requests and go faster"
        )
        if run.get("rate_held") is not None:
            text += (
                f" (about {run['rate_held']:g} requests/s held for {HOLD_SECONDS:g} s without one)"
            )
        say(prose(text, width, lead="  "))
    short = doc.get("targets_by_verdict", {}).get("short")
    if short:  # a feed that ended below its count: done, but not all of it
        say(
            prose(
                f"{plural(short, 'target')} short of the count the API gave: "
                f"{totals['reviews_missing']:,} reviews missing (crawler status lists them)",
                width,
                lead="  ",
            )
        )
    stopped = run.get("stop_message")
    if stopped:
        say(prose(str(stopped), width, lead="  stopped: "))


def _lines_to_stderr(text_lines: list[str]) -> None:
    for line in text_lines:
        print(line, file=sys.stderr)
