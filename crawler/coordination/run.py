"""A worker's run: its start (a refresh started or joined), its heartbeat, its end."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from crawler import logs
from crawler.coordination import sealing
from crawler.coordination import sources as found_by
from crawler.coordination.leases import release_product
from crawler.coordination.orphans import adopt_orphans
from crawler.coordination.sync import decoded
from crawler.coordination.writes import Writes
from crawler.errors import LeaseLost
from crawler.output.layout import Layout
from crawler.state import rules

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore

log = logs.get_logger("crawler.coordination")


async def begin_run(store: RedisStore, *, refresh: bool, mode: str, probe: bool = False) -> int:
    """A worker's run: products with failed or capped targets are queued again; with
    ``refresh``, a refresh starts unless one is under way (then this worker joins it). A
    refresh is the job's: every worker applies it to the products it takes."""
    await _queue_retries(store)
    redis, meta = store.link.redis, store.key("meta")
    await store.link.call(lambda: redis.hdel(meta, "budget_stopped"))  # it may be raised
    current = int(await store.link.call(lambda: redis.hget(meta, "refresh")) or 0)
    queued = int(await store.link.call(lambda: redis.hget(meta, "refresh_queued")) or 0)
    if queued != current:  # a refresh a kill left half-queued: queued whole, flag or not
        await _queue_every_product(store, current)
    by_plan = await store.link.call(lambda: redis.hget(meta, "refresh_by_plan")) == str(current)
    if refresh:
        current = await _start_refresh(store, current, mode, probe=probe, by_plan=by_plan)
    elif by_plan and not probe:
        await _walked_by_a_run(store)
    store.refresh = current
    await store.refresh_view()
    return current


async def _start_refresh(
    store: RedisStore, current: int, mode: str, *, probe: bool, by_plan: bool
) -> int:
    """``rules.refresh_to_walk``: refresh ``current + 1``, its products all queued (once,
    even through a kill), or the refresh there is."""
    redis, meta = store.link.redis, store.key("meta")
    todo, held = await store.link.call(
        lambda: asyncio.gather(redis.llen(store.key("todo")), redis.zcard(store.key("leases")))
    )
    under_way = bool(current) and bool(todo or held)
    walked = rules.refresh_to_walk(current, asked=True, under_way=under_way, by_plan=by_plan)
    if walked == current:
        if by_plan and not probe:
            await _walked_by_a_run(store)
        return current
    writes = Writes()
    writes.check(meta, "refresh", current or None)
    writes.op("HSET", meta, "refresh", walked)
    if probe:
        writes.op("HSET", meta, "refresh_by_plan", walked)
    started = orjson.dumps({"started_at": time.time(), "mode": mode}).decode()
    writes.op("HSET", store.key("refreshes"), walked, started)
    if (await store.apply(writes))[0] != "ok":  # another worker started it: joined
        return int(await store.link.call(lambda: redis.hget(meta, "refresh")) or 0)
    await _queue_every_product(store, walked)
    return walked


async def _walked_by_a_run(store: RedisStore) -> None:
    """The refresh a plan started is a run's now: the next --refresh is a new one."""
    writes = Writes()
    writes.op("HDEL", store.key("meta"), "refresh_by_plan")
    await store.apply(writes)


async def _queue_every_product(store: RedisStore, refresh: int) -> None:
    redis, meta = store.link.redis, store.key("meta")
    saved = await store.link.call(lambda: redis.hget(meta, "targets_list"))
    products = list(dict.fromkeys(p for p, _ in decoded(saved).pairs())) if saved else []
    # and what sources found, walked again as listed ones are; the sources first of all
    found = await store.link.call(lambda: redis.smembers(store.key("found")))
    products = list(dict.fromkeys([*products, *sorted(f.rpartition(":")[0] for f in found)]))
    series = await store.link.call(lambda: redis.smembers(store.key("series")))
    if series:
        writes = Writes()
        writes.members("LPUSH", store.key("todo"), [found_by.unit(n) for n in sorted(series)])
        await store.apply(writes)
    for start in range(0, len(products), 10_000):
        writes = Writes()
        writes.members("RPUSH", store.key("todo"), products[start : start + 10_000])
        await store.apply(writes)
    writes = Writes()
    writes.op("HSET", meta, "refresh_queued", refresh)
    await store.apply(writes)


async def _queue_retries(store: RedisStore) -> None:
    retry = store.key("retry")
    products = await store.link.call(lambda: store.link.redis.smembers(retry))
    if products:
        writes = Writes()
        writes.members("RPUSH", store.key("todo"), sorted(products))
        writes.members("SREM", retry, sorted(products))
        await store.apply(writes)


async def maintain(store: RedisStore) -> None:
    """Renew every held lease (and this worker's heartbeat) three times a lease: a lease
    found moved on is marked lost, so its walkers stop before sending more. Seals what
    dead workers left open here, and refreshes the job's figures, on the way."""
    interval = store._lease_ms / 3000
    last = (asyncio.get_running_loop().time(), store.pages_committed)
    task = asyncio.current_task()
    while True:
        await asyncio.sleep(interval)
        if task is not None and task.cancelling():  # a cancellation some library swallowed
            raise asyncio.CancelledError
        now = asyncio.get_running_loop().time()
        rate = (store.pages_committed - last[1]) / max(1e-3, now - last[0])
        last = (now, store.pages_committed)
        await store.renew(rate)
        if store.retired:
            raise LeaseLost(
                f"worker {store.worker}: another process took this worker's name, or the "
                "others found it dead (silent longer than coordination.lease_seconds); "
                "nothing of its uncommitted work counts: start it again"
            )
        if store.link.settled(store._lease_ms / 1000):
            await _adopt(store)
        await store.refresh_view()


async def end_run(store: RedisStore, info: dict[str, Any], *, budget_stopped: bool) -> None:
    """Give back the products still held (queued again for any worker), seal what dead
    workers left open here, and log the run."""
    for lease in list(store._leases.values()):
        await release_product(store, lease, requeue=True)
    await _seal_orphans_here(store)
    writes = Writes()
    ended = orjson.dumps({"held": 0, "rate": 0.0, "stopped": True}).decode()
    # a clean end: what is leased and not given back went out with requests
    writes.op("HSET", store._w, "live", ended, "outstanding", 0, "ended", 1)
    writes.op("LPUSH", store.key("runs"), orjson.dumps({"worker": store.worker, **info}))
    writes.op("LTRIM", store.key("runs"), 0, 999)
    if budget_stopped:  # rules.BUDGET_STOPPED, shown by the view once no walk is under way
        writes.op("HSET", store.key("meta"), "budget_stopped", 1)
    await store.apply(writes)
    await store.refresh_view()


async def _seal_orphans_here(store: RedisStore) -> None:
    """The last worker to end must not leave a dead one's open shard, with its uncommitted
    tail, in the folder: wait for such a worker to count as dead (a lease at most), then
    seal its shard. Live workers, and shards on other machines' disks, are not waited for."""
    loop = asyncio.get_running_loop()
    # long enough for a worker killed at the very end to count as dead, with room for a
    # quiet spell (a busy machine's late heartbeat) that holds adoptions back meanwhile
    deadline = loop.time() + 3 * store._dead_ms / 1000
    while loop.time() < deadline and await _silent_with_shards_here(store):
        if store.link.settled(store._lease_ms / 1000):
            await _adopt(store)
        await asyncio.sleep(store._lease_ms / 3000)
    if (
        store._shared is not None
        and loop.time() >= deadline
        and await _silent_with_shards_here(store)
    ):
        # not an error (it may yet come back), but its shard is not listed until a worker
        # seals it: say so rather than end as if the output were whole
        log.warning(
            "a silent worker's open shard is still unsealed; run a worker again to seal "
            "it and list it in the manifest"
        )


async def _adopt(store: RedisStore) -> None:
    """Dead workers' shards sealed here; never by two tasks of this process at once (the
    heartbeat's and the end's): both would fetch one shard, into one temporary file."""
    async with store._adopting:
        await adopt_orphans(store.link, store._p, store.layout, store._dead_ms, store._shared)
        await sealing.seal_orphans(store)


async def _silent_with_shards_here(store: RedisStore) -> bool:
    redis = store.link.redis
    seconds, micros = await store.link.call(redis.time)
    now = seconds * 1000 + micros // 1000
    beats = await store.link.call(
        lambda: redis.zrange(store.key("workers"), 0, -1, withscores=True)
    )
    for worker, beat in beats:
        if worker == store.worker or now - beat < store._lease_ms / 2:
            continue
        state = await store.link.call(partial(redis.hgetall, store.key(f"w:{worker}")))
        if store._shared is not None and _open_in_reach(state):
            return True  # a bucket: its open shards are in reach, wherever it ran
        if state.get("ended") == "1":
            continue
        if await asyncio.to_thread(_has_files, store.layout, worker):
            return True
    return False


def _open_in_reach(state: dict[str, str]) -> bool:
    """A silent worker's open shard, or a retired one's open series shard (sealed after its
    adoption: ``sealing.seal_orphans``)."""
    alive = state.get("ended") != "1"
    return (alive and bool(state.get("open_shard"))) or any(
        value for field, value in state.items() if field.startswith("so:")
    )


def _has_files(layout: Layout, worker: str) -> bool:
    return bool(layout.owned_files(worker))
