"""A series shard an earlier incarnation of this worker, or a dead worker, left open: sealed at
its committed length, as a reviews shard is (``opening.seal_my_open_shard``, ``orphans``).

The committed part is copied to a new file that replaces the old name once Redis has recorded
the seal, and only if nothing was committed to the shard since it was read. With a bucket for
output every worker's shards are in reach: a shard whose file is not here (its machine lost, or
its files) is fetched from its parts first (``orphans.fetched``); without one, it is left to the
machine whose disk holds it.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from crawler import logs
from crawler.coordination.orphans import fetched, install, seal_copy
from crawler.coordination.writes import Writes

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore

log = logs.get_logger("crawler.coordination")


async def seal_mine(store: RedisStore) -> None:
    """A new incarnation never appends to a series file an earlier one had open (it may be only
    paused): each is sealed at its committed length, as the reviews' open shard is."""
    redis = store.link.redis
    mine = await store.link.call(lambda: redis.hgetall(store.worker_key))
    for field, file in sorted(mine.items()):
        if field.startswith("so:") and file:
            await _seal(store, store.worker, field[3:], file, fenced=True)


async def seal_orphans(store: RedisStore) -> None:
    """The open series shards of workers retired for dead (``ended`` by an adoption), whose
    files are here (or, with a bucket, anywhere), sealed at their committed lengths."""
    redis = store.link.redis
    docs = await store.link.call(lambda: redis.hgetall(store.key("sshards")))
    for file, raw in sorted(docs.items()):
        doc = orjson.loads(raw)
        worker = doc["worker"]
        if doc["sha256"] is not None or worker == store.worker:
            continue
        state = await store.link.call(partial(redis.hgetall, store.key(f"w:{worker}")))
        if state.get("ended") != "1" or state.get(f"so:{doc['series']}") != file:
            continue  # alive (or back: it seals its own), or sealed already
        await _seal(store, worker, doc["series"], file, fenced=False, inc=state.get("inc"))


async def _seal(
    store: RedisStore, worker: str, series: str, file: str, *, fenced: bool, inc: str | None = None
) -> None:
    redis, shards = store.link.redis, store.key("sshards")
    record = await store.link.call(lambda: redis.hget(shards, file))
    if record is None:
        return
    doc = orjson.loads(record)
    path = store.layout.shard(file)
    whose = (
        f"the series shard an earlier run of worker {worker} left open"
        if fenced
        else "a dead worker's open series shard"
    )
    if not await asyncio.to_thread(path.exists) and not await _in_reach(
        store, file, record, doc, whose
    ):
        return  # on another machine's disk: that machine's to seal
    owner = store.key(f"w:{worker}")
    writes = Writes()
    writes.check(shards, file, record)  # nothing committed to it since it was read
    writes.check(owner, f"so:{series}", file)
    if inc is not None:
        writes.check(owner, "inc", inc)  # not started again meanwhile
    writes.op("HSET", owner, f"so:{series}", "")
    if doc["records"] == 0:  # opened, nothing committed: nothing to keep (the file first)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        writes.op("HDEL", shards, file)
        writes.op("ZREM", store.key("sshardorder"), file)
        await store.apply(writes, fenced=fenced)
        return
    copy, sealed = await asyncio.to_thread(seal_copy, path, doc)
    writes.op("HSET", shards, file, orjson.dumps(sealed).decode())
    if (await store.apply(writes, fenced=fenced))[0] != "ok":
        await asyncio.to_thread(copy.unlink, missing_ok=True)
        return
    await asyncio.to_thread(install, copy, path, store.layout)
    log.info("sealed a series shard left open", shard=file, worker=worker)


async def _in_reach(
    store: RedisStore, file: str, record: str, doc: dict[str, Any], whose: str
) -> bool:
    """A shard whose file is not here, made so with a bucket: its committed part fetched from
    its parts (nothing to fetch when nothing was committed to it); False without a bucket, or
    when its record changed meanwhile (``orphans.fetched``, which stops the run when the parts
    do not hold it)."""
    shared = store._shared
    if shared is None:
        return False
    if doc["records"] == 0:
        return True
    return await fetched(store.link, store.key("sshards"), shared, file, record, whose)
