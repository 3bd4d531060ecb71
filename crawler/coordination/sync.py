"""The job file's targets made a coordinated job's: added, removed and re-capped by the rules.

The targets last synced are kept in Redis (their columns, compressed), so a changed job file is
compared with them: only the targets added, removed or given another cap are read and written.
What each of those becomes is ``rules``'s decision, the same as in one process: a removed target
is kept but inactive (never walked, never counted), a cap raised past a walk that ended at it
walks on, a cap lowered to where a walk is ends it. A product whose targets change while a
worker walks it is taken from that worker (its epoch moves: its next commit is refused), so no
walk goes on under rules the file no longer says.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import zstandard

from crawler.coordination.scripts import LOCK
from crawler.coordination.writes import Writes, doc_of, parse_doc
from crawler.state import rules
from crawler.state.model import TargetState
from crawler.targets import TargetList

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore

_CHUNK = 500  # products per read and per script: long scripts hold up every other worker
_LOCK_MS = 120_000  # re-armed after every chunk: a worker that died syncing holds it this long
_OFF = object()  # a target the job file no longer lists


async def sync_targets(store: RedisStore, targets: TargetList) -> bool:
    """Make ``targets`` the job's, under a lock the other workers wait on; False when they were
    already (nothing read, whatever their number)."""
    digest = targets.digest()
    redis, link, meta = store.link.redis, store.link, store.key("meta")
    lock, token = store.key("init"), uuid.uuid4().hex
    holding = link.script(LOCK)
    while await link.call(lambda: redis.hget(meta, "digest")) != digest:
        if not await link.call(lambda: redis.set(lock, token, nx=True, px=_LOCK_MS)):
            await asyncio.sleep(0.2)  # another worker is writing them
            continue
        try:
            if await link.call(lambda: redis.hget(meta, "digest")) == digest:
                return False
            saved = await link.call(lambda: redis.hget(meta, "targets_list"))
            fresh = not await link.call(lambda: redis.hexists(meta, "targets"))
            before = decoded(saved) if saved else TargetList()
            for chunk in _chunks(_changes(before, targets)):
                await _write(store, await _found_kept(store, chunk), fresh=fresh)
                await holding(keys=[lock], args=[token, _LOCK_MS])
            listed = _encoded(targets)
            done = {"digest": digest, "targets": len(targets), "targets_list": listed}
            await link.call(partial(redis.hset, meta, mapping=done))
            return True
        finally:
            await holding(keys=[lock], args=[token, 0])
    return False


def _changes(before: TargetList, after: TargetList) -> dict[str, dict[str, Any]]:
    """product -> region -> its cap now (or ``_OFF``), for every target added, removed or
    re-capped. A job listed once before costs a dict of its targets for the comparison."""
    old = {(p, r): cap for p, r, cap in before.rows()}
    changed: dict[str, dict[str, Any]] = {}
    for product_id, region, cap in after.rows():
        key = (product_id, region)
        if key in old and old.pop(key) == cap:
            continue
        changed.setdefault(product_id, {})[region] = cap
    for product_id, region in old:
        changed.setdefault(product_id, {})[region] = _OFF
    return changed


async def _found_kept(
    store: RedisStore, chunk: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """A target the job file drops stays when a source found it too (``found``: as one process
    keeps a target a source found): the file was not the only one to list it."""
    dropped = [
        f"{p}:{r}" for p, regions in chunk.items() for r, cap in regions.items() if cap is _OFF
    ]
    if not dropped:
        return chunk
    redis = store.link.redis
    marks = await store.link.call(lambda: redis.smismember(store.key("found"), dropped))
    kept = {pair for pair, mark in zip(dropped, marks, strict=True) if mark}
    trimmed = {
        p: {r: cap for r, cap in regions.items() if f"{p}:{r}" not in kept}
        for p, regions in chunk.items()
    }
    return {p: regions for p, regions in trimmed.items() if regions}


def _chunks(changed: dict[str, dict[str, Any]]) -> Iterator[dict[str, dict[str, Any]]]:
    chunk: dict[str, dict[str, Any]] = {}
    for product_id, regions in changed.items():
        chunk[product_id] = regions
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


async def _write(store: RedisStore, chunk: dict[str, dict[str, Any]], *, fresh: bool) -> None:
    """One chunk of products, read then written in one script; read again and decided again
    when a worker changed one of them in between."""
    pause = 0.02
    while True:
        held = {} if fresh else await _read(store, list(chunk))
        writes, delta, queue = Writes(), rules.Delta(), []
        for product_id, regions in chunk.items():
            if _product(store, writes, delta, product_id, regions, held.get(product_id, {})):
                queue.append(product_id)
        if queue:
            writes.op("RPUSH", store.key("todo"), *queue)
        store.count(writes, delta)
        if (await store.apply(writes))[0] == "ok":
            return
        # a worker moved one of them (or an earlier, killed sync wrote some): read, decide again
        fresh = False
        await asyncio.sleep(pause)
        pause = min(1.0, pause * 2)


def _product(  # noqa: PLR0917 -- one chunk's accumulators, passed along the products
    store: RedisStore,
    writes: Writes,
    delta: rules.Delta,
    product_id: str,
    regions: dict[str, Any],
    found: dict[str, str],
) -> bool:
    """One product's changed targets as ``rules`` decides them; whether it is to walk now."""
    key = store.key(f"p:{product_id}")
    writes.check(key, "e", found.get("e"))
    writes.check(key, "o", found.get("o"))
    walkable = touched = False
    for region, cap in regions.items():
        raw = found.get(f"r:{region}")
        if raw is None and cap is _OFF:
            continue
        # a commit between the read and this write (a walk under way) changes only the target:
        # the target as read must still be there, or the sync decides again
        writes.check(key, f"r:{region}", raw)
        state, was_on = TargetState(0), False
        if raw is not None:
            state, _, off = parse_doc(raw, 0)
            was_on, touched = not off, True
        before = replace(state) if was_on else None
        on = cap is not _OFF
        if on:
            rules.configured(state, cap)
            walkable = walkable or rules.walkable(state)
        delta.moved(before, state if on else None)
        if not on:
            writes.op("SREM", store.key("attention"), f"{product_id}:{region}")
        writes.op("HSET", key, f"r:{region}", doc_of(state, cap if on else None, on))
    writes.op("HSETNX", key, "e", "0")
    writes.op("HINCRBY", key, "v", "1")
    if touched and found.get("o"):  # a walk under the old rules: taken from its worker
        writes.op("HINCRBY", key, "e", "1")
        writes.op("HSET", key, "o", "")
        writes.op("ZREM", store.key("leases"), product_id)
        walkable = walkable or _walkable(found, regions)
    return walkable


def _walkable(found: dict[str, str], changed: dict[str, Any]) -> bool:
    """Whether a target of the product that this sync leaves as it was is still to walk."""
    for name, raw in found.items():
        if name.startswith("r:") and name[2:] not in changed:
            state, _, off = parse_doc(raw, 0)
            if not off and rules.walkable(state):
                return True
    return False


async def _read(store: RedisStore, products: list[str]) -> dict[str, dict[str, str]]:
    redis = store.link.redis

    async def read() -> list[dict[str, str]]:
        pipe = redis.pipeline(transaction=False)
        for product_id in products:
            pipe.hgetall(store.key(f"p:{product_id}"))
        result: list[dict[str, str]] = await pipe.execute()
        return result

    found = await store.link.call(read)
    return dict(zip(products, found, strict=True))


def _encoded(targets: TargetList) -> str:
    packed = zstandard.ZstdCompressor(level=3).compress(targets.to_bytes())
    return base64.b64encode(packed).decode()


def decoded(text: str) -> TargetList:
    return TargetList.from_bytes(zstandard.ZstdDecompressor().decompress(base64.b64decode(text)))
