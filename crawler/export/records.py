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

_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: what every reader takes as a time
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_REPAIRS = 64  # wrong fields mended in one line at most: past that it is unreadable
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
KINDS = {1: "image", 2: "video"}  # the API's media_type


class _Picture(msgspec.Struct, gc=False):
    width: int | None = None
    height: int | None = None
    url_list: list[str | None] | None = None


class _Media(msgspec.Struct, gc=False):
    media_type: int | None = None
    image: _Picture | None = None
    video: _Picture | None = None


class _Text(msgspec.Struct, gc=False):
    plain_text: str | None = None


class _Review(msgspec.Struct, gc=False):
    rating: int | None = None
    display_text: str | None = None
    display_review_text: msgspec.Raw = msgspec.Raw()  # decoded only without display_text
    review_timestamp: str | int | None = None
    main_review_title: str | None = None
    review_country: str | None = None
    images: list[msgspec.Raw] | None = None  # only counted
    media: list[_Media | None] | None = None


class _Avatar(msgspec.Struct, gc=False):
    url_list: list[str | None] | None = None


class _User(msgspec.Struct, gc=False):
    name: str | None = None
    user_id: str | int | None = None
    avatar: _Avatar | None = None


class _Item(msgspec.Struct, gc=False):
    review: _Review | None = None
    sku_id: str | int | None = None
    sku_specification: str | None = None
    digg_count: int | None = None
    is_anonymous: bool | None = None
    review_source_name: str | None = None
    is_updated: bool | None = None


class _ItemWithUser(_Item):
    review_user: _User | None = None  # decoded only when asked for: it costs a third more


class _Product(msgspec.Struct, gc=False):
    review_count: int | None = None
    product_rating: float | None = None


class _Record(msgspec.Struct, gc=False):
    review_id: str | int | None = None
    product_id: str | int | None = None
    region: str | None = None
    fetched_at: str | None = None
    product: _Product | None = None
    item: _Item | None = None


class _RecordWithUser(_Record):
    item: _ItemWithUser | None = None


_NO_ITEM, _NO_REVIEW, _NO_USER, _NO_PICTURE = _ItemWithUser(), _Review(), _User(), _Picture()
_texts = msgspec.json.Decoder(list[_Text | None] | None)

REVIEW_COLUMNS = (
    "product_id", "region", "review_id", "rating", "text", "title", "review_time", "sku_id",
    "sku_specification", "likes", "is_anonymous", "review_source_name", "country",
    "image_count", "has_media", "is_updated", "harvested_at", "shard",
)  # fmt: skip
REVIEWER_COLUMNS = ("reviewer_name", "reviewer_user_id", "reviewer_avatar")
MEDIA_COLUMNS = ("review_id", "position", "kind", "url", "width", "height")
SNAPSHOT_COLUMNS = ("product_id", "region", "review_count", "product_rating", "harvested_at")
Columns = dict[str, list[Any]]


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

    def count_nulls(self, table: str, columns: Columns) -> None:
        for name, values in columns.items():
            if nulls := values.count(None):
                self.nulls[f"{table}.{name}"] += nulls


class Rows:
    """A batch of one shard's records, decoded; ``tables`` gives them as the three tables'
    columns (built a column at a time: a comprehension per column beats an append per value)."""

    def __init__(self, shard: str, *, reviewer: bool) -> None:
        self.shard = shard
        self.reviewer = reviewer
        self.tally = Tally()
        self._decoder = _with_user if reviewer else _without_user
        self._records: list[_Record] = []
        self._times: dict[str | None, int | None] = {None: None}

    def __len__(self) -> int:
        return len(self._records)

    def add_lines(self, chunk: bytes | memoryview) -> None:
        """Whole lines (each ending in a line feed), the fast way when they all fit."""
        try:
            self._records += self._decoder.decode_lines(chunk)
        except msgspec.DecodeError:  # some line does not fit: each on its own
            for line in bytes(chunk).splitlines():
                if (record := self._one(line)) is not None:
                    self._records.append(record)

    def tables(self) -> tuple[Columns, Columns, Columns]:
        """(reviews, review_media, product_snapshots) as columns of Python values; their nulls
        counted in ``tally``. Integers are as sent: ``tables.TableFile`` nulls (and counts)
        those their column cannot hold."""
        records = self._records
        items = [r.item or _NO_ITEM for r in records]
        reviews = [i.review or _NO_REVIEW for i in items]
        times = [self._time(r.fetched_at) for r in records]
        ids = _ids([r.review_id for r in records])
        columns: Columns = {
            "product_id": _ids([r.product_id for r in records]),
            "region": [r.region for r in records],
            "review_id": ids,
            "rating": [r.rating for r in reviews],
            "text": [r.display_text if r.display_text is not None else _body(r) for r in reviews],
            "title": [r.main_review_title for r in reviews],
            "review_time": self._millis([r.review_timestamp for r in reviews]),
            "sku_id": _ids([i.sku_id for i in items]),
            "sku_specification": [i.sku_specification for i in items],
            "likes": [i.digg_count for i in items],
            "is_anonymous": [i.is_anonymous for i in items],
            "review_source_name": [i.review_source_name for i in items],
            "country": [r.review_country for r in reviews],
            "image_count": [None if r.images is None else len(r.images) for r in reviews],
            "has_media": [
                None if r.media is None and r.images is None else bool(r.media or r.images)
                for r in reviews
            ],
            "is_updated": [i.is_updated for i in items],
            "harvested_at": times,
            "shard": [self.shard] * len(records),
        }
        if self.reviewer:
            users = [getattr(i, "review_user", None) or _NO_USER for i in items]
            columns["reviewer_name"] = [u.name for u in users]
            columns["reviewer_user_id"] = _ids([u.user_id for u in users])
            columns["reviewer_avatar"] = [
                _first(u.avatar.url_list) if u.avatar is not None else None for u in users
            ]
        media = _media(ids, reviews)
        snapshots = _snapshots(records, times)
        self.tally.count_nulls("reviews", columns)
        self.tally.count_nulls("review_media", media)
        self.tally.count_nulls("product_snapshots", snapshots)
        return columns, media, snapshots

    def _one(self, line: bytes) -> _Record | None:
        if not line.strip():
            return None
        try:
            return self._decoder.decode(line)
        except msgspec.ValidationError:
            return self._mended(line)
        except msgspec.DecodeError:
            self.tally.unreadable_lines += 1
            return None

    def _mended(self, line: bytes) -> _Record | None:
        """The line with each field of another type than the table's made null, counted."""
        try:
            doc = _any.decode(line)
        except msgspec.DecodeError:
            self.tally.unreadable_lines += 1
            return None
        for _ in range(_REPAIRS):
            try:  # encoded again: the structs' raw fields are read from JSON only
                record: _Record = self._decoder.decode(_encode(doc))
                return record
            except msgspec.ValidationError as exc:
                found = _AT.search(str(exc))
                if found is None or not _null_at(doc, found["path"]):
                    break  # the whole line is not an object: not a record
                self.tally.wrong_type[_field_name(found["path"])] += 1
        self.tally.unreadable_lines += 1
        return None

    def _millis(self, values: list[str | int | None]) -> list[int | None]:
        """``review_timestamp`` (milliseconds since the epoch, a string of digits) as numbers."""
        out: list[int | None] = []
        for value in values:
            millis = int(value) if isinstance(value, str) and value.isdigit() else value
            if isinstance(millis, int) and 0 <= millis <= _MS_MAX:
                out.append(millis)
            else:
                if millis is not None:
                    self.tally.wrong_type["item.review.review_timestamp"] += 1
                out.append(None)
        return out

    def _time(self, text: str | None) -> int | None:
        """``fetched_at`` (ISO 8601, UTC) as milliseconds; a page's lines share it: parsed once."""
        try:
            return self._times[text]
        except KeyError:
            pass
        try:
            moment = datetime.fromisoformat(text)  # type: ignore[arg-type] # None is cached
        except (ValueError, TypeError):
            self.tally.wrong_type["fetched_at"] += 1
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the writer writes UTC, with a Z
        if len(self._times) > 4096:  # a batch's pages, at most; a shard's could be many more
            self._times = {None: None}
        self._times[text] = millis = (moment - _EPOCH) // _MS
        return millis


_without_user = msgspec.json.Decoder(_Record)
_any, _encode = msgspec.json.Decoder(), msgspec.json.Encoder().encode
_with_user = msgspec.json.Decoder(_RecordWithUser)


def _media(ids: list[str | None], reviews: list[_Review]) -> Columns:
    review_id: list[str | None] = []
    position: list[int] = []
    kind: list[str | None] = []
    url: list[str | None] = []
    width: list[int | None] = []
    height: list[int | None] = []
    for one_id, review in zip(ids, reviews, strict=True):
        if not review.media:
            continue
        for at, one in enumerate(review.media):
            if one is None:
                continue
            what = KINDS.get(one.media_type) if one.media_type is not None else None
            picture = (one.video if what == "video" else one.image) or _NO_PICTURE
            review_id.append(one_id)
            position.append(at)
            kind.append(what)
            url.append(_first(picture.url_list))
            width.append(picture.width)
            height.append(picture.height)
    return {
        "review_id": review_id,
        "position": position,
        "kind": kind,
        "url": url,
        "width": width,
        "height": height,
    }


def _snapshots(records: list[_Record], times: list[int | None]) -> Columns:
    columns: Columns = {name: [] for name in SNAPSHOT_COLUMNS}
    for record, harvested in zip(records, times, strict=True):
        if record.product is None:
            continue
        columns["product_id"].append(_ids([record.product_id])[0])
        columns["region"].append(record.region)
        columns["review_count"].append(record.product.review_count)
        columns["product_rating"].append(record.product.product_rating)
        columns["harvested_at"].append(harvested)
    return columns


def _ids(values: list[str | int | None]) -> list[str | None]:
    """Ids, always strings: some tools read ids of 19 digits as floats."""
    return [v if v is None or isinstance(v, str) else str(v) for v in values]


def _first(urls: list[str | None] | None) -> str | None:
    return urls[0] if urls else None


def _body(review: _Review) -> str | None:
    """The text from ``display_review_text`` when ``display_text`` is missing."""
    if not review.display_review_text:
        return None
    try:
        parts = _texts.decode(review.display_review_text)
    except msgspec.DecodeError:
        return None
    texts = [p.plain_text for p in parts or () if p is not None and p.plain_text is not None]
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
