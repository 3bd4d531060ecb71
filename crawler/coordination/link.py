"""The connection to Redis, and what a worker does while Redis cannot be reached: wait, then stop.

Every call of the coordinated mode goes through ``Link.call``. While Redis is unreachable the
calls wait and try again (so no request is sent: the rate gate and the credit ledger are there),
the worker says so once, and once Redis answers again it says that too; after
``unavailable_seconds`` it gives up with ``CoordinationError``. Every script is idempotent, so a
call whose answer was lost is simply sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from crawler import logs
from crawler.config import masked_url
from crawler.errors import CoordinationError

log = logs.get_logger("crawler.coordination")
_T = TypeVar("_T")
# errors this soon after Redis answered again are the same outage's tail (pooled connections to
# the old server, a restart still loading its append-only file): not said again
_FLAP_SECONDS = 5.0


class Link:
    """One ``redis.asyncio`` client and its registered scripts."""

    def __init__(self, url: str, *, unavailable_seconds: float) -> None:
        import redis.asyncio  # noqa: PLC0415 -- only a coordinated job needs the client

        self.url = str(masked_url(url))
        self.redis: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, decode_responses=True
        )
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            OSError,
        )
        # answers that waiting does not mend: said at once, with what to fix
        self._refusals: tuple[type[BaseException], ...] = (
            redis.exceptions.AuthenticationError,
            redis.exceptions.AuthorizationError,
            redis.exceptions.ResponseError,
        )
        self._unavailable = unavailable_seconds
        self._down_since: float | None = None
        self._back_at = float("-inf")  # when Redis last answered again after an outage
        self._said = False  # whether this outage was announced (so its end is too)
        self._scripts: dict[str, Any] = {}

    def script(self, source: str) -> Callable[..., Awaitable[Any]]:
        """A script registered once; called as ``await f(keys=[...], args=[...])``."""
        if source not in self._scripts:
            self._scripts[source] = self.redis.register_script(source)
        registered = self._scripts[source]

        async def run(*, keys: list[str], args: list[Any]) -> Any:
            return await self.call(lambda: registered(keys=keys, args=args))

        return run

    async def call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``command``, again and again while Redis is unreachable, up to the deadline."""
        delay = 0.05
        while True:
            try:
                result = await command()
            except self._refusals as exc:
                raise refused(exc, self.url) from None
            except self._errors as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a cancellation turned into an error
                    raise asyncio.CancelledError from None
                self._went_down(exc)
                assert self._down_since is not None  # noqa: S101 -- set just above
                if time.monotonic() - self._down_since > self._unavailable:
                    raise CoordinationError(
                        f"Redis at {self.url} unreachable for more than "
                        f"coordination.unavailable_seconds ({self._unavailable:g} s); nothing "
                        "is lost: start the worker again once Redis is back"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            if self._down_since is not None:
                if self._said:
                    log.warning(
                        "Redis is back",
                        redis=self.url,
                        seconds=round(time.monotonic() - self._down_since, 1),
                    )
                self._down_since = None
                self._back_at = time.monotonic()
            return result

    def settled(self, seconds: float) -> bool:
        """No outage ended in the last ``seconds``. After one, the other workers' heartbeats
        and leases look stale only because Redis was gone for them too: give them a lease's
        time to renew before taking anything of theirs over."""
        return time.monotonic() - self._back_at > seconds

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._said = False
        if not self._said and (
            now - self._back_at > _FLAP_SECONDS or now - self._down_since > _FLAP_SECONDS
        ):
            self._said = True
            log.warning(
                "Redis unreachable: no request is sent until it answers again",
                redis=self.url,
                error=type(exc).__name__,
                give_up_after_seconds=self._unavailable,
            )

    async def close(self) -> None:
        await self.redis.aclose()


def refused(exc: BaseException, url: str) -> CoordinationError:
    """What a Redis error that waiting does not mend means, and what to fix."""
    import redis.exceptions as errors  # noqa: PLC0415 -- only a coordinated job needs the client

    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, errors.AuthenticationError | errors.AuthenticationWrongNumberOfArgsError):
        fix = "it refused the password (or user): fix it in coordination.redis_url or --redis"
    elif isinstance(exc, errors.NoPermissionError | errors.AuthorizationError):
        fix = (
            "its user may not run what a worker needs: grant it the key pattern crawler:* and "
            "the commands +@read +@write +@scripting +info +config|get +time"
        )
    elif isinstance(exc, errors.ReadOnlyError):
        fix = "it is a read-only replica: point coordination.redis_url at the primary"
    elif isinstance(exc, errors.OutOfMemoryError):
        fix = "it is out of memory (maxmemory): raise maxmemory, or free memory; nothing is lost"
    else:
        fix = "it refused a command"
    return CoordinationError(
        f"Redis at {url}: {fix} ({text}); start the worker again once that is fixed"
    )


def unreachable(exc: BaseException, url: str) -> CoordinationError:
    """Redis cannot be reached now, for a command that does not wait for it (status)."""
    import redis.exceptions as errors  # noqa: PLC0415 -- only a coordinated job needs the client

    if isinstance(exc, errors.AuthenticationError | errors.AuthorizationError):
        return refused(exc, url)
    if isinstance(exc, errors.ResponseError):
        return refused(exc, url)
    return CoordinationError(
        f"Redis at {url} unreachable ({type(exc).__name__}): the job's state is there; "
        "start Redis (or fix --redis / coordination.redis_url) and ask again"
    )
