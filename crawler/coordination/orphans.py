"""A dead worker's open shard, sealed by a live one that can see the file.

The committed part of the shard (its length is in Redis) is copied to a new file, which then
replaces the old name; only after Redis has recorded the seal and retired the dead worker's
incarnation. A worker that was only paused, and wakes up, goes on writing to the old file, which
no name points to any more, and its next commit is refused: a reader never sees its bytes.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog

from crawler.coordination.link import Link
from crawler.coordination.scripts import ADOPT, SILENT
from crawler.layout import Layout, fsync_dir
from crawler.shards import sha256_of

log = structlog.get_logger("crawler.coordination")


async def adopt_orphans(link: Link, prefix: str, layout: Layout, stale_ms: int) -> int:
    """Seal the open shards of workers silent for longer than ``stale_ms`` whose files are in
    this folder; the number sealed."""
    dead: list[str] = await link.script(SILENT)(keys=[prefix + "workers"], args=[stale_ms])
    sealed = 0
    for worker in dead:
        state = await link.call(partial(link.redis.hgetall, f"{prefix}w:{worker}"))
        file = state.get("open_shard")
        if not file or not layout.shard(file).exists():
            continue  # nothing open, or on another machine's disk: that worker's to finish
        raw = await link.call(partial(link.redis.hget, prefix + "shards", file))
        doc: dict[str, Any] = orjson.loads(raw)
        copy = _copy_committed(layout.shard(file), doc["bytes"])
        doc["sha256"] = sha256_of(copy)
        answer = await link.script(ADOPT)(
            keys=[prefix + "workers", f"{prefix}w:{worker}", prefix + "shards"],
            args=[worker, state["inc"], stale_ms, file, orjson.dumps(doc).decode()],
        )
        if answer != "ok":  # it came back, or another worker sealed it first
            copy.unlink()
            continue
        os.replace(copy, layout.shard(file))
        fsync_dir(layout.shards_dir)
        log.warning("sealed a dead worker's open shard", worker=worker, shard=file)
        sealed += 1
    return sealed


def _copy_committed(path: Path, length: int) -> Path:
    copy = path.with_name(f".{path.name}.adopt")
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
    or a worker that woke up after it): the committed part copied in again."""
    for file, length in sealed:
        path = layout.shard(file)
        if path.exists() and path.stat().st_size > length:
            os.replace(_copy_committed(path, length), path)
            fsync_dir(layout.shards_dir)
