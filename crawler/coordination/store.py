"""The coordinated store: a job's state in Redis, shared by every worker, behind ``StateStore``.

It decides nothing of the job: ``crawler.state.rules`` does, as for one process, and this store
persists each decision with one APPLY script, checked against what the decision read (a lease's
epoch, the ledger's count) so that a worker whose view went stale changes nothing. A worker
leases a product (all its regions) at a time, renews the lease while it walks, and fences every
commit with the lease's epoch. Its own shard series carries its name; the shards' committed
lengths live here, so a reader is only ever shown committed bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from array import array
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from crawler import logs
from crawler.coordination import sources as found_by
from crawler.coordination.link import Link
from crawler.coordination.orphans import Shared, adopt_orphans, install, seal_copy
from crawler.coordination.scripts import APPLY, CLAIM, REGISTER, RENEW
from crawler.coordination.seen import ItemSeen, ProductSeen
from crawler.coordination.sync import decoded, sync_targets
from crawler.coordination.writes import Writes, doc_of, flat, parse_doc, totals_from
from crawler.errors import ConfigError, CoordinationError, LeaseLost, OutputError, StateError
from crawler.output.dedup import SeenSet
from crawler.output.layout import Layout, shard_sequence, write_atomically
from crawler.sources import Source, SourceTarget
from crawler.state import rules
from crawler.state.events import Commit, PageCommitted, ShardOpened, Status, WriterPosition
from crawler.state.model import Claimed, Ledger, SeriesState, ShardInfo, TargetState, Totals
from crawler.state.verdict import Verdict
from crawler.targets import Target, TargetList

log = logs.get_logger("crawler.coordination")
_WAIT_MS = (100, 500)  # with nothing to claim, how soon to look again: never a busy loop


@dataclass
class Lease:
    """A product held by this worker; ``lost`` once its epoch moved on."""

    product_id: str
    epoch: str
    version: str  # the product's targets' version at the claim: a sync since may add some
    refresh: int  # the refresh under way at the claim: one started since walks it again
    targets: set[int] = field(default_factory=set)  # local ids of its targets not final yet
    lost: bool = False


@dataclass(frozen=True)
class Origin:
    """Where a worker's job file is: two files that only share a name are two jobs."""

    path: str  # the job file, resolved
    explicit: bool  # named by coordination.job: the user says it is the same job


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
        await store._check_durability()
        await store._check_identity(origin or Origin("", explicit=True))
        await store._check_output(output)
        await store._register()
        await store._forfeit(store._w)
        await store._seal_my_open_shard()
        await found_by.seal_mine(store)
        store.series_states = await found_by.load_series(store)
        await store.refresh_view()
        return store

    async def _check_durability(self) -> None:
        """Refuse a Redis that could forget an acknowledged commit or lease (see README)."""
        try:
            settings = await self.link.call(lambda: self.link.redis.config_get("append*"))
        except CoordinationError as exc:
            # managed services often deny CONFIG to their users: the rest may still be allowed
            if "CONFIG" not in str(exc).upper() and "NOPERM" not in str(exc):
                raise
            log.warning("cannot read Redis's persistence settings", error=str(exc)[:200])
            return
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise ConfigError(
                f"Redis at {self.link.url}: appendonly={settings.get('appendonly')}, "
                f"appendfsync={settings.get('appendfsync')}; a coordinated job needs "
                "appendonly yes and appendfsync always, so that a Redis restart loses no "
                "committed page and no credit lease (CONFIG SET appendonly yes; CONFIG SET "
                "appendfsync always)"
            )

    async def _check_identity(self, origin: Origin) -> None:
        """One name, one job: a job file elsewhere on this machine under a name a job on this
        Redis has is another job (refused), unless coordination.job names it on purpose; a
        folder holding another job's shards is refused too."""
        redis, meta, host = self.link.redis, self.key("meta"), socket.gethostname()
        name = self._p[8:-1]
        if origin.path:
            await self.link.call(lambda: redis.hsetnx(meta, f"origin:{host}", origin.path))
            first = await self.link.call(lambda: redis.hget(meta, f"origin:{host}"))
            if first != origin.path and not origin.explicit:
                raise ConfigError(
                    f"{origin.path}: coordination.job: a job named {name!r} on this Redis was "
                    f"started from {first}; this file is another job: give it a "
                    f"coordination.job of its own (or, if it is the same job moved, set "
                    f"coordination.job: {name})"
                )
        await self.link.call(lambda: redis.hsetnx(meta, "id", uuid.uuid4().hex))
        job_id = await self.link.call(lambda: redis.hget(meta, "id"))
        marker = self.layout.coordinated
        mine = {"job": name, "id": job_id}
        try:
            saved = orjson.loads(marker.read_bytes()) if marker.exists() else None
        except (OSError, orjson.JSONDecodeError):
            saved = None
        if saved is not None and saved.get("id") != job_id:
            raise StateError(
                f"{self.layout.root}: holds the shards of another coordinated job "
                f"({saved.get('job')!r}), or of one whose state this Redis no longer has; "
                "use another output.dir"
            )
        if saved is None:
            await asyncio.to_thread(_mark, marker, orjson.dumps(mine) + b"\n")

    async def _check_output(self, output: dict[str, Any]) -> None:
        meta = self.key("meta")
        wanted = orjson.dumps(output).decode()
        redis = self.link.redis
        await self.link.call(lambda: redis.hsetnx(meta, "output", wanted))
        saved = await self.link.call(lambda: redis.hget(meta, "output"))
        if saved != wanted:
            raise StateError(
                f"coordinated job {self._p[8:-1]!r}: the output settings changed since it started "
                f"(saved {saved}, now {wanted}); put them back or name another coordination.job"
            )

    async def _register(self) -> None:
        info = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid()}).decode()
        register = self.link.script(REGISTER)
        inc, commit_seq, lease_seq, next_shard, open_file = await register(
            keys=[self._w, self.key("workers"), self.key("leases")],
            args=[self.worker, info, self._p],
        )
        self._inc, self._commit_seq, self._lease_seq = int(inc), int(commit_seq), int(lease_seq)
        self._next_shard = int(next_shard)
        redis = self.link.redis
        shards = await self.link.call(lambda: redis.hgetall(self.key("shards")))
        mine = [orjson.loads(v) for v in shards.values()]
        mine = [s for s in mine if s["worker"] == self.worker]
        mine.sort(key=lambda s: s["seq"])
        self._sealed = [_info(s) for s in mine if s["sha256"] is not None]
        self._earlier_open = next((s for s in mine if s["file"] == open_file), None)

    async def _forfeit(self, worker_key: str) -> None:
        """The credits a worker's earlier incarnation leased and never gave back (it died, or
        was retired while paused) count as forfeited: maybe sent, never to be used now."""
        raw = await self.link.call(lambda: self.link.redis.hget(worker_key, "outstanding"))
        if not raw or int(raw) <= 0:
            return
        ledger = Ledger()
        rules.crashed(ledger, int(raw))
        writes = Writes()
        writes.check(worker_key, "outstanding", raw)  # once, whoever does it
        writes.op("HINCRBY", self.key("ledger"), "forfeited", ledger.forfeited)
        writes.op("HSET", worker_key, "outstanding", 0)
        await self.apply(writes, fenced=False)

    async def _seal_my_open_shard(self) -> None:
        """A new incarnation never appends to the file an earlier one had open: that one may be
        only paused and write again. The committed part is sealed under the file's name (a
        copy, renamed in: the old file lives on, unnamed, for whoever still writes it), and
        this incarnation starts a new file."""
        doc = self._earlier_open
        if (
            doc is not None
            and self._shared is not None
            and not self.layout.shard(doc["file"]).exists()
            and not await self._shared.fetch(doc["file"], doc["bytes"], records=doc["records"])
        ):
            # its machine, or its files, are gone, and so are its committed parts: going on
            # would leave its committed reviews out of the output, silently
            raise StateError(
                f"{doc['file']}: the shard an earlier run of worker {self.worker} left open "
                f"({doc['records']:,} reviews, {doc['bytes']:,} bytes committed) is neither in "
                f"{self.layout.shards_dir} nor whole in the bucket's parts; it cannot be sealed"
            )
        if doc is None or not self.layout.shard(doc["file"]).exists():
            return  # none, or on another machine's disk: that machine's to finish
        path = self.layout.shard(doc["file"])
        record = orjson.dumps(doc).decode()
        writes = Writes()
        writes.check(self.key("shards"), doc["file"], record)
        writes.op("HSET", self._w, "open_shard", "")
        if doc["records"] == 0:  # opened, nothing committed: nothing to keep (the file first: a
            # kill before the record goes leaves an empty open record, never listed)
            await asyncio.to_thread(path.unlink, missing_ok=True)
            writes.op("HDEL", self.key("shards"), doc["file"])
            writes.op("ZREM", self.key("shardorder"), doc["file"])
            await self.apply(writes)
            return
        copy, sealed = await asyncio.to_thread(seal_copy, path, doc)
        writes.op("HSET", self.key("shards"), doc["file"], orjson.dumps(sealed).decode())
        writes.op("HINCRBY", self.key("meta"), "shards_version", 1)
        if (await self.apply(writes))[0] != "ok":
            await asyncio.to_thread(copy.unlink, missing_ok=True)
            return
        await asyncio.to_thread(install, copy, path, self.layout)
        self._sealed.append(_info(sealed))
        log.info("sealed the shard an earlier run of this worker left open", shard=doc["file"])

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
        sealed = [_info(d) for d in docs if d["sha256"] is not None]
        return sealed, [_info(d) for d in docs if d["sha256"] is None and d["records"]]

    # -- the run's life ------------------------------------------------------------------------

    async def sync_targets(self, targets: TargetList) -> bool:
        return await sync_targets(self, targets)

    async def begin_run(self, *, refresh: bool, mode: str, probe: bool = False) -> int:
        """A worker's run: products with failed or capped targets are queued again; with
        ``refresh``, a refresh starts unless one is under way (then this worker joins it). A
        refresh is the job's: every worker applies it to the products it takes."""
        await self._queue_retries()
        redis, meta = self.link.redis, self.key("meta")
        await self.link.call(lambda: redis.hdel(meta, "budget_stopped"))  # it may be raised
        current = int(await self.link.call(lambda: redis.hget(meta, "refresh")) or 0)
        queued = int(await self.link.call(lambda: redis.hget(meta, "refresh_queued")) or 0)
        if queued != current:  # a refresh a kill left half-queued: queued whole, flag or not
            await self._queue_every_product(current)
        by_plan = await self.link.call(lambda: redis.hget(meta, "refresh_by_plan")) == str(current)
        if refresh:
            current = await self._start_refresh(current, mode, probe=probe, by_plan=by_plan)
        elif by_plan and not probe:
            await self._walked_by_a_run()
        self.refresh = current
        await self.refresh_view()
        return current

    async def _start_refresh(self, current: int, mode: str, *, probe: bool, by_plan: bool) -> int:
        """``rules.refresh_to_walk``: refresh ``current + 1``, its products all queued (once,
        even through a kill), or the refresh there is."""
        redis, meta = self.link.redis, self.key("meta")
        todo, held = await self.link.call(
            lambda: asyncio.gather(redis.llen(self.key("todo")), redis.zcard(self.key("leases")))
        )
        under_way = bool(current) and bool(todo or held)
        walked = rules.refresh_to_walk(current, asked=True, under_way=under_way, by_plan=by_plan)
        if walked == current:
            if by_plan and not probe:
                await self._walked_by_a_run()
            return current
        writes = Writes()
        writes.check(meta, "refresh", current or None)
        writes.op("HSET", meta, "refresh", walked)
        if probe:
            writes.op("HSET", meta, "refresh_by_plan", walked)
        started = orjson.dumps({"started_at": time.time(), "mode": mode}).decode()
        writes.op("HSET", self.key("refreshes"), walked, started)
        if (await self.apply(writes))[0] != "ok":  # another worker started it: joined
            return int(await self.link.call(lambda: redis.hget(meta, "refresh")) or 0)
        await self._queue_every_product(walked)
        return walked

    async def _walked_by_a_run(self) -> None:
        """The refresh a plan started is a run's now: the next --refresh is a new one."""
        writes = Writes()
        writes.op("HDEL", self.key("meta"), "refresh_by_plan")
        await self.apply(writes)

    async def _queue_every_product(self, refresh: int) -> None:
        redis, meta = self.link.redis, self.key("meta")
        saved = await self.link.call(lambda: redis.hget(meta, "targets_list"))
        products = list(dict.fromkeys(p for p, _ in decoded(saved).pairs())) if saved else []
        # and what sources found, walked again as listed ones are; the sources first of all
        found = await self.link.call(lambda: redis.smembers(self.key("found")))
        products = list(dict.fromkeys([*products, *sorted(f.rpartition(":")[0] for f in found)]))
        series = await self.link.call(lambda: redis.smembers(self.key("series")))
        if series:
            writes = Writes()
            writes.members("LPUSH", self.key("todo"), [found_by.unit(n) for n in sorted(series)])
            await self.apply(writes)
        for start in range(0, len(products), 10_000):
            writes = Writes()
            writes.members("RPUSH", self.key("todo"), products[start : start + 10_000])
            await self.apply(writes)
        writes = Writes()
        writes.op("HSET", meta, "refresh_queued", refresh)
        await self.apply(writes)

    async def _queue_retries(self) -> None:
        retry = self.key("retry")
        products = await self.link.call(lambda: self.link.redis.smembers(retry))
        if products:
            writes = Writes()
            writes.members("RPUSH", self.key("todo"), sorted(products))
            writes.members("SREM", retry, sorted(products))
            await self.apply(writes)

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        """Give back the products still held (queued again for any worker), seal what dead
        workers left open here, and log the run."""
        for lease in list(self._leases.values()):
            await self._release_product(lease, requeue=True)
        await self._seal_orphans_here()
        writes = Writes()
        ended = orjson.dumps({"held": 0, "rate": 0.0, "stopped": True}).decode()
        # a clean end: what is leased and not given back went out with requests
        writes.op("HSET", self._w, "live", ended, "outstanding", 0, "ended", 1)
        writes.op("LPUSH", self.key("runs"), orjson.dumps({"worker": self.worker, **info}))
        writes.op("LTRIM", self.key("runs"), 0, 999)
        if budget_stopped:  # rules.BUDGET_STOPPED, shown by the view once no walk is under way
            writes.op("HSET", self.key("meta"), "budget_stopped", 1)
        await self.apply(writes)
        await self.refresh_view()

    async def _seal_orphans_here(self) -> None:
        """The last worker to end must not leave a dead one's open shard, with its uncommitted
        tail, in the folder: wait for such a worker to count as dead (a lease at most), then
        seal its shard. Live workers, and shards on other machines' disks, are not waited for."""
        loop = asyncio.get_running_loop()
        # long enough for a worker killed at the very end to count as dead, with room for a
        # quiet spell (a busy machine's late heartbeat) that holds adoptions back meanwhile
        deadline = loop.time() + 3 * self._dead_ms / 1000
        while loop.time() < deadline and await self._silent_with_shards_here():
            if self.link.settled(self._lease_ms / 1000):
                await self._adopt()
            await asyncio.sleep(self._lease_ms / 3000)
        if (
            self._shared is not None
            and loop.time() >= deadline
            and await self._silent_with_shards_here()
        ):
            # not an error (it may yet come back), but its shard is not listed until a worker
            # seals it: say so rather than end as if the output were whole
            log.warning(
                "a silent worker's open shard is still unsealed; run a worker again to seal "
                "it and list it in the manifest"
            )

    async def _adopt(self) -> None:
        await adopt_orphans(self.link, self._p, self.layout, self._dead_ms, self._shared)
        await found_by.seal_orphans(self)

    async def _silent_with_shards_here(self) -> bool:
        redis = self.link.redis
        seconds, micros = await self.link.call(redis.time)
        now = seconds * 1000 + micros // 1000
        beats = await self.link.call(
            lambda: redis.zrange(self.key("workers"), 0, -1, withscores=True)
        )
        for worker, beat in beats:
            if worker == self.worker or now - beat < self._lease_ms / 2:
                continue
            ended = await self.link.call(partial(redis.hget, self.key(f"w:{worker}"), "ended"))
            if ended == "1":
                continue
            if self._shared is not None:  # a bucket: its open shard is in reach, wherever it ran
                shard = await self.link.call(
                    partial(redis.hget, self.key(f"w:{worker}"), "open_shard")
                )
                if shard:
                    return True
            if await asyncio.to_thread(_has_files, self.layout, worker):
                return True
        return False

    # -- targets -------------------------------------------------------------------------------

    async def claim(self) -> Claimed | None:
        if self._drained and self.finding:  # a walk of a series this worker holds may find more
            self._drained = False
        while not self._queue and not self._drained and not self.retired:
            async with self._claiming:  # one claim at a time: the others find its targets
                if not self._queue and not self._drained and not self.retired:
                    await self._claim_product()
        return self._queue.pop(0) if self._queue else None

    async def _claim_product(self) -> None:
        keys = [self.key(k) for k in ("todo", "leases", f"w:{self.worker}", "retry")]
        settled = "1" if self.link.settled(self._lease_ms / 1000) else "0"
        args = [self._p, self.worker, uuid.uuid4().hex, self._lease_ms, self._inc, settled]
        answer = await self._claim(keys=keys, args=args)
        if not answer:
            self._drained = True
            return
        if answer[0] == "retired":
            self.retired = True
            return
        if answer[0] == "wait":  # another worker's product: its lease ends, or it finishes
            low, high = _WAIT_MS
            await asyncio.sleep(max(low, min(int(answer[1]), high)) / 1000)
            return
        product_id, epoch, flat_fields = answer[0], answer[1], answer[2]
        # a refresh another worker started since this one began: joined, product by product
        self.refresh = max(self.refresh, int(answer[3]))
        fields = dict(zip(flat_fields[::2], flat_fields[1::2], strict=True))
        lease = Lease(product_id, epoch, fields.get("v", ""), self.refresh)
        self._leases[product_id] = lease
        if found_by.is_series(product_id):
            await self._claim_series(lease, fields)
            return
        targets = []
        for name, raw in sorted(fields.items()):
            if name.startswith("r:"):
                state, cap, off = parse_doc(raw, self._next_id)
                self._next_id += 1
                if not off:
                    targets.append((state, Target(product_id, name[2:], cap)))
        joined = [(state, f"r:{target.region}", target.max_pages) for state, target in targets]
        if not await self._joined(lease, joined):
            self._forget(lease)
            return
        claimed: list[Claimed] = []
        for state, target in targets:
            if not rules.walkable(state):
                continue
            lease.targets.add(state.id)
            self._live[state.id] = (state, target, lease)
            claimed.append(Claimed(target, state, int(epoch), lease))
        if not claimed:
            await self._release_product(lease, requeue=False)
            return
        # the product's committed ids before any of its targets is handed out: a walker may
        # render its first page while this waits
        ids = await self.link.call(lambda: self.link.redis.smembers(self.key(f"seen:{product_id}")))
        self.seen.hold(product_id, ids)
        self._queue.extend(claimed)

    async def _claim_series(self, lease: Lease, fields: dict[str, str]) -> None:
        """An endpoint's series taken: every source target of it this worker walks, and the
        items its shards hold already (``iseen:<series>``)."""
        targets = found_by.targets_of(fields, self._sources, self._next_id)
        self._next_id += len(targets)
        joined: list[tuple[TargetState, str, int | None]] = [
            (state, found_by.field_of(target), None) for state, target in targets
        ]
        if not await self._joined(lease, joined, counted=False):
            self._forget(lease)
            return
        claimed: list[Claimed] = []
        for state, target in targets:
            if rules.walkable(state):
                lease.targets.add(state.id)
                self._live_sources[state.id] = (state, target, lease)
                # a source target walks as a Target does (its fields fill the endpoint's params)
                claimed.append(Claimed(target, state, int(lease.epoch), lease))  # type: ignore[arg-type]
        if not claimed:
            await self._release_product(lease, requeue=False)
            return
        series = lease.product_id[len(found_by.MARK) :]
        key = self.key(f"iseen:{series}")
        ids = await self.link.call(lambda: self.link.redis.smembers(key))
        self._items.setdefault(series, ItemSeen()).hold(ids)
        self._queue.extend(claimed)

    async def _joined(
        self,
        lease: Lease,
        targets: list[tuple[TargetState, str, int | None]],
        *,
        counted: bool = True,
    ) -> bool:
        """The rules one process applies to every target at a run's start, applied here to a
        product (or a series' source targets: ``counted`` False, in no total) as it is taken
        (``rules.BUDGET_REOPENED``, and ``rules.refresh_started`` while a refresh is under
        way); False if it was lost meanwhile."""
        delta, writes = rules.Delta(), Writes()
        starting = [rules.BUDGET_REOPENED]
        if self.refresh:
            starting.append(rules.refresh_started(self.refresh))
        for state, name, cap in targets:
            if any([rules.changed(state, rule, delta) for rule in starting]):
                writes.op("HSET", self.key(f"p:{lease.product_id}"), name, doc_of(state, cap))
        if not writes.ops:
            return True
        writes.check(self.key(f"p:{lease.product_id}"), "e", lease.epoch)
        if counted:
            self.count(writes, delta)
        return (await self.apply(writes))[0] == "ok"

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
        return _ids(packed, other)

    async def _release_product(self, lease: Lease, *, requeue: bool) -> None:
        if not lease.lost:
            key = self.key(f"p:{lease.product_id}")
            writes = Writes()
            writes.check(key, "e", lease.epoch)
            _release(writes, self, lease, requeue=requeue)
            await self.apply(writes)
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        self._leases.pop(lease.product_id, None)
        for local_id in lease.targets:
            self._live.pop(local_id, None)
            self._live_sources.pop(local_id, None)
        self._queue = [
            c
            for c in self._queue
            if c.target.product_id != lease.product_id and c.saved.id not in lease.targets
        ]
        if found_by.is_series(lease.product_id):
            self._items.get(lease.product_id[len(found_by.MARK) :], ItemSeen()).drop()
        else:
            self.seen.drop(lease.product_id)

    async def maintain(self) -> None:
        """Renew every held lease (and this worker's heartbeat) three times a lease: a lease
        found moved on is marked lost, so its walkers stop before sending more. Seals what
        dead workers left open here, and refreshes the job's figures, on the way."""
        interval = self._lease_ms / 3000
        last = (asyncio.get_running_loop().time(), self.pages_committed)
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(interval)
            if task is not None and task.cancelling():  # a cancellation some library swallowed
                raise asyncio.CancelledError
            now = asyncio.get_running_loop().time()
            rate = (self.pages_committed - last[1]) / max(1e-3, now - last[0])
            last = (now, self.pages_committed)
            await self.renew(rate)
            if self.retired:
                raise LeaseLost(
                    f"worker {self.worker}: another process took this worker's name, or the "
                    "others found it dead (silent longer than coordination.lease_seconds); "
                    "nothing of its uncommitted work counts: start it again"
                )
            if self.link.settled(self._lease_ms / 1000):
                await self._adopt()
            await self.refresh_view()

    async def renew(self, rate: float = 0.0) -> None:
        held = [lease for lease in self._leases.values() if not lease.lost]
        info = orjson.dumps({"held": len(held), "rate": round(rate, 2), "pid": os.getpid()})
        keys = [self.key("leases"), self.key("workers"), self._w]
        args: list[Any] = [self._p, self.worker, self._lease_ms, self._inc, info.decode()]
        for lease in held:
            args += [lease.product_id, lease.epoch]
        answer = await self._renew(keys=keys, args=args)
        if answer[0] == "retired":
            self.retired = True
            for lease in held:
                lease.lost = True
            return
        for product_id in answer[1:]:
            if product_id in self._leases:
                self._leases[product_id].lost = True
                log.warning(
                    "lease lost: another worker walks this product now", product_id=product_id
                )

    # -- credits -------------------------------------------------------------------------------

    async def lease(self, credits: int, cost: int, ceiling: int) -> int:
        """``rules.lease_size`` of what the ledger says now, added only if the ledger still
        says it (another worker leasing meanwhile: read again, decide again)."""
        ledger = self.key("ledger")
        while True:
            raw = await self.link.call(lambda: self.link.redis.hget(ledger, "leased"))
            size = rules.lease_size(int(raw or 0), credits, cost, ceiling)
            if size == 0:
                return 0
            writes = Writes()
            writes.check(ledger, "leased", raw)
            writes.op("HINCRBY", ledger, "leased", size)
            writes.op("HINCRBY", self._w, "outstanding", size)
            if await self._credits(writes) == "ok":
                self.ledger.leased += size
                return size

    async def give_back(self, credits: int) -> None:
        writes = Writes()
        writes.op("HINCRBY", self.key("ledger"), "leased", -credits)
        writes.op("HINCRBY", self._w, "outstanding", -credits)
        await self._credits(writes)
        self.ledger.leased -= credits

    async def _credits(self, writes: Writes) -> str:
        self._lease_seq += 1
        answer = await self.apply(writes, chan="lease_seq", seq=self._lease_seq)
        if answer[0] == "retired":  # not one more credit for this incarnation
            raise LeaseLost(
                f"worker {self.worker}: another process took this worker's name, or the others "
                "found it dead; start it again"
            )
        return answer[0]

    # -- commits -------------------------------------------------------------------------------

    async def commit(self, batch: Commit) -> list[TargetState]:
        """The batch as ``rules.committed`` decides it, in one script fenced by every lease's
        epoch; LeaseLost when a product was taken over meanwhile (nothing of it then counts).
        Source pages go in the same script: their targets, the items' ids and the products they
        found (``found_by``); a found target another worker added meanwhile makes the script
        refuse the batch, which is then decided again (its found targets only: the rules moved
        the walks once, in memory)."""
        held = {c.target_id: self._live[c.target_id] for c in batch.changes}
        states = {i: state for i, (state, _, _) in held.items()}
        delta = rules.committed(states, batch.changes)
        live = self._live_sources
        sourced = {p.change.target_id: live[p.change.target_id] for p in batch.sources}
        rules.source_committed({i: s for i, (s, _, _) in sourced.items()}, batch.sources)
        delta.credits += sum(p.change.credits for p in batch.sources)
        finished = [s for s in states.values() if s.status in rules.FINAL]
        release = self._released_by(finished)
        release += [lease for lease in self._sources_released(sourced) if lease not in release]
        every = [*held.values(), *sourced.values()]
        leases = list({lease.product_id: lease for _, _, lease in every}.values())
        for attempt in itertools.count():
            writes = Writes()
            found = await self._batch_writes(writes, batch, held, sourced, leases)
            self.count(writes, delta)
            if delta.credits:
                writes.op("HINCRBY", self.key("ledger"), "credits", delta.credits)
                writes.op("HINCRBY", self._w, "outstanding", -delta.credits)
            for lease in release:
                _release(writes, self, lease, requeue=False)
            answer = await self.apply(writes, chan="commit_seq", seq=self._commit_seq + 1)
            if answer[0] == "ok":
                break
            retried = answer[0] == "stale" and batch.sources and attempt < 50
            if not retried or not await self._still_held(leases):
                # the worker stops: what this batch changed in memory is moot
                raise LeaseLost(_refused(self.worker, answer, len(self._p)))
            await asyncio.sleep(0.01)  # a found target another worker added: decided again
        self._commit_seq += 1
        self.pages_committed += sum(isinstance(c, PageCommitted) for c in batch.changes)
        self._after_commit(batch, delta.totals, delta.credits, release)
        if batch.sources or batch.series_shards or batch.series_positions:
            found_by.series_committed(self.series_states, batch)
        for status, sums in found.totals.by_status.items():
            self.totals.by_status[status].merge(sums)
        if found.totals.targets:  # found targets queued: this worker's walkers claim them too
            self._drained = False
        if batch.sources:
            self.found.set()
        return finished

    async def _batch_writes(
        self,
        writes: Writes,
        batch: Commit,
        held: dict[int, tuple[TargetState, Target, Lease]],
        sourced: dict[int, tuple[TargetState, SourceTarget, Lease]],
        leases: list[Lease],
    ) -> rules.Delta:
        """A batch's checks and writes but its sums; what its found targets add to them."""
        writes.op("ZADD", self.key("workers"), "$now", self.worker)  # a worker that commits lives
        for lease in leases:
            writes.check(self.key(f"p:{lease.product_id}"), "e", lease.epoch)
        self._shard_writes(writes, batch)
        for state, target, _ in held.values():
            self._target_writes(writes, state, target)
        for change in batch.changes:
            if isinstance(change, PageCommitted):
                ids = _ids(change.ids, change.other_ids)
                product_id = held[change.target_id][1].product_id
                writes.members("SADD", self.key(f"seen:{product_id}"), ids)
        found = await found_by.found_writes(self, writes, batch.sources, sourced)
        found_by.page_writes(self, writes, sourced)
        found_by.series_writes(self, writes, batch)
        self.count(writes, found)
        return found

    def _sources_released(
        self, sourced: dict[int, tuple[TargetState, SourceTarget, Lease]]
    ) -> list[Lease]:
        done: list[Lease] = []
        for local_id, (state, _, lease) in sourced.items():
            if state.status in rules.FINAL:
                self._live_sources.pop(local_id, None)
                lease.targets.discard(local_id)
                if not lease.targets and lease not in done:
                    done.append(lease)
        return done

    async def _still_held(self, leases: list[Lease]) -> bool:
        redis = self.link.redis
        for lease in leases:
            key = self.key(f"p:{lease.product_id}")
            epoch = await self.link.call(partial(redis.hget, key, "e"))
            if epoch != lease.epoch:
                return False
        return True

    def _shard_writes(self, writes: Writes, batch: Commit) -> None:
        shards = self.key("shards")
        opened = self._open_shard.file if self._open_shard else None
        for event in batch.shards:
            if isinstance(event, ShardOpened):
                writes.op("ZADD", self.key("shardorder"), "$now", event.file)
                writes.op("HINCRBY", self._w, "next_shard", 1)
                writes.op("HSET", self._w, "open_shard", event.file)
                writes.op("HSET", shards, event.file, self._doc(event.file, 0, 0, None))
                opened = event.file
            else:
                writes.op("HSET", self._w, "open_shard", "")
                doc = self._doc(event.file, event.records, event.bytes, event.sha256)
                writes.op("HSET", shards, event.file, doc)
                opened = None
        if opened is not None:
            p = batch.position
            writes.op("HSET", shards, opened, self._doc(opened, p.shard_records, p.shard_bytes))
        if batch.shards:
            writes.op("HINCRBY", self.key("meta"), "shards_version", 1)

    def _target_writes(self, writes: Writes, state: TargetState, target: Target) -> None:
        key, name = self.key(f"p:{target.product_id}"), target.key
        writes.op("HSET", key, f"r:{target.region}", doc_of(state, target.max_pages))
        # failed or at a credit cap: looked at by status, and walked again at the next start;
        # a feed that ended short of its count: looked at
        if state.status in (Status.FAILED, Status.BUDGET):
            writes.op("SADD", self.key("retry"), target.product_id)
        if state.status in (Status.FAILED, Status.BUDGET) or state.verdict is Verdict.SHORT:
            writes.op("SADD", self.key("attention"), name)
        else:
            writes.op("SREM", self.key("attention"), name)

    def _released_by(self, finished: list[TargetState]) -> list[Lease]:
        done: list[Lease] = []
        for state in finished:
            lease = self._live.pop(state.id)[2]  # walked to its end: not held in memory
            lease.targets.discard(state.id)
            if not lease.targets and lease not in done:
                done.append(lease)
        return done

    def _after_commit(
        self, batch: Commit, delta: Totals, credits: int, release: list[Lease]
    ) -> None:
        for event in batch.shards:
            if isinstance(event, ShardOpened):
                self._open_shard = ShardInfo(event.file)
                self._next_shard += 1
            else:
                self._sealed.append(ShardInfo(event.file, event.records, event.bytes, event.sha256))
                self._open_shard = None
        self._position = batch.position
        if self._open_shard is not None:
            p = batch.position
            self._open_shard = ShardInfo(self._open_shard.file, p.shard_records, p.shard_bytes)
        for status, sums in delta.by_status.items():
            self.totals.by_status[status].merge(sums)
        self.ledger.credits += credits
        for lease in release:
            self._forget(lease)

    def _doc(self, file: str, records: int, size: int, sha256: str | None = None) -> str:
        doc = {"file": file, "worker": self.worker, "seq": shard_sequence(file),
               "records": records, "bytes": size, "sha256": sha256}  # fmt: skip
        return orjson.dumps(doc).decode()

    async def close(self) -> None:
        await self.link.close()
        if self.held is not None:
            os.close(self.held)
            self.held = None


def _release(writes: Writes, store: RedisStore, lease: Lease, *, requeue: bool) -> None:
    """A product given back: unleased; queued again when asked, or when a sync changed its
    targets since it was claimed (one may have been added while it was walked)."""
    key = store.key(f"p:{lease.product_id}")
    writes.op("ZREM", store.key("leases"), lease.product_id)
    writes.op("HSET", key, "o", "")
    if requeue:
        writes.op("RPUSH", store.key("todo"), lease.product_id)
    else:
        writes.unless(key, "v", lease.version, "RPUSH", store.key("todo"), lease.product_id)
        meta = store.key("meta")
        refresh = lease.refresh or ""  # '' as the field reads before any refresh
        writes.unless(meta, "refresh", refresh, "RPUSH", store.key("todo"), lease.product_id)


def _refused(worker: str, answer: list[str], prefix: int) -> str:
    if answer[0] == "stale":
        products = ", ".join(k[prefix + 2 :] for k in answer[1:])
        why = f"products {products} were taken over by another worker (or a changed job file)"
    else:
        why = "another process took this worker's name, or the others found it dead"
    return (
        f"worker {worker}: {why} (it was paused or cut off longer than "
        "coordination.lease_seconds); nothing of its last batch counts, start it again"
    )


def _mark(marker: Path, text: bytes) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(exc, marker.parent) from None
    write_atomically(marker, text)


def _has_files(layout: Layout, worker: str) -> bool:
    return bool(layout.owned_files(worker))


def _info(doc: dict[str, Any]) -> ShardInfo:
    return ShardInfo(doc["file"], doc["records"], doc["bytes"], doc["sha256"])


def _ids(packed: bytes, other: bytes) -> list[str]:
    numbers = array("Q")
    numbers.frombytes(packed)
    return [str(n) for n in numbers] + (orjson.loads(other) if other else [])


def ledger_from(fields: dict[str, str]) -> Ledger:
    return Ledger(
        int(fields.get("leased", 0)), int(fields.get("credits", 0)), int(fields.get("forfeited", 0))
    )
