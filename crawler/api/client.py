"""One HTTP session per run: a page request in, a parsed page or a classified error out.

Whatever the server sends is one of the two: bodies are read up to ``api.max_body_bytes``
(counted after decompression) and no further, every way of failing to decode is a
``ServerError``, and what the server says (a ``message``, a ``Location``) reaches an error's words
only through the run's ``Redactor``, so the API key it may echo is never shown.
"""

from __future__ import annotations

import email.utils
import http
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import aiohttp

from crawler.api.endpoint import (
    UNREADABLE,
    Cursor,
    CursorEndpoint,
    Fields,
    Page,
    server_message,
    unreadable,
)
from crawler.api.inflate import Inflater
from crawler.api.redact import Redactor
from crawler.config import MAX_BODY_BYTES
from crawler.errors import (
    ApiError,
    AuthError,
    CreditsExhausted,
    RateLimited,
    ServerError,
    TargetError,
    WrongEndpoint,
)


class ApiClient:
    """Sends page requests with the key in a header; errors carry status and a message, no headers.

    Use as ``async with ApiClient(...) as client``: the session lives exactly as long as the block.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int,
        timeout_seconds: float,
        max_body_bytes: int = MAX_BODY_BYTES,
        redactor: Redactor | None = None,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``observe(endpoint, outcome, seconds)`` hears of every answer (the run's metrics)."""
        self._base_url = base_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            # only what ``Inflater`` inflates within the cap: aiohttp would inflate whole chunks
            "Accept-Encoding": "gzip, deflate",
        }
        # the key is always among the secrets blotted out of what the server says
        self._redact = redactor if redactor is not None else Redactor([api_key])
        self._max_body = max_body_bytes
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._observe = observe

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            trust_env=False,
            raise_for_status=False,
            # aiohttp inflates each chunk whole as it arrives, before we read it: 64 KB of a gzip
            # bomb is 64 MB held at once, more on a loaded machine; we inflate within the cap
            auto_decompress=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"ApiClient({self._base_url!r})"  # never the headers: they hold the key

    async def fetch(self, endpoint: CursorEndpoint, target: Fields, cursor: Cursor) -> Page:
        """One request. Raises a RetryableError, TargetError or RunStopped subclass on failure."""
        if self._observe is None:
            return await self._fetch(endpoint, target, cursor)
        started = time.monotonic()
        try:
            page = await self._fetch(endpoint, target, cursor)
        except ApiError as exc:
            self._observe(endpoint.name, outcome(exc), time.monotonic() - started)
            raise
        self._observe(endpoint.name, "ok", time.monotonic() - started)
        return page

    async def _fetch(self, endpoint: CursorEndpoint, target: Fields, cursor: Cursor) -> Page:
        if self._session is None:
            raise RuntimeError("ApiClient used outside 'async with'")
        url = self._base_url + endpoint.path
        params = endpoint.params(target, cursor)
        try:
            async with self._session.get(
                url, params=params, headers=self._headers, allow_redirects=False
            ) as response:
                status = response.status
                headers = response.headers
                body = await self._read(response)
        except TimeoutError:
            raise ServerError("timed out") from None
        except aiohttp.ClientError as exc:
            # the exception's repr may carry request headers; keep only its class name
            raise ServerError(f"network fault ({type(exc).__name__})") from None
        if status == 200:
            if body is None:
                raise ServerError(
                    f"body over api.max_body_bytes ({self._max_body:,} bytes): not read further",
                    status=200,
                )
            return self._page(endpoint, body, cursor)
        # an error's status says what to do; a body too large to read only loses its message
        raise _error(
            status,
            body or b"",
            headers.get("Retry-After"),
            headers.get("Location"),
            url,
            self._redact,
        )

    async def _read(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The body, decompressed; None once it passes the cap (the connection is dropped
        rather than drained: a body that large is not worth its bytes)."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        inflater = Inflater(encoding, self._max_body)
        chunks: list[bytes] = []
        size = 0
        async for raw in response.content.iter_any():
            chunk = inflater.feed(raw)
            size += len(chunk)
            if size > self._max_body or inflater.over:
                response.close()
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _page(self, endpoint: CursorEndpoint, body: bytes, cursor: Cursor) -> Page:
        try:
            page = endpoint.decode(body, self._redact, cursor)
        except UNREADABLE as exc:  # a decoder's own slip is still one bad answer, not a crash
            raise ServerError(unreadable(exc), status=200) from None
        after = page.next_cursor
        if isinstance(after, str) and self._redact.finds(after):
            # it would be saved with the page and told when the walk gets stuck
            raise ServerError("next_cursor holds the API key: refused", status=200)
        return page


def outcome(exc: ApiError) -> str:
    """A failed request's outcome, as the metrics name it: what the caller does next."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, ServerError):
        return "network_error" if exc.status is None else "server_error"
    for kind, name in _OUTCOMES:
        if isinstance(exc, kind):
            return name
    return "error"


_OUTCOMES = (
    (TargetError, "bad_request"),
    (AuthError, "refused"),
    (CreditsExhausted, "credits_exhausted"),
    (WrongEndpoint, "wrong_endpoint"),
)


def _error(  # noqa: PLR0917 -- the parts of one answer, each passed in once
    status: int,
    body: bytes,
    retry_after: str | None,
    location: str | None,
    url: str,
    redact: Redactor,
) -> ApiError:
    """The error for a non-200 answer, by what the caller does next."""
    said = server_message(body)
    shown = redact(said) if said else ""
    message = f": {shown}" if shown else ""
    if status == 429:
        return RateLimited(f"429 rate limited{message}", retry_after=parse_retry_after(retry_after))
    if status in (401, 403):
        what = "missing or invalid API key" if status == 401 else "key not allowed on this endpoint"
        return AuthError(f"{status} {what}{message}", status=status)
    if status == 402:
        return CreditsExhausted(f"402 credits exhausted{message}", status=status)
    if status == 400:
        return TargetError(f"400 invalid parameters{message}", status=status)
    if status == 408 or status >= 500:
        return ServerError(
            f"{status} server error{message}",
            status=status,
            retry_after=parse_retry_after(retry_after),
        )
    # a status this API never gives: every target would get it, so the run stops (the URL has
    # no secret in it: the key rides in a header, and the query is left out anyway)
    # where a redirect points, without its query: the path is what tells a wrong base_url
    moved = (
        f", redirecting to {redact(location.partition('?')[0])}"
        if location and 300 <= status < 400
        else ""
    )
    return WrongEndpoint(
        f"{status} {_reason(status)} from GET {url}{moved}: not an answer of the reviews API; "
        "check api.base_url",
        status=status,
    )


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "unknown status"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
