"""The job's targets: product x region pairs from the job file and a targets file, kept in columns.

A million targets as Python objects would cost several hundred bytes each; here a target is 13
bytes (a 64-bit product id, a region index, a page cap), and a ``Target`` is made only when one is
walked or listed. ``targets_file`` reads a targets file into the same columns.
"""

from __future__ import annotations

import difflib
import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from crawler.output.dedup import SeenIds

REGIONS = (
    "US",
    "GB",
    "DE",
    "FR",
    "IT",
    "ID",
    "MY",
    "MX",
    "PH",
    "SG",
    "ES",
    "TH",
    "VN",
    "BR",
    "JP",
    "IE",
)
REGION_INDEX = {region: index for index, region in enumerate(REGIONS)}
MAX_ERRORS = 20  # bad rows listed one by one; the rest are counted
MAX_PAGES = 1_000_000  # a target's cap at most (ten million reviews); the column holds 2**32 - 1
_U64 = (1 << 64) - 1
_NO_CAP = 0  # max_pages column: 0 means no cap (a cap is always > 0)


@dataclass(frozen=True, slots=True)
class Target:
    """One walk: a product in one region."""

    product_id: str
    region: str
    max_pages: int | None = None

    @property
    def key(self) -> str:
        return f"{self.product_id}:{self.region}"

    def value(self, name: str) -> str:
        """A field for an endpoint's parameters (``product_id``, ``region``)."""
        value: str = getattr(self, name)
        return value


class TargetList:
    """Targets in columns, in the order they were listed; iterating yields ``Target``s."""

    def __init__(self) -> None:
        self._ids = array("Q")  # the product id as a number, or 0 when it is kept in _odd
        self._odd: dict[int, str] = {}  # ids a number cannot hold: leading zeros, > 64 bits
        self._regions = array("B")
        self._caps = array("I")

    def append(self, product_id: str, region: int, max_pages: int | None) -> None:
        self.append_number(_as_number(product_id), product_id, region, max_pages)

    def append_number(
        self, number: int | None, product_id: str, region: int, max_pages: int | None
    ) -> None:
        """``append`` for a caller that has the id as a number already (None: not one)."""
        if number is None:
            self._odd[len(self._ids)] = product_id
            number = 0
        self._ids.append(number)
        self._regions.append(region)
        self._caps.append(max_pages or _NO_CAP)

    def __len__(self) -> int:
        return len(self._ids)

    def index_of(self, number: int, region: int) -> int:
        """Where a product (its id as a number) is first listed in a region; it must be listed.

        A scan of the columns, at C speed: only for the few duplicates a load reports."""
        ids, regions = self._ids, self._regions
        at = ids.index(number)
        while regions[at] != region:
            at = ids.index(number, at + 1)
        return at

    def __getitem__(self, index: int) -> Target:
        number = self._ids[index]
        product_id = str(number) if number else self._odd[index]
        cap = self._caps[index]
        return Target(product_id, REGIONS[self._regions[index]], cap or None)

    def __iter__(self) -> Iterator[Target]:
        for index in range(len(self._ids)):
            yield self[index]

    def rows(self) -> Iterator[tuple[str, str, int | None]]:
        """(product_id, region, max_pages) per target: what the state database stores."""
        odd, regions = self._odd, REGIONS
        for index, (number, region, cap) in enumerate(
            zip(self._ids, self._regions, self._caps, strict=True)
        ):
            yield (str(number) if number else odd[index]), regions[region], cap or None

    def pairs(self) -> Iterator[tuple[str, str]]:
        """(product_id, region) per target, in order."""
        for product_id, region, _ in self.rows():
            yield product_id, region

    def to_bytes(self) -> bytes:
        """The list as bytes (its columns), for a store that keeps the targets it synced."""
        odd = orjson.dumps({str(k): v for k, v in self._odd.items()})
        parts = [self._ids.tobytes(), self._regions.tobytes(), self._caps.tobytes(), odd]
        head = b"".join(len(part).to_bytes(8, "little") for part in parts)
        return b"TL1" + head + b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> TargetList:
        if data[:3] != b"TL1":
            raise ValueError("not a target list")
        sizes = [int.from_bytes(data[3 + 8 * i : 11 + 8 * i], "little") for i in range(4)]
        at = 35
        parts = []
        for size in sizes:
            parts.append(data[at : at + size])
            at += size
        targets = cls()
        targets._ids.frombytes(parts[0])
        targets._regions.frombytes(parts[1])
        targets._caps.frombytes(parts[2])
        targets._odd = {int(k): v for k, v in orjson.loads(parts[3]).items()}
        return targets

    def digest(self) -> str:
        """Changes whenever a target is added, removed, reordered or gets another cap."""
        digest = hashlib.blake2b(digest_size=16)
        for column in (self._ids, self._regions, self._caps):
            digest.update(column.tobytes())
        digest.update(repr(sorted(self._odd.items())).encode())
        return digest.hexdigest()


def _as_number(product_id: str) -> int | None:
    if product_id[0] == "0" or len(product_id) > 20:  # "007" and "7" are different products
        return None
    number = int(product_id)
    return number if number <= _U64 else None


class Collector:
    """Builds a TargetList from several sources; refuses duplicates and collects bad rows.

    A source is a label with one ``{}`` for the position (``job.yaml:12: targets[{}]``,
    ``targets.csv:{}``); each target remembers its source and position, so a duplicate can name
    where its first listing was.
    """

    def __init__(self) -> None:
        self.targets = TargetList()
        self.errors: list[str] = []
        self.bad = 0  # bad rows in all, listed or not
        # one exact set of ids per region (~11 bytes a target while loading): a hit is a
        # duplicate, with no need to look through the targets to make sure
        self._keys = [SeenIds(capacity=1 << 12) for _ in REGIONS]
        self._odd_keys: dict[tuple[str, int], int] = {}  # -> where it was first listed
        self._sources: list[tuple[str, str]] = []
        self._source_of = array("B")
        self._position_of = array("I")

    def source(self, label: str, short: str) -> int:
        """A new source; ``short`` names a position within the same source."""
        self._sources.append((label, short))
        return len(self._sources) - 1

    def _where(self, index: int, *, seen_from: int) -> str:
        source = self._source_of[index]
        label, short = self._sources[source]
        return (short if source == seen_from else label).format(self._position_of[index])

    def add(
        self, product_id: str, region: int, max_pages: int | None, source: int, position: int
    ) -> None:
        """Add a checked target (``region`` as its index), unless it is listed already."""
        number = _as_number(product_id)
        if number is not None:
            new = self._keys[region].add_u64(number)
        else:
            new = (product_id, region) not in self._odd_keys
            if new:
                self._odd_keys[(product_id, region)] = len(self.targets)
        if not new:
            if len(self.errors) >= MAX_ERRORS:
                self.bad += 1  # counted only: where it was first listed is never shown
                return
            first = (
                self._odd_keys[(product_id, region)]
                if number is None
                else self.targets.index_of(number, region)
            )
            self.problem(
                f"{self._sources[source][0].format(position)}: product {product_id} in "
                f"{REGIONS[region]} is already listed at {self._where(first, seen_from=source)}"
            )
            return
        self.targets.append_number(number, product_id, region, max_pages)
        self._source_of.append(source)
        self._position_of.append(position)

    def problem(self, message: str) -> None:
        self.bad += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    def summary(self) -> list[str]:
        more = self.bad - len(self.errors)
        tail = [f"... and {more:,} more bad targets ({self.bad:,} in all)"] if more > 0 else []
        return self.errors + tail


def check_product_id(value: str) -> str | None:
    """Why ``value`` is not a product id, or None when it is one."""
    if value.isascii() and value.isdigit():
        return None
    if value and value.replace(".", "", 1).replace("E+", "", 1).replace("e+", "", 1).isdigit():
        return (
            f"{quoted(value)} is not a product id (a string of digits): a spreadsheet made it a "
            "number"
        )
    return f"{quoted(value)} is not a product id (a string of digits)"


# each region's country, and the other names people give it: ISO's three letters, UK
_COUNTRIES = {
    "US": ("the United States", "USA", "America", "United States of America"),
    "GB": ("the United Kingdom", "UK", "GBR", "Great Britain", "Britain", "England"),
    "DE": ("Germany", "DEU", "Deutschland"),
    "FR": ("France", "FRA"),
    "IT": ("Italy", "ITA", "Italia"),
    "ID": ("Indonesia", "IDN"),
    "MY": ("Malaysia", "MYS"),
    "MX": ("Mexico", "MEX", "México"),
    "PH": ("the Philippines", "PHL"),
    "SG": ("Singapore", "SGP"),
    "ES": ("Spain", "ESP", "España"),
    "TH": ("Thailand", "THA"),
    "VN": ("Vietnam", "VNM", "Viet Nam"),
    "BR": ("Brazil", "BRA", "Brasil"),
    "JP": ("Japan", "JPN"),
    "IE": ("Ireland", "IRL"),
}
_NAMED = {
    name.removeprefix("the ").casefold(): region
    for region, names in _COUNTRIES.items()
    for name in names
}


def check_region(value: str) -> str | None:
    """Why ``value`` is not a region (with the one meant, when that is clear), or None."""
    if value in REGION_INDEX:
        return None
    if value.upper() in REGION_INDEX:
        return f"{quoted(value)} is not a region: write it {value.upper()}"
    key = value.strip().removeprefix("the ").casefold()
    # a misspelt country name ('Phillipines'); a code of two or three letters is too short
    # for a guess to mean anything ('DK' is as close to DE as to nothing)
    close = difflib.get_close_matches(key, _NAMED, n=1, cutoff=0.8) if len(key) > 3 else []
    region = _NAMED.get(key) or (_NAMED[close[0]] if close else None)
    if region is not None:
        return f"{quoted(value)} is not a region: {region} is {_COUNTRIES[region][0]}"
    return f"unknown region {quoted(value)}; one of {', '.join(REGIONS)}"


def quoted(value: str, most: int = 60) -> str:
    """``value`` in quotes for a message, cut short when long (a cell can be 100,000 characters)."""
    if len(value) <= most:
        return f"'{value}'"
    return f"'{value[:most]}...' ({len(value):,} characters)"
