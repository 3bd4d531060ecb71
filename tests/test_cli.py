"""The command line at its edges: what a person meets in the first minutes, each a clear line
and an exit status, never a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
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
