"""Products (and series) leased: claimed with their targets, renewed, given back, forgotten.

A worker leases a product (all its regions) at a time, or an endpoint's series (``sources``),
renews the lease while it walks, and fences every commit with the lease's epoch.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from crawler import logs
from crawler.coordination import sources as found_by
from crawler.coordination.seen import ItemSeen
from crawler.coordination.writes import Writes, doc_of, parse_doc
from crawler.state import rules
from crawler.state.model import Claimed, TargetState
from crawler.targets import Target

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore

log = logs.get_logger("crawler.coordination")
_WAIT_MS = (100, 500)  # with nothing to claim, how soon to look again: never a busy loop


@dataclass
class Lease:
    """A product held by this worker; ``lost`` once its epoch moved on."""

    product_id: str
    epoch: str
    version: str  # the product's targets' version at the claim: a sync since may add some
    refresh: int  # the refresh under way at the claim: one started since walks it again
    targets: set[int] = field(default_factory=set)  # local ids of its targets not final yet
    lost: bool = False


async def claim(store: RedisStore) -> Claimed | None:
    if store._drained and store.finding:  # a walk of a series this worker holds may find more
        store._drained = False
    while not store._queue and not store._drained and not store.retired:
        async with store._claiming:  # one claim at a time: the others find its targets
            if not store._queue and not store._drained and not store.retired:
                await _claim_product(store)
    return store._queue.pop(0) if store._queue else None


async def _claim_product(store: RedisStore) -> None:
    keys = [store.key(k) for k in ("todo", "leases", f"w:{store.worker}", "retry")]
    settled = "1" if store.link.settled(store._lease_ms / 1000) else "0"
    args = [store._p, store.worker, uuid.uuid4().hex, store._lease_ms, store._inc, settled]
    answer = await store._claim(keys=keys, args=args)
    if not answer:
        store._drained = True
        return
    if answer[0] == "retired":
        store.retired = True
        return
    if answer[0] == "wait":  # another worker's product: its lease ends, or it finishes
        low, high = _WAIT_MS
        await asyncio.sleep(max(low, min(int(answer[1]), high)) / 1000)
        return
    product_id, epoch, flat_fields = answer[0], answer[1], answer[2]
    # a refresh another worker started since this one began: joined, product by product
    store.refresh = max(store.refresh, int(answer[3]))
    fields = dict(zip(flat_fields[::2], flat_fields[1::2], strict=True))
    lease = Lease(product_id, epoch, fields.get("v", ""), store.refresh)
    store._leases[product_id] = lease
    if found_by.is_series(product_id):
        await _claim_series(store, lease, fields)
        return
    targets = []
    for name, raw in sorted(fields.items()):
        if name.startswith("r:"):
            state, cap, off = parse_doc(raw, store._next_id)
            store._next_id += 1
            if not off:
                targets.append((state, Target(product_id, name[2:], cap)))
    joined = [(state, f"r:{target.region}", target.max_pages) for state, target in targets]
    if not await _joined(store, lease, joined):
        forget(store, lease)
        return
    claimed: list[Claimed] = []
    for state, target in targets:
        if not rules.walkable(state):
            continue
        lease.targets.add(state.id)
        store._live[state.id] = (state, target, lease)
        claimed.append(Claimed(target, state, int(epoch), lease))
    if not claimed:
        await release_product(store, lease, requeue=False)
        return
    # the product's committed ids before any of its targets is handed out: a walker may
    # render its first page while this waits
    ids = await store.link.call(lambda: store.link.redis.smembers(store.key(f"seen:{product_id}")))
    store.seen.hold(product_id, ids)
    store._queue.extend(claimed)


async def _claim_series(store: RedisStore, lease: Lease, fields: dict[str, str]) -> None:
    """An endpoint's series taken: every source target of it this worker walks, and the
    items its shards hold already (``iseen:<series>``)."""
    targets = found_by.targets_of(fields, store._sources, store._next_id)
    store._next_id += len(targets)
    joined: list[tuple[TargetState, str, int | None]] = [
        (state, found_by.field_of(target), None) for state, target in targets
    ]
    if not await _joined(store, lease, joined, counted=False):
        forget(store, lease)
        return
    claimed: list[Claimed] = []
    for state, target in targets:
        if rules.walkable(state):
            lease.targets.add(state.id)
            store._live_sources[state.id] = (state, target, lease)
            # a source target walks as a Target does (its fields fill the endpoint's params)
            claimed.append(Claimed(target, state, int(lease.epoch), lease))  # type: ignore[arg-type]
    if not claimed:
        await release_product(store, lease, requeue=False)
        return
    series = lease.product_id[len(found_by.MARK) :]
    key = store.key(f"iseen:{series}")
    ids = await store.link.call(lambda: store.link.redis.smembers(key))
    store._items.setdefault(series, ItemSeen()).hold(ids)
    store._queue.extend(claimed)


async def _joined(
    store: RedisStore,
    lease: Lease,
    targets: list[tuple[TargetState, str, int | None]],
    *,
    counted: bool = True,
) -> bool:
    """The rules one process applies to every target at a run's start, applied here to a
    product (or a series' source targets: ``counted`` False, in no total) as it is taken
    (``rules.BUDGET_REOPENED``, and ``rules.refresh_started`` while a refresh is under
    way); False if it was lost meanwhile."""
    delta, writes = rules.Delta(), Writes()
    starting = [rules.BUDGET_REOPENED]
    if store.refresh:
        starting.append(rules.refresh_started(store.refresh))
    for state, name, cap in targets:
        if any([rules.changed(state, rule, delta) for rule in starting]):
            writes.op("HSET", store.key(f"p:{lease.product_id}"), name, doc_of(state, cap))
    if not writes.ops:
        return True
    writes.check(store.key(f"p:{lease.product_id}"), "e", lease.epoch)
    if counted:
        store.count(writes, delta)
    return (await store.apply(writes))[0] == "ok"


async def release_product(store: RedisStore, lease: Lease, *, requeue: bool) -> None:
    if not lease.lost:
        key = store.key(f"p:{lease.product_id}")
        writes = Writes()
        writes.check(key, "e", lease.epoch)
        release_writes(writes, store, lease, requeue=requeue)
        await store.apply(writes)
    forget(store, lease)


def forget(store: RedisStore, lease: Lease) -> None:
    store._leases.pop(lease.product_id, None)
    for local_id in lease.targets:
        store._live.pop(local_id, None)
        store._live_sources.pop(local_id, None)
    store._queue = [
        c
        for c in store._queue
        if c.target.product_id != lease.product_id and c.saved.id not in lease.targets
    ]
    if found_by.is_series(lease.product_id):
        store._items.get(lease.product_id[len(found_by.MARK) :], ItemSeen()).drop()
    else:
        store.seen.drop(lease.product_id)


async def renew(store: RedisStore, rate: float = 0.0) -> None:
    held = [lease for lease in store._leases.values() if not lease.lost]
    info = orjson.dumps({"held": len(held), "rate": round(rate, 2), "pid": os.getpid()})
    keys = [store.key("leases"), store.key("workers"), store._w]
    args: list[Any] = [store._p, store.worker, store._lease_ms, store._inc, info.decode()]
    for lease in held:
        args += [lease.product_id, lease.epoch]
    answer = await store._renew(keys=keys, args=args)
    if answer[0] == "retired":
        store.retired = True
        for lease in held:
            lease.lost = True
        return
    for product_id in answer[1:]:
        if product_id in store._leases:
            store._leases[product_id].lost = True
            log.warning("lease lost: another worker walks this product now", product_id=product_id)


def release_writes(writes: Writes, store: RedisStore, lease: Lease, *, requeue: bool) -> None:
    """A product given back: unleased; queued again when asked, or when a sync changed its
    targets since it was claimed (one may have been added while it was walked)."""
    key = store.key(f"p:{lease.product_id}")
    writes.op("ZREM", store.key("leases"), lease.product_id)
    writes.op("HSET", key, "o", "")
    if requeue:
        writes.op("RPUSH", store.key("todo"), lease.product_id)
    else:
        writes.unless(key, "v", lease.version, "RPUSH", store.key("todo"), lease.product_id)
        meta = store.key("meta")
        refresh = lease.refresh or ""  # '' as the field reads before any refresh
        writes.unless(meta, "refresh", refresh, "RPUSH", store.key("todo"), lease.product_id)
