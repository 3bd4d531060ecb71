"""A cursor endpoint described as data: path, parameters, and how an answer decodes into a page.

Of a page, the crawler needs three values (has_more, the next cursor, each item's id) and each
item's bytes. Only those are decoded into Python objects; items stay the bytes the API sent
(``msgspec.Raw``), so they are written as they came, never parsed and encoded again. Another
cursor endpoint of the same API is one more ``CursorEndpoint``, not a copy of the walker.

Whatever bytes come, ``decode`` returns a page or raises ``ServerError``: JSON nested too deep,
bytes that are not UTF-8 where the crawler reads a value (an id, the cursor), numbers too large
to keep, each is a bad answer like a truncated one. Bytes that are not UTF-8 inside the rest of an
item are replaced with U+FFFD, so every record line is valid UTF-8 JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import orjson

from crawler.api.redact import NOTHING, Redactor
from crawler.errors import ServerError

Cursor = int | str

# every way decoding bytes can fail: msgspec's errors, RecursionError (nesting deeper than the
# stack), ValueError (UnicodeDecodeError and orjson's errors among them), TypeError, OverflowError
UNREADABLE = (msgspec.MsgspecError, RecursionError, ValueError, TypeError, OverflowError)

# what the state can keep of a number: SQLite's integers are signed 64-bit
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
MAX_CURSOR = 4096  # characters; a cursor is sent back in a URL and saved with every page


@dataclass(frozen=True, slots=True)
class Page:
    """One decoded answer: its items as sent, their ids, where to go next, the total."""

    items: list[bytes | msgspec.Raw]  # each item's JSON as sent, on one line
    ids: list[str | None]  # each item's id; None when it has none
    next_cursor: Cursor | None
    has_more: bool
    total: int | None
    # ``product_rating`` as sent (JSON, one line), kept for the export's product snapshots
    rating: bytes | msgspec.Raw | None = None


class Decode(Protocol):
    """An answer's bytes (asked for at ``cursor``) -> Page; ServerError for anything else, its
    words passed through ``redact`` where they quote the server."""

    def __call__(self, body: bytes, redact: Redactor = ..., cursor: Cursor = ...) -> Page: ...


class Fields(Protocol):
    """What an endpoint's parameters are filled from: a review target, a source's target."""

    def value(self, name: str) -> str: ...


@dataclass(frozen=True, slots=True)
class CursorEndpoint:
    """A paged endpoint: ``templates`` (parameter -> ``"{field}"`` template) filled from the
    walked target, the cursor (or page number) in ``cursor_param``, ``fixed`` parameters as
    they are (a page size)."""

    name: str
    path: str
    cursor_param: str
    first_cursor: Cursor
    decode: Decode
    templates: tuple[tuple[str, str], ...] = (
        ("product_id", "{product_id}"),
        ("region", "{region}"),
    )
    fixed: tuple[tuple[str, str], ...] = ()
    credits_per_request: int = 2

    def params(self, target: Fields, cursor: Cursor) -> dict[str, str]:
        value = target.value
        params = {
            name: value(t[1:-1]) if _whole(t) else _filled(t, value) for name, t in self.templates
        }
        params.update(self.fixed)
        params[self.cursor_param] = str(cursor)
        return params


def _whole(template: str) -> bool:
    """A template that is one field and nothing else (most are): no formatting needed."""
    return template.startswith("{") and template.endswith("}") and template.count("{") == 1


def _filled(template: str, value: Any) -> str:
    import string  # noqa: PLC0415 -- only a template with text around its fields needs it

    out = []
    for text, field, _, _ in string.Formatter().parse(template):
        out.append(text)
        if field is not None:
            out.append(value(field))
    return "".join(out)


# -- the reviews endpoint: only the fields the crawler reads are declared; msgspec skips the rest


class _ReviewData(msgspec.Struct):
    review_items: list[msgspec.Raw]
    has_more: bool
    next_cursor: int | str | None = None
    review_count: int | None = None
    product_rating: msgspec.Raw = msgspec.Raw()  # empty: not sent


class _Envelope(msgspec.Struct):
    code: int
    data: _ReviewData | None = None


class _Status(msgspec.Struct):
    code: Any = None
    message: Any = None


class _ReviewId(msgspec.Struct):
    review_id: str | int


class _ItemId(msgspec.Struct):
    review: _ReviewId


_envelope = msgspec.json.Decoder(_Envelope)
_status = msgspec.json.Decoder(_Status)
_item_id = msgspec.json.Decoder(_ItemId)
_any = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()


def decode_reviews(body: bytes, redact: Redactor = NOTHING, cursor: Cursor = 0) -> Page:
    """A reviews answer -> Page; anything that does not fit the contract is a server fault."""
    try:
        return _decode(body, redact)
    except ServerError:
        raise
    except UNREADABLE as exc:
        raise ServerError(unreadable(exc), status=200) from None


def unreadable(exc: BaseException) -> str:
    """Why bytes did not decode, in words that quote none of them."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deep"
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    if isinstance(exc, msgspec.DecodeError | orjson.JSONDecodeError):
        return "truncated or non-JSON body"
    return f"answer could not be decoded ({type(exc).__name__})"


def _decode(body: bytes, redact: Redactor) -> Page:
    try:
        doc = _envelope.decode(body)
    except UnicodeDecodeError:  # the one string of the envelope decoded: the rest is skipped
        raise ServerError("next_cursor is not valid UTF-8", status=200) from None
    except msgspec.DecodeError:
        raise ServerError(_unfit(body, redact), status=200) from None
    data = doc.data
    if doc.code != 0 or data is None:
        raise ServerError(_unfit(body, redact), status=200)
    cursor = data.next_cursor
    if data.has_more and cursor is None:
        raise ServerError("answer says has_more but gives no next cursor", status=200)
    if isinstance(cursor, int) and not _INT_MIN <= cursor <= _INT_MAX:
        raise ServerError("next_cursor is a number too large to keep", status=200)
    if isinstance(cursor, str) and len(cursor) > MAX_CURSOR:
        raise ServerError(f"next_cursor is over {MAX_CURSOR:,} characters long", status=200)
    count = data.review_count
    if count is not None and not 0 <= count <= _INT_MAX:
        count = None  # not a count: unknown, as if not sent
    raws = data.review_items
    ids = [_id_of(raw) for raw in raws]  # before any repair: an id is read as sent, or refused
    rating: bytes | msgspec.Raw | None = None
    if data.product_rating:
        rating = as_lines(body, [data.product_rating])[0]
    return Page(as_lines(body, raws), ids, cursor, data.has_more, count, rating)


def as_lines(body: bytes, raws: list[msgspec.Raw]) -> list[bytes | msgspec.Raw]:
    """A page's items as record lines take them: as sent, unless the page needs a repair."""
    # a line break inside an item would split its record line: re-encode such items compactly
    # (only an API that pretty-prints sends any; one look at the whole body rules it out)
    spread = b"\n" in body or b"\r" in body
    items: list[bytes | msgspec.Raw] = [*raws]
    if not _is_utf8(body):  # never on a well-formed answer: JSON is UTF-8 (RFC 8259)
        items = [_repaired(item) for item in items]
    if spread:
        items = [_one_line(item) for item in items]
    return items


def _is_utf8(body: bytes) -> bool:
    if body.isascii():  # most answers, at a fraction of the cost of decoding
        return True
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


def _repaired(item: bytes | msgspec.Raw) -> bytes | msgspec.Raw:
    """The item with bytes that are not UTF-8 replaced with U+FFFD. They can only be inside
    strings (outside, the page would not have decoded), so the item stays the same JSON."""
    data = bytes(item)
    try:
        data.decode()
    except UnicodeDecodeError:
        return data.decode(errors="replace").encode()
    return item


# how the API writes an item: the review first, its id first. Read there, the id costs a look at
# 60 bytes; decoding the item for it (msgspec skipping 6 KB of fields) cost 7 µs a review
_PREFIX = b'{"review":{"review_id":"'
_ID_END = len(_PREFIX) + 24  # the id's 19 to 20 digits and its closing quote fit in here


def _id_of(raw: msgspec.Raw) -> str | None:
    head = bytes(memoryview(raw)[:_ID_END])
    if head.startswith(_PREFIX):
        # the item is valid JSON (its page decoded), so after the opening quote comes the
        # string's end; an id of plain digits is the id, anything else goes the careful way
        end = head.find(b'"', len(_PREFIX))
        found = head[len(_PREFIX) : end]
        if end > 0 and found.isdigit():
            return found.decode()
    try:
        value = _item_id.decode(raw).review.review_id
    except msgspec.DecodeError:  # no id, or not a string or a number: the writer skips it
        return None
    except UnicodeDecodeError:  # an id changed by a repair could be another review's
        raise ServerError("a review id is not valid UTF-8", status=200) from None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    return value or None


def _one_line(raw: bytes | msgspec.Raw) -> bytes:
    data = bytes(raw)
    if b"\n" not in data and b"\r" not in data:
        return data
    # msgspec keeps integers wider than 64 bits exact, where other decoders make them floats
    return _encode.encode(_any.decode(data))


def _unfit(body: bytes, redact: Redactor, fields: str = "data, review_items, has_more") -> str:
    """Why an answer with status 200 is not a page, for the retry log."""
    status = _envelope_status(body)
    if status is None:
        return "truncated or non-JSON body"
    if status.code != 0:
        return f"API code {redact(repr(status.code), 40)}: {redact(status.message or '')}"
    return f"answer does not fit the contract ({fields})"


unfit = _unfit


def server_message(body: bytes) -> object:
    """The ``message`` of any answer's envelope, None when it has none."""
    status = _envelope_status(body)
    return None if status is None else status.message


def _envelope_status(body: bytes) -> _Status | None:
    """The code and message of any answer, None when it is not a JSON object. Bytes that are
    not UTF-8 in them are replaced with U+FFFD: the message still says something."""
    try:
        return _status.decode(body)
    except UnicodeDecodeError:
        pass
    except UNREADABLE:
        return None
    try:
        return _status.decode(body.decode(errors="replace").encode())
    except UNREADABLE:
        return None


REVIEWS = CursorEndpoint(
    name="reviews",
    path="/v1/tiktok/product/reviews",
    cursor_param="offset",
    first_cursor=1,
    decode=decode_reviews,
)
MAX_ID = _INT_MAX
