"""The SQLite state file's tables (version ``VERSION``), and a target's state as a row of them."""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable
from typing import Any

from crawler.state.events import Finish, Status
from crawler.state.model import COLUMNS, TargetState
from crawler.state.verdict import Verdict

VERSION = 5

# version 5: sources (their targets' walks, in a target's columns: ``COLUMNS``), the
# endpoints' own shard series, found targets
SOURCES_SCHEMA = """
CREATE TABLE source_targets (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    max_pages INTEGER,
    active INTEGER NOT NULL DEFAULT 1,
    found INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    finish TEXT,
    cursor,
    walk INTEGER NOT NULL DEFAULT 0,
    walk_pages INTEGER NOT NULL DEFAULT 0,
    walk_new INTEGER NOT NULL DEFAULT 0,
    walk_goal INTEGER,
    walk_credits INTEGER NOT NULL DEFAULT 0,
    walk_expected INTEGER,
    walk_count INTEGER,
    base_count INTEGER,
    pages INTEGER NOT NULL DEFAULT 0,
    items INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    review_count INTEGER,
    reason TEXT,
    walk_shown INTEGER NOT NULL DEFAULT 0,
    seen INTEGER,
    verdict TEXT,
    UNIQUE (source, key)
);
CREATE TABLE series (
    name TEXT PRIMARY KEY,
    next_shard INTEGER NOT NULL DEFAULT 1,
    open_shard TEXT,
    shard_bytes INTEGER NOT NULL DEFAULT 0,
    shard_records INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0,
    seen_other INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE series_shards (
    seq INTEGER PRIMARY KEY,
    series TEXT NOT NULL,
    file TEXT NOT NULL UNIQUE,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""

SCHEMA = (
    """
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    output TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    outstanding INTEGER NOT NULL DEFAULT 0,
    forfeited INTEGER NOT NULL DEFAULT 0,
    next_shard INTEGER NOT NULL DEFAULT 1,
    open_shard TEXT,
    shard_bytes INTEGER NOT NULL DEFAULT 0,
    shard_records INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0,
    seen_other INTEGER NOT NULL DEFAULT 0,
    targets_digest TEXT,
    refresh INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE targets (
    id INTEGER PRIMARY KEY,
    product_id TEXT NOT NULL,
    region TEXT NOT NULL,
    max_pages INTEGER,
    active INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'pending',
    finish TEXT,
    cursor,
    walk INTEGER NOT NULL DEFAULT 0,
    walk_pages INTEGER NOT NULL DEFAULT 0,
    walk_new INTEGER NOT NULL DEFAULT 0,
    walk_goal INTEGER,
    walk_credits INTEGER NOT NULL DEFAULT 0,
    walk_expected INTEGER,
    walk_count INTEGER,
    base_count INTEGER,
    pages INTEGER NOT NULL DEFAULT 0,
    items INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    review_count INTEGER,
    reason TEXT,
    walk_shown INTEGER NOT NULL DEFAULT 0,
    seen INTEGER,
    verdict TEXT,
    found_by TEXT,
    UNIQUE (product_id, region)
);
CREATE TABLE shards (
    seq INTEGER PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    refresh INTEGER,
    exit_status INTEGER,
    stop_reason TEXT,
    stop_message TEXT,
    requests INTEGER,
    retries INTEGER,
    rate_limited INTEGER,
    rate_limit_episodes INTEGER
);
CREATE TABLE refreshes (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    mode TEXT NOT NULL,
    targets INTEGER NOT NULL DEFAULT 0,
    probed INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    new_reviews INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    short INTEGER NOT NULL DEFAULT 0,
    by_plan INTEGER NOT NULL DEFAULT 0
);
"""
    + SOURCES_SCHEMA
)

STATE_COLUMNS = ", ".join(COLUMNS)
UPDATE_TARGET = f"UPDATE targets SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE id = ?"  # noqa: S608 -- column names are ours
UPDATE_SOURCE = UPDATE_TARGET.replace("UPDATE targets", "UPDATE source_targets", 1)
row_of: Callable[[TargetState], tuple[Any, ...]] = operator.attrgetter(*COLUMNS[1:], "id")


def state_of(row: tuple[Any, ...]) -> TargetState:
    """A TargetState from a row of ``SELECT {COLUMNS} FROM targets``."""
    t = TargetState(*row)
    t.status = Status(t.status)
    t.finish = Finish(t.finish) if t.finish else None
    t.verdict = Verdict(t.verdict) if t.verdict else None
    return t


def job_row(db: sqlite3.Connection) -> dict[str, Any]:
    cursor = db.execute("SELECT * FROM job WHERE id = 1")
    row = cursor.fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the job row is missing")
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
