"""The coordinated store: a job's state in Redis, shared by every worker, behind ``StateStore``.

It decides nothing of the job: ``crawler.state.rules`` does, as for one process, and this store
persists each decision with one APPLY script, checked against what the decision read (a lease's
epoch, the ledger's count) so that a worker whose view went stale changes nothing. A worker
leases a product (all its regions) at a time, renews the lease while it walks, and fences every
commit with the lease's epoch. Its own shard series carries its name; the shards' committed
lengths live here, so a reader is only ever shown committed bytes.

This class holds a worker's state and answers for it; the work is done by functions that take
the store, one module per part: ``opening`` (the checks and the registration before a worker
claims anything), ``run`` (a run's start, heartbeat and end), ``leases`` (claims, renewals,
products given back), ``credit`` (the ledger's credits) and ``commits`` (a batch persisted).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

import orjson

from crawler.coordination import commits, credit, leases, opening, run, sealing
from crawler.coordination import sources as found_by
from crawler.coordination.leases import Lease
from crawler.coordination.link import Link
from crawler.coordination.opening import Origin, shard_info
from crawler.coordination.orphans import Shared
from crawler.coordination.scripts import APPLY, CLAIM, RENEW
from crawler.coordination.seen import ItemSeen, ProductSeen
from crawler.coordination.sync import sync_targets
from crawler.coordination.writes import Writes, flat, totals_from
from crawler.output.dedup import SeenSet
from crawler.output.layout import Layout
from crawler.sources import Source, SourceTarget
from crawler.state import rules
from crawler.state.events import Commit, WriterPosition
from crawler.state.model import Claimed, Ledger, SeriesState, ShardInfo, TargetState, Totals
from crawler.targets import Target, TargetList

__all__ = ["Lease", "Origin", "RedisStore", "default_worker", "ledger_from", "prefix_of"]


def prefix_of(job: str) -> str:
    return f"crawler:{job}:"


def default_worker() -> str:
    name = f"{socket.gethostname()}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RedisStore:
    """One worker's view of a coordinated job."""

    def __init__(
        self,
        link: Link,
        job: str,
        worker: str,
        layout: Layout,
        lease_seconds: float,
        *,
        shared: Shared | None = None,
    ):
        self.layout = layout
        # a bucket's output: any worker's committed shard, fetched from its parts to this folder
        self._shared = shared
        self.link = link
        self.worker = worker
        self.seen = ProductSeen()
        self.found = asyncio.Event()  # set at each commit of a source page of this worker
        self.totals = Totals()
        self.ledger = Ledger()
        self.refresh = 0
        self._p = prefix_of(job)
        self._w = self.key(f"w:{worker}")
        self._lease_ms = int(lease_seconds * 1000)
        # silent this long, a worker is taken for dead and its open shard sealed: twice a lease,
        # as retiring a worker that was only slow to start or busy costs it its run
        self._dead_ms = 2 * self._lease_ms
        self._inc = 0
        self._commit_seq = 0
        self._lease_seq = 0
        self._next_shard = 1
        self._open_shard: ShardInfo | None = None
        self._position = WriterPosition()
        self._sealed: list[ShardInfo] = []  # this worker's, for recovery
        self._earlier_open: dict[str, Any] | None = None  # the shard its last incarnation had
        self._leases: dict[str, Lease] = {}
        self._live: dict[int, tuple[TargetState, Target, Lease]] = {}
        # the source targets of the series this worker holds, and their items' seen-sets
        self._live_sources: dict[int, tuple[TargetState, SourceTarget, Lease]] = {}
        self._items: dict[str, ItemSeen] = {}
        self._sources: set[str] = set()  # the job's sources, by name
        self.series_states: dict[str, SeriesState] = {}  # this worker's series shards
        self._queue: list[Claimed] = []
        self._claiming = asyncio.Lock()
        # one adoption at a time: the heartbeat's and the end's would fetch one shard twice
        self._adopting = asyncio.Lock()
        self._next_id = 1
        self._drained = False
        self.retired = False
        self.pages_committed = 0  # this worker's, for the rate in its heartbeat
        self.held: int | None = None  # the lock on this worker's name on this machine
        self._apply = link.script(APPLY)
        self._claim = link.script(CLAIM)
        self._renew = link.script(RENEW)

    def key(self, name: str) -> str:
        return self._p + name

    def count(self, writes: Writes, delta: rules.Delta) -> None:
        """The sums a change of targets moves: totals by status, each refresh's figures."""
        for name, value in flat(delta.totals).items():
            writes.op("HINCRBYFLOAT", self.key("totals"), name, repr(value))
        for refresh, figures in delta.refreshes.items():
            for name, value in figures.items():
                if value:
                    writes.op("HINCRBY", self.key(f"refresh:{refresh}"), name, value)

    async def apply(
        self, writes: Writes, *, chan: str = "", seq: int = 0, fenced: bool = True
    ) -> list[str]:
        """Persist one decided change: ['ok'], ['retired'], or ['stale', key, ...]. Sent again
        after a lost answer (``Link.call``), it is applied once: by its sequence number on a
        channel one task sends in order (commits, leases), else by a request id of its own.
        ``fenced``: refused once this incarnation is retired."""
        payload = {"inc": self._inc if fenced else None, "chan": chan, "seq": seq,
                   "rid": "" if chan else uuid.uuid4().hex,
                   "checks": writes.checks, "ops": writes.ops}  # fmt: skip
        answer: list[str] = await self._apply(keys=[self._w], args=[orjson.dumps(payload)])
        if answer[0] == "retired":
            self.retired = True
        return answer

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        link: Link,
        *,
        job: str,
        worker: str,
        layout: Layout,
        output: dict[str, Any],
        lease_seconds: float,
        origin: Origin | None = None,
        shared: Shared | None = None,
    ) -> RedisStore:
        store = cls(link, job, worker, layout, lease_seconds, shared=shared)
        await opening.check_durability(store)
        await opening.check_identity(store, origin or Origin("", explicit=True))
        await opening.check_output(store, output)
        await opening.register_worker(store)
        await credit.forfeit(store, store._w)
        await opening.seal_my_open_shard(store)
        await sealing.seal_mine(store)
        store.series_states = await found_by.load_series(store)
        await store.refresh_view()
        return store

    async def refresh_view(self) -> None:
        """The job's totals and ledger as Redis has them (for the progress display)."""
        redis = self.link.redis
        totals, ledger = await self.link.call(
            lambda: asyncio.gather(
                redis.hgetall(self.key("totals")), redis.hgetall(self.key("ledger"))
            )
        )
        self.totals = totals_from(totals)
        self.ledger = ledger_from(ledger)

    # -- what the run reads --------------------------------------------------------------------

    @property
    def position(self) -> WriterPosition:
        return self._position

    @property
    def open_shard(self) -> ShardInfo | None:
        return self._open_shard

    @property
    def next_shard(self) -> int:
        return self._next_shard

    @property
    def shard_prefix(self) -> str:
        return f"reviews-{self.worker}-"

    def shards(self) -> list[ShardInfo]:
        return list(self._sealed)

    async def manifest(self) -> tuple[list[ShardInfo], list[ShardInfo]]:
        """Every worker's sealed shards, in the order opened, and the open ones' committed
        parts: the job's manifest."""
        redis = self.link.redis
        order, shards = await self.link.call(
            lambda: asyncio.gather(
                redis.zrange(self.key("shardorder"), 0, -1), redis.hgetall(self.key("shards"))
            )
        )
        docs = [orjson.loads(shards[f]) for f in order if f in shards]
        sealed = [shard_info(d) for d in docs if d["sha256"] is not None]
        return sealed, [shard_info(d) for d in docs if d["sha256"] is None and d["records"]]

    # -- the run's life ------------------------------------------------------------------------

    async def sync_targets(self, targets: TargetList) -> bool:
        return await sync_targets(self, targets)

    async def begin_run(self, *, refresh: bool, mode: str, probe: bool = False) -> int:
        return await run.begin_run(self, refresh=refresh, mode=mode, probe=probe)

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        await run.end_run(self, info, budget_stopped=budget_stopped)

    async def maintain(self) -> None:
        await run.maintain(self)

    # -- targets -------------------------------------------------------------------------------

    async def claim(self) -> Claimed | None:
        return await leases.claim(self)

    async def renew(self, rate: float = 0.0) -> None:
        await leases.renew(self, rate)

    def holds(self, target_id: int) -> bool:
        held = self._live.get(target_id) or self._live_sources.get(target_id)
        return held is not None and not held[2].lost

    # -- sources (``found_by``: the Redis side of them) ---------------------------------------

    @property
    def finding(self) -> bool:
        """This worker holds a series whose walk is under way: its commits may queue products."""
        return any(
            found_by.is_series(lease.product_id) and not lease.lost and lease.targets
            for lease in self._leases.values()
        )

    def series(self, name: str) -> SeriesState:
        return self.series_states.get(name) or SeriesState(name)

    def item_seen(self, name: str) -> SeenSet:
        """The seen-set a series' writer renders with: the committed ids come with its lease."""
        return self._items.setdefault(name, ItemSeen())

    async def series_manifest(self) -> dict[str, tuple[list[ShardInfo], list[ShardInfo]]]:
        return await found_by.series_manifest(self)

    async def sync_sources(self, sources: tuple[Source, ...]) -> None:
        self._sources = {source.name for source in sources}
        await found_by.sync_sources(self, sources)

    @property
    def worker_key(self) -> str:
        return self._w

    @staticmethod
    def ids_of(packed: bytes, other: bytes) -> list[str]:
        return commits.ids_of(packed, other)

    # -- credits -------------------------------------------------------------------------------

    async def lease(self, credits: int, cost: int, ceiling: int) -> int:
        return await credit.lease(self, credits, cost, ceiling)

    async def give_back(self, credits: int) -> None:
        await credit.give_back(self, credits)

    # -- commits -------------------------------------------------------------------------------

    async def commit(self, batch: Commit) -> list[TargetState]:
        return await commits.commit(self, batch)

    async def close(self) -> None:
        await self.link.close()
        if self.held is not None:
            os.close(self.held)
            self.held = None


def ledger_from(fields: dict[str, str]) -> Ledger:
    return Ledger(
        int(fields.get("leased", 0)), int(fields.get("credits", 0)), int(fields.get("forfeited", 0))
    )
