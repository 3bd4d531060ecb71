"""Many processes, on one machine or many, working one job through Redis: the coordinated mode.

Imported only when a job is coordinated (``coordination:`` in the job file, or ``--redis``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from functools import partial
from typing import Any

import orjson

from crawler.config import Job
from crawler.coordination.gate import SharedRateGate
from crawler.coordination.link import Link
from crawler.coordination.orphans import Shared, repair_sealed
from crawler.coordination.store import Origin, RedisStore, default_worker, prefix_of
from crawler.errors import ConfigError, OutputError, StateError
from crawler.output.layout import Layout, hold

__all__ = ["RedisStore", "SharedRateGate", "default_worker", "key_fingerprint", "open_worker"]


def key_fingerprint(api_key: str) -> str:
    """How Redis names an API key's rate gate: never the key itself."""
    return hashlib.blake2b(api_key.encode(), digest_size=8).hexdigest()


async def open_worker(
    job: Job,
    layout: Layout,
    output: dict[str, Any],
    worker: str | None,
    *,
    fresh: bool = False,
    shared: Shared | None = None,
) -> RedisStore:
    """Join the job as a worker: register, then seal what dead workers left open here.
    ``fresh`` first removes the job's state in Redis and its files here (refused while a worker
    of it is alive). ``shared``: a bucket job's, every worker's shards in reach."""
    settings = job.coordination
    assert settings is not None  # noqa: S101 -- the caller checked the job is coordinated
    if worker is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", worker):
        raise ConfigError(
            f"--worker {worker!r}: a worker's name is letters, digits, '_', '.' and '-' (it names "
            "its shard files and its keys in Redis)"
        )
    name = worker or default_worker()
    held = _hold_worker(job, layout, name)
    link = Link(job.redis_url, unavailable_seconds=settings.unavailable_seconds)
    try:
        if fresh:
            await _start_over(link, job, layout, name)
        store = await RedisStore.open(
            link,
            job=job.name,
            worker=name,
            layout=layout,
            output=output,
            lease_seconds=settings.lease_seconds,
            origin=Origin(str(job.path.resolve()), explicit=settings.job is not None),
            shared=shared,
        )
        store.held = held
        layout.shards_dir.mkdir(parents=True, exist_ok=True)
        sealed, _ = await store.manifest()
        # off the loop: copies of shards can be large, and the heartbeat must go on meanwhile
        await asyncio.to_thread(repair_sealed, layout, [(s.file, s.bytes) for s in sealed])
    except BaseException:
        await link.close()
        os.close(held)
        raise
    return store


async def _start_over(link: Link, job: Job, layout: Layout, worker: str) -> None:
    """--fresh: every key of the job in Redis and every file of it in this folder, removed,
    once no other worker of it is alive (its heartbeat younger than two leases)."""
    assert job.coordination is not None  # noqa: S101 -- the caller's check
    prefix, redis = prefix_of(job.name), link.redis
    seconds, micros = await link.call(redis.time)
    now = seconds * 1000 + micros // 1000
    beats = await link.call(lambda: redis.zrange(prefix + "workers", 0, -1, withscores=True))
    alive = []
    for name, beat in beats:
        live = await link.call(partial(redis.hget, f"{prefix}w:{name}", "live"))
        stopped = bool(live) and bool(orjson.loads(live).get("stopped"))
        if name != worker and not stopped and now - beat < 2000 * job.coordination.lease_seconds:
            alive.append(name)
    if alive:
        raise StateError(
            f"{job.path}: --fresh: worker {', '.join(sorted(alive))} of job {job.name!r} is "
            "running; stop every worker of the job first"
        )

    async def every_key() -> list[str]:
        return [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]

    keys = await link.call(every_key)
    for start in range(0, len(keys), 1000):
        await link.call(partial(redis.delete, *keys[start : start + 1000]))
    try:
        await asyncio.to_thread(layout.remove_job_files)
    except OSError as exc:
        raise OutputError.from_os(exc, layout.root) from None


def _hold_worker(job: Job, layout: Layout, worker: str) -> int:
    """This machine's one process under ``worker``'s name; a folder a one-process run of the
    job owns is refused (its credits and reviews would be bought again from nothing)."""
    if layout.state_db.exists():
        raise StateError(
            f"{layout.root}: holds the state of this job run in one process (state/state.db); "
            "run coordinated it would start over and buy every page again. Finish it without "
            "--redis (and without coordination:), or give the coordinated job another "
            "output.dir"
        )
    try:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(exc, layout.state_dir) from None
    fd = hold(layout.worker_lock(worker))
    if fd is None:
        raise StateError(
            f"{job.path}: worker {worker!r} is running already on this machine (for "
            f"{layout.root}); stop it first, or give this one another --worker name"
        )
    return fd
