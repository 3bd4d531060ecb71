"""A worker's opening: its Redis, its job and its output checked, its name registered.

Before a worker claims anything: a Redis that could forget an acknowledged commit is refused, as
are a job file or an output folder that belong to another job; the worker's incarnation is
registered, and the shard its last incarnation left open is sealed (never appended to).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from crawler import logs
from crawler.coordination.orphans import install, seal_copy
from crawler.coordination.scripts import REGISTER
from crawler.coordination.writes import Writes
from crawler.errors import ConfigError, CoordinationError, OutputError, StateError
from crawler.output.layout import write_atomically
from crawler.state.model import ShardInfo

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore

log = logs.get_logger("crawler.coordination")


@dataclass(frozen=True)
class Origin:
    """Where a worker's job file is: two files that only share a name are two jobs."""

    path: str  # the job file, resolved
    explicit: bool  # named by coordination.job: the user says it is the same job


async def check_durability(store: RedisStore) -> None:
    """Refuse a Redis that could forget an acknowledged commit or lease (see README)."""
    try:
        settings = await store.link.call(lambda: store.link.redis.config_get("append*"))
    except CoordinationError as exc:
        # managed services often deny CONFIG to their users: the rest may still be allowed
        if "CONFIG" not in str(exc).upper() and "NOPERM" not in str(exc):
            raise
        log.warning("cannot read Redis's persistence settings", error=str(exc)[:200])
        return
    if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
        raise ConfigError(
            f"Redis at {store.link.url}: appendonly={settings.get('appendonly')}, "
            f"appendfsync={settings.get('appendfsync')}; a coordinated job needs "
            "appendonly yes and appendfsync always, so that a Redis restart loses no "
            "committed page and no credit lease (CONFIG SET appendonly yes; CONFIG SET "
            "appendfsync always)"
        )


async def check_identity(store: RedisStore, origin: Origin) -> None:
    """One name, one job: a job file elsewhere on this machine under a name a job on this
    Redis has is another job (refused), unless coordination.job names it on purpose; a
    folder holding another job's shards is refused too."""
    redis, meta, host = store.link.redis, store.key("meta"), socket.gethostname()
    name = store._p[8:-1]
    if origin.path:
        await store.link.call(lambda: redis.hsetnx(meta, f"origin:{host}", origin.path))
        first = await store.link.call(lambda: redis.hget(meta, f"origin:{host}"))
        if first != origin.path and not origin.explicit:
            raise ConfigError(
                f"{origin.path}: coordination.job: a job named {name!r} on this Redis was "
                f"started from {first}; this file is another job: give it a "
                f"coordination.job of its own (or, if it is the same job moved, set "
                f"coordination.job: {name})"
            )
    await store.link.call(lambda: redis.hsetnx(meta, "id", uuid.uuid4().hex))
    job_id = await store.link.call(lambda: redis.hget(meta, "id"))
    marker = store.layout.coordinated
    mine = {"job": name, "id": job_id}
    try:
        saved = orjson.loads(marker.read_bytes()) if marker.exists() else None
    except (OSError, orjson.JSONDecodeError):
        saved = None
    if saved is not None and saved.get("id") != job_id:
        raise StateError(
            f"{store.layout.root}: holds the shards of another coordinated job "
            f"({saved.get('job')!r}), or of one whose state this Redis no longer has; "
            "use another output.dir"
        )
    if saved is None:
        await asyncio.to_thread(_mark, marker, orjson.dumps(mine) + b"\n")


async def check_output(store: RedisStore, output: dict[str, Any]) -> None:
    meta = store.key("meta")
    wanted = orjson.dumps(output).decode()
    redis = store.link.redis
    await store.link.call(lambda: redis.hsetnx(meta, "output", wanted))
    saved = await store.link.call(lambda: redis.hget(meta, "output"))
    if saved != wanted:
        raise StateError(
            f"coordinated job {store._p[8:-1]!r}: the output settings changed since it started "
            f"(saved {saved}, now {wanted}); put them back or name another coordination.job"
        )


async def register_worker(store: RedisStore) -> None:
    info = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid()}).decode()
    register = store.link.script(REGISTER)
    inc, commit_seq, lease_seq, next_shard, open_file = await register(
        keys=[store._w, store.key("workers"), store.key("leases")],
        args=[store.worker, info, store._p],
    )
    store._inc, store._commit_seq, store._lease_seq = int(inc), int(commit_seq), int(lease_seq)
    store._next_shard = int(next_shard)
    redis = store.link.redis
    shards = await store.link.call(lambda: redis.hgetall(store.key("shards")))
    mine = [orjson.loads(v) for v in shards.values()]
    mine = [s for s in mine if s["worker"] == store.worker]
    mine.sort(key=lambda s: s["seq"])
    store._sealed = [shard_info(s) for s in mine if s["sha256"] is not None]
    store._earlier_open = next((s for s in mine if s["file"] == open_file), None)


async def seal_my_open_shard(store: RedisStore) -> None:
    """A new incarnation never appends to the file an earlier one had open: that one may be
    only paused and write again. The committed part is sealed under the file's name (a
    copy, renamed in: the old file lives on, unnamed, for whoever still writes it), and
    this incarnation starts a new file."""
    doc = store._earlier_open
    if (
        doc is not None
        and store._shared is not None
        and not store.layout.shard(doc["file"]).exists()
        and not await store._shared.fetch(doc["file"], doc["bytes"], records=doc["records"])
    ):
        # its machine, or its files, are gone, and so are its committed parts: going on
        # would leave its committed reviews out of the output, silently
        raise StateError(
            f"{doc['file']}: the shard an earlier run of worker {store.worker} left open "
            f"({doc['records']:,} reviews, {doc['bytes']:,} bytes committed) is neither in "
            f"{store.layout.shards_dir} nor whole in the bucket's parts; it cannot be sealed"
        )
    if doc is None or not store.layout.shard(doc["file"]).exists():
        return  # none, or on another machine's disk: that machine's to finish
    path = store.layout.shard(doc["file"])
    record = orjson.dumps(doc).decode()
    writes = Writes()
    writes.check(store.key("shards"), doc["file"], record)
    writes.op("HSET", store._w, "open_shard", "")
    if doc["records"] == 0:  # opened, nothing committed: nothing to keep (the file first: a
        # kill before the record goes leaves an empty open record, never listed)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        writes.op("HDEL", store.key("shards"), doc["file"])
        writes.op("ZREM", store.key("shardorder"), doc["file"])
        await store.apply(writes)
        return
    copy, sealed = await asyncio.to_thread(seal_copy, path, doc)
    writes.op("HSET", store.key("shards"), doc["file"], orjson.dumps(sealed).decode())
    writes.op("HINCRBY", store.key("meta"), "shards_version", 1)
    if (await store.apply(writes))[0] != "ok":
        await asyncio.to_thread(copy.unlink, missing_ok=True)
        return
    await asyncio.to_thread(install, copy, path, store.layout)
    store._sealed.append(shard_info(sealed))
    log.info("sealed the shard an earlier run of this worker left open", shard=doc["file"])


def _mark(marker: Path, text: bytes) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(exc, marker.parent) from None
    write_atomically(marker, text)


def shard_info(doc: dict[str, Any]) -> ShardInfo:
    return ShardInfo(doc["file"], doc["records"], doc["bytes"], doc["sha256"])
