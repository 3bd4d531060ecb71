"""An append-only log of state events with group commit: many appenders share one fsync.

Each line is ``<crc32 hex8> <json>\\n``. A line that is cut short or fails its checksum can only
be the last one, left by a crash mid-write: reading stops there and the tail is cut off. A bad line
followed by good ones is corruption, and is reported, never skipped.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from crawler.errors import OutputError, StateError

Event = dict[str, Any]


def encode(event: Event) -> bytes:
    body = orjson.dumps(event)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def read(path: Path) -> tuple[list[Event], int]:
    """Events of a journal file and the byte length of its intact part."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    events: list[Event] = []
    good = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        event = _decode(line)
        if event is None:
            if any(_decode(later) is not None for later in lines[number:-1]):
                raise StateError(f"{path}: line {number} is corrupt (checksum or JSON)")
            break
        events.append(event)
        good += len(line) + 1
    return events, good


def _decode(line: bytes) -> Event | None:
    crc, _, body = line.partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        event = orjson.loads(body)
    except (ValueError, orjson.JSONDecodeError):
        return None
    return event if isinstance(event, dict) else None


class Journal:
    """Appends events durably. ``await append(...)`` returns once they are fsynced."""

    def __init__(self, path: Path, *, keep_bytes: int) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, keep_bytes)  # drop a torn tail left by a crash
        os.lseek(fd, 0, os.SEEK_END)
        self._fd = fd
        self._buffer: list[bytes] = []
        self._batch: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        # one thread, first in first out: even if a cancelled appender lets the lock go while its
        # flush still runs, the next flush waits behind it, so lines never interleave or swap
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self.lines = 0

    async def append(self, events: Iterable[Event]) -> None:
        self._buffer.extend(encode(e) for e in events)
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        async with self._lock:
            if not batch.done():
                lines, self._buffer, self._batch = self._buffer, [], None
                # shielded: a cancelled appender must not abandon the others sharing this fsync
                await asyncio.shield(self._flush(lines, batch))
        await batch

    async def _flush(self, lines: list[bytes], batch: asyncio.Future[None]) -> None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._write, b"".join(lines))
        except OSError as exc:
            batch.set_exception(OutputError.from_os(exc, self.path))
        else:
            self.lines += len(lines)
            batch.set_result(None)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a batch is written; holding it keeps any flush from starting."""
        return self._lock

    def detach_pending(self) -> asyncio.Future[None] | None:
        """Drop the events waiting to be written, for a snapshot that already holds them; the
        caller resolves the returned future once that snapshot is durable."""
        batch, self._buffer, self._batch = self._batch, [], None
        return batch

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
