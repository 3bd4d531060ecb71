"""The seen-set is exact and persisted; the journal survives a torn tail and reports corruption."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from crawler.dedup import SeenIds, SeenLog
from crawler.errors import StateError
from crawler.journal import encode, read
from crawler.layout import Layout
from crawler.state import FileStateStore, load


def test_seen_ids_is_exactly_a_set():
    rng = random.Random(1)
    ids = [str(rng.randrange(10**18, 10**19)) for _ in range(20_000)]
    ids += ids[:500] + ["0", "007", "abc", "18446744073709551616", "18446744073709551615"] * 2
    seen, reference = SeenIds(capacity=10), set()
    for review_id in ids:
        assert seen.add(review_id) == (review_id not in reference)
        reference.add(review_id)
    assert len(seen) == len(reference)


def test_seen_log_keeps_committed_ids_only(tmp_path: Path):
    ids_path, other_path = tmp_path / "seen.u64", tmp_path / "seen-other.txt"
    log = SeenLog(ids_path, other_path, 0, 0)
    assert log.add("1234567890123456789") and log.add("x-1")
    log.write(*log.take())
    committed, other = log.count, log.other_bytes
    assert log.add("1234567890123456790")
    log.write(*log.take())  # written, but say a crash came before the state counted it
    log.close()
    reopened = SeenLog(ids_path, other_path, committed, other)
    reopened.load()
    assert not reopened.add("1234567890123456789") and not reopened.add("x-1")
    assert reopened.add("1234567890123456790")  # uncommitted: cut off, so new again
    reopened.close()
    assert ids_path.stat().st_size == committed * 8


def test_journal_torn_tail_is_cut_and_corruption_is_reported(tmp_path: Path):
    path = tmp_path / "journal.log"
    lines = [encode({"e": "R", "k": "1:US", "c": 2}) for _ in range(3)]
    path.write_bytes(b"".join(lines) + lines[0][:10])
    events, good = read(path)
    assert len(events) == 3 and good == sum(len(line) for line in lines)
    path.write_bytes(lines[0] + b"garbage\n" + lines[1])
    with pytest.raises(StateError, match="line 2 is corrupt"):
        read(path)


async def test_live_compaction_keeps_every_event(tmp_path: Path):
    layout = Layout(tmp_path)
    output = {"shard_max_records": 10, "compression": "none"}
    store = FileStateStore.open(layout, output, compact_after=5)

    async def lease(n: int) -> None:
        for _ in range(n):
            await store.record([{"e": "L", "c": 2}])

    await asyncio.gather(*(lease(40) for _ in range(8)))
    assert store.state.leased == 8 * 40 * 2
    assert store.state.generation > 10  # it compacted, many times, under concurrent appends
    store.close()
    reopened, _ = load(layout)
    assert reopened.leased == 8 * 40 * 2
    assert len(list(layout.state_dir.glob("journal-*.log"))) == 1
