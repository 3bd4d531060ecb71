"""An S3-compatible bucket as the job's output sees it: create-only puts, compare-and-swap, retries.

obstore (the ``s3`` extra) is imported here only, and this module only when ``output.dir`` is an
``s3://`` URL. The endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; an
instance or container role) and are never put in a message: errors name the bucket, the key and
the server's status, nothing else. Transient faults (5xx, timeouts, a dropped connection) are
tried again under the job's ``api.retry`` caps; a refusal (403, no such bucket, a full quota)
raises ``OutputError`` at once: the run stops (exit 7) and the state keeps what was committed.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from crawler.config import is_loopback
from crawler.errors import ConfigError, OutputError

if TYPE_CHECKING:  # the job file's checks parse a URL here, before retry.py can be imported
    from crawler.pacing.retry import RetryPolicy

T = TypeVar("T")

# a bucket's name as S3 allows it (3-63 of lowercase letters, digits, dots and hyphens)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_FROM_ENV = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_REGION": "region",
}
_RESUME = "the state is saved: run the same command again once the bucket takes writes"
# crawler verify and export only read: "takes writes" would send their users the wrong way
_RESUME_READ = "run the same command again once the bucket can be read (a run's state is saved)"


@dataclass(frozen=True)
class BucketUrl:
    """``s3://bucket/prefix``: where a job's manifest and shards go."""

    bucket: str
    prefix: str  # no leading or trailing '/'; may be empty

    @classmethod
    def parse(cls, url: str) -> BucketUrl:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ConfigError(
                f"{url!r}: {bucket!r} is not a bucket's name (3 to 63 lowercase letters, "
                "digits, '.' and '-'); write s3://BUCKET/PREFIX"
            )
        prefix = prefix.strip("/")
        if "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
            raise ConfigError(f"{url!r}: the prefix has an empty, '.' or '..' part")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class Bucket:
    """One client for the run; keys are relative to the job's prefix."""

    def __init__(self, url: BucketUrl, store: Any, policy: RetryPolicy) -> None:
        self.url = url
        self._store = store
        self._policy = policy
        self.requests = 0  # counted for the benchmark and the README's cost figures

    @classmethod
    def open(
        cls, url: BucketUrl, policy: RetryPolicy, environ: Mapping[str, str] | None = None
    ) -> Bucket:
        """A client from the environment, as the AWS tools read it."""
        from obstore.store import S3Store  # noqa: PLC0415 -- the s3 extra, only for a bucket

        env = os.environ if environ is None else environ
        if env.get("AWS_PROFILE") and not env.get("AWS_ACCESS_KEY_ID"):
            env = {**env, **_profile(url, env)}
        config: dict[str, Any] = {}
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint and not _secure_enough(endpoint):
            raise ConfigError(
                f"output.dir: {url}: AWS_ENDPOINT_URL {endpoint!r}: a host that is not this "
                "machine's is reached over https only (credentials and reviews cross the network)"
            )
        if endpoint:
            config["endpoint"] = endpoint
        for name, setting in _FROM_ENV.items():  # the given environment's, not the process's
            if env.get(name):
                config[setting] = env[name]
        if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"  # S3-compatible servers ignore it; AWS redirects
        options: dict[str, Any] = {"timeout": "60s"}
        if (endpoint or "").startswith("http://"):
            options["allow_http"] = True  # a local server; AWS itself is https only
        try:
            store = S3Store(
                url.bucket,
                prefix=url.prefix or None,
                config=config,  # type: ignore[arg-type]  # a TypedDict built key by key
                client_options=options,  # type: ignore[arg-type]  # same
                retry_config={"max_retries": 0},  # ours, under the job's caps, below
            )
        except Exception as exc:  # obstore's configuration errors: no secret in them, but cut
            raise ConfigError(
                f"output.dir: {url}: cannot set up the S3 client: {_short(exc)}"
            ) from None
        return cls(url, store, policy)

    async def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` (If-None-Match: *); False when it exists already (412)."""
        import obstore  # noqa: PLC0415

        async def put() -> bool:
            try:
                await obstore.put_async(self._store, key, data, mode="create")
            except obstore.exceptions.AlreadyExistsError:
                return False
            return True

        return await self._call(put, "write", key)

    async def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Replace ``key`` if it is still at ``etag`` (If-Match), or create it when ``etag`` is
        None; its new ETag, or None when another writer got there first."""
        import obstore  # noqa: PLC0415

        async def put() -> str | None:
            mode: Any = "create" if etag is None else {"e_tag": etag}
            try:
                done = await obstore.put_async(self._store, key, data, mode=mode)
            except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
                return None
            return done["e_tag"] or ""

        return await self._call(put, "write", key)

    async def put_file(self, key: str, path: Path) -> None:
        """A local file put whole under ``key`` (replacing one there), in parts when large: it
        appears once complete, never in part."""
        import obstore  # noqa: PLC0415

        async def put() -> None:
            await obstore.put_async(self._store, key, path)

        await self._call(put, "write", key)

    async def get(self, key: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and ETag; None when there is none."""
        import obstore  # noqa: PLC0415

        async def get() -> tuple[bytes, str | None] | None:
            try:
                got = await obstore.get_async(self._store, key)
                return bytes(await got.bytes_async()), got.meta["e_tag"]
            except FileNotFoundError:  # obstore's NotFoundError is one
                return None

        return await self._call(get, "read", key)

    async def size(self, key: str) -> int | None:
        import obstore  # noqa: PLC0415

        async def head() -> int | None:
            try:
                return int((await obstore.head_async(self._store, key))["size"])
            except FileNotFoundError:
                return None

        return await self._call(head, "read", key)

    async def list(self, prefix: str) -> list[tuple[str, int]]:
        """Every key under ``prefix`` with its size, in key order."""
        import obstore  # noqa: PLC0415

        async def listed() -> list[tuple[str, int]]:
            found = await obstore.list(self._store, prefix).collect_async()
            return sorted((meta["path"], int(meta["size"])) for meta in found)

        return await self._call(listed, "list", prefix)

    async def delete(self, *keys: str) -> None:
        """Delete ``keys``: one DeleteObjects request per thousand on S3; a key already gone
        is no error."""
        import obstore  # noqa: PLC0415

        async def delete() -> None:
            try:
                await obstore.delete_async(self._store, list(keys))
            except FileNotFoundError:
                return

        if keys:
            await self._call(delete, "delete", keys[0])

    async def _call(self, op: Callable[[], Awaitable[T]], verb: str, key: str) -> T:
        """``op`` tried again on transient faults, within the retry caps; a refusal, or faults
        past the caps, as an ``OutputError`` naming the object."""
        tries = self._policy.start(time.monotonic())
        while True:
            self.requests += 1
            try:
                return await op()
            except Exception as exc:
                if not _transient(exc):
                    raise OutputError(self._refused(verb, key, exc)) from None
                delay = tries.next_delay(time.monotonic())
                if delay is None:
                    raise OutputError(
                        f"{self.url.key(key)} in s3://{self.url.bucket}: cannot {verb} after "
                        f"{tries.attempts} tries ({_short(exc)}); {_resume(verb)}"
                    ) from None
                await asyncio.sleep(delay)

    def _refused(self, verb: str, key: str, exc: Exception) -> str:
        where = f"s3://{self.url.bucket}/{self.url.key(key)}"
        status, code = _status(exc)
        text = str(exc)
        if code == "NoSuchBucket" or ("NoSuchBucket" in text):
            why = f"bucket {self.url.bucket!r} does not exist: create it, or fix output.dir"
        elif status == 403 or type(exc).__name__ in ("PermissionDeniedError",):
            why = (
                "access denied (403): give these credentials s3:PutObject, s3:GetObject, "
                "s3:ListBucket and s3:DeleteObject on it, check the quota, or check that the "
                "bucket exists (some S3-compatible servers answer 403 for a missing one)"
            )
        elif type(exc).__name__ == "UnauthenticatedError" or status == 401:
            why = "the credentials were refused: check AWS_ACCESS_KEY_ID and its secret"
        elif code in ("QuotaExceeded", "EntityTooLarge") or status == 507:
            why = f"the bucket is full ({code or status}): free space or raise the quota"
        else:
            why = f"refused ({_short(exc)})"
        return f"{where}: cannot {verb}: {why}; {_resume(verb)}"


def _resume(verb: str) -> str:
    return _RESUME_READ if verb in ("read", "list") else _RESUME


def _status(exc: Exception) -> tuple[int | None, str | None]:
    text = str(exc)
    status = _STATUS.search(text)
    code = _CODE.search(text)
    return (int(status[1]) if status else None), (code[1] if code else None)


def _transient(exc: Exception) -> bool:
    """5xx, timeouts and dropped connections are tried again; a 4xx is the bucket's answer."""
    name = type(exc).__name__
    if name in (
        "PermissionDeniedError",
        "UnauthenticatedError",
        "NotSupportedError",
        "InvalidPathError",
        "UnknownConfigurationKeyError",
        "NotFoundError",
    ) or isinstance(exc, FileNotFoundError | ConfigError):
        return False
    status, code = _status(exc)
    if code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
        return True
    return status is None or status >= 500 or status in (408, 429)


def _short(exc: Exception) -> str:
    """An obstore message, cut to its first line: it names the URL, never the credentials."""
    status, code = _status(exc)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = re.sub(r"\s*:\s*<\?xml.*", "", first)
    said = f"{status} {code}" if status and code else first
    if len(said) <= 200:
        return said
    # cut at a word, marked: "non-2xx sta" read as the whole of what the server said
    return said[:200].rsplit(" ", 1)[0] + " ..."


def _secure_enough(endpoint: str) -> bool:
    """https anywhere; plain http only to a loopback address (a local test server)."""
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback(parts.hostname or "")


def _profile(url: BucketUrl, env: Mapping[str, str]) -> dict[str, str]:
    """A named profile's static keys and region, as the AWS tools keep them in
    ``~/.aws/credentials`` and ``~/.aws/config`` (or the files AWS_SHARED_CREDENTIALS_FILE and
    AWS_CONFIG_FILE name). Profiles that sign in another way (SSO, an assumed role, a process)
    are exported to variables first: the AWS CLI does that, and it is not done twice here."""
    name = env["AWS_PROFILE"]
    home = Path(env.get("HOME") or Path.home())
    files = (
        (Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws/credentials"), name),
        (Path(env.get("AWS_CONFIG_FILE") or home / ".aws/config"),
         name if name == "default" else f"profile {name}"),
    )  # fmt: skip
    found: dict[str, str] = {}
    for path, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it: {type(exc).__name__}") from None
        if parser.has_section(section):
            for key, variable in _PROFILE_KEYS.items():
                if parser.get(section, key, fallback="") and variable not in found:
                    found[variable] = parser.get(section, key)
    if "AWS_ACCESS_KEY_ID" not in found or "AWS_SECRET_ACCESS_KEY" not in found:
        raise ConfigError(
            f"output.dir: {url}: AWS_PROFILE {name!r} has no access keys in "
            f"{files[0][0]} or {files[1][0]}; for a profile that signs in another way, export "
            'its credentials first: eval "$(aws configure export-credentials --profile '
            f'{name} --format env)"'
        )
    if env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        found.pop("AWS_REGION", None)  # the environment's region comes first, as for the CLI
    return found


_PROFILE_KEYS = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region": "AWS_REGION",
}
