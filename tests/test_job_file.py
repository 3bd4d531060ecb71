"""Hostile or mistaken job files: refused at load with one line per problem, never a hang or a
traceback, and never with a secret in the message."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from crawler import ConfigError, load_job
from tests.conftest import crawler_command, free_port, run_crawler, subprocess_env
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


def _with(setting: str, value: str) -> str:
    """GOOD with one setting (``section.key``, or ``targets.max_pages`` for the first target)."""
    section, key = setting.split(".")
    if section == "targets":
        return GOOD.replace("region: US}", f"region: US, {key}: {value}}}", 1)
    if f"  {key}: " in GOOD:
        return re.sub(rf"  {key}: .*", f"  {key}: {value}", GOOD)
    if f"{section}:" not in GOOD:
        return GOOD + f"{section}:\n  {key}: {value}\n"
    return GOOD.replace(f"{section}:\n", f"{section}:\n  {key}: {value}\n", 1)


NUMBERS = {
    # setting, value written, what is said
    "api.requests_per_second": (".inf", "Input should be at most 1000000 (got inf)"),
    "api.timeout_seconds": (".nan", "Input should be a number (got nan)"),
    "api.shutdown_grace_seconds": ("1.0e+300", "Input should be at most 3600 (got 1e+300)"),
    "budget.max_credits": (
        "99999999999999999999",
        "Input should be at most 1000000000000 (got 99999999999999999999)",
    ),
    "budget.credits_per_request": ("yes", "Input should be a number, not a boolean (got True)"),
    "budget.max_credits_per_target": (
        "1.0e+300",  # an integer too large to parse
        "Input should be at most 1000000000000 (got 1e+300)",
    ),
    "output.shard_max_records": (
        "99999999999999999999",
        "Input should be at most 100000000 (got 99999999999999999999)",
    ),
    "output.commit_every_pages": ("true", "Input should be a number, not a boolean (got True)"),
    "targets.max_pages": ("4294967296", "Input should be at most 1000000 (got 4294967296)"),
    "coordination.lease_seconds": ("-.inf", "Input should be greater than 0 (got -inf)"),
    "coordination.unavailable_seconds": ("1e300", "Input should be at most 86400 (got '1e300')"),
}


@pytest.mark.parametrize("setting", sorted(NUMBERS))
def test_every_number_is_checked_against_its_range(tmp_path: Path, setting: str):
    value, said = NUMBERS[setting]
    path = _write(tmp_path, _with(setting, value))
    message = _refused(path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if value in text)
    shown = setting.replace("targets.", "targets[0].")
    assert message == f"{path}:{line}: {shown}: {said}"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("api.retry", "{max_attempts: 1001}"),
        ("api.retry", "{max_seconds: 86401}"),
        ("api.retry", "{base_seconds: 3601}"),
        ("api.retry", "{cap_seconds: .inf}"),
        ("api.retry", "{max_retry_after_seconds: 1.0e+10}"),
        ("api.retry", "{max_attempts: on}"),
    ],
)
def test_retry_numbers_too(tmp_path: Path, setting: str, value: str):
    path = _write(
        tmp_path, GOOD.replace("  base_url: sandbox\n", f"  base_url: sandbox\n  retry: {value}\n")
    )
    key = value.strip("{}").split(":")[0]
    assert _refused(path).startswith(f"{path}:3: api.retry.{key}: Input should be ")


def test_the_largest_values_load(tmp_path: Path):
    text = GOOD.replace("requests_per_second: 5", "requests_per_second: 1000000").replace(
        "max_credits: 100", "max_credits: 1000000000000"
    )
    text = text.replace("region: US}", "region: US, max_pages: 1000000}")
    job = load_job(_write(tmp_path, text))
    assert job.api.requests_per_second == 1_000_000 and job.budget.max_credits == 10**12
    assert next(iter(job.targets)).max_pages == 1_000_000


SECRET = "hunter2"
REDIS_URLS = {
    # how the coordination section is written: what the message says of it
    "a list": (
        f"coordination:\n  redis_url: [redis://u:{SECRET}@h:6379/0]\n",
        ":12: coordination.redis_url: Input should be a valid string (got ['redis://***@h:6379/0'])",
    ),
    "a number": ("coordination:\n  redis_url: 6379\n", ":12: coordination.redis_url: "),
    "the section as a URL": (
        f"coordination: redis://u:{SECRET}@h:6379/0\n",
        ":11: coordination: Input should be a valid dictionary or instance of "
        "CoordinationSettings (got 'redis://***@h:6379/0')",
    ),
    "the section as a list": (
        f"coordination: [redis://u:{SECRET}@h]\n",
        ":11: coordination: Input should be a valid dictionary",
    ),
    "no scheme": (
        f"coordination:\n  redis_url: u:{SECRET}@h:6379\n",
        ":12: coordination.redis_url: String should match pattern '^(redis|rediss|unix)://' "
        "(got '***@h:6379')",
    ),
    "a scheme mistyped": (
        f"coordination:\n  redis_url: 'redis:/u:{SECRET}@h'\n",
        ":12: coordination.redis_url: String should match pattern",
    ),
    "http": (
        f"coordination:\n  redis_url: http://u:{SECRET}@h\n",
        "(got 'http://***@h')",
    ),
    "a port that is not a number": (
        f"coordination:\n  redis_url: redis://u:{SECRET}@h:port/0\n",
        ":12: coordination.redis_url: 'redis://***@h:port/0' is not a Redis URL: its port is "
        "not a number from 0 to 65535",
    ),
    "a password holding a slash": (
        # the URL's host ends at the slash: its "port" is the password's first part
        f"coordination:\n  redis_url: redis://u:{SECRET}/x@h:6379/0\n",
        ":12: coordination.redis_url: 'redis://***@h:6379/0' is not a Redis URL: its port is "
        "not a number from 0 to 65535",
    ),
    "a port out of range": (
        f"coordination:\n  redis_url: redis://u:{SECRET}@h:99999/0\n",
        "'redis://***@h:99999/0' is not a Redis URL: its port is not a number from 0 to 65535",
    ),
    "a password in the query": (
        f"coordination:\n  redis_url: redis://h:6379/0?password={SECRET}&db=x\n",
        ":12: coordination.redis_url: 'redis://h:6379/0?password=***&db=x' is not a Redis URL: "
        "Invalid value for 'db' in connection URL.",
    ),
    "a bad job name beside a password": (
        f"coordination:\n  redis_url: redis://u:{SECRET}@h:6379/0\n  job: 'a b'\n",
        ":13: coordination.job: String should match pattern",
    ),
}


@pytest.mark.parametrize("case", sorted(REDIS_URLS))
def test_a_redis_password_is_never_said(tmp_path: Path, case: str):
    section, said = REDIS_URLS[case]
    path = _write(tmp_path, GOOD + section)
    message = _refused(path)
    assert SECRET not in message
    assert said in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    "url",
    [
        f"redis:/u:{SECRET}@h",
        f"u:{SECRET}@h:6379",
        f"redis://u:{SECRET}@h:port/0",
        f"redis://h:6379/0?password={SECRET}&socket_timeout=x",
    ],
)
def test_a_bad_redis_option_never_says_its_password(tmp_path: Path, url: str):
    job = load_job(_write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as caught:
        job.coordinated(url)
    assert str(caught.value).startswith("--redis: ")
    assert SECRET not in str(caught.value)


def test_a_job_shows_no_redis_password(tmp_path: Path):
    job = load_job(_write(tmp_path, GOOD + f"coordination:\n  redis_url: redis://u:{SECRET}@h\n"))
    assert SECRET not in repr(job) and SECRET not in repr(job.coordinated(f"redis://:{SECRET}@g"))


async def test_the_command_line_never_says_a_redis_password(tmp_path: Path):
    """Neither of a URL it refuses, nor of one whose Redis does not answer (a password given
    in the query, as redis-py reads it too)."""
    path = _write(tmp_path, GOOD)
    status, _, stderr = await run_crawler("status", str(path), "--redis", f"redis:/u:{SECRET}@h")
    assert status == 2 and SECRET.encode() not in stderr, stderr
    assert stderr.startswith(b"crawler: --redis: '***@h' is not a Redis URL")
    url = f"redis://127.0.0.1:{free_port()}/0?password={SECRET}"
    status, _, stderr = await run_crawler("status", str(path), "--redis", url)
    assert status == 8 and SECRET.encode() not in stderr, stderr
    assert b"?password=***" in stderr


@pytest.mark.parametrize("setting", ["max_credits", "redis_url"])
def test_a_value_nested_990_deep_is_refused_in_one_line(tmp_path: Path, setting: str):
    """libyaml allows 1,000 levels; finding the line of the problem went past Python's
    recursion limit (a RecursionError traceback)."""
    deep = "[" * 990 + f"redis://u:{SECRET}@h" + "]" * 990
    if setting == "max_credits":
        text = GOOD.replace("max_credits: 100", f"max_credits: {deep}")
    else:
        text = GOOD + f"coordination:\n  redis_url: {deep}\n"
    message = _refused(_write(tmp_path, text))
    assert message.endswith("(got [[[[...]]]])") and SECRET not in message


def test_nan_for_a_setting_that_is_not_a_number(tmp_path: Path):
    path = _write(
        tmp_path, GOOD.replace("  base_url: sandbox\n", "  base_url: sandbox\n  key_env: .nan\n")
    )
    assert _refused(path) == f"{path}:3: api.key_env: Input should be a valid string (got nan)"


def test_a_control_character_is_named_in_one_line(tmp_path: Path):
    """A NUL, as a broken copy leaves: PyYAML's message was two lines, with no line number."""
    path = _write(tmp_path, GOOD.replace("dir: out", 'dir: "o\x00ut"'))
    assert _refused(path) == (
        f"{path}:7: character U+0000: control characters are not allowed in YAML; remove it"
    )
