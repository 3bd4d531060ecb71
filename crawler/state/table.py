"""The targets' tables changed by the rules: the job file's targets synced, a rule applied over
statuses, the refreshes' figures counted, the walkable ones read in batches, the totals summed."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from crawler.state import rules
from crawler.state.events import WALKABLE, Status
from crawler.state.model import Sums, TargetState, Totals
from crawler.state.schema import STATE_COLUMNS, UPDATE_SOURCE, UPDATE_TARGET, row_of, state_of
from crawler.state.verdict import MISSING_SQL, VERDICTS
from crawler.targets import TargetList

CLAIM_BATCH = 256  # rows read per query while handing out targets
SUMS = (
    "count(*), sum(pages), sum(items), sum(records), sum(duplicates), sum(credits), "
    "sum(retries), sum(rate_limited), sum(seconds), count(walk_expected), sum(walk_expected), "
    "sum(CASE WHEN status != 'done' THEN max(0, walk_expected - walk_pages) ELSE 0 END), "
    + ", ".join(f"sum(verdict = '{v}')" for v in VERDICTS)
    + f", sum({MISSING_SQL}), sum(review_count), "
    "sum(CASE WHEN review_count IS NOT NULL THEN records ELSE 0 END)"
    ", sum(walk_pages > 0)"
)


def sync(db: sqlite3.Connection, targets: TargetList, digest: str) -> None:
    """The job file's targets made the active ones (inside a transaction)."""
    # a target no longer in the job file is kept (with what it harvested) but inactive:
    # never walked, never counted, until the file lists it again
    # a target a source found stays: the job file never listed it
    db.execute("UPDATE targets SET active = 0 WHERE active AND found_by IS NULL")
    db.executemany(
        "INSERT INTO targets (product_id, region, max_pages) VALUES (?, ?, ?) "
        "ON CONFLICT (product_id, region) DO UPDATE SET active = 1, "
        "max_pages = excluded.max_pages",
        targets.rows(),
    )
    # rules.configured changes only targets with a cap, or whose walk ended at one
    update_where(
        db,
        "active AND (max_pages IS NOT NULL OR finish = 'cap')",
        rules.configured,
    )
    db.execute("UPDATE job SET targets_digest = ?", (digest,))


def update_where(
    db: sqlite3.Connection,
    where: str,
    change: Callable[[TargetState, int | None], bool],
    *args: Any,
    table: str = "targets",
) -> int:
    """Apply ``change`` to the state of every target matching ``where`` (inside a
    transaction); the number changed. Source targets are in no total nor refresh."""
    rows = db.execute(
        f"SELECT max_pages, {STATE_COLUMNS} FROM {table} WHERE {where}",  # noqa: S608 -- ours
        args,
    ).fetchall()
    changed: list[TargetState] = []
    delta = rules.Delta()
    for row in rows:
        state, cap = state_of(row[1:]), row[0]

        def rule(s: TargetState, cap: int | None = cap) -> bool:
            return change(s, cap)

        if rules.changed(state, rule, delta):
            changed.append(state)
    if table != "targets":
        db.executemany(UPDATE_SOURCE, map(row_of, changed))
        return len(changed)
    db.executemany(UPDATE_TARGET, map(row_of, changed))
    count_refreshes(db, delta)
    return len(changed)


def count_refreshes(db: sqlite3.Connection, delta: rules.Delta) -> None:
    for refresh, figures in delta.refreshes.items():
        names = [n for n in rules.REFRESH_FIGURES if figures[n]]
        if names:
            db.execute(
                f"UPDATE refreshes SET {', '.join(f'{n} = {n} + ?' for n in names)} "  # noqa: S608 -- ours
                "WHERE id = ?",
                [*(figures[n] for n in names), refresh],
            )


def apply(db: sqlite3.Connection, rule: rules.Rule) -> int:
    """A rule over every active target of the statuses it changes, sources' too."""
    marks = ", ".join("?" * len(rule.statuses))
    where = f"active AND status IN ({marks})"
    update_where(db, where, lambda state, _cap: rule(state), *rule.statuses, table="source_targets")
    return update_where(db, where, lambda state, _cap: rule(state), *rule.statuses)


def walkable(db: sqlite3.Connection, after: int) -> list[Any]:
    """The next batch of walkable active targets after the id ``after``, in order."""
    return db.execute(
        f"SELECT product_id, region, max_pages, {STATE_COLUMNS} FROM targets "  # noqa: S608 -- column names are ours
        "WHERE id > ? AND active AND status IN (?, ?, ?) ORDER BY id LIMIT ?",
        (after, *WALKABLE, CLAIM_BATCH),
    ).fetchall()


def totals_of(db: sqlite3.Connection) -> Totals:
    """Every active target's figures, summed by status: one pass over the table."""
    totals = Totals()
    query = f"SELECT status, {SUMS} FROM targets WHERE active GROUP BY status"  # noqa: S608 -- ours
    for status, *figures in db.execute(query):
        totals.by_status[Status(status)] = Sums(*(f or 0 for f in figures))
    return totals
