"""Older state files brought to this version, each step in one transaction."""

from __future__ import annotations

import sqlite3
from collections import Counter

from crawler.state import rules
from crawler.state.schema import SOURCES_SCHEMA, STATE_COLUMNS, UPDATE_TARGET, row_of, state_of


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Version 2 -> 3: the lease a crash forfeits, and each refresh's figures kept for good
    (worked out once from the targets, by ``rules.refresh_figures``). 3 -> 4: each target's
    verdict (``rules.VERDICTS_JUDGED``)."""
    figures = ", ".join(
        f"{n} INTEGER NOT NULL DEFAULT 0" for n in (*rules.REFRESH_FIGURES, "by_plan")
    )
    # one transaction (SQLite's ALTER TABLE is transactional): a kill leaves the old version whole
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 2:
            for column in (
                "outstanding INTEGER NOT NULL DEFAULT 0",
                "forfeited INTEGER NOT NULL DEFAULT 0",
            ):
                db.execute(f"ALTER TABLE job ADD COLUMN {column}")
            for column in figures.split(", "):
                db.execute(f"ALTER TABLE refreshes ADD COLUMN {column}")
        else:  # each refresh's targets found still short
            db.execute("ALTER TABLE refreshes ADD COLUMN short INTEGER NOT NULL DEFAULT 0")
        for column in ("walk_shown INTEGER NOT NULL DEFAULT 0", "seen INTEGER", "verdict TEXT"):
            db.execute(f"ALTER TABLE targets ADD COLUMN {column}")
        if version == 2:
            _count_old_refreshes(db)
        _judge_old_targets(db)
        db.execute("UPDATE job SET version = 4")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _judge_old_targets(db: sqlite3.Connection) -> None:
    rule = rules.VERDICTS_JUDGED
    marks = ", ".join("?" * len(rule.statuses))
    rows = db.execute(
        f"SELECT {STATE_COLUMNS} FROM targets WHERE status IN ({marks})",  # noqa: S608 -- ours
        rule.statuses,
    ).fetchall()
    states = [state for state in map(state_of, rows) if rule(state)]
    db.executemany(UPDATE_TARGET, map(row_of, states))


def migrate_to_sources(db: sqlite3.Connection) -> None:
    """Version 4 -> 5: sources, the endpoints' series, and which source found a target; one
    transaction (a kill leaves version 4 whole)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE targets ADD COLUMN found_by TEXT")
        for statement in SOURCES_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("UPDATE job SET version = 5")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _count_old_refreshes(db: sqlite3.Connection) -> None:
    rows = db.execute(f"SELECT walk, {STATE_COLUMNS} FROM targets WHERE active AND walk > 0")  # noqa: S608 -- ours
    sums: dict[int, Counter[str]] = {}
    for row in rows:
        sums.setdefault(row[0], Counter()).update(rules.refresh_figures(state_of(row[1:])))
    for refresh, counted in sums.items():
        db.execute(
            f"UPDATE refreshes SET {', '.join(f'{n} = ?' for n in rules.REFRESH_FIGURES)} "  # noqa: S608 -- ours
            "WHERE id = ?",
            [*(counted[n] for n in rules.REFRESH_FIGURES), refresh],
        )
