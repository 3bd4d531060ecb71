"""The exact set of review ids already written, compact in memory and persisted append-only.

Review ids are decimal numbers below 2**64, so the set is an open-addressing hash table of
unsigned 64-bit integers in ``array('Q')``s: about 8 bytes / load factor per id, against about
90 for a ``set`` of str. Ids that are not such numbers (the contract never shows one) go to an
ordinary set, so the set stays exact for any id. Nothing here is probabilistic.

The table is split in 64 parts chosen by the hash's top bits. Each part grows on its own, so a
resize holds two copies of one part, not of the whole set: peak memory stays near the steady
size. Small parts double (few rehashes while the set is small and memory is no concern); past
16,384 slots (8 MiB in all) they grow by 1.2, which with a 0.8 load keeps 10 to 12 bytes per id.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import orjson

from crawler.errors import OutputError, StateError

_EMPTY = 0  # id 0 is kept in the fallback set, so 0 can mark an empty slot
_MULT = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads ids whose low bits are alike
_MASK64 = (1 << 64) - 1
_PART_BITS = 6
_PARTS = 1 << _PART_BITS
_MAX_LOAD = 0.8
_GROWTH = 1.2
_DOUBLE_BELOW = 1 << 14  # slots of one part


def as_u64(review_id: str) -> int | None:
    """The id as a table key, or None when it must go to the fallback set."""
    if not (review_id.isascii() and review_id.isdigit()) or len(review_id) > 20:
        return None
    if review_id[0] == "0":  # "007" and "7" are different ids but the same number
        return None
    value = int(review_id)
    return value if 0 < value <= _MASK64 else None


class _Part:
    """One open-addressing table with linear probing."""

    __slots__ = ("count", "limit", "slots", "table")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.table = array("Q", bytes(8 * slots))
        self.limit = int(slots * _MAX_LOAD)
        self.count = 0

    def add(self, key: int, hashed: int) -> bool:
        table, slots = self.table, self.slots
        i = hashed % slots
        while True:
            found = table[i]
            if found == _EMPTY:
                break
            if found == key:
                return False
            i += 1
            if i == slots:
                i = 0
        table[i] = key
        self.count += 1
        return True

    def grown(self, at_least: int = 0) -> _Part:
        step = 2.0 if self.slots < _DOUBLE_BELOW else _GROWTH
        bigger = _Part(max(int(self.slots * step) + 1, int(at_least / _MAX_LOAD) + 1))
        add = bigger.add
        for key in self.table:
            if key:  # _EMPTY is 0
                add(key, (key * _MULT) & _MASK64)
        return bigger


class SeenIds:
    """An exact set of review ids."""

    def __init__(self, capacity: int = 1024) -> None:
        self._other: set[str] = set()
        per_part = max(16, int(capacity / _PARTS / _MAX_LOAD) + 1)
        self._parts = [_Part(per_part) for _ in range(_PARTS)]

    def __len__(self) -> int:
        return sum(p.count for p in self._parts) + len(self._other)

    def add(self, review_id: str) -> bool:
        """Add an id; True when it was not there before."""
        key = as_u64(review_id)
        if key is None:
            if review_id in self._other:
                return False
            self._other.add(review_id)
            return True
        return self.add_u64(key)

    def add_u64(self, key: int) -> bool:
        # the hot path, once per review: _Part.add inlined, as a call costs as much as a probe
        hashed = (key * _MULT) & _MASK64
        index = hashed >> (64 - _PART_BITS)
        part = self._parts[index]
        table, slots = part.table, part.slots
        i = hashed % slots
        while found := table[i]:
            if found == key:
                return False
            i += 1
            if i == slots:
                i = 0
        table[i] = key
        part.count += 1
        if part.count > part.limit:
            self._parts[index] = part.grown()
        return True

    def add_many_u64(self, keys: array[int]) -> None:
        """Load saved ids: every part sized once for its share, then filled."""
        share = len(keys) // _PARTS + 1
        self._parts = [
            p.grown(p.count + share) if p.count + share > p.limit else p for p in self._parts
        ]
        add = self.add_u64
        for key in keys:
            add(key)


class SeenSet(Protocol):
    """What the writer needs of a seen-set: this module's ``SeenLog`` for one process, a
    per-product set held in Redis for many."""

    loaded: bool
    count: int  # ids in the seen file, for the writer's committed position
    other_bytes: int

    def adder(self, product_id: str) -> Callable[[str], bool]: ...

    def take(self) -> tuple[bytes, bytes]: ...

    def load(self) -> None: ...

    def write(self, ids: bytes, other: bytes) -> None: ...

    def close(self) -> None: ...


class SeenLog:
    """The persisted set: ``seen.u64`` (8 bytes an id) and ``seen-other.txt`` (one id a line,
    as it is, or as a JSON string when it holds a line feed or starts with a double quote).

    Opened at the committed lengths (``recover`` cut a crash's leftovers). Opening reads the
    files; ``load`` builds the in-memory set (a second per few million ids), so a run can start
    sending requests meanwhile.
    """

    def __init__(self, ids_path: Path, other_path: Path, count: int, other_bytes: int) -> None:
        self.seen = SeenIds(capacity=max(count, 1 << 16))  # 0.7 MB: no resizing for small jobs
        self._ids_path, self._other_path = ids_path, other_path
        self._ids_fd = _open_at(ids_path, count * 8)
        self._other_fd = _open_at(other_path, other_bytes)
        self.count = count
        self.other_bytes = other_bytes
        self._saved = array("Q")
        self._saved.frombytes(os.pread(self._ids_fd, count * 8, 0))
        self._saved_other = _read_other(os.pread(self._other_fd, other_bytes, 0))
        self.loaded = not (self._saved or self._saved_other)
        self._pending_ids = array("Q")
        self._pending_other: list[str] = []

    def load(self) -> None:
        """Put the saved ids in the set; until then ``add`` must not be called."""
        self.seen.add_many_u64(self._saved)
        for review_id in self._saved_other:
            self.seen.add(review_id)
        self._saved, self._saved_other = array("Q"), []
        self.loaded = True

    def adder(self, product_id: str) -> Callable[[str], bool]:
        """The add function for a product's reviews: one set for every product here."""
        return self.add

    def add(self, review_id: str) -> bool:
        """True when new; the id is then queued until ``take``."""
        key = as_u64(review_id)
        if key is not None:
            if not self.seen.add_u64(key):
                return False
            self._pending_ids.append(key)
            return True
        if not self.seen.add(review_id):
            return False
        self._pending_other.append(_other_line(review_id))
        return True

    def take(self) -> tuple[bytes, bytes]:
        """The ids queued since the last ``take``, as the bytes ``write`` appends."""
        ids, other = self._pending_ids.tobytes(), "".join(self._pending_other).encode()
        self._pending_ids, self._pending_other = array("Q"), []
        return ids, other

    def write(self, ids: bytes, other: bytes) -> None:
        """Append and fsync; ``count`` and ``other_bytes`` are then the new committed lengths."""
        if ids:
            _write_all(self._ids_fd, ids, self._ids_path)
            self.count += len(ids) // 8
        if other:
            _write_all(self._other_fd, other, self._other_path)
            self.other_bytes += len(other)

    def close(self) -> None:
        os.close(self._ids_fd)
        os.close(self._other_fd)


def _other_line(review_id: str) -> str:
    """An id's line in ``seen-other.txt``: the id itself, as every id was written before ids
    could hold a line feed; JSON when it does (or starts with the quote that marks JSON)."""
    if "\n" in review_id or review_id.startswith('"'):
        return orjson.dumps(review_id).decode() + "\n"
    return review_id + "\n"


def _read_other(data: bytes) -> list[str]:
    """The ids of ``seen-other.txt``. Lines end at a line feed only: an id may hold any other
    line break (``\r``, U+0085, U+2028), which ``str.splitlines`` would have cut it at."""
    lines = data.split(b"\n")
    if not lines[-1]:  # the committed length ends the file on a line feed: nothing after it
        lines.pop()
    ids = []
    for line in lines:
        if line.startswith(b'"'):
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, str):
                ids.append(value)
                continue
        ids.append(line.decode())
    return ids


def _open_at(path: Path, length: int) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise OutputError.from_os(exc, path) from None
    if os.fstat(fd).st_size != length:
        os.close(fd)
        raise StateError(f"{path}: {length} bytes committed, the file differs")
    return fd


def _write_all(fd: int, data: bytes, path: Path) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise OutputError.from_os(exc, path) from None
