"""The coordinated store: a job's state in Redis, shared by every worker, behind ``StateStore``.

A worker leases a product (all its regions) at a time, renews the lease while it walks, and
commits each writer batch with one script that checks every lease's epoch first: a worker whose
lease moved on (it was paused longer than ``lease_seconds``) cannot commit, so two workers never
both count a page. Its own shard series carries its name; the shards' committed lengths live
here, so a reader is only ever shown committed bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from array import array
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import orjson
import structlog

from crawler.coordination.link import Link
from crawler.coordination.orphans import adopt_orphans
from crawler.coordination.scripts import (
    CLAIM,
    COMMIT,
    LEASE,
    REGISTER,
    RELEASE,
    RENEW,
    RETRY,
    SYNC,
)
from crawler.coordination.seen import ProductSeen
from crawler.errors import ConfigError, LeaseLost, StateError
from crawler.layout import Layout, shard_sequence
from crawler.state import rules
from crawler.state.events import (
    WALKABLE,
    Commit,
    Finish,
    PageCommitted,
    ShardOpened,
    Status,
    WriterPosition,
)
from crawler.state.model import Claimed, Ledger, ShardInfo, Sums, TargetState, Totals
from crawler.targets import Target, TargetList

log = structlog.get_logger("crawler.coordination")
_FINAL = (Status.DONE, Status.FAILED, Status.BUDGET)
_ATTENTION = (Status.FAILED, Status.BUDGET)
_SYNC_CHUNK = 2000  # targets per sync script: long scripts block every other worker
_WAIT_MS = 500  # with nothing to claim, how often to look again while others hold products


@dataclass
class Lease:
    """A product held by this worker; ``lost`` once its epoch moved on."""

    product_id: str
    epoch: str
    targets: set[int] = field(default_factory=set)  # local ids of its targets not final yet
    lost: bool = False


def prefix_of(job: str) -> str:
    return f"crawler:{job}:"


def default_worker() -> str:
    name = f"{socket.gethostname()}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_DEFAULTS = asdict(TargetState(0))


def state_json(state: TargetState, target: Target) -> str:
    """A target's state as Redis keeps it: what differs from a new target's (a million new
    targets are then a few bytes each)."""
    doc = {k: v for k, v in asdict(state).items() if k != "id" and v != _DEFAULTS[k]}
    if target.max_pages is not None:
        doc["max_pages"] = target.max_pages
    return orjson.dumps(doc).decode()


def state_from(raw: str, local_id: int) -> tuple[TargetState, int | None]:
    doc = orjson.loads(raw)
    max_pages = doc.pop("max_pages", None)
    state = TargetState(local_id, **doc)
    state.status = Status(state.status)
    state.finish = Finish(state.finish) if state.finish else None
    return state, max_pages


class RedisStore:
    """One worker's view of a coordinated job."""

    def __init__(self, link: Link, job: str, worker: str, layout: Layout, lease_seconds: float):
        self.layout = layout
        self.link = link
        self.worker = worker
        self.seen = ProductSeen()
        self.totals = Totals()
        self.ledger = Ledger()
        self.refresh = 0
        self.runs = 0
        self._p = prefix_of(job)
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
        self._leases: dict[str, Lease] = {}
        self._live: dict[int, tuple[TargetState, Target, Lease]] = {}
        self._queue: list[Claimed] = []
        self._claiming = asyncio.Lock()
        self._next_id = 1
        self._drained = False
        self.retired = False
        self.pages_committed = 0  # this worker's, for the rate in its heartbeat
        self._claim = link.script(CLAIM)
        self._commit = link.script(COMMIT)
        self._lease = link.script(LEASE)
        self._renew = link.script(RENEW)
        self._release = link.script(RELEASE)
        self._sync = link.script(SYNC)

    def key(self, name: str) -> str:
        return self._p + name

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
    ) -> RedisStore:
        store = cls(link, job, worker, layout, lease_seconds)
        await store._check_durability()
        await store._check_output(output)
        await store._register()
        await store.refresh_view()
        return store

    async def _check_durability(self) -> None:
        """Refuse a Redis that could forget an acknowledged commit or lease (see README)."""
        try:
            settings = await self.link.call(lambda: self.link.redis.config_get("append*"))
        except Exception as exc:
            log.warning("cannot read Redis's persistence settings", error=type(exc).__name__)
            return
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise ConfigError(
                f"Redis at {self.link.url}: appendonly={settings.get('appendonly')}, "
                f"appendfsync={settings.get('appendfsync')}; a coordinated job needs "
                "appendonly yes and appendfsync always, so that a Redis restart loses no "
                "committed page and no credit lease (CONFIG SET appendonly yes; CONFIG SET "
                "appendfsync always)"
            )

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
            keys=[self.key(f"w:{self.worker}"), self.key("workers"), self.key("leases")],
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
        opened = next((s for s in mine if s["file"] == open_file), None)
        if opened is not None:
            self._open_shard = _info(opened)
            self._position = WriterPosition(opened["bytes"], opened["records"])

    async def refresh_view(self) -> None:
        """The job's totals and ledger as Redis has them (for the progress display)."""
        redis = self.link.redis
        totals, ledger = await self.link.call(
            lambda: asyncio.gather(
                redis.hgetall(self.key("totals")), redis.hgetall(self.key("ledger"))
            )
        )
        self.totals = totals_from(totals)
        self.ledger = Ledger(int(ledger.get("leased", 0)), int(ledger.get("credits", 0)))

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
        """Write the job's targets into Redis once (and what was added since), under a lock:
        the other workers wait for it."""
        digest = targets.digest()
        redis, meta = self.link.redis, self.key("meta")
        while await self.link.call(lambda: redis.hget(meta, "digest")) != digest:
            taken = await self.link.call(
                lambda: redis.set(self.key("init"), self.worker, nx=True, px=120_000)
            )
            if not taken:
                await asyncio.sleep(0.2)  # another worker is writing them
                continue
            try:
                if await self.link.call(lambda: redis.hget(meta, "digest")) != digest:
                    await self._write_targets(targets)
                    await self.link.call(
                        lambda: redis.hset(
                            meta, mapping={"digest": digest, "targets": len(targets)}
                        )
                    )
                    return True
            finally:
                await self.link.call(lambda: redis.delete(self.key("init")))
        return False

    async def _write_targets(self, targets: TargetList) -> None:
        keys = [self.key("todo"), self.key("leases"), self.key("totals")]
        args: list[Any] = [self._p]
        new = state_json(TargetState(0), Target("0", "US"))
        for product_id, region, cap in targets.rows():
            state = (
                new if cap is None else state_json(TargetState(0), Target(product_id, region, cap))
            )
            args += [product_id, region, state]
            if len(args) > 3 * _SYNC_CHUNK:
                await self._sync(keys=keys, args=args)
                args = [self._p]
        if len(args) > 1:
            await self._sync(keys=keys, args=args)

    async def begin_run(self, *, refresh: bool, mode: str) -> int:
        """A worker's run: products with failed or capped targets are queued again."""
        if refresh:
            raise ConfigError(
                "--refresh is not available for a coordinated job yet; harvest it again under "
                "another coordination.job and output.dir"
            )
        await self.link.script(RETRY)(keys=[self.key("retry"), self.key("todo")], args=[])
        await self.refresh_view()
        return 0

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        """Give back the products still held (queued again for any worker), seal what dead
        workers left open here, and log the run."""
        for lease in list(self._leases.values()):
            await self._release_product(lease, requeue=True)
        await self._seal_orphans_here()
        doc = orjson.dumps({"worker": self.worker, **info}).decode()
        redis = self.link.redis
        ended = orjson.dumps({"held": 0, "rate": 0.0, "stopped": True}).decode()
        await self.link.call(lambda: redis.hset(self.key(f"w:{self.worker}"), "live", ended))
        await self.link.call(lambda: redis.lpush(self.key("runs"), doc))
        await self.link.call(lambda: redis.ltrim(self.key("runs"), 0, 999))
        await self.refresh_view()

    async def _seal_orphans_here(self) -> None:
        """The last worker to end must not leave a dead one's open shard, with its uncommitted
        tail, in the folder: wait for such a worker to count as dead (a lease at most), then
        seal its shard. Live workers, and shards on other machines' disks, are not waited for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5 * self._dead_ms / 1000
        while loop.time() < deadline and await self._silent_with_shards_here():
            if self.link.settled(self._lease_ms / 1000):
                await adopt_orphans(self.link, self._p, self.layout, self._dead_ms)
            await asyncio.sleep(self._lease_ms / 3000)

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
            state = await self.link.call(partial(redis.hgetall, self.key(f"w:{worker}")))
            stopped = orjson.loads(state.get("live", "{}")).get("stopped")
            file = state.get("open_shard")
            if file and not stopped and self.layout.shard(file).exists():
                return True
        return False

    # -- targets -------------------------------------------------------------------------------

    async def claim(self) -> Claimed | None:
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
            await asyncio.sleep(min(int(answer[1]), _WAIT_MS) / 1000)
            return
        product_id, epoch, flat = answer[0], answer[1], answer[2]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        if product_id in self._leases:  # its own, expired and taken back: the old lease is over
            self._leases[product_id].lost = True
            self._forget(self._leases[product_id])
        lease = Lease(product_id, epoch)
        self._leases[product_id] = lease
        claimed: list[Claimed] = []
        for name, raw in sorted(fields.items()):
            if not name.startswith("r:"):
                continue
            state, cap = state_from(raw, self._next_id)
            self._next_id += 1
            if state.status not in WALKABLE:
                continue
            target = Target(product_id, name[2:], cap)
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

    def holds(self, target_id: int) -> bool:
        held = self._live.get(target_id)
        return held is not None and not held[2].lost

    async def _release_product(self, lease: Lease, *, requeue: bool) -> None:
        keys = [self.key("leases"), self.key("todo")]
        args = [self._p, lease.product_id, lease.epoch, "1" if requeue else "0"]
        if not lease.lost:
            await self._release(keys=keys, args=args)
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        self._leases.pop(lease.product_id, None)
        for local_id in lease.targets:
            self._live.pop(local_id, None)
        self._queue = [c for c in self._queue if c.target.product_id != lease.product_id]
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
                await adopt_orphans(self.link, self._p, self.layout, self._dead_ms)
            await self.refresh_view()

    async def renew(self, rate: float = 0.0) -> None:
        held = [lease for lease in self._leases.values() if not lease.lost]
        info = orjson.dumps({"held": len(held), "rate": round(rate, 2), "pid": os.getpid()})
        keys = [self.key("leases"), self.key("workers"), self.key(f"w:{self.worker}")]
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
        granted = await self._lease_credits(credits, cost, ceiling)
        self.ledger.leased += granted
        return granted

    async def give_back(self, credits: int) -> None:
        await self._lease_credits(-credits, 1, -1)
        self.ledger.leased -= credits

    async def _lease_credits(self, credits: int, cost: int, ceiling: int) -> int:
        self._lease_seq += 1
        keys = [self.key("ledger"), self.key(f"w:{self.worker}")]
        args = [credits, cost, ceiling, self._lease_seq, self._inc]
        answer = await self._lease(keys=keys, args=args)
        if isinstance(answer, list):  # retired: not one more credit for this incarnation
            self.retired = True
            raise LeaseLost(
                f"worker {self.worker}: another process took this worker's name, or the others "
                "found it dead; start it again"
            )
        return int(answer)

    # -- commits -------------------------------------------------------------------------------

    async def commit(self, batch: Commit) -> list[TargetState]:
        """One script for the whole batch; LeaseLost when a product was taken over meanwhile
        (nothing of the batch is then counted)."""
        changed: dict[int, tuple[TargetState, Target]] = {}
        seen: dict[str, list[str]] = {}
        fences: dict[str, str] = {}
        for change in batch.changes:
            state, target, lease = self._live[change.target_id]
            fences[lease.product_id] = lease.epoch
            changed[state.id] = (state, target)
        delta, credits = rules.committed({i: s for i, (s, _) in changed.items()}, batch.changes)
        for change in batch.changes:
            state, target, _ = self._live[change.target_id]
            new = _ids(change.ids, change.other_ids) if isinstance(change, PageCommitted) else []
            if new:
                seen.setdefault(target.product_id, []).extend(new)
        finished = [s for s, _ in changed.values() if s.status in _FINAL]
        release = self._released_by(finished)
        payload = {
            "worker": self.worker,
            "inc": self._inc,
            "seq": self._commit_seq + 1,
            "fences": [[p, e] for p, e in fences.items()],
            "shards": [self._shard_doc(e) for e in batch.shards],
            "open": self._open_doc(batch),
            "targets": [
                [
                    t.product_id,
                    t.region,
                    state_json(s, t),
                    s.status in (Status.FAILED, Status.BUDGET),
                ]
                for s, t in changed.values()
            ],
            "seen": [[p, *ids] for p, ids in seen.items()],
            "totals": flat(delta),
            "credits": credits,
            "release": [lease.product_id for lease in release],
        }
        keys = [
            self.key(f"w:{self.worker}"),
            *(self.key(k) for k in ("ledger", "totals", "shards", "shardorder", "leases")),
            *(self.key(k) for k in ("attention", "retry", "todo", "workers")),
        ]
        answer = await self._commit(keys=keys, args=[self._p, orjson.dumps(payload).decode()])
        if answer[0] != "ok":
            self.retired = self.retired or answer[0] == "retired"
            raise LeaseLost(
                f"worker {self.worker}: "
                + (
                    f"products {', '.join(answer[1:])} were taken over by another worker"
                    if answer[0] == "fenced"
                    else "another process took this worker's name, or the others found it dead"
                )
                + " (it was paused or cut off longer than coordination.lease_seconds); nothing "
                "of its last batch counts, start it again"
            )
        self._commit_seq += 1
        self.pages_committed += sum(isinstance(c, PageCommitted) for c in batch.changes)
        self._after_commit(batch, delta, credits, release)
        return finished

    def _released_by(self, finished: list[TargetState]) -> list[Lease]:
        done: list[Lease] = []
        for state in finished:
            lease = self._live[state.id][2]
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

    def _shard_doc(self, event: Any) -> dict[str, Any]:
        if isinstance(event, ShardOpened):
            return self._doc(event.file, 0, 0, None)
        return self._doc(event.file, event.records, event.bytes, event.sha256)

    def _open_doc(self, batch: Commit) -> dict[str, Any] | None:
        opened = self._open_shard.file if self._open_shard else None
        for event in batch.shards:
            opened = event.file if isinstance(event, ShardOpened) else None
        if opened is None:
            return None
        return self._doc(opened, batch.position.shard_records, batch.position.shard_bytes, None)

    def _doc(self, file: str, records: int, size: int, sha256: str | None) -> dict[str, Any]:
        seq = shard_sequence(file)
        return {"file": file, "worker": self.worker, "seq": seq, "records": records,
                "bytes": size, "sha256": sha256}  # fmt: skip

    async def close(self) -> None:
        await self.link.close()


def _info(doc: dict[str, Any]) -> ShardInfo:
    return ShardInfo(doc["file"], doc["records"], doc["bytes"], doc["sha256"])


def _ids(packed: bytes, other: bytes) -> list[str]:
    numbers = array("Q")
    numbers.frombytes(packed)
    return [str(n) for n in numbers] + [i for i in other.decode().split("\n") if i]


def flat(totals: Totals) -> dict[str, float]:
    """A Totals as the fields of the ``totals`` hash: ``<status>|<figure>``, zeros left out."""
    out: dict[str, float] = {}
    for status, sums in totals.by_status.items():
        for name, value in asdict(sums).items():
            if value:
                out[f"{status}|{name}"] = value
    return out


def totals_from(fields: dict[str, str]) -> Totals:
    totals = Totals()
    for name, value in fields.items():
        status, _, figure = name.partition("|")
        sums: Sums = totals.by_status[Status(status)]
        number = float(value)
        setattr(sums, figure, number if figure == "seconds" else round(number))
    return totals
