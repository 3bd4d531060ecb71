"""The edges: the 429 pause holds every walker, wrong URLs stop early, Retry-After is capped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import traceback
from pathlib import Path

import pytest

from crawler import load_job, run_job
from crawler.config import BudgetSettings
from crawler.errors import BudgetExhausted, ComeBackLater
from crawler.output.layout import Layout
from crawler.pacing.budget import Budget
from crawler.pacing.limits import RateGate
from crawler.pacing.retry import RetryPolicy
from crawler.pacing.slowdown import FLOOR, HeldRate, Slowdown
from crawler.sandbox import SandboxOptions, key_fingerprint, serve, serve_in_process
from crawler.state.sqlite import SqliteStore
from tests.conftest import (
    ENV,
    KEY,
    PRODUCTS,
    expected_ids,
    output_ids,
    target_rows,
    write_job,
)

TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS[:4]]
PAIRS = [(p, r) for p in PRODUCTS[:4] for r in ("US", "GB", "DE")]


async def test_no_request_leaves_during_a_429_pause(tmp_path: Path):
    """The API answers 429 to everything for 2 s after its 40th request. Walkers are queued in
    the rate limiter when that happens: none of them may go out before the pause ends."""
    options = SandboxOptions(throttle_after=40, throttle_seconds=2.0)
    async with serve_in_process(options) as (url, box):
        api = {"requests_per_second": 30, "concurrency": 8}
        job = load_job(write_job(tmp_path, url, TARGETS[:2], api=api))
        result = await run_job(job, environ=ENV)
        book = (await box.ledger())[key_fingerprint(KEY)]
        pairs = [(p, r) for p in PRODUCTS[:2] for r in ("US", "GB", "DE")]
        expected = set()
        for product_id, region in pairs:
            expected.update(await box.ids(product_id, region))
    assert result.exit_status == 0
    # only a request already on its way when the first 429 came back can arrive in the window
    # (the walkers queued in the limiter used to: 8 of them at this rate)
    assert book["requests_while_throttled"] <= 1, book
    assert result.report["run"]["rate_limit_episodes"] == 1
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected


@pytest.mark.parametrize("status", [301, 404, 405, 410])
async def test_a_status_this_api_never_gives_stops_the_run(tmp_path: Path, sandbox, status):
    async with sandbox(answer_status=status) as (url, box):
        targets = [{"product_id": p, "regions": ["US", "GB", "DE", "FR"]} for p in PRODUCTS]
        job = load_job(write_job(tmp_path, url, targets))  # 32 targets
        result = await run_job(job, environ=ENV)
        sent = sum(b.requests for b in box.ledgers.values())
    assert result.exit_status == 5
    assert 1 <= sent <= job.api.concurrency  # not one request per target
    message = result.report["run"]["stop_message"]
    assert message.startswith(f"{status} ") and f"GET {url}/v1/tiktok/product/reviews" in message
    assert KEY not in message and "product_id" not in message
    assert {row["status"] for row in target_rows(job.output.dir)} == {"pending"}


async def test_408_is_retried_like_a_server_error(tmp_path: Path, sandbox):
    async with sandbox(answer_status=408) as (url, box):
        api = {"retry": {"max_attempts": 3, "base_seconds": 0}}
        job = load_job(write_job(tmp_path, url, TARGETS[:1], api=api))
        result = await run_job(job, environ=ENV)
        sent = sum(b.requests for b in box.ledgers.values())
    assert result.exit_status == 1  # each target failed on its own, after its tries
    assert sent == 3 * 3
    assert all("408" in row["reason"] for row in target_rows(job.output.dir))


@pytest.mark.parametrize("retry_after", ["86400000", "Fri, 01 Jan 2100 00:00:00 GMT"])
async def test_a_retry_after_beyond_the_cap_stops_cleanly_and_resumes(
    tmp_path: Path, sandbox, retry_after
):
    options = {"throttle_after": 30, "throttle_seconds": 3600.0, "retry_after": retry_after}
    async with sandbox(**options) as (url, _):
        job = load_job(write_job(tmp_path, url, TARGETS))
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await run_job(job, environ=ENV)
        assert loop.time() - started < 15  # not the thousand days asked for
    assert result.exit_status == 6
    message = result.report["run"]["stop_message"]
    assert "api.retry.max_retry_after_seconds (300)" in message and "run again after" in message
    async with sandbox() as (url, box):  # the API is back: the same job carries on
        job = load_job(write_job(tmp_path, url, TARGETS))
        assert (await run_job(job, environ=ENV)).exit_status == 0
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)


async def test_a_cursor_given_again_fails_the_target_at_once(tmp_path: Path, sandbox):
    stuck = PRODUCTS[0]
    async with sandbox(stuck=frozenset({stuck})) as (url, box):
        job = load_job(write_job(tmp_path, url, [{"product_id": stuck, "region": "GB"}]))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 1
    (row,) = target_rows(job.output.dir)
    assert row["reason"] == "the API gave cursor 2, already walked in this walk (the same page)"
    assert box.ledgers[key_fingerprint(KEY)].requests == 2


async def test_a_maintenance_window_is_waited_out_as_the_503s_say(tmp_path: Path, sandbox):
    """503 with Retry-After for 2 s: tries spaced as asked, not burnt on the job's own backoff
    (8 tries within half a second here: every target failed)."""
    async with sandbox(maintenance_seconds=2.0) as (url, box):
        job = load_job(write_job(tmp_path, url, [{"product_id": PRODUCTS[0], "region": "US"}]))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 0
    statuses = box.ledgers[key_fingerprint(KEY)].statuses
    assert 1 <= statuses["503"] <= 3 and statuses["200"] >= 1


async def test_cursors_that_cycle_fail_the_target_at_once(tmp_path: Path, sandbox):
    cycling = PRODUCTS[7]  # a product of many pages
    async with sandbox(cycling=frozenset({cycling})) as (url, box):
        job = load_job(write_job(tmp_path, url, [{"product_id": cycling, "region": "US"}]))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 1
    (row,) = target_rows(job.output.dir)
    assert row["reason"] == "the API gave cursor 2, already walked in this walk (a cycle)"
    assert box.ledgers[key_fingerprint(KEY)].requests == 3  # pages 1, 2, 3: no page again


async def test_no_429_at_or_below_the_allowed_rate(tmp_path: Path):
    """The server in a process of its own, so a busy machine slows both sides alike."""
    async with serve_in_process(SandboxOptions(rate=50, burst=2)) as (url, box):
        targets = [
            {"product_id": PRODUCTS[0], "region": "GB"},
            {"product_id": PRODUCTS[7], "region": "US"},
        ]
        job = load_job(write_job(tmp_path, url, targets, api={"requests_per_second": 50}))
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await run_job(job, environ=ENV)
        seconds = loop.time() - started
        book = (await box.ledger())[key_fingerprint(KEY)]
    assert result.exit_status == 0
    assert book["statuses"].get("429", 0) == 0
    requests = result.report["run"]["requests"]
    assert requests == book["requests"] > 100
    assert requests / seconds > 0.9 * 50  # start-up and the last page are in the time too


async def test_a_job_asking_more_than_the_api_allows_settles_just_under_it(tmp_path: Path):
    """60/s asked of a key allowing 40: after two 429 episodes the rate holds just under the
    one that drew the second, with no 429 (plain halving climbed back into the limit again
    every few seconds, and averaged two thirds of it)."""
    allowed = 40
    async with serve_in_process(SandboxOptions(rate=allowed, burst=4)) as (url, box):
        many = [str(1729679758111249333 + i) for i in range(40)]
        targets = [{"product_id": p, "regions": ["US", "GB", "DE", "FR"]} for p in many]
        api = {"requests_per_second": 60, "concurrency": 8}
        job = load_job(write_job(tmp_path, url, targets, api=api))
        loop = asyncio.get_running_loop()
        crawl = asyncio.create_task(run_job(job, environ=ENV))  # owned here, cancelled below
        try:
            await asyncio.sleep(8.0)  # the first 429s and the climbs back
            before, started = (await box.ledger())[key_fingerprint(KEY)], loop.time()
            await asyncio.sleep(5.0)
            after, seconds = (await box.ledger())[key_fingerprint(KEY)], loop.time() - started
        finally:
            crawl.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await crawl
    assert before["statuses"].get("429", 0) > 0  # it did ask too much, at first
    assert after["statuses"].get("429", 0) == before["statuses"].get("429", 0)
    assert (after["requests"] - before["requests"]) / seconds >= 0.85 * allowed


class FakeTime:
    """A clock tests move by hand, and a sleep that moves it: no waiting, exact figures."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_the_rate_halves_once_per_episode_and_climbs_back():
    time = FakeTime()
    gate = RateGate(100, clock=time.clock, sleep=time.sleep)
    await gate.on_rate_limited(2.0)
    await gate.on_rate_limited(1.0)  # the same episode
    assert gate.episodes == 1 and gate.current == 50
    await gate.acquire()  # waits out the pause, by the clock
    assert sum(time.slept) == pytest.approx(2.0)
    # a tenth of the configured rate back per quiet second, counted from the last change, up
    # to 0.9 of the rate that drew the 429; held there, then probed upwards a step a second
    for quiet_seconds, rate in ((0.5, 50), (1.0, 60), (2.0, 70), (5.0, 90), (30.5, 90)):
        time.now = 1002.0 + quiet_seconds
        await gate.acquire()
        assert gate.current == pytest.approx(rate)
    for probing_seconds, rate in ((1.0, 91), (1.5, 91), (3.0, 93), (60.0, 100)):
        time.now = 1002.0 + 5.0 + 30.0 + probing_seconds
        await gate.acquire()
        assert gate.current == pytest.approx(rate)
    await gate.on_rate_limited(None)  # a new episode, no Retry-After: a second's pause
    assert gate.episodes == 2 and gate.current == 95  # met while probing: just under it


async def test_a_rate_above_the_allowed_one_is_learned():
    """A 429 met while probing above the safe rate steps back under it, without halving; a 429
    at the safe rate (the API allows less than it did) halves the rate again."""
    time = FakeTime()
    gate = RateGate(100, clock=time.clock, sleep=time.sleep)
    await gate.on_rate_limited(1.0)  # at 100: halved
    time.now += 6.0
    await gate.acquire()
    assert gate.current == pytest.approx(90)
    time.now += 30.0 + 3.0  # probed to 93
    await gate.acquire()
    await gate.on_rate_limited(1.0)  # the API allows less than 93: just under it
    assert gate.episodes == 2 and gate.current == pytest.approx(93 * 0.95)
    time.now += 29.0  # held, even once the pause is over
    await gate.acquire()
    assert gate.current == pytest.approx(93 * 0.95)
    await gate.on_rate_limited(1.0)  # at the safe rate: halved
    assert gate.episodes == 3 and gate.current == pytest.approx(93 * 0.95 / 2)
    time.now += 1.0 + 10.0
    await gate.acquire()
    assert gate.current == pytest.approx(93 * 0.95 * 0.9)  # the new ceiling's safe rate


async def test_a_rate_change_keeps_the_limiter_full():
    """A new rate's bucket starts as full as the old one: a send right after another waits its
    turn at the new rate, rather than going at once through an empty bucket."""
    gate = RateGate(2)
    loop = asyncio.get_running_loop()
    await gate.acquire()
    await gate.on_rate_limited(0.0)  # no pause; the rate halves to 1/s
    started = loop.time()
    await gate.acquire()
    # about 0.5 s, less the time between the two calls (an empty bucket: at once)
    assert loop.time() - started >= 0.3


async def test_a_late_429_begins_no_episode():
    """The answer to a request sent before the last episode began, arriving after its pause,
    pauses again but does not slow down again: it says nothing of the rate now."""
    time = FakeTime()
    gate = RateGate(100, clock=time.clock, sleep=time.sleep)
    await gate.on_rate_limited(1.0)
    time.now += 1.5
    await gate.on_rate_limited(1.0, sent_ago=2.0)  # sent before the episode began
    assert gate.episodes == 1 and gate.current == 50 and gate.paused
    time.now += 1.5
    await gate.on_rate_limited(1.0, sent_ago=0.5)  # sent since: a new episode
    assert gate.episodes == 2 and gate.current == 25


def test_the_rate_named_after_429s_is_one_that_held():
    """The 429 hint's rate: the highest share that went 30 s without a 429, not the one that drew
    the last 429 (a key allowing 10/s was told 5.42/s: half its allowance)."""
    held = HeldRate()
    held.reached(0.0, 1.0)
    held.limited(5.0)  # 1.0 drew a 429 within 5 s: it did not hold
    held.reached(5.0, 0.5)
    for second in range(6, 10):
        held.reached(float(second), 0.5 + 0.1 * (second - 5))  # the climb back, to 0.9
    assert held.settle(30.0) == 0.0  # nothing has held 30 s yet
    held.limited(45.0)  # 0.9, reached at 9 s, held 36 s; no 429 for anything below it either
    assert held.settle(45.0) == pytest.approx(0.9)
    held.reached(45.0, 0.45)
    held.reached(50.0, 0.95)
    held.limited(60.0)  # 0.95 held 10 s: not enough
    assert held.settle(100.0) == pytest.approx(0.9)


def test_the_slowdown_holds_from_the_end_of_a_long_pause():
    """A Retry-After longer than the hold is no time spent at the safe share: the hold starts
    when the pause ends, and the rate does not jump at once by what the pause lasted."""
    slowdown = Slowdown()
    slowdown.limited(0.0)
    slowdown.recover(6.0, 1.0)  # climbed back to 0.9
    slowdown.recover(39.0, 1.0)  # held 30 s, probed 3 s: 0.93
    slowdown.limited(40.0)  # met while probing: 0.95 of 0.93
    assert slowdown.share == pytest.approx(0.8835)
    assert not slowdown.recover(161.0, 160.0)  # a pause of 120 s, just over
    assert slowdown.share == pytest.approx(0.8835)
    assert slowdown.recover(160.0 + 32.0, 160.0)  # held 30 s from the pause's end, then probed
    assert slowdown.share == pytest.approx(0.8835 + 0.02)


def test_the_slowdown_stays_at_its_floor():
    slowdown = Slowdown()
    for second in range(7):  # halved down to the floor, and a 429 while held there
        slowdown.limited(float(second))
    assert slowdown.share == FLOOR


async def test_a_429_pause_begun_while_waiting_in_the_limiter_holds_the_request():
    gate = RateGate(2)  # a slot every half second
    await gate.acquire()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(gate.acquire())  # owned here, awaited below
    await asyncio.sleep(0.1)  # now inside the limiter, its slot 0.4 s away
    paused_at = loop.time()
    await gate.on_rate_limited(1.0)
    await waiting
    assert loop.time() - paused_at >= 0.99


async def test_leases_grow_while_fast_shrink_when_slow_and_go_back(tmp_path: Path):
    time = FakeTime()
    output = {"shard_max_records": 1, "compression": "none"}
    store = await SqliteStore.open(Layout(tmp_path), output)
    settings = BudgetSettings(max_credits=1000, credits_per_request=2)
    budget = Budget(settings, store, lease_requests=4, clock=time.clock)

    async def lease(after: float) -> int:
        """Use up the lease in hand, ``after`` seconds later take the next; its size."""
        while budget.spent < store.ledger.leased:
            await budget.reserve(0)
        time.now += after
        before = store.ledger.leased
        await budget.reserve(0)
        return store.ledger.leased - before

    # leases less than a second apart double; a slow patch halves the next one
    assert [await lease(0.1) for _ in range(4)] == [8, 16, 32, 64]
    assert await lease(5.0) == 32
    await budget.give_back()  # one request of the last lease was used: the rest goes back
    assert store.ledger.leased == 8 + 16 + 32 + 64 + 2 and budget.spent == store.ledger.leased
    capped = BudgetSettings(max_credits=1000, max_credits_per_target=10)
    with pytest.raises(BudgetExhausted, match="max_credits_per_target"):
        await Budget(capped, store, lease_requests=1).reserve(10)
    await store.close()


def test_retries_stop_at_the_attempt_cap_and_the_time_cap():
    policy = RetryPolicy(max_attempts=4, max_seconds=10, base_seconds=1, cap_seconds=8)
    tries = policy.start(0.0)
    delays = [tries.next_delay(0.0) for _ in range(4)]
    assert delays[3] is None and all(d is not None for d in delays[:3])  # 4 tries in all
    seeded = RetryPolicy(max_seconds=10, base_seconds=1, cap_seconds=8, rng=random.Random(3))
    tries = seeded.start(0.0)
    assert tries.next_delay(10.0) is None  # any wait would pass max_seconds
    zero = RetryPolicy(base_seconds=0).start(0.0)
    assert zero.next_delay(0.0) == 0.0  # the zero-wait mode: same decisions, no sleeping
    with pytest.raises(ComeBackLater, match="wait 301 s"):
        RetryPolicy().check_retry_after(301.0)
    RetryPolicy().check_retry_after(300.0)  # at the cap: waited for


async def test_no_fsync_runs_on_the_event_loop_once_the_walk_has_begun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Seals and manifests fsync at every shard: on the loop they would hold up every walker
    (and a coordinated worker's heartbeats) for the disk's flush. Only the start-up's crash
    recovery, before the first request, may fsync there."""
    on_the_loop: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread() is threading.main_thread() and box.ledgers:
            on_the_loop.append("".join(traceback.format_stack(limit=8)[:-1]))
        real(fd)

    targets = [{"product_id": p, "region": "US"} for p in PRODUCTS[:4]]
    # small shards: several seals (shard, manifest) during the run, one at its end
    output = {"shard_max_records": 40, "compression": "gzip"}
    async with serve(SandboxOptions()) as (url, box):
        job = load_job(write_job(tmp_path, url, targets, output=output))
        monkeypatch.setattr(os, "fsync", fsync)
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 0
    assert len(list((tmp_path / "out" / "shards").glob("*.gz"))) > 3
    assert not on_the_loop, on_the_loop[0]
