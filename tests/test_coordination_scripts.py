"""The coordinated mode's atomic steps, driven one by one against a real redis-server: the
races a review found, each pinned (a lost answer, a paused worker waking mid-adoption)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from crawler.coordination import orphans
from crawler.coordination.link import Link
from crawler.coordination.scripts import APPLY, CLAIM, REGISTER, RENEW
from crawler.output.layout import Layout
from tests.conftest import RedisServer

P = "crawler:job:"


def k(name: str) -> str:
    return P + name


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    connection = redis.Redis(port=redis_server.port, decode_responses=True)
    yield connection
    connection.close()


def register(client: Any, worker: str) -> int:
    script = client.register_script(REGISTER)
    return int(
        script(keys=[k(f"w:{worker}"), k("workers"), k("leases")], args=[worker, "{}", P])[0]
    )


def claim(client: Any, worker: str, inc: int, request: str, lease_ms: int) -> list[Any]:
    script = client.register_script(CLAIM)
    keys = [k("todo"), k("leases"), k(f"w:{worker}"), k("retry")]
    result: list[Any] = script(keys=keys, args=[P, worker, request, lease_ms, inc, "1"])
    return result


def apply(
    client: Any,
    worker: str,
    inc: int,
    ops: list[list[Any]],
    *,
    checks: Sequence[Sequence[str]] = (),
    chan: str = "commit_seq",
    seq: int = 1,
) -> list[Any]:
    """The one writing script, as a store sends it."""
    payload = {"inc": inc, "chan": chan, "seq": seq, "checks": checks,
               "ops": [[str(a) for a in op] for op in ops]}  # fmt: skip
    result: list[Any] = client.register_script(APPLY)(
        keys=[k(f"w:{worker}")], args=[json.dumps(payload)]
    )
    return result


def keep_alive(client: Any, worker: str, inc: int, seconds: float) -> None:
    """``worker`` renewing (every 50 ms) for ``seconds``: Redis is reachable."""
    renew = client.register_script(RENEW)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        renew(keys=[k("leases"), k("workers"), k(f"w:{worker}")], args=[P, worker, 1000, inc, "{}"])
        time.sleep(0.05)  # far under half a lease (0.5 s), however busy the cores


def one_product(client: Any) -> None:
    client.hset(k("p:111"), mapping={"r:US": "{}", "e": 0})
    client.rpush(k("todo"), "111")


def test_a_claim_sent_again_never_hands_out_another_workers_lease(client):
    inc_a, inc_b = register(client, "a"), register(client, "b")
    one_product(client)
    keep_alive(client, "b", inc_b, 1.2)  # Redis up for longer than the lease
    first = claim(client, "a", inc_a, "req-1", 1000)
    assert first[:2] == ["111", "1"]  # its answer is lost on the way to a
    keep_alive(client, "b", inc_b, 1.1)  # a is cut off past its lease; b takes the product
    taken = claim(client, "b", inc_b, "req-2", 1000)
    assert taken[:2] == ["111", "2"]
    assert claim(client, "a", inc_a, "req-1", 1000) == []  # the repeat: not b's lease
    fenced = apply(
        client, "a", inc_a, [["SADD", k("seen:111"), "r1"]], checks=[(k("p:111"), "e", "1")]
    )
    assert fenced == ["stale", k("p:111")]
    assert client.scard(k("seen:111")) == 0


def test_a_worker_waking_during_its_adoption_keeps_its_commit(client, tmp_path: Path):
    inc = register(client, "w")
    one_product(client)
    time.sleep(2.1)  # past the lease, so the adoption below may run at all
    assert claim(client, "w", inc, "req", 60_000)[0] == "111"
    layout = Layout(tmp_path)
    layout.shards_dir.mkdir()
    shard = layout.shard("reviews-w-000001.jsonl")
    page1 = b"".join(b'{"review_id":"r%d"}\n' % i for i in range(10))
    page2 = b"".join(b'{"review_id":"r%d"}\n' % i for i in range(10, 20))

    def batch(seq: int, size: int, records: int) -> list[Any]:
        doc = {"file": shard.name, "worker": "w", "seq": 1, "sha256": None}
        ids = [f"r{i}" for i in range(records - 10, records)]
        ops = [["HSET", k("w:w"), "open_shard", shard.name],
               ["HSET", k("shards"), shard.name,
                json.dumps({**doc, "records": records, "bytes": size})],
               ["SADD", k("seen:111"), *ids]]  # fmt: skip
        return apply(client, "w", inc, ops, checks=[(k("p:111"), "e", "1")], seq=seq)

    shard.write_bytes(page1)
    assert batch(1, len(page1), 10) == ["ok"]
    shard.write_bytes(page1 + page2)  # page 2 fsynced; then w is paused, long past a lease
    client.zadd(k("workers"), {"w": int(time.time() * 1000) - 10_000})
    real_copy = orphans._copy_committed

    def copy_then_wake(path: Path, length: int) -> Path:
        copied = real_copy(path, length)
        assert batch(2, len(page1 + page2), 20) == ["ok"]
        return copied

    orphans._copy_committed = copy_then_wake  # the race, in order
    try:
        link = Link(f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0",
                    unavailable_seconds=5)  # fmt: skip

        async def adopt() -> list[str]:
            try:
                return await orphans.adopt_orphans(link, P, layout, 2000)
            finally:
                await link.close()

        assert asyncio.run(adopt()) == []  # refused: the copy is shorter than what is committed
    finally:
        orphans._copy_committed = real_copy
    doc = json.loads(client.hget(k("shards"), shard.name))
    assert doc["bytes"] == len(page1 + page2) and doc["sha256"] is None
    assert shard.read_bytes() == page1 + page2 and not list(tmp_path.rglob("*.adopt"))


def test_a_retired_incarnation_leases_no_credit(client):
    def lease(inc: int, credits: int, seq: int) -> list[Any]:
        ops = [["HINCRBY", k("ledger"), "leased", credits]]
        return apply(client, "w", inc, ops, chan="lease_seq", seq=seq)

    old = register(client, "w")
    assert lease(old, 10, 1) == ["ok"]
    assert lease(old, 10, 1) == ["ok"]  # a repeat after a lost answer: applied once
    assert lease(old, -4, 2) == ["ok"]  # given back
    new = register(client, "w")  # the same name started again elsewhere
    assert lease(old, 10, 3) == ["retired"]
    assert lease(new, 10, 3) == ["ok"]
    assert int(client.hget(k("ledger"), "leased")) == 16


def test_after_a_gap_of_every_worker_nothing_is_taken_over_for_a_lease(client):
    inc_a, inc_b = register(client, "a"), register(client, "b")
    one_product(client)
    time.sleep(1.2)
    assert claim(client, "a", inc_a, "r1", 1000)[0] == "111"
    time.sleep(1.5)  # nobody reached Redis for longer than half a lease: an outage
    assert claim(client, "b", inc_b, "r2", 1000)[0] == "wait"  # a may only have been cut off
    keep_alive(client, "b", inc_b, 1.2)  # b goes on renewing: the clock runs again
    answer = claim(client, "b", inc_b, "r3", 1000)
    assert answer[:2] == ["111", "2"], (answer, client.hgetall(k("clock")), client.time())


def shared_and_local_slowdown(client: Any, steps: Sequence[tuple[str, float]]) -> Any:
    """Drives the Redis gate's scripts and a ``Slowdown`` through the same 429s ("limited", or
    "limited:S" with a pause of S seconds) and requests ("ask"), each ``seconds`` after the one
    before, and checks that they agree at every step; answers the ``Slowdown``. Redis's clock
    cannot be moved, so the times stored in the gate's hash are moved back instead."""
    from crawler.coordination.scripts import RATE, RATE_LIMITED  # noqa: PLC0415 -- these tests'
    from crawler.pacing.slowdown import Slowdown  # noqa: PLC0415 -- as above

    key = "crawler:rate:abc"
    rate, limited = client.register_script(RATE), client.register_script(RATE_LIMITED)
    local = Slowdown()

    def past(seconds: float) -> None:  # every stored time, `seconds` earlier
        for field in ("changed", "reached", "pause", "began"):
            if (value := client.hget(key, field)) is not None:
                client.hset(key, field, f"{float(value) - seconds * 1e6:.0f}")

    def shares() -> tuple[float, float]:
        return float(client.hget(key, "factor")), float(client.hget(key, "ceiling"))

    now = paused_at = 0.0
    for event, seconds in steps:
        past(seconds)
        now += seconds
        if event.startswith("limited"):
            pause = float(event.partition(":")[2] or 0)
            _, ceiling = limited(keys=[key], args=[int(pause * 1e6), 0])
            local.limited(now)
            paused_at = now + pause
            assert float(ceiling) == pytest.approx(local.ceiling, abs=0.005)  # limited_at's
        else:
            rate(keys=[key, key + ":sent"], args=[100, 1.5, 1, 0.02])
            local.recover(now, paused_at)
        # a climb step moves 0.1 a second, and Redis's clock goes on between the scripts
        assert shares() == pytest.approx((local.share, local.ceiling), abs=0.005), (event, now)
    return local


def test_the_shared_slowdown_follows_the_one_process_rules(client):
    """The Redis gate slows down and climbs back as ``slowdown.Slowdown`` does: halved, back to
    just under the rate that drew the 429, held, probed, stepped back without halving."""
    steps = [("limited", 0), ("ask", 6), ("ask", 20), ("ask", 13), ("limited", 0), ("ask", 32.5),
             ("limited", 0), ("ask", 11), ("limited", 0), ("ask", 3)]  # fmt: skip
    local = shared_and_local_slowdown(client, steps)
    # the steps took each branch: halved at 1, probed to 0.93, stepped back to 0.95 of it,
    # probed, stepped back, then halved at the safe share and climbed 3 s
    assert local.ceiling == pytest.approx((0.93 * 0.95 + 0.025) * 0.95)
    assert local.share == pytest.approx(local.ceiling * 0.5 + 0.3)


def test_the_shared_slowdown_holds_from_the_end_of_a_long_pause(client):
    steps = [("limited", 0), ("ask", 6), ("ask", 33), ("limited:120", 0), ("ask", 121),
             ("ask", 32)]  # fmt: skip
    local = shared_and_local_slowdown(client, steps)
    assert local.share == pytest.approx(0.93 * 0.95 + 0.03)  # held 30 s from the pause's end


def test_the_shared_slowdown_leaves_its_floor(client):
    """Halved down to the floor (5% of the rate), the rate is held there, then probed upwards:
    it never stays at the floor for good."""
    local = shared_and_local_slowdown(client, [("limited", 0.0)] * 6 + [("ask", 40.0)])
    assert local.share == pytest.approx(0.9 * 0.05 + 0.01 * 10)


def test_targets_show_stopped_budget_only_once_no_walk_is_under_way(client, redis_server):
    """Leased credits reaching max_credits say the budget is spent only once no worker walks:
    while a lease runs, its credits may still walk pending targets."""
    from crawler.config import BudgetSettings  # noqa: PLC0415 -- this test's
    from crawler.coordination.view import RedisView  # noqa: PLC0415 -- as above

    one_product(client)
    # US: a walk under way; GB: never begun (a budget stop cuts nothing of it short)
    client.hset(k("p:111"), mapping={"r:US": '{"walk_pages": 2}', "r:GB": "{}"})
    client.hset(k("ledger"), mapping={"leased": 100, "credits": 60})
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000

    def statuses() -> tuple[bool, list[str]]:  # the report reads `walking` (report.build)
        view = RedisView(redis_server.url, "job", BudgetSettings(max_credits=100))
        try:
            return view.walking, [status for (status,) in view.rows(("status",))]
        finally:
            view.close()

    client.zadd(k("leases"), {"222": now_ms + 60_000})  # a walk under way
    assert statuses() == (True, ["pending", "pending"])
    client.zadd(k("leases"), {"222": now_ms - 1})  # its lease run out: nobody walks
    assert statuses() == (False, ["pending", "stopped_budget"])


def test_the_shared_slowdown_carries_on_from_an_older_crawlers_state(client):
    """A hash an older crawler wrote (no ``reached``, ``ceiling`` or ``margin``) with a share
    between the safe one and 1: the hold starts at the first request, then the rate probes up
    (it had stayed where it was for good)."""
    from crawler.coordination.scripts import RATE  # noqa: PLC0415 -- this test's

    key = "crawler:rate:old"
    rate = client.register_script(RATE)
    client.hset(key, mapping={"factor": 0.95, "changed": 0, "pause": 0, "tat": 0})
    rate(keys=[key, key + ":sent"], args=[100, 1.5, 1, 0.02])
    reached = float(client.hget(key, "reached"))
    client.hset(key, "reached", f"{reached - 40e6:.0f}")  # 40 s later
    rate(keys=[key, key + ":sent"], args=[100, 1.5, 1, 0.02])
    assert float(client.hget(key, "factor")) == pytest.approx(1.0)


def test_a_late_429_begins_no_shared_episode(client):
    from crawler.coordination.scripts import RATE_LIMITED  # noqa: PLC0415 -- this test's

    key = "crawler:rate:late"
    limited = client.register_script(RATE_LIMITED)
    assert int(limited(keys=[key], args=[0, 0])[0]) == 1
    for field in ("changed", "pause", "began"):  # 5 s later
        client.hset(key, field, f"{float(client.hget(key, field)) - 5e6:.0f}")
    assert int(limited(keys=[key], args=[0, 10_000_000])[0]) == 0  # sent 10 s ago
    assert float(client.hget(key, "factor")) == pytest.approx(0.5)
    assert int(limited(keys=[key], args=[0, 1_000_000])[0]) == 1  # sent 1 s ago
    assert float(client.hget(key, "factor")) == pytest.approx(0.25)


def test_the_rates_jobs_said_are_answered_again_the_same(client):
    """RATE_SAID answers the other jobs' rates; sent again (a lost answer), the same."""
    from crawler.coordination.scripts import RATE_SAID  # noqa: PLC0415 -- this test's

    said = client.register_script(RATE_SAID)
    key = "crawler:rate:x:said"
    assert said(keys=[key], args=[300, "first"]) == []
    assert said(keys=[key], args=[200, "second"]) == ["first", "300"]
    assert said(keys=[key], args=[200, "second"]) == ["first", "300"]
    assert said(keys=[key], args=[200, "first"]) == ["second", "200"]  # its own rate, changed


def test_in_the_quiet_after_an_outage_a_queued_product_stays_with_its_holder(client):
    inc_a, inc_b = register(client, "a"), register(client, "b")
    one_product(client)
    keep_alive(client, "b", inc_b, 1.2)  # Redis up for longer than the lease
    assert claim(client, "a", inc_a, "r1", 1000)[0] == "111"
    client.rpush(k("todo"), "111")  # queued again (a retry at some worker's start)
    time.sleep(1.5)  # an outage: a's lease looks run out, only because nobody reached Redis
    assert claim(client, "b", inc_b, "r2", 1000)[0] == "wait"
    assert client.hget(k("p:111"), "o") == f"a#{inc_a}" and client.sismember(k("retry"), "111")


async def test_an_idle_worker_waits_between_claims(redis_server: RedisServer, tmp_path: Path):
    """Nothing to take but a product that may yet come free: it asks a few times a second."""
    from crawler.coordination.store import RedisStore  # noqa: PLC0415 -- this test's alone

    sync = redis.Redis(port=redis_server.port, decode_responses=True)
    inc_a = register(sync, "a")
    one_product(sync)
    assert claim(sync, "a", inc_a, "r1", 1000)[0] == "111"
    sync.hset(k("clock"), "quiet", int(time.time() * 1000) + 60_000)  # just after an outage
    store = await RedisStore.open(
        Link(redis_server.url, unavailable_seconds=5), job="job", worker="b",
        layout=Layout(tmp_path), output={}, lease_seconds=1,
    )  # fmt: skip
    sync.config_resetstat()
    try:
        await asyncio.wait_for(store.claim(), 1.0)
    except TimeoutError:
        pass
    finally:
        await store.close()
    calls = int(sync.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    sync.close()
    assert calls <= 15, calls


def test_a_retired_worker_leaves_no_uncommitted_shard(client, tmp_path: Path):
    """Killed between writing a batch's new shard and the commit that records it, a worker that
    never comes back under its name leaves that file behind: retiring it removes the file."""
    register(client, "d")
    name = "reviews-d-000001.jsonl"
    sealed = {"file": name, "worker": "d", "seq": 1, "records": 1,
              "bytes": 20, "sha256": "x"}  # fmt: skip
    client.hset(k("shards"), name, json.dumps(sealed))
    client.hset(k("w:d"), mapping={"next_shard": 2, "open_shard": "", "outstanding": 6})
    layout = Layout(tmp_path)
    layout.shards_dir.mkdir()
    layout.shard(name).write_bytes(b'{"review_id":"r1"}\n')
    stray = layout.shard("reviews-d-000002.jsonl")
    stray.write_bytes(b'{"review_id":"r2"}\n')  # a batch's new shard, never committed
    client.zadd(k("workers"), {"d": int(time.time() * 1000) - 10_000})
    time.sleep(2.1)  # Redis up longer than the span a worker must be silent for
    port = client.connection_pool.connection_kwargs["port"]

    async def retire() -> list[str]:
        link = Link(f"redis://127.0.0.1:{port}/0", unavailable_seconds=5)
        try:
            return await orphans.adopt_orphans(link, P, layout, 2000)
        finally:
            await link.close()

    assert asyncio.run(retire()) == ["d"]
    assert not stray.exists() and layout.shard(name).exists()
    assert client.hget(k("w:d"), "ended") == "1" and client.hget(k("ledger"), "forfeited") == "6"
    assert asyncio.run(retire()) == []  # retired once
