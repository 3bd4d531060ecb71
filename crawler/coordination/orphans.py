"""A dead worker's open shard, sealed by a live one that can see the file.

The committed part of the shard (its length is in Redis) is copied to a new file, which then
replaces the old name; only after Redis has recorded the seal and retired the dead worker's
incarnation, and only if nothing was committed to the shard since the copy was taken. A worker
that was only paused, and wakes up, goes on writing to the old file, which no name points to any
more, and its next commit is refused: a reader never sees its bytes.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog

from crawler.coordination.link import Link
from crawler.coordination.scripts import ADOPT, SILENT
from crawler.output.layout import Layout, fsync_dir
from crawler.output.shards import sha256_of

log = structlog.get_logger("crawler.coordination")


async def adopt_orphans(link: Link, prefix: str, layout: Layout, stale_ms: int) -> list[str]:
    """Seal the open shards of workers silent for longer than ``stale_ms`` whose files are in
    this folder; the workers whose shard was sealed (and incarnation retired)."""
    dead: list[str] = await link.script(SILENT)(keys=[prefix + "workers"], args=[stale_ms, prefix])
    sealed: list[str] = []
    for worker in dead:
        state = await link.call(partial(link.redis.hgetall, f"{prefix}w:{worker}"))
        file = state.get("open_shard")
        if not file or not layout.shard(file).exists():
            continue  # nothing open, or on another machine's disk: that worker's to finish
        record = await link.call(partial(link.redis.hget, prefix + "shards", file))
        try:  # off the event loop: a shard can be large, and the leases must be renewed meanwhile
            copy, doc = await asyncio.to_thread(seal_copy, layout.shard(file), orjson.loads(record))
        except (OSError, ValueError) as exc:
            log.warning("cannot seal a dead worker's shard here", shard=file, error=str(exc))
            continue
        answer = await link.script(ADOPT)(
            keys=[prefix + "workers", f"{prefix}w:{worker}", prefix + "shards"],
            args=[worker, state["inc"], stale_ms, file, orjson.dumps(doc).decode(), record, prefix],
        )
        if answer != "ok":  # it came back, committed meanwhile, or another worker sealed it
            await asyncio.to_thread(copy.unlink, missing_ok=True)
            continue
        await asyncio.to_thread(install, copy, layout.shard(file), layout)
        log.warning("sealed a dead worker's open shard", worker=worker, shard=file)
        sealed.append(worker)
    return sealed


def seal_copy(path: Path, doc: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The committed part of an open shard copied beside it, and the shard's record sealed."""
    copy = _copy_committed(path, doc["bytes"])
    return copy, {**doc, "sha256": sha256_of(copy)}


def install(copy: Path, path: Path, layout: Layout) -> None:
    """A sealed copy renamed in, durably: the old file lives on, unnamed, for whoever still
    writes it."""
    os.replace(copy, path)
    fsync_dir(layout.shards_dir)


def _copy_committed(path: Path, length: int) -> Path:
    """The first ``length`` bytes of ``path`` in a new file beside it, this process's own."""
    copy = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.adopt")
    with path.open("rb") as source, copy.open("wb") as target:
        left = length
        while left:
            chunk = source.read(min(left, 1 << 20))
            if not chunk:
                raise ValueError(f"{path}: shorter than its committed {length} bytes")
            target.write(chunk)
            left -= len(chunk)
        target.flush()
        os.fsync(target.fileno())
    return copy


def repair_sealed(layout: Layout, sealed: list[tuple[str, int]]) -> None:
    """A sealed shard whose file is longer than its seal (a crash between the seal and the copy,
    or a worker that woke up after it): the committed part copied in again. Leftover copies of
    an adoption that never finished are removed."""
    for file, length in sealed:
        path = layout.shard(file)
        if path.exists() and path.stat().st_size > length:
            os.replace(_copy_committed(path, length), path)
            fsync_dir(layout.shards_dir)
    for leftover in layout.shards_dir.glob(".*.adopt"):  # an adoption takes seconds, not hours
        if time.time() - leftover.stat().st_mtime > 3600:
            leftover.unlink(missing_ok=True)
