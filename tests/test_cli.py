"""The command line at its edges: what a person meets in the first minutes, each a clear line
and an exit status, never a traceback."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.conftest import crawler_command, run_crawler, subprocess_env, write_job


async def test_version():
    status, stdout, _ = await run_crawler("--version")
    assert status == 0 and stdout.decode().startswith("crawler ")


async def test_a_log_file_in_a_missing_folder_is_a_usage_error(tmp_path: Path):
    job = write_job(tmp_path, "sandbox", [{"product_id": "1", "region": "US"}])
    status, _, stderr = await run_crawler(
        "--log-file", str(tmp_path / "no" / "x.log"), "status", str(job)
    )
    assert status == 2 and b"--log-file" in stderr and b"Traceback" not in stderr


async def test_the_sandbox_on_a_taken_port_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, stderr = await run_crawler("sandbox", "--port", str(port))
    assert status == 2, stderr.decode()
    assert b"cannot listen" in stderr and b"cannot write" not in stderr


async def test_plan_without_the_api_key_does_not_pass(tmp_path: Path):
    job = write_job(tmp_path, "https://api.example.com", [{"product_id": "1", "region": "US"}])
    env = {k: v for k, v in os.environ.items() if k != "KEYAPI_API_KEY"}
    process = await asyncio.create_subprocess_exec(
        *crawler_command("plan", str(job)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 2, stderr.decode()
    # the plan is still shown (it needs no key), and then what keeps the job from running
    assert "1 target, none started" in " ".join(stdout.decode().split())  # lines fit 80 columns
    assert b"KEYAPI_API_KEY is not set" in stderr and b"Traceback" not in stderr


async def test_shards_without_state_are_not_called_a_coordinated_job(tmp_path: Path):
    job = write_job(tmp_path, "sandbox", [{"product_id": "1729679758111249333", "region": "US"}])
    status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    assert status == 0, stderr.decode()
    shutil.rmtree(tmp_path / "out" / "state")
    status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    assert status == 2 and b"holds shards but no job state" in stderr
    assert b"coordinated" not in stderr


def test_a_read_only_state_file_is_named_as_such(tmp_path: Path):
    """(As root SQLite writes such a file anyway: the message is checked where it is made.)"""
    from crawler.state.sqlite import _error  # noqa: PLC0415 -- the one place that words it

    state = tmp_path / "state.db"
    state.write_bytes(b"")
    state.chmod(0o444)
    message = str(_error(sqlite3.OperationalError("attempt to write a readonly database"), state))
    assert "the file is read-only" in message and "chmod u+w" in message
    assert "file system is read-only" not in message


def test_help_of_the_package_starts_with_the_api_a_program_calls():
    import pydoc  # noqa: PLC0415 -- this test's alone

    import crawler  # noqa: PLC0415

    text = pydoc.render_doc(crawler, renderer=pydoc.TextDoc())
    head = "\n".join(pydoc.plain(text).splitlines()[:20])
    assert "crawler.load_job(" in head and "crawler.run_job(" in head


# what a one-process run without metrics or export has no use for before its first request
# (issue 22: start-up cost more than a hand-written loop's). importlib.metadata is not listed:
# pydantic's plugin loader imports it as soon as a model is built, --version or not
NOT_BEFORE_THE_FIRST_REQUEST = (
    "structlog",  # its dev module loads rich and rich's tracebacks
    "rich",  # only the live display, on a terminal
    "crawler.report",  # only at the end
    "crawler.export",
    "crawler.metrics",
    "prometheus_client",
    "pyarrow",
    "redis",
    "crawler.coordination",
)


async def test_a_run_imports_only_what_it_uses_before_its_first_request(tmp_path: Path):
    first_request = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the request line: the crawler has sent its first request
        first_request.set()
        await reader.read()  # never answered; the crawler is killed while it waits

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    job = write_job(tmp_path, f"http://127.0.0.1:{port}", [{"product_id": "1", "region": "US"}])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", *crawler_command("run", "--no-progress", str(job))[1:],
        env=subprocess_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    reading = asyncio.create_task(process.stderr.read())  # drained as written: never blocks it
    try:
        await asyncio.wait_for(first_request.wait(), 30)
    finally:
        process.kill()
        await process.wait()
        server.close()
    # "import time: self [us] | cumulative | name", indented by depth: everything imported
    # from the start to a moment after the request was sent
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in (await reading).decode().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "aiohttp" in imported and "crawler.runner" in imported  # the list is the run's
    early = sorted(
        name
        for name in imported
        for unused in NOT_BEFORE_THE_FIRST_REQUEST
        if name == unused or name.startswith(unused + ".")
    )
    assert not early, early


def test_verify_and_export_lines_fit_80_columns_and_never_cut_a_path(
    monkeypatch: pytest.MonkeyPatch,
):
    from crawler.cli import _say_fitted  # noqa: PLC0415 -- what verify and export print through

    monkeypatch.delenv("COLUMNS", raising=False)
    shown = io.StringIO()  # not a terminal: 80 columns
    problem = "out/shards/reviews-000002.jsonl: 100 bytes, the state committed 4,187,243: the "
    _say_fitted(f"problem: {problem}file was cut or replaced since; put the original back", shown)
    _say_fitted("  nulls: " + "x" * 90 + " and more", shown)  # a word too long: the line whole
    lines = shown.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines[:-1]) and len(lines) == 3
    assert lines[0].startswith(f"problem: {problem.split(maxsplit=1)[0]} ") and lines[1].startswith(
        " " * 9
    )
    assert lines[2] == "  nulls: " + "x" * 90 + " and more"


async def test_a_metrics_port_in_use_is_refused_before_anything_is_done(tmp_path: Path):
    job = write_job(tmp_path, "sandbox", [{"product_id": "1729679758111249333", "region": "US"}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, stderr = await run_crawler("run", "--metrics-port", str(port), str(job))
        said = stderr.decode()
        assert status == 2 and f"cannot listen on 127.0.0.1:{port}" in said, said
        assert "--metrics-port" in said and "Traceback" not in said
        assert not (tmp_path / "out" / "shards").exists()  # nothing walked
        # a harvest there, and --fresh refused for its metrics port: the harvest is still there
        assert (await run_crawler("run", "--no-progress", str(job)))[0] == 0
        shards = sorted((tmp_path / "out" / "shards").iterdir())
        status, _, stderr = await run_crawler(
            "run", "--fresh", "--metrics-port", str(port), str(job)
        )
        assert status == 2 and b"cannot listen" in stderr
        assert sorted((tmp_path / "out" / "shards").iterdir()) == shards != []
