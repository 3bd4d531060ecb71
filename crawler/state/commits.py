"""A commit batch written to the state file, inside the store's one transaction: the sources'
pages, the shard events, the targets, the refreshes' figures, the credits and the writer's
position, so that they move together."""

from __future__ import annotations

import sqlite3

from crawler.state import rules
from crawler.state.events import Commit, ShardOpened
from crawler.state.model import TargetState
from crawler.state.schema import UPDATE_TARGET, row_of
from crawler.state.sources import write_sources
from crawler.state.table import count_refreshes


def write(
    db: sqlite3.Connection,
    targets: list[TargetState],
    batch: Commit,
    delta: rules.Delta,
    sources: dict[int, TargetState],
) -> int:
    """The batch's writes; the targets its source pages added."""
    added = (
        write_sources(db, batch, sources)
        if batch.sources or batch.series_shards or batch.series_positions
        else 0
    )
    for event in batch.shards:
        if isinstance(event, ShardOpened):
            db.execute("UPDATE job SET open_shard = ?, next_shard = next_shard + 1", (event.file,))
        else:
            db.execute(
                "INSERT INTO shards (file, records, bytes, sha256) VALUES (?, ?, ?, ?)",
                (event.file, event.records, event.bytes, event.sha256),
            )
            db.execute("UPDATE job SET open_shard = NULL")
    db.executemany(UPDATE_TARGET, map(row_of, targets))
    count_refreshes(db, delta)
    credits = delta.credits + sum(p.change.credits for p in batch.sources)
    p = batch.position
    db.execute(
        "UPDATE job SET credits = credits + ?, outstanding = outstanding - ?, "
        "shard_bytes = ?, shard_records = ?, seen = ?, seen_other = ?",
        (credits, credits, p.shard_bytes, p.shard_records, p.seen, p.seen_other),
    )
    return added
