"""Where committed shards are published: the folder's manifest, or a bucket's parts, sealed
objects and manifest, each in the commit order that keeps a reader off uncommitted bytes.

In a bucket (``output.dir: s3://...``) the shards are still written and fsynced in the local
working folder first; then, for each batch:

1. each segment a batch adds to a shard is put as a part object, create-only:
   ``_parts/<shard>/<start>-<end>.<token>`` (byte offsets in the shard; the token is drawn
   afresh by each process start, so no two processes ever write one key), before the state
   records the commit; so whatever the state counts is in the bucket, whatever machine is lost;
2. once the state has recorded a seal, the whole shard is put create-only as
   ``shards/<shard>`` (from the local file, or from its parts when the file is gone), checked
   against the sha256 the state recorded;
3. the manifest ``manifest.json`` is replaced by compare-and-swap (If-Match on its ETag; create
   with If-None-Match when there is none): read, add the newly sealed shards, write, and read
   again on a 412. Entries are only ever added, so two writers cannot undo each other;
4. the parts of the listed shards are deleted (those a killed writer left too).

A job's source series (``shop_products-000001.jsonl``; a coordinated worker's
``shop_products-<worker>-000001.jsonl``) go the same way, listed under the manifest's ``series``
by name. A reader of the manifest reads sealed objects only: an
open shard is not listed. Parts that start at or past the committed length (a batch whose commit
a crash cut off) are deleted at the next start, before any new part is put; parts at or below it
never are while the state records the shard. A paused process of an earlier incarnation may
still put parts (under its own token) that overlap the committed ones: a shard is rebuilt from
the one chain of parts from 0 to its committed length that its sha256 (sealed) or record count
(open) allows, and a run stops, never guesses, when that leaves more than one or none.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from crawler import logs
from crawler.errors import OutputError, StateError
from crawler.output.bucket import Bucket
from crawler.output.chains import PART, PARTS, committed_bytes, is_stray, part_key, sha256_of
from crawler.output.layout import (
    SERIES_PATTERN,
    SHARD_PATTERN,
    Layout,
    series_owner,
    shard_owner,
    write_atomically,
)
from crawler.output.shards import write_manifest
from crawler.state import ShardInfo

__all__ = [
    "MANIFEST",
    "PARTS",
    "BucketPublisher",
    "FolderPublisher",
    "Publisher",
    "Segment",
    "part_key",
]

log = logs.get_logger("crawler.writer")

MANIFEST = "manifest.json"
Listing = tuple[list[ShardInfo], list[ShardInfo]]


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes a batch appended to a shard, at ``start``."""

    file: str
    start: int
    data: bytes


class Publisher(Protocol):
    # whether a batch's bytes go anywhere before the commit: a folder's are where they belong
    # once fsynced, so its writer makes no task per batch for them
    puts_parts: bool

    async def before_commit(self, segments: list[Segment]) -> None:
        """Called with a batch's segments once they are fsynced, before the state counts them."""

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        """The manifest, listing ``sealed`` (and, in a folder, the open shards' committed part)."""


class FolderPublisher:
    """The local folder: the shard files are the output; the manifest is renamed in."""

    puts_parts = False

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    async def before_commit(self, segments: list[Segment]) -> None:
        return

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        # off the loop: its fsyncs must not hold up walkers, heartbeats and lease renewals
        await asyncio.to_thread(write_manifest, self._layout, sealed, open_shards, series)


class BucketPublisher:
    """A bucket: parts before each commit, sealed objects and the manifest after."""

    puts_parts = True

    def __init__(self, bucket: Bucket, layout: Layout) -> None:
        self.bucket = bucket
        self._layout = layout
        # this process's own part keys: another process (a paused earlier incarnation of this
        # worker, writing a shard name this one reuses) can never replace or delete them
        self.token = secrets.token_hex(8)

    async def check_writable(self) -> None:
        """One object put (twice) and deleted before the first request: a bucket that refuses
        writes, or that ignores If-None-Match (its create-only puts would replace sealed
        objects and parts), stops the run before a credit is spent."""
        probe = f"_probe/{uuid.uuid4().hex}"
        await self.bucket.put_new(probe, b"")
        replaced = await self.bucket.put_new(probe, b"")
        await self.bucket.delete(probe)
        if replaced:
            raise OutputError(
                f"{self.bucket.url}: the server does not honour If-None-Match: * (a create-only "
                "put of an existing object was not refused with 412), and the output relies on "
                "it never to replace a committed object; use an S3-compatible server that does"
            )

    async def before_commit(self, segments: list[Segment]) -> None:
        async with asyncio.TaskGroup() as group:
            for segment in segments:
                group.create_task(self._put_part(segment))

    async def _put_part(self, segment: Segment) -> None:
        end = segment.start + len(segment.data)
        key = part_key(segment.file, segment.start, end, self.token)
        if await self.bucket.put_new(key, segment.data):
            return
        found = await self.bucket.get(key)
        if found is not None and found[0] == segment.data:
            return  # put before, its answer lost (a retry): the same bytes
        # the key is this process's own: other bytes there are never replaced (whatever put
        # them, a commit may count them), and the batch is not recorded
        raise OutputError(
            f"s3://{self.bucket.url.bucket}/{self.bucket.url.key(key)}: holds other bytes "
            "than this process put there; is a second run of this job writing to the same "
            "prefix?"
        )

    async def publish(
        self, sealed: list[ShardInfo], open_shards: list[ShardInfo], series: Mapping[str, Listing]
    ) -> None:
        """``series``: each source endpoint's own shards, listed under ``series`` by name as in
        a folder's manifest (sealed ones only, as the reviews')."""
        while True:
            found = await self.bucket.get(MANIFEST)
            doc = _parse(found[0] if found else None, self.bucket)
            listings = [(doc, sealed)]
            if any(shards for shards, _ in series.values()):
                named = doc.setdefault("series", {})
                listings += [
                    (named.setdefault(name, _listing()), shards)
                    for name, (shards, _) in sorted(series.items())
                    if shards
                ]
            fresh = [(listing, _unlisted(listing, shards)) for listing, shards in listings]
            if found is not None and not any(shards for _, shards in fresh):
                return
            for listing, shards in fresh:
                for shard in shards:
                    await self._put_sealed(shard)
                listing["shards"] += [_entry(s) for s in shards]
                listing["records"] = sum(entry["records"] for entry in listing["shards"])
            data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
            if await self.bucket.put_if(MANIFEST, data, found[1] if found else None) is not None:
                break  # else another writer replaced it meanwhile: read it again
        await self._drop_listed_parts(_listed_files(doc))

    async def _drop_listed_parts(self, listed: set[str]) -> None:
        """The parts of every listed shard, not only of the shards this writer just listed: a
        writer killed between its manifest and its deletes leaves them to the next one. Their
        sealed objects hold their bytes, and no part of a sealed shard is put again; the
        parts left are only the open shards', a few per worker, so one listing is cheap."""
        parts = await self.bucket.list(PARTS)
        await self.bucket.delete(
            *(key for key, _ in parts if (part := PART.fullmatch(key)) and part["file"] in listed)
        )

    async def listed(self) -> set[str]:
        """The shard files the bucket's manifest lists, the series' too."""
        found = await self.bucket.get(MANIFEST)
        return _listed_files(_parse(found[0] if found else None, self.bucket))

    async def _put_sealed(self, shard: ShardInfo) -> None:
        key = f"shards/{shard.file}"
        if await self.bucket.size(key) is None:
            data = await asyncio.to_thread(self._local, shard)
            if data is None:  # the parts' one chain with the sealed sha256, or None
                data = await self.committed(
                    shard.file, shard.bytes, sha256=shard.sha256, records=shard.records
                )
            if data is not None and await self.bucket.put_new(key, data):
                return
            # a 412, or its parts gone: another worker put it meanwhile (and dropped its parts)
        found = await self.bucket.get(key)
        if found is None:
            raise StateError(
                f"{shard.file}: sealed, but its committed bytes are neither in "
                f"{self._layout.shard(shard.file)} nor in the parts under "
                f"{self.bucket.url}/{PARTS}; the shard cannot be published"
            )
        # create-only: never replaced, whoever put it; its size alone could match other bytes
        digest = await asyncio.to_thread(sha256_of, found[0])
        if digest != shard.sha256:
            raise StateError(
                f"s3://{self.bucket.url.bucket}/{self.bucket.url.key(key)}: {len(found[0])} "
                f"bytes with another sha256 than this job sealed {shard.file} with "
                f"({shard.bytes} bytes): the prefix holds another job's output; point "
                "output.dir at another prefix"
            )

    def _local(self, shard: ShardInfo) -> bytes | None:
        path = self._layout.shard(shard.file)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return data if sha256_of(data) == shard.sha256 else None

    async def committed(
        self, file: str, length: int, *, sha256: str | None = None, records: int | None = None
    ) -> bytes | None:
        """A shard's first ``length`` bytes from its parts (``chains.committed_bytes``)."""
        return await committed_bytes(self.bucket, file, length, sha256=sha256, records=records)

    async def fetch(
        self, file: str, length: int, *, sha256: str | None = None, records: int | None = None
    ) -> bool:
        """A shard's committed part written to the local folder from its parts (its machine
        is gone, or its file was removed); False when the parts do not hold it."""
        data = await self.committed(file, length, sha256=sha256, records=records)
        if data is None:
            return False
        await asyncio.to_thread(self._write_shard, file, data)
        log.warning("fetched a shard's committed part from the bucket", shard=file, bytes=length)
        return True

    async def drop_strays(
        self, owner: str, known: set[str], first_unknown: int, series: Mapping[str, int]
    ) -> None:
        """A retired worker's parts of shards no commit recorded (a batch's new shard whose
        commit a kill cut off), its reviews' and its series' (``chains.is_stray``): never
        listed, their reviews or items walked again by whoever took its work over."""
        stale = [
            key
            for key, _ in await self.bucket.list(PARTS)
            if (part := PART.fullmatch(key))
            and is_stray(part["file"], owner, known, first_unknown, series)
        ]
        await self.bucket.delete(*stale)

    def _write_shard(self, file: str, data: bytes) -> None:
        try:  # a new machine's working folder may have no shards folder yet
            self._layout.shards_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(exc, self._layout.shards_dir) from None
        write_atomically(self._layout.shard(file), data)

    async def recover(
        self,
        listed: set[str],
        sealed: list[ShardInfo],
        opened: list[ShardInfo],
        open_shard: ShardInfo | None,
        committed: int,
        *,
        owner: str | None,
        series: Mapping[str, Listing] | None = None,
    ) -> None:
        """Before anything is put: parts no commit counted are deleted, parts of a listed
        shard too, and an open shard whose local file is gone or short is fetched back.
        ``listed``: the manifest's shards, read before the state (a shard is sealed in the
        state before it is listed, so none listed meanwhile looks foreign); ``sealed`` and
        ``opened``: every shard of the job the state records, with its committed length;
        ``owner``: this worker's series only; ``series``: the source endpoints' shards as the
        state lists them (``series_manifest``, every worker's), this worker's recovered as its
        reviews' are; None: the reviews' alone."""
        with_series, series = series is not None, series or {}
        known = {s.file for s in sealed} | {s.file for done, _ in series.values() for s in done}
        if stranger := sorted(listed - known):
            raise StateError(
                f"{self.bucket.url}/{MANIFEST}: lists {len(stranger)} shards this job's state "
                f"does not have ({stranger[0]}...): another job's output, or this job's local "
                "state (output.work_dir) is gone; point output.dir at another prefix"
            )
        lengths = {s.file: s.bytes for s in (*sealed, *opened)}
        tails: list[ShardInfo] = []  # open shards as committed: length and records
        for done, open_series in series.values():
            lengths |= {s.file: s.bytes for s in (*done, *open_series)}
            # a coordinated worker's own (another's open shard is its own to finish)
            tails += [s for s in open_series if series_owner(s.file) == owner]
        if open_shard is not None:
            lengths[open_shard.file] = max(committed, lengths.get(open_shard.file, 0))
            tails.append(replace(open_shard, bytes=committed))
        stale: list[str] = []
        for key, _ in await self.bucket.list(PARTS):
            part = PART.fullmatch(key)
            if part is None:
                continue
            file, start = part["file"], int(part["start"])
            if file in listed:
                stale.append(key)  # a crash between the manifest and the clean-up
            elif not _ours(file, owner, series=with_series):
                continue  # another worker's: its batches in flight are none of ours
            elif file not in lengths or start >= lengths[file]:
                # no commit opened its shard, or counted it; parts at or below a recorded
                # committed length are never deleted: they may be the only copy of it
                stale.append(key)
        await self.bucket.delete(*stale)
        for shard in tails:
            await self._fetch_if_short(shard)

    async def _fetch_if_short(self, shard: ShardInfo) -> None:
        """An open shard's committed part (``shard.bytes``) fetched back from its parts when
        its local file is gone or short."""
        if shard.bytes == 0:
            return
        path = self._layout.shard(shard.file)
        size = path.stat().st_size if path.exists() else 0
        if size < shard.bytes and not await self.fetch(
            shard.file, shard.bytes, records=shard.records
        ):
            raise StateError(
                f"{path}: {size:,} bytes, the state committed {shard.bytes:,}, and the parts "
                f"under {self.bucket.url}/{PARTS}{shard.file}/ do not hold them"
            )

    async def remove_job_objects(self) -> int:
        """--fresh: the job's objects under the prefix (manifest, shards and series shards,
        parts), nothing else."""
        removed = [
            key
            for key, _ in await self.bucket.list("")
            if key == MANIFEST
            or key.startswith((PARTS, "_probe/"))
            # the reviews' shards and the source endpoints' (SERIES_PATTERN matches both)
            or (key.startswith("shards/") and SERIES_PATTERN.fullmatch(key.removeprefix("shards/")))
        ]
        await self.bucket.delete(*removed)
        return len(removed)


def _ours(file: str, owner: str | None, *, series: bool) -> bool:
    """Whether a part's shard is this worker's to recover: its reviews shards, and (``series``)
    its source endpoints' shards."""
    if SHARD_PATTERN.fullmatch(file):
        return shard_owner(file) == owner
    return series and SERIES_PATTERN.fullmatch(file) is not None and series_owner(file) == owner


def _listing() -> dict[str, Any]:
    return {"records": 0, "shards": [], "open_shards": []}


def _unlisted(listing: dict[str, Any], sealed: list[ShardInfo]) -> list[ShardInfo]:
    listed = {entry["file"] for entry in listing["shards"]}
    return [s for s in sealed if f"shards/{s.file}" not in listed]


def _listed_files(doc: dict[str, Any]) -> set[str]:
    """Every shard file a manifest lists: the reviews', and each series'."""
    listings = [doc, *doc.get("series", {}).values()]
    return {entry["file"].removeprefix("shards/") for one in listings for entry in one["shards"]}


def _entry(shard: ShardInfo) -> dict[str, Any]:
    return {
        "file": f"shards/{shard.file}",
        "records": shard.records,
        "bytes": shard.bytes,
        "sha256": shard.sha256,
    }


def _parse(data: bytes | None, bucket: Bucket) -> dict[str, Any]:
    if data is None:
        return {"version": 2, **_listing()}
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        for one in [doc, *doc.get("series", {}).values()]:
            if not isinstance(one, dict) or not isinstance(one.get("shards"), list):
                raise ValueError("no shards list")
    except (orjson.JSONDecodeError, ValueError, AttributeError) as exc:  # series: not a dict
        raise StateError(
            f"{bucket.url}/{MANIFEST}: not a manifest ({exc}); point output.dir at another prefix"
        ) from None
    return doc
