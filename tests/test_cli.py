"""The command line at its edges: what a person meets in the first minutes, each a clear line
and an exit status, never a traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
from pathlib import Path

from tests.conftest import crawler_command, run_crawler, write_job


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
    assert (b"KEYAPI_API_KEY" in stderr and b"1 targets" in stdout + stderr) or stdout


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
