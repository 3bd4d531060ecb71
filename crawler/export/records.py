"""Record lines -> the three tables' rows, typed: a field missing is a null, one of another type
is a null and a count, a field not listed is never read.

Lines are decoded with msgspec into structs that declare only the fields the tables take, so
the rest of a 6 KB review is skipped unparsed. A chunk of lines decodes in one call; a line that
does not fit (a field of another type) is decoded again alone, with each field msgspec names as
wrong set to null and counted under its path (``item.review.rating``), until it fits.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson

_INT32, _INT64 = 2**31 - 1, 2**63 - 1
_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: what every reader takes as a time
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_REPAIRS = 64  # wrong fields mended in one line at most: past that it is unreadable
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
KINDS = {1: "image", 2: "video"}  # the API's media_type


class _Picture(msgspec.Struct):
    width: int | None = None
    height: int | None = None
    url_list: list[str | None] | None = None


class _Media(msgspec.Struct):
    media_type: int | None = None
    image: _Picture | None = None
    video: _Picture | None = None


class _Text(msgspec.Struct):
    plain_text: str | None = None


class _Review(msgspec.Struct):
    rating: int | None = None
    display_text: str | None = None
    display_review_text: list[_Text | None] | None = None
    review_timestamp: str | int | None = None
    main_review_title: str | None = None
    review_country: str | None = None
    images: list[msgspec.Raw] | None = None  # only counted
    media: list[_Media | None] | None = None


class _Avatar(msgspec.Struct):
    url_list: list[str | None] | None = None


class _User(msgspec.Struct):
    name: str | None = None
    user_id: str | int | None = None
    avatar: _Avatar | None = None


class _Item(msgspec.Struct):
    review: _Review | None = None
    sku_id: str | int | None = None
    sku_specification: str | None = None
    digg_count: int | None = None
    is_anonymous: bool | None = None
    review_source_name: str | None = None
    is_updated: bool | None = None
    review_user: _User | None = None


class _Product(msgspec.Struct):
    review_count: int | None = None
    product_rating: float | None = None


class _Record(msgspec.Struct):
    review_id: str | int | None = None
    product_id: str | int | None = None
    region: str | None = None
    fetched_at: str | None = None
    product: _Product | None = None
    item: _Item | None = None


_decoder = msgspec.json.Decoder(_Record)
_NO_ITEM, _NO_REVIEW, _NO_USER = _Item(), _Review(), _User()

REVIEW_COLUMNS = (
    "product_id", "region", "review_id", "rating", "text", "title", "review_time", "sku_id",
    "sku_specification", "likes", "is_anonymous", "review_source_name", "country",
    "image_count", "has_media", "is_updated", "harvested_at", "shard",
)  # fmt: skip
REVIEWER_COLUMNS = ("reviewer_name", "reviewer_user_id", "reviewer_avatar")
MEDIA_COLUMNS = ("review_id", "position", "kind", "url", "width", "height")
SNAPSHOT_COLUMNS = ("product_id", "region", "review_count", "product_rating", "harvested_at")


@dataclass
class Tally:
    """What the rows lack: nulls per column, wrong types per field, lines that are no record."""

    nulls: Counter[str] = field(default_factory=Counter)
    wrong_type: Counter[str] = field(default_factory=Counter)
    unreadable_lines: int = 0

    def add(self, other: Tally) -> None:
        self.nulls.update(other.nulls)
        self.wrong_type.update(other.wrong_type)
        self.unreadable_lines += other.unreadable_lines


class Rows:
    """A batch of the three tables' rows, as columns (lists), for one shard."""

    def __init__(self, shard: str, *, reviewer: bool) -> None:
        self.shard = shard
        self.reviewer = reviewer
        columns = REVIEW_COLUMNS + (REVIEWER_COLUMNS if reviewer else ())
        self.reviews: dict[str, list[Any]] = {c: [] for c in columns}
        self.media: dict[str, list[Any]] = {c: [] for c in MEDIA_COLUMNS}
        self.snapshots: dict[str, list[Any]] = {c: [] for c in SNAPSHOT_COLUMNS}
        self.tally = Tally()
        self._times: dict[str, int | None] = {}

    def __len__(self) -> int:
        return len(self.reviews["review_id"])

    def add_lines(self, chunk: bytes) -> None:
        """Whole lines (each ending in a line feed), the fast way when they all fit."""
        try:
            records = _decoder.decode_lines(chunk)
        except msgspec.DecodeError:  # some line does not fit: each on its own
            records = [r for line in chunk.splitlines() if (r := self._one(line)) is not None]
        for record in records:
            self._add(record)

    def count_nulls(self) -> Tally:
        """The batch's tally with its nulls counted per column (``table.column``)."""
        for table, columns in (
            ("reviews", self.reviews),
            ("review_media", self.media),
            ("product_snapshots", self.snapshots),
        ):
            for name, values in columns.items():
                if nulls := values.count(None):
                    self.tally.nulls[f"{table}.{name}"] += nulls
        return self.tally

    def _one(self, line: bytes) -> _Record | None:
        if not line.strip():
            return None
        try:
            return _decoder.decode(line)
        except msgspec.ValidationError:
            return self._mended(line)
        except msgspec.DecodeError:
            self.tally.unreadable_lines += 1
            return None

    def _mended(self, line: bytes) -> _Record | None:
        """The line with each field of another type than the table's made null, counted."""
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.tally.unreadable_lines += 1
            return None
        for _ in range(_REPAIRS):
            try:
                return msgspec.convert(doc, _Record)
            except msgspec.ValidationError as exc:
                found = _AT.search(str(exc))
                if found is None or not _null_at(doc, found["path"]):
                    break  # the whole line is not an object: not a record
                self.tally.wrong_type[_field_name(found["path"])] += 1
        self.tally.unreadable_lines += 1
        return None

    def _add(self, record: _Record) -> None:
        item = record.item or _NO_ITEM
        review = item.review or _NO_REVIEW
        review_id = _text(record.review_id)
        harvested = self._time(record.fetched_at)
        columns = self.reviews
        columns["product_id"].append(_text(record.product_id))
        columns["region"].append(record.region)
        columns["review_id"].append(review_id)
        columns["rating"].append(self._bounded(review.rating, _INT32, "item.review.rating"))
        columns["text"].append(_body(review))
        columns["title"].append(review.main_review_title)
        columns["review_time"].append(self._millis(review.review_timestamp))
        columns["sku_id"].append(_text(item.sku_id))
        columns["sku_specification"].append(item.sku_specification)
        columns["likes"].append(self._bounded(item.digg_count, _INT64, "item.digg_count"))
        columns["is_anonymous"].append(item.is_anonymous)
        columns["review_source_name"].append(item.review_source_name)
        columns["country"].append(review.review_country)
        images, media = review.images, review.media
        columns["image_count"].append(None if images is None else len(images))
        unknown = media is None and images is None
        columns["has_media"].append(None if unknown else bool(media) or bool(images))
        columns["is_updated"].append(item.is_updated)
        columns["harvested_at"].append(harvested)
        columns["shard"].append(self.shard)
        if self.reviewer:
            user = item.review_user or _NO_USER
            avatar = user.avatar.url_list if user.avatar is not None else None
            columns["reviewer_name"].append(user.name)
            columns["reviewer_user_id"].append(_text(user.user_id))
            columns["reviewer_avatar"].append(avatar[0] if avatar else None)
        if media:
            self._add_media(review_id, media)
        if record.product is not None:
            product = record.product
            snapshot = self.snapshots
            snapshot["product_id"].append(_text(record.product_id))
            snapshot["region"].append(record.region)
            count = self._bounded(product.review_count, _INT64, "product.review_count")
            snapshot["review_count"].append(count)
            snapshot["product_rating"].append(product.product_rating)
            snapshot["harvested_at"].append(harvested)

    def _add_media(self, review_id: str | None, media: list[_Media | None]) -> None:
        columns = self.media
        for position, one in enumerate(media):
            if one is None:
                continue
            kind = KINDS.get(one.media_type) if one.media_type is not None else None
            picture = one.video if kind == "video" else one.image
            urls = picture.url_list if picture is not None else None
            columns["review_id"].append(review_id)
            columns["position"].append(position)
            columns["kind"].append(kind)
            columns["url"].append(urls[0] if urls else None)
            width, height = (None, None) if picture is None else (picture.width, picture.height)
            columns["width"].append(self._bounded(width, _INT32, "item.review.media.width"))
            columns["height"].append(self._bounded(height, _INT32, "item.review.media.height"))

    def _bounded(self, value: int | None, bound: int, name: str) -> int | None:
        if value is None or -bound - 1 <= value <= bound:
            return value
        self.tally.wrong_type[name] += 1  # a number no column of this type holds
        return None

    def _millis(self, value: str | int | None) -> int | None:
        """``review_timestamp`` (milliseconds since the epoch, a string of digits) as a number."""
        if value is None:
            return None
        if isinstance(value, str):
            if not value.isascii() or not value.isdigit():
                self.tally.wrong_type["item.review.review_timestamp"] += 1
                return None
            value = int(value)
        if 0 <= value <= _MS_MAX:
            return value
        self.tally.wrong_type["item.review.review_timestamp"] += 1
        return None

    def _time(self, text: str | None) -> int | None:
        """``fetched_at`` (ISO 8601, UTC) as milliseconds; a page's lines share it: parsed once."""
        if text is None:
            return None
        try:
            return self._times[text]
        except KeyError:
            pass
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.tally.wrong_type["fetched_at"] += 1
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the writer writes UTC, with a Z
        if len(self._times) > 4096:  # within a batch; a run's pages have as many as pages
            self._times.clear()
        self._times[text] = millis = (moment - _EPOCH) // _MS
        return millis


def _text(value: str | int | None) -> str | None:
    """An id, always a string: some tools read ids of 19 digits as floats."""
    return value if value is None or isinstance(value, str) else str(value)


def _body(review: _Review) -> str | None:
    if review.display_text is not None:
        return review.display_text
    parts = review.display_review_text
    if not parts:
        return None
    texts = [p.plain_text for p in parts if p is not None and p.plain_text is not None]
    return "\n".join(texts) if texts else None


def _null_at(doc: Any, path: str) -> bool:
    """Set the value at a msgspec path (``.item.review[0].rating``) to null; False: no such."""
    steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(path)]
    if not steps:
        return False
    parent = doc
    for step in steps[:-1]:
        parent = _child(parent, step)
        if parent is None:
            return False
    last = steps[-1]
    if isinstance(last, str) and isinstance(parent, dict) and last in parent:
        parent[last] = None
        return True
    if isinstance(last, int) and isinstance(parent, list) and last < len(parent):
        parent[last] = None
        return True
    return False


def _child(value: Any, step: str | int) -> Any:
    if isinstance(step, str):
        return value.get(step) if isinstance(value, dict) else None
    return value[step] if isinstance(value, list) and step < len(value) else None


def _field_name(path: str) -> str:
    """``.item.review.media[2].image`` -> ``item.review.media.image``: counted as one field."""
    return ".".join(name for name, _ in _STEP.findall(path) if name)
