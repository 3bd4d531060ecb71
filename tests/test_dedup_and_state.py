"""The seen-set is exact and persisted; the state store commits whole batches, holds the ceiling."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import orjson
import pytest

from crawler.errors import StateError
from crawler.output.dedup import SeenIds, SeenLog
from crawler.output.layout import Layout
from crawler.output.recovery import recover
from crawler.state.events import (
    Commit,
    Finish,
    PageCommitted,
    ShardOpened,
    Status,
    TargetFailed,
    WriterPosition,
)
from crawler.state.model import Ledger
from crawler.state.sqlite import SqliteStore, SqliteView
from crawler.targets import TargetList


def test_seen_ids_is_exactly_a_set():
    rng = random.Random(1)
    ids = [str(rng.randrange(10**18, 10**19)) for _ in range(20_000)]
    ids += ids[:500] + ["0", "007", "abc", "18446744073709551616", "18446744073709551615"] * 2
    seen, reference = SeenIds(capacity=10), set()
    for review_id in ids:
        assert seen.add(review_id) == (review_id not in reference)
        reference.add(review_id)
    assert len(seen) == len(reference)


def test_recovery_keeps_committed_ids_only(tmp_path: Path):
    layout = Layout(tmp_path)
    layout.state_dir.mkdir()
    log = SeenLog(layout.seen_ids, layout.seen_other, 0, 0)
    assert log.add("1234567890123456789") and log.add("x-1")
    log.write(*log.take())
    committed = WriterPosition(seen=log.count, seen_other=log.other_bytes)
    assert log.add("1234567890123456790")
    log.write(*log.take())  # written, but say a crash came before the state counted it
    log.close()
    found = recover(layout, committed, [], None, 1)
    assert found.bytes_cut == 8
    reopened = SeenLog(layout.seen_ids, layout.seen_other, committed.seen, committed.seen_other)
    reopened.load()
    assert not reopened.add("1234567890123456789") and not reopened.add("x-1")
    assert reopened.add("1234567890123456790")  # uncommitted: cut off, so new again
    reopened.close()
    assert layout.seen_ids.stat().st_size == committed.seen * 8
    with pytest.raises(StateError, match="cut or replaced since"):  # shorter than committed
        recover(layout, WriterPosition(seen=committed.seen + 5), [], None, 1)


OUTPUT = {"shard_max_records": 10, "compression": "none"}


async def test_leases_never_pass_the_ceiling_and_survive_a_reopen(tmp_path: Path):
    layout = Layout(tmp_path)
    store = await SqliteStore.open(layout, OUTPUT)
    # many leases at once, as walkers of several runs would ask: never past the ceiling
    granted = await asyncio.gather(*(store.lease(8, 2, 101) for _ in range(40)))
    assert sum(granted) == 100 and store.ledger.leased == 100
    assert await store.lease(8, 2, 101) == 0  # not even one request fits
    await store.give_back(6)
    await store.close()
    reopened = await SqliteStore.open(layout, OUTPUT)
    assert reopened.ledger.leased == 94
    await reopened.close()


async def test_a_commit_is_whole_after_reopening(tmp_path: Path):
    layout = Layout(tmp_path)
    targets = TargetList()
    targets.append("1234567890", 0, None)
    targets.append("1234567891", 1, 3)
    store = await SqliteStore.open(layout, OUTPUT)
    assert await store.sync_targets(targets)
    assert not await store.sync_targets(targets)  # unchanged: nothing to do
    await store.begin_run(refresh=False, mode="early_stop")
    first, second = await store.claim(), await store.claim()
    assert first and second and await store.claim() is None
    page = PageCommitted(
        first.saved.id, 0, 2, Status.PENDING, None, 10, 9, 1, 2, 0, 0, 0.1, 40, None, 4
    )
    failed = TargetFailed(second.saved.id, 0, "400 invalid parameters", 2, 0, 0)
    position = WriterPosition(900, 9, 9, 0)
    finished = await store.commit(
        Commit([page, failed], [ShardOpened("reviews-000001.jsonl")], position)
    )
    assert [t.id for t in finished] == [second.saved.id]
    assert store.totals.count(Status.FAILED) == 1 and store.totals.total("records") == 9
    await store.close()
    reopened = await SqliteStore.open(layout, OUTPUT)
    assert reopened.position == position and reopened.ledger.credits == 4
    assert reopened.open_shard is not None and reopened.open_shard.file == "reviews-000001.jsonl"
    assert reopened.totals.count(Status.FAILED) == 1
    assert reopened.totals.by_status[Status.PENDING].pages_left == 3
    await reopened.begin_run(refresh=False, mode="early_stop")
    again = await reopened.claim()
    assert again is not None and again.saved.cursor == 2 and again.saved.walk_pages == 1
    await reopened.close()


@pytest.mark.parametrize("left", ["an empty file", "the schema without its job row"])
async def test_a_kill_during_the_first_start_leaves_a_state_that_starts(tmp_path: Path, left: str):
    """The first start creates state.db; a kill before its job row is committed leaves a file
    that holds nothing of the job: the next start begins it, never 'unreadable state'."""
    layout = Layout(tmp_path)
    layout.state_dir.mkdir()
    db = sqlite3.connect(layout.state_db)
    if left != "an empty file":  # what the first start had committed before the kill
        from crawler.state.sqlite import SCHEMA  # noqa: PLC0415 -- only this test needs it

        db.executescript(f"BEGIN; {SCHEMA}; COMMIT;")
    db.close()
    store = await SqliteStore.open(layout, OUTPUT)
    assert store.ledger.leased == 0 and store.open_shard is None
    await store.close()
    await (await SqliteStore.open(layout, OUTPUT)).close()


async def test_a_state_without_its_job_row_but_with_targets_is_not_thrown_away(tmp_path: Path):
    """Only a file that holds nothing is begun again: rows of targets mean a real state."""
    layout = Layout(tmp_path)
    layout.state_dir.mkdir()
    db = sqlite3.connect(layout.state_db)
    from crawler.state.sqlite import SCHEMA  # noqa: PLC0415 -- only this test needs it

    db.executescript(f"BEGIN; {SCHEMA}; COMMIT;")
    db.execute("INSERT INTO targets (product_id, region) VALUES ('1', 'US')")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="unreadable state"):
        await SqliteStore.open(layout, OUTPUT)


async def test_a_second_crawler_on_the_same_job_is_refused(tmp_path: Path):
    layout = Layout(tmp_path)
    store = await SqliteStore.open(layout, OUTPUT)
    with pytest.raises(StateError, match="another crawler is running this job"):
        await SqliteStore.open(layout, OUTPUT)
    await store.close()
    await (await SqliteStore.open(layout, OUTPUT)).close()  # free again once closed


async def test_a_probed_target_is_not_held_in_memory_for_the_run(tmp_path: Path):
    """plan --probe walks page 1 of every target and leaves them pending: a million of them must
    not stay in the store's memory (~280 B each) until the run ends."""
    store = await SqliteStore.open(Layout(tmp_path), OUTPUT)
    targets = TargetList()
    for n in range(50):
        targets.append(str(1234567890 + n), 0, None)
    await store.sync_targets(targets)
    await store.begin_run(refresh=False, mode="early_stop")
    while (claimed := await store.claim()) is not None:
        probed = PageCommitted(
            claimed.saved.id, 0, 2, Status.PENDING, None, 10, 10, 0, 2, 0, 0, 0.1, 40, None, 4,
            last=True,
        )  # fmt: skip
        await store.commit(Commit([probed], [], WriterPosition()))
    assert not store._live  # all committed, none held
    assert store.totals.count(Status.PENDING) == 50
    await store.close()


# the state schema of version 2 (crawler before the rules were written once), as it was
V2_SCHEMA = """
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    output TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
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
    mode TEXT NOT NULL
);
"""


async def test_a_version_2_state_is_migrated_whole(tmp_path: Path):
    layout = Layout(tmp_path)
    layout.state_dir.mkdir()
    db = sqlite3.connect(layout.state_db, isolation_level=None)
    db.executescript(f"BEGIN; {V2_SCHEMA}; COMMIT;")
    db.execute(
        "INSERT INTO job (id, version, output, leased, credits) VALUES (1, 2, ?, 40, 36)",
        (orjson.dumps(OUTPUT).decode(),),
    )
    db.execute("INSERT INTO refreshes (id, started_at, mode) VALUES (1, 0, 'early_stop')")
    for n, (status, finish, pages, new) in enumerate(
        [("done", "same", 1, 0), ("done", "goal", 3, 5), ("pending", None, 0, 0)]
    ):
        db.execute(
            "INSERT INTO targets (product_id, region, status, finish, walk, walk_pages, "
            "walk_new, walk_credits) VALUES (?, 'US', ?, ?, 1, ?, ?, ?)",
            (str(100 + n), status, finish, pages, new, 2 * pages),
        )
    db.close()
    store = await SqliteStore.open(layout, OUTPUT)
    assert store.ledger == Ledger(40, 36, 0)
    await store.close()
    view = SqliteView.open(layout)
    assert view is not None
    (refresh,) = view.refreshes()
    view.close()
    assert (refresh["targets"], refresh["probed"], refresh["changed"]) == (3, 2, 1)
    assert (refresh["new_reviews"], refresh["pages"], refresh["done"]) == (5, 4, 2)


async def test_a_version_3_state_gets_its_finished_targets_judged(tmp_path: Path):
    from tests.test_store_contract import ended, start, targets  # noqa: PLC0415 -- its helpers

    layout = Layout(tmp_path)
    store = await SqliteStore.open(layout, OUTPUT)
    listed = targets(("1729679758111249333", "US", None), ("1729679758111249334", "US", None))
    first = await start(store, listed)
    await store.commit(
        Commit(
            [
                ended(first[0], Finish.END, shown=60, count=100),
                ended(first[1], Finish.END, shown=100, count=100),
            ],
            [],
            store.position,
        )
    )
    await store.close()
    db = sqlite3.connect(layout.state_db, isolation_level=None)  # as version 3 kept it
    for column in ("walk_shown", "seen", "verdict", "found_by"):
        db.execute(f"ALTER TABLE targets DROP COLUMN {column}")
    db.execute("ALTER TABLE refreshes DROP COLUMN short")
    for table in ("source_targets", "series", "series_shards"):  # version 5's
        db.execute(f"DROP TABLE {table}")
    db.execute("UPDATE job SET version = 3")
    db.close()
    store = await SqliteStore.open(layout, OUTPUT)
    await store.close()
    view = SqliteView.open(layout)
    assert view is not None
    try:  # judged from its items (63, 103: a repeat counted twice where no record says which)
        rows = list(view.rows(("verdict", "missing")))
        assert rows == [("short", 37), ("complete", 0)]
        assert view.job["version"] == 5  # and on through version 4 to 5 (sources)
    finally:
        view.close()
