"""A disk that fills up mid-run: a clear stop naming the file (exit 7), then an exact resume."""

from __future__ import annotations

import asyncio
import shlex
import shutil
from pathlib import Path

from crawler import load_job
from crawler.output.layout import Layout
from crawler.output.verify import verify
from tests.conftest import (
    PRODUCTS,
    crawler_command,
    expected_ids,
    output_ids,
    subprocess_env,
    write_job,
)

PAIRS = [(PRODUCTS[0], "GB"), (PRODUCTS[5], "US")]  # ~1,100 reviews: some 6 MB of shards


async def test_a_full_disk_stops_naming_the_file_and_resumes_exactly(tmp_path: Path, served):
    """The output folder is a 700 kB tmpfs, in a mount namespace of the test's own (no root
    needed, nothing left mounted): the first run fills it; after it is made larger, the same
    command carries on."""
    url, box = served
    targets = [{"product_id": p, "region": r} for p, r in PAIRS]
    job = write_job(tmp_path, url, targets, output={"shard_max_records": 100_000})
    out = load_job(job).output.dir
    out.mkdir()
    copy = tmp_path / "copy"
    copy.mkdir()
    run = shlex.join(crawler_command("--log-level", "warning", "run", "--no-progress", str(job)))
    script = f"""
        mount -t tmpfs -o size=700k tmpfs {out}
        {run} 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.status
        mount -o remount,size=64m {out}
        {run} 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.status
        cp -a {out}/. {copy}/
    """
    unshare = shutil.which("unshare")
    assert unshare, "the test needs util-linux's unshare"
    process = await asyncio.create_subprocess_exec(
        unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script,
        env=subprocess_env(),
    )  # fmt: skip
    assert await process.wait() == 0
    first = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.status").read_text().strip() == "7", first
    assert "No space left on device" in first and "Traceback" not in first
    assert f"crawler: {out}/" in first  # the file that could not be written, by its path
    assert "free space on that disk" in first and "run the same command again" in first
    second = (tmp_path / "second.err").read_text()
    assert (tmp_path / "second.status").read_text().strip() == "0", second
    ids = output_ids(copy)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    assert verify(Layout(copy)).ok


async def test_a_read_only_output_folder_is_named(tmp_path: Path, served):
    url, _ = served
    job = write_job(tmp_path, url, [{"product_id": PRODUCTS[0], "region": "US"}])
    out = load_job(job).output.dir
    out.mkdir()
    run = shlex.join(crawler_command("run", "--no-progress", str(job)))
    script = f"mount -t tmpfs -o ro tmpfs {out} && {run} 2> {tmp_path}/err; echo $? > {tmp_path}/st"
    process = await asyncio.create_subprocess_exec(
        "unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
        env=subprocess_env(),
    )  # fmt: skip
    assert await process.wait() == 0
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "st").read_text().strip() == "7", err
    assert err.splitlines() == [
        f"crawler: {out}/state: cannot write: Read-only file system; the file system is "
        "read-only: remount it writable or point output.dir elsewhere, then run the same "
        "command again: the state is saved and the run carries on where it stopped"
    ]
