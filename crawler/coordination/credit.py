"""A worker's credits: leased from the job's ledger, given back, forfeited when it died."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crawler.coordination.writes import Writes
from crawler.errors import LeaseLost
from crawler.state import rules
from crawler.state.model import Ledger

if TYPE_CHECKING:
    from crawler.coordination.store import RedisStore


async def lease(store: RedisStore, credits: int, cost: int, ceiling: int) -> int:
    """``rules.lease_size`` of what the ledger says now, added only if the ledger still
    says it (another worker leasing meanwhile: read again, decide again)."""
    ledger = store.key("ledger")
    while True:
        raw = await store.link.call(lambda: store.link.redis.hget(ledger, "leased"))
        size = rules.lease_size(int(raw or 0), credits, cost, ceiling)
        if size == 0:
            return 0
        writes = Writes()
        writes.check(ledger, "leased", raw)
        writes.op("HINCRBY", ledger, "leased", size)
        writes.op("HINCRBY", store._w, "outstanding", size)
        if await _credits(store, writes) == "ok":
            store.ledger.leased += size
            return size


async def give_back(store: RedisStore, credits: int) -> None:
    writes = Writes()
    writes.op("HINCRBY", store.key("ledger"), "leased", -credits)
    writes.op("HINCRBY", store._w, "outstanding", -credits)
    await _credits(store, writes)
    store.ledger.leased -= credits


async def _credits(store: RedisStore, writes: Writes) -> str:
    store._lease_seq += 1
    answer = await store.apply(writes, chan="lease_seq", seq=store._lease_seq)
    if answer[0] == "retired":  # not one more credit for this incarnation
        raise LeaseLost(
            f"worker {store.worker}: another process took this worker's name, or the others "
            "found it dead; start it again"
        )
    return answer[0]


async def forfeit(store: RedisStore, worker_key: str) -> None:
    """The credits a worker's earlier incarnation leased and never gave back (it died, or
    was retired while paused) count as forfeited: maybe sent, never to be used now."""
    raw = await store.link.call(lambda: store.link.redis.hget(worker_key, "outstanding"))
    if not raw or int(raw) <= 0:
        return
    ledger = Ledger()
    rules.crashed(ledger, int(raw))
    writes = Writes()
    writes.check(worker_key, "outstanding", raw)  # once, whoever does it
    writes.op("HINCRBY", store.key("ledger"), "forfeited", ledger.forfeited)
    writes.op("HSET", worker_key, "outstanding", 0)
    await store.apply(writes, fenced=False)
