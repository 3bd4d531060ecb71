"""A dead worker's open shard, sealed by a live one that can see the file, or fetch it.

The committed part of the shard (its length is in Redis) is copied to a new file, which then
replaces the old name; only after Redis has recorded the seal and retired the dead worker's
incarnation, and only if nothing was committed to the shard since the copy was taken. A worker
that was only paused, and wakes up, goes on writing to the old file, which no name points to any
more, and its next commit is refused: a reader never sees its bytes.

With a bucket for output, every worker can see every shard: a dead worker's committed part is
fetched from its parts in the bucket (``shared.fetch``) into this machine's folder, then sealed
here, and its parts that no commit counted are deleted (``shared.drop_strays``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import orjson

from crawler import logs
from crawler.coordination.link import Link
from crawler.coordination.scripts import ADOPT, SILENT
from crawler.errors import StateError
from crawler.output.layout import Layout, fsync_dir, series_sequence, shard_owner, shard_sequence
from crawler.output.shards import sha256_of

log = logs.get_logger("crawler.coordination")


class Shared(Protocol):
    """Every worker's shards in reach of every worker: a bucket (``BucketPublisher``)."""

    async def fetch(self, file: str, length: int, *, records: int | None = None) -> bool:
        """A shard's committed ``length`` bytes (``records`` lines) into this folder; False if
        not to be had."""
        ...

    async def drop_strays(
        self, owner: str, known: set[str], first_unknown: int, series: Mapping[str, int]
    ) -> None:
        """``owner``'s parts of shards no commit recorded (its reviews' numbered
        ``first_unknown`` on, a series' ``series[<name>]`` on)."""
        ...


async def adopt_orphans(
    link: Link, prefix: str, layout: Layout, stale_ms: int, shared: Shared | None = None
) -> list[str]:
    """Retire the workers silent for longer than ``stale_ms`` whose files are in this folder
    (or, with ``shared``, in the bucket): their open shard sealed at its committed length, and
    their files that no commit recorded (a batch's new shard, written before the commit a kill
    cut off) removed; the workers retired."""
    dead: list[str] = await link.script(SILENT)(keys=[prefix + "workers"], args=[stale_ms, prefix])
    retired: list[str] = []
    for worker in dead:
        # its reviews shards and its sources' series shards (a worker may have walked only those)
        here = await asyncio.to_thread(layout.owned_files, worker)
        if not here and shared is None:
            continue  # nothing of it on this disk: another machine's worker to finish
        state = await link.call(partial(link.redis.hgetall, f"{prefix}w:{worker}"))
        file = state.get("open_shard") or ""
        record, copy, doc = "", None, None
        if file:
            record = await link.call(partial(link.redis.hget, prefix + "shards", file))
            if not layout.shard(file).exists():
                if shared is None or not record:
                    continue  # its open shard is on another machine's disk
                if not await fetched(link, prefix + "shards", shared, file, record):
                    continue  # sealed by another worker meanwhile, or committed to again
            try:  # off the event loop: a shard can be large, and the leases must be renewed
                copy, doc = await asyncio.to_thread(
                    seal_copy, layout.shard(file), orjson.loads(record)
                )
            except (OSError, ValueError) as exc:
                log.warning("cannot seal a dead worker's shard here", shard=file, error=str(exc))
                continue
        answer = await link.script(ADOPT)(
            keys=[prefix + "workers", f"{prefix}w:{worker}", prefix + "shards"],
            args=[worker, state.get("inc", "0"), stale_ms, file,
                  orjson.dumps(doc).decode() if doc else "", record or "", prefix],
        )  # fmt: skip
        if answer != "ok":  # it came back, committed meanwhile, or another worker retired it
            if copy is not None:
                await asyncio.to_thread(copy.unlink, missing_ok=True)
            continue
        if copy is not None:
            await asyncio.to_thread(install, copy, layout.shard(file), layout)
            log.warning("sealed a dead worker's open shard", worker=worker, shard=file)
        known = set(await link.call(partial(link.redis.hkeys, prefix + "shards")))
        known |= set(await link.call(partial(link.redis.hkeys, prefix + "sshards")))
        await asyncio.to_thread(_remove_strays, layout, here, known, state)
        if shared is not None:
            opened = {f[3:]: int(v) for f, v in state.items() if f.startswith("sn:")}
            await shared.drop_strays(worker, known, int(state.get("next_shard", "1")), opened)
        retired.append(worker)
    return retired


async def fetched(  # noqa: PLR0917 -- the shard, its record, and where both are
    link: Link,
    shards: str,
    shared: Shared,
    file: str,
    record: str,
    whose: str = "a dead worker's open shard",
) -> bool:
    """An open shard whose file is not here (a dead worker's, a reviews or a series shard,
    recorded in the hash ``shards``) fetched from the bucket; False when its record changed
    meanwhile (another worker sealed it and dropped its parts, or it came back and committed).
    Its committed parts not to be had otherwise stop this worker: skipping the shard would
    leave its committed records out of the output, silently."""
    doc = orjson.loads(record)
    if await shared.fetch(file, doc["bytes"], records=doc["records"]):
        return True
    if await link.call(partial(link.redis.hget, shards, file)) != record:
        return False
    raise StateError(
        f"{file}: {whose} ({doc['records']:,} records, {doc['bytes']:,} "
        "bytes committed) is not whole in the bucket's parts; it cannot be sealed, and going "
        "on would leave its records out"
    )


def _remove_strays(
    layout: Layout, files: list[Path], known: set[str], state: dict[str, str]
) -> None:
    """A retired worker's files no commit recorded: past its committed shard numbers (of its
    reviews, ``next_shard``; of a series, ``sn:<series>``), so never listed, and their reviews
    or items walked again by whoever took its products or series over."""
    for path in files:
        if path.name in known:
            continue
        if shard_owner(path.name) is not None:
            first_unknown, seq = int(state.get("next_shard", "1")), shard_sequence(path.name)
        else:
            series = path.name.split("-", 1)[0]
            first_unknown, seq = int(state.get(f"sn:{series}", "1")), series_sequence(path.name)
        if seq >= first_unknown:
            path.unlink(missing_ok=True)
            log.warning("removed a dead worker's uncommitted shard", shard=path.name)
    fsync_dir(layout.shards_dir)


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
