"""A sealed shard read for export: chunks of whole lines, checked against the manifest as read.

A thread reads, hashes and decompresses (zlib, zstd and sha256 let go of the GIL) while the
caller decodes the previous chunk, so the export uses a second core; two chunks wait at most.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

CHUNK = 4 << 20  # bytes read at a time
_END = object()


@dataclass(frozen=True)
class ShardEntry:
    """A sealed shard as the manifest lists it."""

    file: str  # shards/reviews-000001.jsonl[.gz|.zst], relative to output.dir
    records: int
    bytes: int
    sha256: str

    @property
    def name(self) -> str:
        return self.file.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        """``reviews-000001`` (or ``reviews-<worker>-000001``): what its export is named after."""
        return self.name.split(".jsonl", 1)[0]


class ShardChanged(Exception):
    """The shard's bytes are not those the manifest sealed."""


class _Hashing:
    """A raw file that hashes and counts what is read from it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True


def chunks(path: Path, entry: ShardEntry) -> Iterator[bytes | memoryview]:
    """The shard's lines, a few MB at a time; ShardChanged (after the last chunk) when its size
    or sha256 differs from the manifest's; OSError as the file gives it."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()
    reader = threading.Thread(target=_read, args=(path, entry, handoff, stop), daemon=True)
    reader.start()
    try:
        while (got := handoff.get()) is not _END:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while reader.is_alive():  # let a reader blocked on a full queue see the stop
            try:
                handoff.get_nowait()
            except queue.Empty:
                reader.join(0.01)


def _read(path: Path, entry: ShardEntry, out: queue.Queue[Any], stop: threading.Event) -> None:
    try:
        with path.open("rb") as raw:
            hashing = _Hashing(raw)
            rest = b""
            for piece in _decompressed(hashing, path.name):
                if stop.is_set():
                    return
                rest = _hand_over(rest, piece, out)
            while hashing.read(CHUNK):  # a compressed stream's trailing bytes count too
                pass
        if rest:
            out.put(rest + b"\n")  # a sealed shard ends in a line feed; the check says if not
        if hashing.size != entry.bytes or hashing.digest.hexdigest() != entry.sha256:
            out.put(
                ShardChanged(
                    f"{path}: {hashing.size:,} bytes, sha256 {hashing.digest.hexdigest()[:12]}..."
                    f"; the manifest sealed {entry.bytes:,} bytes, {entry.sha256[:12]}...: the "
                    "shard changed since (crawler verify says more); not exported"
                )
            )
        out.put(_END)
    except BaseException as exc:  # handed to the caller, which raises it in its own thread
        out.put(exc)


def _hand_over(rest: bytes, piece: bytes, out: queue.Queue[Any]) -> bytes:
    """Hand over the whole lines of ``rest + piece`` without copying ``piece`` (a view of it),
    and return what is left after its last line feed."""
    start = 0
    if rest:
        first = piece.find(b"\n") + 1
        if not first:
            return rest + piece
        out.put(rest + piece[:first])
        start = first
    end = piece.rfind(b"\n") + 1
    if end > start:
        out.put(memoryview(piece)[start:end])
    return piece[max(end, start) :]


def _gunzip(raw: _Hashing) -> Iterator[bytes]:
    """A shard's gzip members (one per committed batch), inflated a chunk at a time: read in
    large blocks, which ``gzip.GzipFile`` does not (its small reads each take the GIL again)."""
    inflate, pending, started = zlib.decompressobj(wbits=31), b"", False
    while True:
        if not pending:
            pending = raw.read(CHUNK)
            if not pending:
                break
        started = True
        out = inflate.decompress(pending, CHUNK)  # at most a chunk: members inflate 100-fold
        pending = inflate.unconsumed_tail
        if inflate.eof:  # the next member starts in what is left
            pending, inflate, started = inflate.unused_data, zlib.decompressobj(31), False
        if out:
            yield out
    if started:
        raise EOFError("the shard ends inside a gzip member")


def _decompressed(hashing: _Hashing, name: str) -> Iterator[bytes]:
    if name.endswith(".gz"):
        yield from _gunzip(hashing)
        return
    stream: Any = hashing
    if name.endswith(".zst"):
        raw = cast("IO[bytes]", hashing)  # read() is all the decompressor calls
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    while data := stream.read(CHUNK):
        yield data
