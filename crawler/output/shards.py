"""Shard files: append committed batches, roll over, seal with sha256, and the manifest.

With compression each batch is its own gzip member or zstd frame. Concatenated members are one
valid stream, and every committed length falls on a member boundary, so a crash's partial batch is
cut off cleanly and no shard ever ends in a partial line.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import zstandard

from crawler.errors import OutputError, StateError
from crawler.output.layout import Layout, write_atomically
from crawler.state import ShardInfo
from crawler.state.events import ShardSealed


def compressor(kind: str) -> Callable[[bytes], bytes]:
    if kind == "gzip":
        return lambda data: gzip.compress(data, compresslevel=6, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3).compress
    return lambda data: data


def read_lines(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The lines of a shard, whatever its compression; with ``limit``, of its first ``limit``
    bytes only (an open shard's committed part: it ends on a line, member or frame boundary)."""
    if limit is not None:
        with path.open("rb") as raw:
            data = raw.read(limit)
        yield from io.BytesIO(inflate(path.name, data))
    elif path.name.endswith(".gz"):
        with gzip.open(path, "rb") as stream:
            yield from stream
    elif path.name.endswith(".zst"):
        with path.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            buffer = b""
            while chunk := reader.read(1 << 20):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line + b"\n"
            if buffer:
                yield buffer
    else:
        with path.open("rb") as stream:
            yield from stream


def inflate(name: str, data: bytes) -> bytes:
    """A shard's bytes (whole members or frames) as its lines, whatever its compression."""
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        return b"".join(_zstd_frames(data))
    return data


def _zstd_frames(data: bytes) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    while chunk := reader.read(1 << 20):
        yield chunk


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class OpenShard:
    """The shard being appended to, opened at its committed length (``recover`` cut the rest)."""

    def __init__(self, path: Path, info: ShardInfo) -> None:
        self.path = path
        self.info = info
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise OutputError.from_os(exc, path) from None
        if os.fstat(fd).st_size != info.bytes:
            os.close(fd)
            raise StateError(f"{path}: {info.bytes} bytes committed, the file differs")
        self._fd = fd
        # hashed as written; a shard reopened after a crash is hashed from the file at its seal
        self._digest: Any = hashlib.sha256() if info.bytes == 0 else None
        self.bytes = info.bytes
        self.records = info.records

    def append(self, data: bytes, records: int) -> None:
        """Write and fsync a batch; called off the event loop."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError.from_os(exc, self.path) from None
        if self._digest is not None:
            self._digest.update(data)
        self.bytes += len(data)
        self.records += records

    def seal(self) -> ShardSealed:
        """Close for good; what the state records of it."""
        os.close(self._fd)
        self._fd = -1
        digest = self._digest.hexdigest() if self._digest else sha256_of(self.path)
        return ShardSealed(self.info.file, self.records, self.bytes, digest)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_manifest(
    layout: Layout,
    sealed: list[ShardInfo],
    open_shards: list[ShardInfo],
    series: Mapping[str, tuple[list[ShardInfo], list[ShardInfo]]] | None = None,
) -> None:
    """Every sealed shard with its records, bytes and sha256; open ones apart, with the length
    committed so far: a reader reads those up to ``bytes`` only. Each endpoint's own series
    (a source's items) is listed the same way under ``series``, by name."""
    doc: dict[str, Any] = {"version": 2, **_listing(sealed, open_shards)}
    if series:
        doc["series"] = {name: _listing(*listed) for name, listed in series.items()}
    write_atomically(layout.manifest, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def _listing(sealed: list[ShardInfo], open_shards: list[ShardInfo]) -> dict[str, Any]:
    return {
        "records": sum(s.records for s in sealed),
        "shards": [
            {"file": f"shards/{s.file}", "records": s.records, "bytes": s.bytes, "sha256": s.sha256}
            for s in sealed
        ],
        "open_shards": [
            {"file": f"shards/{s.file}", "records": s.records, "bytes": s.bytes}
            for s in open_shards
        ],
    }
