"""A worker's commits: a batch's pages, shards and finds persisted in one fenced script."""

from __future__ import annotations

import asyncio
import itertools
from array import array
from functools import partial
from typing import TYPE_CHECKING

import orjson

from crawler.coordination import sources as found_by
from crawler.coordination.leases import forget, release_writes
from crawler.coordination.writes import Writes, doc_of
from crawler.errors import LeaseLost
from crawler.output.layout import shard_sequence
from crawler.sources import SourceTarget
from crawler.state import rules
from crawler.state.events import Commit, PageCommitted, ShardOpened, Status
from crawler.state.model import ShardInfo, TargetState, Totals
from crawler.state.verdict import Verdict
from crawler.targets import Target

if TYPE_CHECKING:
    from crawler.coordination.leases import Lease
    from crawler.coordination.store import RedisStore


async def commit(store: RedisStore, batch: Commit) -> list[TargetState]:
    """The batch as ``rules.committed`` decides it, in one script fenced by every lease's
    epoch; LeaseLost when a product was taken over meanwhile (nothing of it then counts).
    Source pages go in the same script: their targets, the items' ids and the products they
    found (``found_by``); a found target another worker added meanwhile makes the script
    refuse the batch, which is then decided again (its found targets only: the rules moved
    the walks once, in memory)."""
    held = {c.target_id: store._live[c.target_id] for c in batch.changes}
    states = {i: state for i, (state, _, _) in held.items()}
    delta = rules.committed(states, batch.changes)
    live = store._live_sources
    sourced = {p.change.target_id: live[p.change.target_id] for p in batch.sources}
    rules.source_committed({i: s for i, (s, _, _) in sourced.items()}, batch.sources)
    delta.credits += sum(p.change.credits for p in batch.sources)
    finished = [s for s in states.values() if s.status in rules.FINAL]
    release = _released_by(store, finished)
    release += [lease for lease in _sources_released(store, sourced) if lease not in release]
    every = [*held.values(), *sourced.values()]
    leases = list({lease.product_id: lease for _, _, lease in every}.values())
    for attempt in itertools.count():
        writes = Writes()
        found = await _batch_writes(store, writes, batch, held, sourced, leases=leases)
        store.count(writes, delta)
        if delta.credits:
            writes.op("HINCRBY", store.key("ledger"), "credits", delta.credits)
            writes.op("HINCRBY", store._w, "outstanding", -delta.credits)
        for lease in release:
            release_writes(writes, store, lease, requeue=False)
        answer = await store.apply(writes, chan="commit_seq", seq=store._commit_seq + 1)
        if answer[0] == "ok":
            break
        retried = answer[0] == "stale" and batch.sources and attempt < 50
        if not retried or not await _still_held(store, leases):
            # the worker stops: what this batch changed in memory is moot
            raise LeaseLost(_refused(store.worker, answer, len(store._p)))
        await asyncio.sleep(0.01)  # a found target another worker added: decided again
    store._commit_seq += 1
    store.pages_committed += sum(isinstance(c, PageCommitted) for c in batch.changes)
    _after_commit(store, batch, delta.totals, delta.credits, release)
    if batch.sources or batch.series_shards or batch.series_positions:
        found_by.series_committed(store.series_states, batch)
    for status, sums in found.totals.by_status.items():
        store.totals.by_status[status].merge(sums)
    if found.totals.targets:  # found targets queued: this worker's walkers claim them too
        store._drained = False
    if batch.sources:
        store.found.set()
    return finished


async def _batch_writes(
    store: RedisStore,
    writes: Writes,
    batch: Commit,
    held: dict[int, tuple[TargetState, Target, Lease]],
    sourced: dict[int, tuple[TargetState, SourceTarget, Lease]],
    *,
    leases: list[Lease],
) -> rules.Delta:
    """A batch's checks and writes but its sums; what its found targets add to them."""
    writes.op("ZADD", store.key("workers"), "$now", store.worker)  # a worker that commits lives
    for lease in leases:
        writes.check(store.key(f"p:{lease.product_id}"), "e", lease.epoch)
    _shard_writes(store, writes, batch)
    for state, target, _ in held.values():
        _target_writes(store, writes, state, target)
    for change in batch.changes:
        if isinstance(change, PageCommitted):
            ids = ids_of(change.ids, change.other_ids)
            product_id = held[change.target_id][1].product_id
            writes.members("SADD", store.key(f"seen:{product_id}"), ids)
    found = await found_by.found_writes(store, writes, batch.sources, sourced)
    found_by.page_writes(store, writes, sourced)
    found_by.series_writes(store, writes, batch)
    store.count(writes, found)
    return found


def _sources_released(
    store: RedisStore, sourced: dict[int, tuple[TargetState, SourceTarget, Lease]]
) -> list[Lease]:
    done: list[Lease] = []
    for local_id, (state, _, lease) in sourced.items():
        if state.status in rules.FINAL:
            store._live_sources.pop(local_id, None)
            lease.targets.discard(local_id)
            if not lease.targets and lease not in done:
                done.append(lease)
    return done


async def _still_held(store: RedisStore, leases: list[Lease]) -> bool:
    redis = store.link.redis
    for lease in leases:
        key = store.key(f"p:{lease.product_id}")
        epoch = await store.link.call(partial(redis.hget, key, "e"))
        if epoch != lease.epoch:
            return False
    return True


def _shard_writes(store: RedisStore, writes: Writes, batch: Commit) -> None:
    shards = store.key("shards")
    opened = store._open_shard.file if store._open_shard else None
    for event in batch.shards:
        if isinstance(event, ShardOpened):
            writes.op("ZADD", store.key("shardorder"), "$now", event.file)
            writes.op("HINCRBY", store._w, "next_shard", 1)
            writes.op("HSET", store._w, "open_shard", event.file)
            writes.op("HSET", shards, event.file, _doc(store, event.file, 0, 0, None))
            opened = event.file
        else:
            writes.op("HSET", store._w, "open_shard", "")
            doc = _doc(store, event.file, event.records, event.bytes, event.sha256)
            writes.op("HSET", shards, event.file, doc)
            opened = None
    if opened is not None:
        p = batch.position
        writes.op("HSET", shards, opened, _doc(store, opened, p.shard_records, p.shard_bytes))
    if batch.shards:
        writes.op("HINCRBY", store.key("meta"), "shards_version", 1)


def _target_writes(store: RedisStore, writes: Writes, state: TargetState, target: Target) -> None:
    key, name = store.key(f"p:{target.product_id}"), target.key
    writes.op("HSET", key, f"r:{target.region}", doc_of(state, target.max_pages))
    # failed or at a credit cap: looked at by status, and walked again at the next start;
    # a feed that ended short of its count: looked at
    if state.status in (Status.FAILED, Status.BUDGET):
        writes.op("SADD", store.key("retry"), target.product_id)
    if state.status in (Status.FAILED, Status.BUDGET) or state.verdict is Verdict.SHORT:
        writes.op("SADD", store.key("attention"), name)
    else:
        writes.op("SREM", store.key("attention"), name)


def _released_by(store: RedisStore, finished: list[TargetState]) -> list[Lease]:
    done: list[Lease] = []
    for state in finished:
        lease = store._live.pop(state.id)[2]  # walked to its end: not held in memory
        lease.targets.discard(state.id)
        if not lease.targets and lease not in done:
            done.append(lease)
    return done


def _after_commit(
    store: RedisStore, batch: Commit, delta: Totals, credits: int, release: list[Lease]
) -> None:
    for event in batch.shards:
        if isinstance(event, ShardOpened):
            store._open_shard = ShardInfo(event.file)
            store._next_shard += 1
        else:
            store._sealed.append(ShardInfo(event.file, event.records, event.bytes, event.sha256))
            store._open_shard = None
    store._position = batch.position
    if store._open_shard is not None:
        p = batch.position
        store._open_shard = ShardInfo(store._open_shard.file, p.shard_records, p.shard_bytes)
    for status, sums in delta.by_status.items():
        store.totals.by_status[status].merge(sums)
    store.ledger.credits += credits
    for lease in release:
        forget(store, lease)


def _doc(store: RedisStore, file: str, records: int, size: int, sha256: str | None = None) -> str:
    doc = {"file": file, "worker": store.worker, "seq": shard_sequence(file),
           "records": records, "bytes": size, "sha256": sha256}  # fmt: skip
    return orjson.dumps(doc).decode()


def _refused(worker: str, answer: list[str], prefix: int) -> str:
    if answer[0] == "stale":
        products = ", ".join(k[prefix + 2 :] for k in answer[1:])
        why = f"products {products} were taken over by another worker (or a changed job file)"
    else:
        why = "another process took this worker's name, or the others found it dead"
    return (
        f"worker {worker}: {why} (it was paused or cut off longer than "
        "coordination.lease_seconds); nothing of its last batch counts, start it again"
    )


def ids_of(packed: bytes, other: bytes) -> list[str]:
    numbers = array("Q")
    numbers.frombytes(packed)
    return [str(n) for n in numbers] + (orjson.loads(other) if other else [])
