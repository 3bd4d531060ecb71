"""A shard's parts in a bucket, and its committed bytes rebuilt from them: the one chain of
parts from 0 to its committed length that fits what the state recorded (its sha256 when sealed,
its record count when open).

A part is ``_parts/<shard>/<start>-<end>.<token>``: byte offsets in the shard, and the token of
the process that put it, so no two processes ever write one key. A paused process of an earlier
incarnation may have put parts beside the committed ones; when more than one chain fits, the run
stops rather than guess.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping

from crawler.errors import StateError
from crawler.output.bucket import Bucket
from crawler.output.layout import SERIES_PATTERN, SHARD_PATTERN
from crawler.output.shards import inflate

PARTS = "_parts/"
PART = re.compile(
    r"_parts/(?P<file>[^/]+)/(?P<start>\d{15})-(?P<end>\d{15})\.(?P<token>[0-9a-f]{16})"
)
# chains of parts from 0 to a committed length looked at before giving up: a shard's parts are
# one chain, plus at most a few a paused process put beside them
MAX_CHAINS = 64


def part_key(file: str, start: int, end: int, token: str) -> str:
    return f"{PARTS}{file}/{start:015d}-{end:015d}.{token}"


def is_stray(
    file: str, owner: str, known: set[str], first_unknown: int, series: Mapping[str, int]
) -> bool:
    """Whether a part's shard is one of ``owner``'s that no commit recorded: not ``known``,
    and numbered past what its commits opened (its reviews shards from ``first_unknown``, a
    series' from ``series[<name>]``, from 1 when it opened none of that series)."""
    if file in known:
        return False
    if (review := SHARD_PATTERN.fullmatch(file)) is not None:
        return review["worker"] == owner and int(review["seq"]) >= first_unknown
    found = SERIES_PATTERN.fullmatch(file)
    return (
        found is not None
        and found["worker"] == owner
        and int(found["seq"]) >= series.get(found["series"], 1)
    )


async def committed_bytes(
    bucket: Bucket,
    file: str,
    length: int,
    *,
    sha256: str | None = None,
    records: int | None = None,
) -> bytes | None:
    """A shard's first ``length`` bytes from its parts, end to end; None if no chain of
    parts reaches it exactly. Parts of several processes may overlap (a paused earlier
    incarnation's beside the committed ones): the chains are told apart by ``sha256`` (a
    sealed shard's) and ``records`` (the committed count); if more than one remains, the
    run stops rather than guess (``StateError``)."""
    spans: dict[int, list[tuple[int, str]]] = {}
    for key, size in await bucket.list(f"{PARTS}{file}/"):
        part = PART.fullmatch(key)
        if part is None:
            continue
        start, end = int(part["start"]), int(part["end"])
        if end <= length and end > start and size == end - start:
            spans.setdefault(start, []).append((end, key))
    chains = _chains(spans, length)
    if chains is None:
        raise StateError(_ambiguous(bucket, file, length, f"more than {MAX_CHAINS}"))
    bodies: dict[str, bytes] = {}
    found: list[bytes] = []
    for chain in chains:
        for key in chain:
            if key not in bodies:
                got = await bucket.get(key)
                bodies[key] = got[0] if got is not None else b""
        data = b"".join(bodies[key] for key in chain)
        if len(data) != length:
            continue  # a part deleted meanwhile (its shard listed by another worker)
        if (sha256 is not None or records is not None) and not await asyncio.to_thread(
            _fits, file, data, sha256, records
        ):
            continue
        found.append(data)
    if len(set(found)) > 1:
        raise StateError(_ambiguous(bucket, file, length, str(len(found))))
    return found[0] if found else None


def _ambiguous(bucket: Bucket, file: str, length: int, chains: str) -> str:
    return (
        f"{file}: {chains} chains of parts under {bucket.url}/{PARTS}{file}/ reach its "
        f"committed {length:,} bytes and fit what the state recorded; which one it "
        "committed cannot be told, so the run stops rather than guess: keep those parts "
        "and report this"
    )


def _chains(spans: dict[int, list[tuple[int, str]]], length: int) -> list[list[str]] | None:
    """Every chain of parts from 0 ending exactly at ``length`` (keys in order); None when
    there are more than ``MAX_CHAINS``."""
    chains: list[list[str]] = []
    stack: list[tuple[int, list[str]]] = [(0, [])]
    while stack:
        at, keys = stack.pop()
        if at == length:
            chains.append(keys)
            if len(chains) > MAX_CHAINS:
                return None
            continue
        stack += [(end, [*keys, key]) for end, key in spans.get(at, [])]
    return chains


def _fits(file: str, data: bytes, sha256: str | None, records: int | None) -> bool:
    """Whether a chain's bytes are what the state recorded: its sha256, its record count."""
    if sha256 is not None and sha256_of(data) != sha256:
        return False
    if records is None:
        return True
    try:
        return inflate(file, data).count(b"\n") == records
    except Exception:  # gzip, zlib or zstd errors: a chain of mixed members, not the shard
        return False


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
