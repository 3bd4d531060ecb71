"""The sources in the state file: their targets synced, claimed and written at a commit with the
targets they found; the endpoints' shard series written, read at opening and moved in memory."""

from __future__ import annotations

import sqlite3
from collections.abc import Container
from dataclasses import replace
from typing import Any

import orjson

from crawler.sources import Source, SourceTarget
from crawler.state import rules
from crawler.state.events import WALKABLE, Commit, ShardOpened, WriterPosition
from crawler.state.model import Claimed, SeriesState, ShardInfo, TargetState
from crawler.state.schema import STATE_COLUMNS, UPDATE_SOURCE, row_of, state_of


def sync_sources(db: sqlite3.Connection, sources: tuple[Source, ...]) -> None:
    """The job's sources' targets made the active ones (inside a transaction)."""
    db.execute("UPDATE source_targets SET active = 0 WHERE active")
    db.executemany(
        "INSERT INTO source_targets (source, key) VALUES (?, ?) "
        "ON CONFLICT (source, key) DO UPDATE SET active = 1",
        ((s.name, t.key) for s in sources for t in s.targets),
    )


def source_batch(db: sqlite3.Connection, known: Container[str]) -> list[Claimed]:
    """Every walkable active target of a source in ``known``, in order."""
    rows = db.execute(
        f"SELECT source, key, {STATE_COLUMNS} FROM source_targets "  # noqa: S608 -- ours
        "WHERE active AND status IN (?, ?, ?) ORDER BY id",
        WALKABLE,
    ).fetchall()
    claimed = []
    for source, key, *state in rows:
        if source in known:
            target = SourceTarget(source, tuple(sorted(orjson.loads(key).items())))
            claimed.append(Claimed(target, state_of(tuple(state))))  # type: ignore[arg-type]  # a source target walks as a Target does (Fields)
    return claimed


def write_sources(db: sqlite3.Connection, batch: Commit, sources: dict[int, TargetState]) -> int:
    """The source pages' targets, their found targets, the series' shards and positions
    (in the commit's transaction); the targets added."""
    added = 0
    for page in batch.sources:
        found = rules.found(page)
        source = db.execute(
            "SELECT source FROM source_targets WHERE id = ?", (page.change.target_id,)
        ).fetchone()[0]
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO targets (product_id, region, found_by) VALUES (?, ?, ?)",
            ((p, r, source) for p, r in found),
        )
        new = db.total_changes - before
        added += new
        # one the job file lists is the source's too: it stays when the file drops it
        db.executemany(
            "UPDATE targets SET found_by = ? WHERE product_id = ? AND region = ? "
            "AND found_by IS NULL AND active",
            ((source, p, r) for p, r in found),
        )
        db.execute(
            "UPDATE source_targets SET found = found + ? WHERE id = ?",
            (new, page.change.target_id),
        )
    db.executemany(UPDATE_SOURCE, map(row_of, sources.values()))
    for shard in batch.series_shards:
        db.execute("INSERT OR IGNORE INTO series (name) VALUES (?)", (shard.series,))
        done = shard.event
        if isinstance(done, ShardOpened):
            db.execute(
                "UPDATE series SET open_shard = ?, next_shard = next_shard + 1 WHERE name = ?",
                (done.file, shard.series),
            )
        else:
            db.execute(
                "INSERT INTO series_shards (series, file, records, bytes, sha256) "
                "VALUES (?, ?, ?, ?, ?)",
                (shard.series, done.file, done.records, done.bytes, done.sha256),
            )
            db.execute("UPDATE series SET open_shard = NULL WHERE name = ?", (shard.series,))
    for name, p in batch.series_positions.items():
        db.execute("INSERT OR IGNORE INTO series (name) VALUES (?)", (name,))
        db.execute(
            "UPDATE series SET shard_bytes = ?, shard_records = ?, seen = ?, seen_other = ? "
            "WHERE name = ?",
            (p.shard_bytes, p.shard_records, p.seen, p.seen_other, name),
        )
    return added


def series_of(db: sqlite3.Connection) -> dict[str, SeriesState]:
    series = {}
    for name, next_shard, open_shard, size, records, seen, other in db.execute(
        "SELECT name, next_shard, open_shard, shard_bytes, shard_records, seen, seen_other "
        "FROM series"
    ):
        sealed = tuple(
            ShardInfo(*row)
            for row in db.execute(
                "SELECT file, records, bytes, sha256 FROM series_shards WHERE series = ? "
                "ORDER BY seq",
                (name,),
            )
        )
        series[name] = SeriesState(
            name,
            WriterPosition(size, records, seen, other),
            ShardInfo(open_shard, records, size) if open_shard else None,
            next_shard,
            sealed,
        )
    return series


def series_moved(series: SeriesState, event: ShardOpened | Any) -> SeriesState:
    """``series`` after a shard of it was opened or sealed."""
    if isinstance(event, ShardOpened):
        series = replace(series, open_shard=ShardInfo(event.file), next_shard=series.next_shard + 1)
    else:
        sealed = ShardInfo(event.file, event.records, event.bytes, event.sha256)
        series = replace(series, open_shard=None, sealed=(*series.sealed, sealed))
    return series
