"""The sandbox in a process of its own, so tests whose timing matters keep their loop to themselves.

``serve_in_process(options)`` starts ``python -m crawler sandbox --port 0`` with the options as
flags, and talks to it only over HTTP: the test's event loop never runs the server's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any

import aiohttp

from crawler.sandbox.app import SandboxOptions, key_fingerprint

_LISTENING = re.compile(rb"sandbox listening on (http://\S+)")
_STOP_SECONDS = 5.0  # from SIGTERM to SIGKILL


def _joined(values: Iterable[str], what: str) -> str:
    items = sorted(values)
    if not items or any("," in v or not v for v in items):
        raise ValueError(f"{what}: no `crawler sandbox` flag can carry {items!r}")
    return ",".join(items)


def _optional(flag: str) -> Callable[[Any], list[str]]:
    return lambda value: [] if value is None else [f"{flag}={value}"]


def _switch(flag: str) -> Callable[[Any], list[str]]:
    return lambda value: [flag] if value else []


def _ms(seconds: float) -> str:
    return repr(seconds * 1000)


# one entry per SandboxOptions field: cli_flags refuses options that have no entry
_FLAGS: dict[str, Callable[[Any], list[str]]] = {
    "page_size": _optional("--page-size"),
    "keys": lambda v: [] if v is None else [f"--keys={_joined(v, 'keys')}"],
    "forbidden_keys": lambda v: [f"--forbidden-keys={_joined(v, 'forbidden_keys')}"] if v else [],
    "credits": _optional("--credits"),
    "charge_failures": _switch("--charge-failures"),
    "rate": _optional("--rate"),
    "burst": _optional("--burst"),
    "fault_rate": _optional("--fault-rate"),
    "faults": lambda v: [f"--faults={','.join(v)}"],
    "slow_seconds": _optional("--slow-seconds"),
    "latency": lambda v: [f"--latency-ms={_ms(v[0])}-{_ms(v[1])}"],
    "seed": _optional("--seed"),
    "endless": lambda v: [f"--endless={_joined(v, 'endless')}"] if v else [],
    "stuck": lambda v: [f"--stuck={_joined(v, 'stuck')}"] if v else [],
    "cycling": lambda v: [f"--cycling={_joined(v, 'cycling')}"] if v else [],
    "generation": _optional("--generation"),
    "shrink": _switch("--shrink"),
    "throttle_after": _optional("--throttle-after"),
    "throttle_seconds": _optional("--throttle-seconds"),
    "retry_after": _optional("--retry-after"),
    "answer_status": _optional("--answer-status"),
    "maintenance_seconds": _optional("--maintenance-seconds"),
    "feed_cap": _optional("--feed-cap"),
}


def cli_flags(options: SandboxOptions) -> list[str]:
    """The ``crawler sandbox`` flags that give these options; ValueError if some cannot."""
    problem = options.problem()
    if problem:
        raise ValueError(problem)
    names = [f.name for f in fields(SandboxOptions)]
    missing = set(names) - _FLAGS.keys()
    if missing:
        raise ValueError(f"no `crawler sandbox` flag for {sorted(missing)}")
    return [flag for name in names for flag in _FLAGS[name](getattr(options, name))]


class SandboxProcess:
    """A sandbox running in another process, and its inspection endpoints as coroutines."""

    def __init__(
        self, base_url: str, process: asyncio.subprocess.Process, session: aiohttp.ClientSession
    ) -> None:
        self.base_url = base_url
        self.process = process
        self._session = session

    async def _get(self, path: str, **params: str) -> Any:
        async with self._session.get(self.base_url + path, params=params) as response:
            response.raise_for_status()
            return await response.json()

    async def ledger(self) -> dict[str, dict[str, Any]]:
        """Each key's book, by fingerprint: charged, requests, statuses, throttle counters."""
        books: dict[str, dict[str, Any]] = (await self._get("/_sandbox/ledger"))["keys"]
        return books

    async def book(self, key: str) -> dict[str, Any] | None:
        """The ledger of one key, None if it has sent nothing."""
        return (await self.ledger()).get(key_fingerprint(key))

    async def ids(self, product_id: str, region: str) -> list[str]:
        doc = await self._get("/_sandbox/ids", product_id=product_id, region=region)
        ids: list[str] = doc["ids"]
        return ids

    async def changes(self, product_id: str, region: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._get(
            "/_sandbox/changes", product_id=product_id, region=region
        )
        return doc

    async def grow(self, generations: int = 1) -> int:
        """Move the catalogue on; the generation it is at now."""
        url = self.base_url + "/_sandbox/grow"
        async with self._session.post(url, json={"generations": generations}) as response:
            response.raise_for_status()
            generation: int = (await response.json())["generation"]
            return generation


@asynccontextmanager
async def serve_in_process(
    options: SandboxOptions | None = None,
    *,
    host: str = "127.0.0.1",
    startup_seconds: float = 30.0,
) -> AsyncIterator[tuple[str, SandboxProcess]]:
    """Serve a sandbox from a child process; yields its base URL and a handle. On exit the child
    gets SIGTERM, then SIGKILL if it is still there after 5 seconds."""
    flags = cli_flags(options or SandboxOptions())
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "crawler", "--log-format", "json", "sandbox"),
        *(f"--host={host}", "--port=0", *flags),
        stdout=asyncio.subprocess.PIPE,
    )
    drain: asyncio.Task[None] | None = None
    try:
        base_url = await asyncio.wait_for(_listening(process), startup_seconds)
        drain = asyncio.create_task(_drain(process))
        async with aiohttp.ClientSession() as session:
            yield base_url, SandboxProcess(base_url, process, session)
    finally:
        await _stop(process)
        if drain is not None:
            await drain


async def _listening(process: asyncio.subprocess.Process) -> str:
    """The base URL from the child's 'sandbox listening on ...' line, the port it really bound."""
    assert process.stdout is not None  # noqa: S101 -- created with stdout=PIPE
    async for line in process.stdout:
        found = _LISTENING.search(line)
        if found:
            return found.group(1).decode()
    status = await process.wait()
    raise RuntimeError(f"the sandbox process exited with status {status} before listening")


async def _drain(process: asyncio.subprocess.Process) -> None:
    """Read the child's stdout to its end, so a chatty child never blocks on a full pipe."""
    assert process.stdout is not None  # noqa: S101 -- created with stdout=PIPE
    async for _ in process.stdout:
        pass


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have exited since the check
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), _STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
