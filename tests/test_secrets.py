"""The job's secrets, the API key and a Redis password, in no output: failures injected where
they are held (a server that puts the Authorization header it got into a broken status line,
header or body; a Redis that refuses the password; an exception logged in a frame holding
both), through the console renderer, JSON logs and --log-file; every byte of stdout, stderr,
the log files, run-report.json, state.db and the shards is searched."""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from crawler import load_job, logs
from tests.conftest import KEY, PRODUCTS, RedisServer, free_port, run_crawler, write_job

PASSWORD = "pw_Zq81xTT0kept"


def _answers(auth: bytes) -> list[bytes]:
    """Broken answers, each carrying what the client sent as its Authorization header."""
    said = b'{"code": 50000, "message": "' + auth + b'", "data": null}'
    return [
        b"HTTP/1.1 599 " + auth + b"\r\nContent-Length: 0\r\n\r\n",  # its reason phrase
        b"HTTP/1.1 200 OK\r\nX-Echo: " + auth + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 20\r\n\r\n"
        + (b"not gzip " + auth)[:20],
        b"HTTP/1.1 503 x\r\nRetry-After: "
        + auth
        + b"\r\nContent-Length: %d\r\n\r\n" % len(said)
        + said,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (len(said) + 5)
        + said,  # cut short
    ]


@asynccontextmanager
async def echoing_server() -> AsyncIterator[str]:
    turn = itertools.count()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            auth = b"".join(
                line.partition(b":")[2].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"authorization:")
            )
            answers = _answers(auth)
            writer.write(answers[next(turn) % len(answers)])
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _searched(outputs: list[bytes], *folders: Path) -> list[bytes]:
    for folder in folders:
        outputs += [p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()]
    return outputs


def _forms(secret: str) -> list[bytes]:
    return [secret.encode(), gzip.compress(secret.encode())[10:-8]]  # as is, and deflated


async def test_neither_secret_reaches_any_output(tmp_path: Path):
    targets = [{"product_id": p, "region": "US"} for p in PRODUCTS[:5]]
    api = {"retry": {"max_attempts": 2, "base_seconds": 0, "cap_seconds": 0}, "concurrency": 2}
    outputs: list[bytes] = []
    logged = tmp_path / "crawler.log"
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.folder.mkdir()
    redis.start("--requirepass", PASSWORD)
    try:
        async with echoing_server() as url:
            job = write_job(tmp_path, url, targets, api=api)
            for logging_args in (["--log-format", "console"], ["--log-file", str(logged)]):
                status, stdout, stderr = await run_crawler(
                    *logging_args, "run", "--fresh", "--no-progress", str(job)
                )
                assert status == 1, stderr.decode()  # each target failed, the run went on
                outputs += [stdout, stderr]
            shown = [["status", "--all"], ["status", "--csv"], ["status", "--json"]]
            for command in shown:
                status, stdout, stderr = await run_crawler(*command, str(job))
                outputs += [stdout, stderr]
            # a coordinated worker holds both: a refused password, then the right one
            folder = tmp_path / "coordinated"
            folder.mkdir()
            shared = write_job(folder, url, targets, api=api)
            base = f"127.0.0.1:{redis.port}/0"
            for password, logging_args in (
                ("not" + PASSWORD, ["--log-format", "console"]),
                ("not" + PASSWORD, ["--log-file", str(logged)]),
                (PASSWORD, ["--log-format", "console"]),
            ):
                redis_url = f"redis://:{password}@{base}"
                status, stdout, stderr = await run_crawler(
                    *logging_args, "run", "--no-progress", "--redis", redis_url, str(shared)
                )
                assert status == (8 if password != PASSWORD else 1), stderr.decode()
                outputs += [stdout, stderr]
            for command in shown:
                status, stdout, stderr = await run_crawler(
                    *command, "--redis", f"redis://:{PASSWORD}@{base}", str(shared)
                )
                assert status == 0, stderr.decode()
                outputs += [stdout, stderr]
    finally:
        redis.stop()
    assert b"refused the password" in b" ".join(outputs)
    for text in _searched(outputs, tmp_path / "out", folder / "out", logged.parent):
        for secret in (KEY, PASSWORD):
            for form in _forms(secret):
                assert form not in text, (secret, text[:2000])


def test_an_exception_logged_where_both_are_held_shows_neither(tmp_path: Path, capsys):
    """The console renderer (one line: the exception's last line, no frame, no local) and the
    JSON one (a plain traceback: no local either), to stderr and to a log file."""
    job = load_job(write_job(tmp_path, "sandbox", [{"product_id": "12345678", "region": "US"}]))
    redis_url = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    coordinated = job.coordinated(redis_url)
    key = job.api_key({"KEYAPI_API_KEY": KEY})
    for held in (repr(job), repr(coordinated), repr(coordinated.coordination), repr(key)):
        assert KEY not in held and PASSWORD not in held
    log_file = tmp_path / "crawler.log"
    for setting in ({"log_format": "console"}, {"log_format": "json"}, {"log_file": log_file}):
        opened = logs.configure(**setting)
        try:
            secrets = {"key": key, "url": redis_url}  # in the failing frame's locals
            try:
                raise ConnectionError(f"cannot reach {coordinated.coordination!r}")
            except ConnectionError:
                logs.get_logger("crawler.test").exception("failed", held=len(secrets))
        finally:
            logs.reset()
            if opened is not None:
                opened.close()
    shown = capsys.readouterr()
    written = log_file.read_text()
    assert written.count("ConnectionError") >= 2 and "Traceback" in written  # JSON: whole
    assert shown.err.count("ConnectionError: cannot reach") == 2
    console = [line for line in shown.err.splitlines() if "error failed" in line]
    assert len(console) == 1 and "Traceback" not in console[0]  # one line
    for text in (shown.out, shown.err, written):
        assert KEY not in text and PASSWORD not in text
