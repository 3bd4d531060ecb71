"""Hostile or mistaken job files: refused at load with one line per problem, never a hang or a
traceback, and never with a secret in the message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from crawler import ConfigError, load_job
from tests.conftest import crawler_command, run_crawler, subprocess_env
from tests.test_config import GOOD

# a few hundred bytes that a YAML loader expands to 9**9 (387 million) strings
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n"
    for below, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "job.yaml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def _refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    return str(caught.value)


async def _run_bounded(*args: str) -> tuple[int, bytes, bytes]:
    """``run_crawler`` within 1 GiB of memory and 60 s: should the bomb go off again, it ends
    this test in a MemoryError, not the machine's other work in the OOM killer."""
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        'ulimit -v 1048576 && exec "$@"',
        "sh",
        *crawler_command(*args),
        env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_an_alias_bomb_is_refused_at_once(tmp_path: Path):
    path = _write(tmp_path, GOOD + BOMB)
    status, _, stderr = await _run_bounded("plan", str(path))
    assert status == 2, stderr.decode(errors="replace")[-2000:]
    assert stderr.decode().splitlines() == [
        f"crawler: {path}:16: YAML alias *e: aliases copy more than 100,000 "
        "values in all; anchors and aliases are for a few shared settings: write the values "
        "out, or list targets in a targets_file"
    ]


@pytest.mark.parametrize("copies", [100, 101])
def test_aliases_may_copy_up_to_the_bound(tmp_path: Path, copies: int):
    """A list of 999 values is 1,000 with itself: 100 copies are allowed, 101 are not."""
    values = ", ".join(["1"] * 999)
    text = (
        GOOD
        + f"shared: &shared [{values}]\n"
        + "".join(f"copy{n}: *shared\n" for n in range(copies))
    )
    message = _refused(_write(tmp_path, text))
    if copies == 100:
        assert "YAML alias" not in message and "unknown key 'copy99'" in message
    else:
        assert message.startswith(f"{tmp_path / 'job.yaml'}:{11 + copies}: YAML alias *shared: ")


def test_an_alias_that_loops_is_refused(tmp_path: Path):
    path = _write(tmp_path, GOOD.replace("region: US}", "region: US, max_pages: &a [*a]}"))
    assert _refused(path) == (
        f"{path}:9: YAML alias *a is inside the node it names (a loop); write the values out"
    )


def test_anchors_for_shared_settings_still_load(tmp_path: Path):
    """A thousand targets sharing their regions and cap through one anchor are well within the
    bound."""
    text = GOOD.split("targets:", maxsplit=1)[0] + "targets:\n"
    text += '  - &base {product_id: "1729679758111240000", regions: [US, GB], max_pages: 5}\n'
    text += "".join(
        f'  - {{<<: *base, product_id: "{1729679758111240001 + i}"}}\n' for i in range(1000)
    )
    job = load_job(_write(tmp_path, text))
    assert len(job.targets) == 2002
    assert {t.max_pages for t in job.targets} == {5}


async def test_a_job_file_that_is_not_utf8_is_named(tmp_path: Path):
    """Latin-1, as an old editor saves it: the file, its line and the byte, exit 2."""
    path = _write(tmp_path, GOOD.replace("output:", "# café\noutput:").encode("latin-1"))
    offset = GOOD.index("output:") + len("# caf")
    status, _, stderr = await run_crawler("plan", str(path))
    assert status == 2 and b"Traceback" not in stderr
    assert stderr.decode().splitlines() == [
        f"crawler: {path}:6: not UTF-8 text: byte 0xe9 at offset {offset} (invalid "
        "continuation byte); save the file as UTF-8"
    ]


def test_a_utf16_job_file_is_named_as_such(tmp_path: Path):
    path = _write(tmp_path, GOOD.encode("utf-16"))
    assert _refused(path) == (
        f"{path}:1: not UTF-8 text: byte 0xff at offset 0 (invalid start byte) (it looks like "
        "UTF-16); save the file as UTF-8"
    )


def test_windows_line_ends_still_load(tmp_path: Path):
    path = _write(tmp_path, GOOD.replace("\n", "\r\n").encode())
    assert len(load_job(path).targets) == 3
    wrong = _write(
        tmp_path, GOOD.replace("max_credits: 100", "max_credits: -1").replace("\n", "\r\n").encode()
    )
    assert _refused(wrong).startswith(f"{wrong}:5: budget.max_credits: ")
