"""A run's start and end in the state file: the refresh it works on, its row in ``runs``, the
budget stops reopened or made (each inside the store's transaction)."""

from __future__ import annotations

import sqlite3
from typing import Any

from crawler.state import rules
from crawler.state.table import apply


def begin(
    db: sqlite3.Connection, current: int, started: float, *, refresh: bool, mode: str, probe: bool
) -> tuple[int, int | None]:
    """The refresh the run works on, and the run's id."""
    apply(db, rules.BUDGET_REOPENED)
    under_way = refresh_open(db, current)
    row = db.execute("SELECT by_plan FROM refreshes WHERE id = ?", (current,)).fetchone()
    by_plan = bool(row and row[0])
    walked = rules.refresh_to_walk(current, asked=refresh, under_way=under_way, by_plan=by_plan)
    if walked != current:
        current = walked
        db.execute(
            "INSERT INTO refreshes (id, started_at, mode, by_plan) VALUES (?, ?, ?, ?)",
            (current, started, mode, int(probe)),
        )
        apply(db, rules.refresh_started(current))
        under_way = True
    elif by_plan and not probe:  # a run walks it now: the next --refresh is a new one
        db.execute("UPDATE refreshes SET by_plan = 0 WHERE id = ?", (current,))
        under_way = under_way or refresh
    db.execute("UPDATE job SET runs = runs + 1, refresh = ?", (current,))
    cursor = db.execute(
        "INSERT INTO runs (started_at, refresh) VALUES (?, ?)",
        (started, current if under_way else None),
    )
    return current, cursor.lastrowid


def refresh_open(db: sqlite3.Connection, refresh: int) -> bool:
    if refresh == 0:
        return False
    row = db.execute(
        "SELECT 1 FROM targets WHERE active AND walk = ? AND status IN ('pending', "
        "'stopped_budget') UNION ALL SELECT 1 FROM source_targets WHERE active AND walk = ? "
        "AND status IN ('pending', 'stopped_budget') LIMIT 1",
        (refresh, refresh),
    ).fetchone()
    return row is not None


def end(
    db: sqlite3.Connection, run_id: int | None, info: dict[str, Any], *, budget_stopped: bool
) -> None:
    if budget_stopped:
        apply(db, rules.BUDGET_STOPPED)
    # a clean end: every credit leased and not given back went out with a request
    db.execute("UPDATE job SET outstanding = 0")
    names = list(info)
    db.execute(
        f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",  # noqa: S608 -- names are ours
        [*(info[n] for n in names), run_id],
    )
