"""The seen-set in the coordinated mode: per product, committed in Redis, held by one worker.

A review belongs to its product (the contract: it shows on several pages and in several regions
of one product), so the product is the unit a worker leases: all its regions' duplicates meet in
one process, and the set of one product is all a worker needs to load when it takes it over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import orjson


class ProductSeen:
    """The ids of the products this worker holds: committed ones from Redis, new ones queued
    until the writer takes them into its commit (``take``)."""

    loaded = True
    count = 0  # no seen file in this mode: the writer's file position stays 0
    other_bytes = 0

    def __init__(self) -> None:
        self._sets: dict[str, set[str]] = {}
        self._pending: list[str] = []

    def hold(self, product_id: str, committed: Iterable[str]) -> None:
        self._sets[product_id] = set(committed)

    def drop(self, product_id: str) -> None:
        self._sets.pop(product_id, None)

    def adder(self, product_id: str) -> Callable[[str], bool]:
        # a product given up meanwhile (its lease lost): its page is dropped before any commit,
        # so what this adds goes nowhere
        return _adder(self._sets.get(product_id, set()), self._pending)

    def take(self) -> tuple[bytes, bytes]:
        """The ids added since the last take, as a JSON list (the store sends them to Redis;
        an id may hold any character, a line feed too)."""
        taken, self._pending = self._pending, []
        return b"", orjson.dumps(taken) if taken else b""

    def load(self) -> None:
        """Nothing to build: a product's ids come with its lease."""

    def write(self, ids: bytes, other: bytes) -> None:
        """Nothing to write: the ids are committed with the page, in Redis."""

    def close(self) -> None:
        self._sets.clear()


class ItemSeen:
    """An endpoint's series' item ids, as one worker holds them: the series is leased whole
    (every source target of the endpoint), so an item two of its targets list meets its
    duplicate in one process. Committed ids come from Redis (``iseen:<series>``) at the claim;
    new ones are queued until the writer takes them into its commit."""

    loaded = True
    count = 0  # no seen file in this mode
    other_bytes = 0

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._pending: list[str] = []

    def hold(self, committed: Iterable[str]) -> None:
        self._ids = set(committed)
        self._pending = []

    def drop(self) -> None:
        self._ids = set()

    def adder(self, product_id: str) -> Callable[[str], bool]:
        return _adder(self._ids, self._pending)

    def take(self) -> tuple[bytes, bytes]:
        """A page's new ids as a JSON list, committed with the page (``SADD iseen:``)."""
        taken, self._pending = self._pending, []
        return b"", orjson.dumps(taken) if taken else b""

    def load(self) -> None:
        """Nothing to build: the ids come with the series' lease."""

    def write(self, ids: bytes, other: bytes) -> None:
        """Nothing to write: the ids are committed with the page, in Redis."""

    def close(self) -> None:
        self._ids = set()


def _adder(ids: set[str], pending: list[str]) -> Callable[[str], bool]:
    """Adds an id not yet in ``ids`` to both, and says whether it was new."""

    def add(one_id: str) -> bool:
        if one_id in ids:
            return False
        ids.add(one_id)
        pending.append(one_id)
        return True

    return add
