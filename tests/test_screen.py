"""What a person reads: the real command line in a real 80x24 terminal (tmux) during a run and
after; one name and one status per figure and target across the table, JSON, CSV and the run
report; and a library that prints nothing unless asked."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from crawler.screen import Column, figure, lines, plural, table
from tests.conftest import (
    ENV,
    PRODUCTS,
    RedisServer,
    crawler_command,
    run_crawler,
    subprocess_env,
    write_job,
)

# 11 targets, 2 walkers, 30 credits: the budget stops the run with walks cut short and
# targets never begun
TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS[:3]] + [
    {"product_id": PRODUCTS[3], "regions": ["IT", "ES"]}
]


def _tiny_job(folder: Path) -> Path:
    return write_job(
        folder,
        "sandbox",
        TARGETS,
        api={"requests_per_second": 40, "concurrency": 2},
        budget={"max_credits": 30},
    )


TMUX = shutil.which("tmux")


def _tmux(socket: str, *args: str, check: bool = True) -> str:
    assert TMUX is not None
    done = subprocess.run(
        [TMUX, "-L", socket, *args], capture_output=True, text=True, check=check, timeout=10
    )
    return done.stdout


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
async def test_every_line_fits_an_80_column_terminal_during_a_run_and_after(tmp_path: Path):
    job = _tiny_job(tmp_path)
    crawler = f"{sys.executable} -m crawler"
    script = tmp_path / "session.sh"
    script.write_text(
        f"cd {tmp_path}\n"
        f"{crawler} run {job}\n"
        f"{crawler} status {job}\n"
        f"{crawler} status --all {job}\n"
        f"{crawler} plan {job}\n"
        "echo __DONE__; sleep 60\n"
    )
    socket = f"crawler-test-{os.getpid()}"  # a server of its own, with this test's environment
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    _tmux(socket, "new-session", "-d", "-x", "80", "-y", "24", f"env -u COLUMNS {env} sh {script}")
    snapshots: list[str] = []
    try:
        _tmux(socket, "set-option", "-g", "history-limit", "5000")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # -J joins a line the terminal wrapped: a wrapped line shows as one over 80 here
            screen = _tmux(socket, "capture-pane", "-p", "-J", "-S", "-")
            snapshots.append(screen)
            if "__DONE__" in screen:
                break
            await asyncio.sleep(0.05)
    finally:
        _tmux(socket, "kill-server", check=False)
    final = snapshots[-1]
    assert "__DONE__" in final, final
    too_wide = {line for s in snapshots for line in s.splitlines() if len(line.rstrip()) > 80}
    assert not too_wide, "\n".join(sorted(too_wide))
    # summaries are broken between their parts, never cut (log lines are: --log-file has them)
    cut = [line for line in final.split("needs attention")[0].splitlines() if "…" in line]
    assert all(line[2] == ":" for line in cut), cut
    assert any("targets" in s and "/11" in s for s in snapshots[:-1])  # the live display
    assert "needs attention" in final and "every target" in final and "exit 3" in final
    assert "Traceback" not in final
    # the console's log lines: one line each, time, event (a level when not info)
    started = [line for line in final.splitlines() if "run started:" in line]
    assert len(started) == 1 and started[0][8:22] == " run started: "
    assert "run finished" not in final  # the closing summary says it


async def test_one_name_and_one_status_per_target_in_table_json_csv_and_report(tmp_path: Path):
    job = _tiny_job(tmp_path)
    status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    assert status == 3, stderr.decode()
    report = orjson.loads((tmp_path / "out" / "run-report.json").read_bytes())
    status, shown, _ = await run_crawler("status", "--json", str(job))
    doc = orjson.loads(shown)
    status, table_csv, _ = await run_crawler("status", "--csv", str(job))
    rows = list(csv.DictReader(io.StringIO(table_csv.decode())))
    by_csv = dict(Counter(r["status"] for r in rows))
    # walks the budget cut short are stopped_budget; targets it never let begin are not_started
    assert report["targets_by_status"] == doc["targets_by_status"] == by_csv
    assert by_csv["not_started"] > 0 and by_csv["stopped_budget"] > 0
    assert all(r["walk_pages"] == "0" for r in rows if r["status"] == "not_started")
    assert all(int(r["walk_pages"]) > 0 for r in rows if r["status"] == "stopped_budget")
    assert report["totals"]["budget_spent"] is True
    # one name per figure: reviews (not records or items) in the totals, the rows, the CSV
    for name in ("reviews", "received", "duplicates", "pages", "credits", "rate_limited"):
        assert name in report["totals"] and name in doc["totals"]
    assert "records" not in report["totals"] and "items" not in report["totals"]
    assert sum(int(r["reviews"]) for r in rows) == report["totals"]["reviews"] > 0
    assert {"reviews", "rate_limited"} <= set(rows[0]) and "records" not in rows[0]
    assert all("reviews" in r for r in report["attention"])
    said = " ".join(stderr.decode().split())
    assert "not_started (budget spent)" in said and "stopped at the credit budget" in said


def test_tables_drop_the_least_useful_columns_first_and_plurals_agree():
    columns = [
        Column("id", lambda r: r["id"], priority=0),
        Column("status", lambda r: r["status"], priority=0, flexible=True, least=6),
        figure("reviews"),
        Column("rare", lambda r: "x" * 30, priority=90),
    ]
    rows = [{"id": "1729679758111249333", "status": "failed: " + "why " * 30, "reviews": 1234}]
    wide, narrow = table(columns, rows, 120), table(columns, rows, 40)
    assert "rare" in wide[0] and "rare" not in narrow[0] and "reviews" in narrow[0]
    assert all(len(line) <= 40 for line in narrow) and narrow[1].endswith("1,234")
    assert lines(["a" * 30, "b" * 30], 40, lead="x: ") == ["x: " + "a" * 30 + ",", "   " + "b" * 30]
    assert [plural(n, "problem") for n in (0, 1, 2)] == ["0 problems", "1 problem", "2 problems"]
    assert plural(1_000, "retry", "retries") == "1,000 retries"


LIBRARY = """
import asyncio, logging, sys
import crawler
job = crawler.load_job(sys.argv[1])
asyncio.run(crawler.run_job(job))  # nothing configured: not a line, on stdout or stderr
print("-- logging set up --", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # asked for: to stderr
asyncio.run(crawler.run_job(job, fresh=True))
"""


async def test_the_library_prints_nothing_on_stdout_unless_asked(tmp_path: Path):
    targets = [{"product_id": PRODUCTS[0], "region": "US"}, {"product_id": "123", "region": "US"}]
    job = write_job(tmp_path, "sandbox", targets)  # one target fails: a warning is logged
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LIBRARY,
        str(job),
        env={**os.environ, **ENV},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await done.communicate()
    assert done.returncode == 0, stderr.decode()
    assert stdout == b""
    before, _, after = stderr.decode().partition("-- logging set up --")
    assert before == ""
    assert "run started" in after and "target failed" in after and "target finished" in after


def _on_a_terminal(*args: str) -> tuple[int, str]:
    """``crawler ARGS`` with stdout and stderr on a pseudo-terminal of 80x24: what it drew."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in subprocess_env().items() if k != "COLUMNS"}
    process = subprocess.Popen(
        crawler_command(*args), env=env, stdin=subprocess.DEVNULL, stdout=side, stderr=side
    )
    os.close(side)
    drawn = []
    while True:
        try:
            data = os.read(main, 1 << 16)
        except OSError:  # EIO: the process and its terminal are gone
            break
        if not data:
            break
        drawn.append(data)
    os.close(main)
    return process.wait(timeout=60), b"".join(drawn).decode(errors="replace")


LIVE = "\x1b[1A"  # the live display moves the cursor up to draw over its lines


def test_a_coordinated_worker_on_a_terminal_draws_no_live_display(
    tmp_path: Path, redis_server: RedisServer
):
    """Workers of one job often share a terminal: each drawing over the others' lines made a
    mess, so a worker prints lines (or none); a one-process run on the same terminal draws."""
    targets = [{"product_id": p, "regions": ["US", "GB"]} for p in PRODUCTS[:3]]
    job = write_job(tmp_path, "sandbox", targets, api={"requests_per_second": 150})
    status, alone = _on_a_terminal("run", str(job))
    assert status == 0, alone
    assert LIVE in alone and "run started" in alone  # the test can tell a live display
    (tmp_path / "w").mkdir()
    other = write_job(tmp_path / "w", "sandbox", targets, api={"requests_per_second": 150})
    status, worker = _on_a_terminal("run", "--redis", redis_server.url, str(other))
    assert status == 0, worker
    assert "run started" in worker and LIVE not in worker and "\x1b[2K" not in worker
    assert all(len(line) <= 80 for line in worker.splitlines())
