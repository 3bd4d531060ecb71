"""Where committed shards are published: the folder's manifest, or a bucket's parts, sealed
objects and manifest, each in the commit order that keeps a reader off uncommitted bytes.

In a bucket (``output.dir: s3://...``) the shards are still written and fsynced in the local
working folder first; then, for each batch:

1. each segment a batch adds to a shard is put as a part object, create-only:
   ``_parts/<shard>/<start>-<end>`` (byte offsets in the shard), before the state records the
   commit; so whatever the state counts is in the bucket, whatever machine is lost;
2. once the state has recorded a seal, the whole shard is put create-only as
   ``shards/<shard>`` (from the local file, or from its parts when the file is gone), checked
   against the sha256 the state recorded;
3. the manifest ``manifest.json`` is replaced by compare-and-swap (If-Match on its ETag; create
   with If-None-Match when there is none): read, add the newly sealed shards, write, and read
   again on a 412. Entries are only ever added, so two writers cannot undo each other;
4. the parts of a listed shard are deleted.

A reader of the manifest reads sealed objects only: an open shard is not listed. Parts past the
committed length (a batch whose commit a crash cut off) are deleted at the next start, before any
new part is put, so the parts at or below a shard's committed length are exactly its committed
batches, end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from crawler import logs
from crawler.errors import OutputError, StateError
from crawler.output.bucket import Bucket
from crawler.output.layout import (
    SHARD_PATTERN,
    Layout,
    shard_owner,
    shard_sequence,
    write_atomically,
)
from crawler.output.shards import write_manifest
from crawler.state import ShardInfo

log = logs.get_logger("crawler.writer")

MANIFEST = "manifest.json"
PARTS = "_parts/"
_PART = re.compile(r"_parts/(?P<file>[^/]+)/(?P<start>\d{15})-(?P<end>\d{15})")

Listing = tuple[list[ShardInfo], list[ShardInfo]]


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes a batch appended to a shard, at ``start``."""

    file: str
    start: int
    data: bytes


class Publisher(Protocol):
    async def before_commit(self, segments: list[Segment]) -> None:
        """Called with a batch's segments once they are fsynced, before the state counts them."""

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        """The manifest, listing ``sealed`` (and, in a folder, the open shards' committed part)."""


class FolderPublisher:
    """The local folder: the shard files are the output; the manifest is renamed in."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    async def before_commit(self, segments: list[Segment]) -> None:
        return

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        # off the loop: its fsyncs must not hold up walkers, heartbeats and lease renewals
        await asyncio.to_thread(write_manifest, self._layout, sealed, open_shards, series)


def part_key(file: str, start: int, end: int) -> str:
    return f"{PARTS}{file}/{start:015d}-{end:015d}"


class BucketPublisher:
    """A bucket: parts before each commit, sealed objects and the manifest after."""

    def __init__(self, bucket: Bucket, layout: Layout) -> None:
        self.bucket = bucket
        self._layout = layout

    async def check_writable(self) -> None:
        """One object put and deleted before the first request: a bucket that refuses writes
        stops the run before a credit is spent."""
        probe = f"_probe/{uuid.uuid4().hex}"
        await self.bucket.put_new(probe, b"")
        await self.bucket.delete(probe)

    async def before_commit(self, segments: list[Segment]) -> None:
        async with asyncio.TaskGroup() as group:
            for segment in segments:
                group.create_task(self._put_part(segment))

    async def _put_part(self, segment: Segment) -> None:
        key = part_key(segment.file, segment.start, segment.start + len(segment.data))
        for _ in range(3):
            if await self.bucket.put_new(key, segment.data):
                return
            found = await self.bucket.get(key)
            if found is not None and found[0] == segment.data:
                return  # put before, its answer lost (a retry), or before a crash: the same bytes
            if found is not None:
                # it starts at or past the committed length: a part no commit counted (a
                # paused process's), never read; this batch's bytes take its place
                await self.bucket.delete(key)
        raise OutputError(
            f"s3://{self.bucket.url.bucket}/{self.bucket.url.key(key)}: another process keeps "
            "putting other bytes there; is a second run of this job writing to the same prefix?"
        )

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        while True:
            found = await self.bucket.get(MANIFEST)
            doc = _parse(found[0] if found else None, self.bucket)
            listed = {entry["file"] for entry in doc["shards"]}
            fresh = [s for s in sealed if f"shards/{s.file}" not in listed]
            if found is not None and not fresh:
                return
            for shard in fresh:
                await self._put_sealed(shard)
            doc["shards"] += [_entry(s) for s in fresh]
            doc["records"] = sum(entry["records"] for entry in doc["shards"])
            data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
            if await self.bucket.put_if(MANIFEST, data, found[1] if found else None) is not None:
                break  # else another writer replaced it meanwhile: read it again
        for shard in fresh:
            await self._drop_parts(shard.file)

    async def _drop_parts(self, file: str) -> None:
        """A listed shard's parts: its sealed object holds their bytes now."""
        await self.bucket.delete(*(key for key, _ in await self.bucket.list(f"{PARTS}{file}/")))

    async def listed(self) -> set[str]:
        """The shard files the bucket's manifest lists."""
        found = await self.bucket.get(MANIFEST)
        doc = _parse(found[0] if found else None, self.bucket)
        return {entry["file"].removeprefix("shards/") for entry in doc["shards"]}

    async def _put_sealed(self, shard: ShardInfo) -> None:
        key = f"shards/{shard.file}"
        size = await self.bucket.size(key)
        if size is None:
            data = await asyncio.to_thread(self._local, shard)
            if data is None:
                data = await self.committed(shard.file, shard.bytes)
            checked = data is not None and hashlib.sha256(data).hexdigest() == shard.sha256
            if checked and data is not None and await self.bucket.put_new(key, data):
                return
            # a 412, or its parts gone: another worker put it meanwhile (and dropped its parts)
            size = await self.bucket.size(key)
            if size is None:
                raise StateError(
                    f"{shard.file}: sealed, but its committed bytes are neither in "
                    f"{self._layout.shard(shard.file)} nor in the parts under "
                    f"{self.bucket.url}/{PARTS}; the shard cannot be published"
                )
        if size != shard.bytes:  # create-only: never replaced, whoever put it
            raise StateError(
                f"s3://{self.bucket.url.bucket}/{self.bucket.url.key(key)}: {size} bytes, this "
                f"job sealed {shard.file} at {shard.bytes}: the prefix holds another job's "
                "output; point output.dir at another prefix"
            )

    def _local(self, shard: ShardInfo) -> bytes | None:
        path = self._layout.shard(shard.file)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == shard.sha256 else None

    async def committed(self, file: str, length: int) -> bytes | None:
        """A shard's first ``length`` bytes from its parts, end to end; None if they do not
        reach it exactly."""
        spans: dict[int, list[tuple[int, str]]] = {}
        for key, _ in await self.bucket.list(f"{PARTS}{file}/"):
            part = _PART.fullmatch(key)
            if part is not None and int(part["end"]) <= length:
                spans.setdefault(int(part["start"]), []).append((int(part["end"]), key))
        chunks, at = [], 0
        while at < length:
            options = spans.get(at, [])
            if len(options) != 1:
                return None
            end, key = options[0]
            found = await self.bucket.get(key)
            if found is None or len(found[0]) != end - at:
                return None
            chunks.append(found[0])
            at = end
        return b"".join(chunks)

    async def fetch(self, file: str, length: int) -> bool:
        """A shard's committed part written to the local folder from its parts (its machine
        is gone, or its file was removed); False when the parts do not hold it."""
        data = await self.committed(file, length)
        if data is None:
            return False
        await asyncio.to_thread(self._write_shard, file, data)
        log.warning("fetched a shard's committed part from the bucket", shard=file, bytes=length)
        return True

    async def drop_strays(self, owner: str, known: set[str], first_unknown: int) -> None:
        """A retired worker's parts of shards no commit recorded (a batch's new shard whose
        commit a kill cut off): never listed, their reviews walked again by whoever took its
        products over."""
        stale = []
        for key, _ in await self.bucket.list(PARTS):
            part = _PART.fullmatch(key)
            file = part["file"] if part else ""
            if (
                SHARD_PATTERN.fullmatch(file)
                and shard_owner(file) == owner
                and file not in known
                and shard_sequence(file) >= first_unknown
            ):
                stale.append(key)
        await self.bucket.delete(*stale)

    def _write_shard(self, file: str, data: bytes) -> None:
        try:  # a new machine's working folder may have no shards folder yet
            self._layout.shards_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(exc, self._layout.shards_dir) from None
        write_atomically(self._layout.shard(file), data)

    async def recover(
        self,
        sealed: list[ShardInfo],
        open_shard: ShardInfo | None,
        committed: int,
        *,
        owner: str | None,
    ) -> None:
        """Before anything is put: parts no commit counted are deleted, parts of a listed
        shard too, and an open shard whose local file is gone or short is fetched back.
        ``sealed``: every sealed shard of the job; ``owner``: this worker's series only."""
        listed = await self.listed()
        known = {s.file for s in sealed}
        if stranger := sorted(listed - known):
            raise StateError(
                f"{self.bucket.url}/{MANIFEST}: lists {len(stranger)} shards this job's state "
                f"does not have ({stranger[0]}...): another job's output, or this job's local "
                "state (output.work_dir) is gone; point output.dir at another prefix"
            )
        stale: list[str] = []
        for key, _ in await self.bucket.list(PARTS):
            part = _PART.fullmatch(key)
            if part is None:
                continue
            file, end = part["file"], int(part["end"])
            if file in listed:
                stale.append(key)  # a crash between the manifest and the clean-up
            elif file in known or shard_owner(file) != owner or not SHARD_PATTERN.fullmatch(file):
                continue  # sealed, not yet listed (the next publish uses it), or another's
            elif open_shard is None or file != open_shard.file or end > committed:
                stale.append(key)  # no commit counted it
        await self.bucket.delete(*stale)
        if open_shard is None or committed == 0:
            return
        path = self._layout.shard(open_shard.file)
        size = path.stat().st_size if path.exists() else 0
        if size < committed and not await self.fetch(open_shard.file, committed):
            raise StateError(
                f"{path}: {size:,} bytes, the state committed {committed:,}, and the parts "
                f"under {self.bucket.url}/{PARTS}{open_shard.file}/ do not hold them"
            )

    async def remove_job_objects(self) -> int:
        """--fresh: the job's objects under the prefix (manifest, shards, parts), nothing else."""
        removed = [
            key
            for key, _ in await self.bucket.list("")
            if key == MANIFEST
            or key.startswith((PARTS, "_probe/"))
            or (key.startswith("shards/") and SHARD_PATTERN.fullmatch(key.removeprefix("shards/")))
        ]
        await self.bucket.delete(*removed)
        return len(removed)


def _entry(shard: ShardInfo) -> dict[str, Any]:
    return {
        "file": f"shards/{shard.file}",
        "records": shard.records,
        "bytes": shard.bytes,
        "sha256": shard.sha256,
    }


def _parse(data: bytes | None, bucket: Bucket) -> dict[str, Any]:
    if data is None:
        return {"version": 2, "records": 0, "shards": [], "open_shards": []}
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
            raise ValueError("no shards list")
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise StateError(
            f"{bucket.url}/{MANIFEST}: not a manifest ({exc}); point output.dir at another prefix"
        ) from None
    return doc
