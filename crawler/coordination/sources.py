"""Sources in the coordinated mode: an endpoint's series leased whole, its pages' finds committed.

The unit of work of a source is its endpoint's series (``p:~<series>``, leased, renewed and
taken over exactly as a product is, with its own epoch): the worker that holds it walks every
source target of that endpoint, so an item two of its targets list meets its duplicate in one
process, and its commit writes the item once. A series' hash keeps each source target's state
(``t:<source>|<fields as JSON>``, a target's ``doc_of``) and the products each found
(``f:<source>|<fields>``). Committed item ids are in ``iseen:<series>``; each worker writes its
own shard files of a series (``shop_products-<worker>-000001.jsonl``), listed in ``sshards``.
What a page finds is decided by ``rules.found`` against the targets Redis has (read, then checked
absent in the same APPLY that moves the source's cursor): a product found twice, or listed in
the job file, is one target, walked once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from crawler import logs
from crawler.coordination.writes import Writes, doc_of, parse_doc
from crawler.output.layout import series_sequence
from crawler.sources import Source, SourceTarget
from crawler.state import rules
from crawler.state.events import Commit, PageCommitted, ShardOpened, SourcePage, Status
from crawler.state.model import SeriesState, ShardInfo, TargetState

if TYPE_CHECKING:
    from crawler.coordination.store import Lease, RedisStore

log = logs.get_logger("crawler.coordination")
MARK = "~"  # a unit of work named ~<series> is an endpoint's series, not a product


def unit(series: str) -> str:
    return MARK + series


def is_series(unit_id: str) -> bool:
    return unit_id.startswith(MARK)


def field_of(target: SourceTarget) -> str:
    """The hash field a source target's state is kept under (a source's name has no '|')."""
    return f"t:{target.source}|{target.key}"


def target_of(name: str) -> SourceTarget:
    source, _, key = name[2:].partition("|")
    fields = orjson.loads(key)
    return SourceTarget(source, tuple(sorted((k, str(v)) for k, v in fields.items())))


# -- a sync: the job file's sources' targets made the job's -----------------------------------


async def sync_sources(store: RedisStore, sources: tuple[Source, ...]) -> None:
    """Each endpoint's series made to hold the job's source targets (a few hundred: read and
    compared at every start); one the job no longer names is kept but inactive."""
    wanted: dict[str, list[SourceTarget]] = {}
    for source in sources:
        wanted.setdefault(source.endpoint, []).extend(source.targets)
    known = await store.link.call(lambda: store.link.redis.smembers(store.key("series")))
    for name in sorted(set(wanted) | set(known)):
        await _sync_series(store, name, {field_of(t) for t in wanted.get(name, [])})


async def _sync_series(store: RedisStore, name: str, wanted: set[str]) -> None:
    key, pause = store.key(f"p:{unit(name)}"), 0.02
    while True:
        found: dict[str, str] = await store.link.call(lambda: store.link.redis.hgetall(key))
        writes = Writes()
        writes.check(key, "e", found.get("e"))
        writes.check(key, "o", found.get("o"))
        walkable = touched = False
        for field in sorted(wanted | {f for f in found if f.startswith("t:")}):
            raw = found.get(field)
            state, on = TargetState(0), field in wanted
            if raw is not None:
                state, _, off = parse_doc(raw, 0)
                if off != on:  # listed as before: nothing to change
                    walkable = walkable or (on and rules.walkable(state))
                    continue
                touched = True
            elif not on:
                continue
            writes.check(key, field, raw)
            writes.op("HSET", key, field, doc_of(state, None, on))
            walkable = walkable or (on and rules.walkable(state))
        if len(writes.checks) == 2:  # nothing changed
            return
        writes.op("SADD", store.key("series"), name)
        writes.op("HSETNX", key, "e", "0")
        writes.op("HINCRBY", key, "v", "1")  # its holder queues it again when it lets it go
        if touched and found.get("o"):  # a walk under the old list: taken from its worker
            writes.op("HINCRBY", key, "e", "1")
            writes.op("HSET", key, "o", "")
            writes.op("ZREM", store.key("leases"), unit(name))
        if walkable:  # first in the queue: what a source finds is walked after it
            writes.op("LPUSH", store.key("todo"), unit(name))
        if (await store.apply(writes))[0] == "ok":
            return
        await asyncio.sleep(pause)  # another worker synced or committed meanwhile: again
        pause = min(1.0, pause * 2)


# -- a claim ------------------------------------------------------------------------------------


def targets_of(
    fields: dict[str, str], sources: Iterable[str], next_id: int
) -> list[tuple[TargetState, SourceTarget]]:
    """A series' source targets as the claim read them: those of the job's sources, active."""
    named = set(sources)
    out: list[tuple[TargetState, SourceTarget]] = []
    for name, raw in sorted(fields.items()):
        if not name.startswith("t:"):
            continue
        state, _, off = parse_doc(raw, next_id + len(out))
        target = target_of(name)
        if not off and target.source in named:
            out.append((state, target))
    return out


# -- a commit -----------------------------------------------------------------------------------


async def found_writes(
    store: RedisStore,
    writes: Writes,
    pages: list[SourcePage],
    held: dict[int, tuple[TargetState, SourceTarget, Lease]],
) -> rules.Delta:
    """The targets the pages found that the job has not (``rules.found``), added pending and
    queued, each checked still absent when the commit is applied; what they add to the totals."""
    delta = rules.Delta()
    pairs = list(dict.fromkeys(pair for page in pages for pair in rules.found(page)))
    if not pairs:
        return delta
    redis = store.link.redis

    async def read() -> list[bool]:
        pipe = redis.pipeline(transaction=False)
        for product_id, region in pairs:
            pipe.hexists(store.key(f"p:{product_id}"), f"r:{region}")
        result: list[bool] = await pipe.execute()
        return result

    known = dict(zip(pairs, await store.link.call(read), strict=True))
    added: list[str] = []
    for page in pages:
        _, target, lease = held[page.change.target_id]
        new = 0
        for product_id, region in rules.found(page):
            if known[(product_id, region)]:
                continue  # listed, or found before: walked once
            known[(product_id, region)] = True
            key, state = store.key(f"p:{product_id}"), TargetState(0)
            writes.check(key, f"r:{region}", None)
            writes.op("HSET", key, f"r:{region}", doc_of(state, None))
            delta.moved(None, state)
            added.append(product_id)
            new += 1
        if new:  # the figure status shows: products found, per source target
            found_field = "f" + field_of(target)[1:]
            writes.op("HINCRBY", store.key(f"p:{lease.product_id}"), found_field, new)
    products = list(dict.fromkeys(added))
    for product_id in products:
        key = store.key(f"p:{product_id}")
        writes.op("HSETNX", key, "e", "0")
        writes.op("HINCRBY", key, "v", "1")  # a holder of the product queues it again
    writes.members("SADD", store.key("found"), [f"{p}:{r}" for p, r in pairs])
    writes.members("RPUSH", store.key("todo"), products)
    return delta


def page_writes(
    store: RedisStore, writes: Writes, held: dict[int, tuple[TargetState, SourceTarget, Lease]]
) -> None:
    """The source targets' states, fenced by their series' epoch."""
    for state, target, lease in held.values():
        key = store.key(f"p:{lease.product_id}")
        writes.check(key, "e", lease.epoch)
        writes.op("HSET", key, field_of(target), doc_of(state, None))
        if state.status in (Status.FAILED, Status.BUDGET):  # walked again at the next start
            writes.op("SADD", store.key("retry"), lease.product_id)


def series_writes(store: RedisStore, writes: Writes, batch: Commit) -> None:
    """The series' new ids, and this worker's series shards: opened, sealed, committed lengths."""
    for page in batch.sources:
        if isinstance(page.change, PageCommitted):
            ids = store.ids_of(page.change.ids, page.change.other_ids)
            writes.members("SADD", store.key(f"iseen:{page.series}"), ids)
    shards, me = store.key("sshards"), store.worker_key
    opened = {name: s.open_shard.file for name, s in store.series_states.items() if s.open_shard}
    for shard in batch.series_shards:
        name, event = shard.series, shard.event
        if isinstance(event, ShardOpened):
            writes.op("ZADD", store.key("sshardorder"), "$now", event.file)
            writes.op("HSET", me, f"so:{name}", event.file, f"sn:{name}", _seq(event.file) + 1)
            writes.op("HSET", shards, event.file, _doc(store, name, event.file, 0, 0))
            opened[name] = event.file
        else:
            writes.op("HSET", me, f"so:{name}", "")
            doc = _doc(store, name, event.file, event.records, event.bytes, event.sha256)
            writes.op("HSET", shards, event.file, doc)
            opened.pop(name, None)
    for name, file in opened.items():
        if (p := batch.series_positions.get(name)) is not None:
            writes.op("HSET", shards, file, _doc(store, name, file, p.shard_records, p.shard_bytes))


def series_committed(states: dict[str, SeriesState], batch: Commit) -> None:
    """What a commit changes of this worker's series as it knows them."""
    for shard in batch.series_shards:
        series, event = states.get(shard.series) or SeriesState(shard.series), shard.event
        if isinstance(event, ShardOpened):
            series = replace(
                series, open_shard=ShardInfo(event.file), next_shard=_seq(event.file) + 1
            )
        else:
            sealed = ShardInfo(event.file, event.records, event.bytes, event.sha256)
            series = replace(series, open_shard=None, sealed=(*series.sealed, sealed))
        states[shard.series] = series
    for name, position in batch.series_positions.items():
        series = states.get(name) or SeriesState(name)
        opened = series.open_shard
        if opened is not None:
            opened = ShardInfo(opened.file, position.shard_records, position.shard_bytes)
        states[name] = replace(series, position=position, open_shard=opened)


def _seq(file: str) -> int:
    return series_sequence(file)


def _doc(  # noqa: PLR0917 -- a shard's record, field by field
    store: RedisStore, series: str, file: str, records: int, size: int, sha256: str | None = None
) -> str:
    doc = {"file": file, "series": series, "worker": store.worker, "seq": _seq(file),
           "records": records, "bytes": size, "sha256": sha256}  # fmt: skip
    return orjson.dumps(doc).decode()


# -- this worker's series at its start, the manifest -------------------------------------------


async def load_series(store: RedisStore) -> dict[str, SeriesState]:
    """This worker's series as Redis has them once its earlier open shards are sealed: the
    next shard number of each, its sealed shards."""
    redis = store.link.redis
    mine = await store.link.call(lambda: redis.hgetall(store.worker_key))
    docs = await store.link.call(lambda: redis.hgetall(store.key("sshards")))
    states: dict[str, SeriesState] = {}
    for field, value in mine.items():
        if field.startswith("sn:"):
            states[field[3:]] = SeriesState(field[3:], next_shard=int(value))
    for doc in sorted((orjson.loads(d) for d in docs.values()), key=lambda d: d["seq"]):
        if doc["worker"] == store.worker and doc["sha256"] is not None:
            series = states.get(doc["series"]) or SeriesState(doc["series"])
            sealed = (*series.sealed, _info(doc))
            states[doc["series"]] = replace(series, sealed=sealed)
    return states


async def series_manifest(
    store: RedisStore,
) -> dict[str, tuple[list[ShardInfo], list[ShardInfo]]]:
    """Every worker's shards of each series, in the order opened: sealed ones, and the
    committed part of the open ones."""
    redis = store.link.redis
    order, docs = await store.link.call(
        lambda: asyncio.gather(
            redis.zrange(store.key("sshardorder"), 0, -1), redis.hgetall(store.key("sshards"))
        )
    )
    listed: dict[str, tuple[list[ShardInfo], list[ShardInfo]]] = {}
    for file in order:
        if file not in docs:
            continue
        doc = orjson.loads(docs[file])
        sealed, opened = listed.setdefault(doc["series"], ([], []))
        if doc["sha256"] is not None:
            sealed.append(_info(doc))
        elif doc["records"]:
            opened.append(_info(doc))
    return dict(sorted(listed.items()))


def _info(doc: dict[str, Any]) -> ShardInfo:
    return ShardInfo(doc["file"], doc["records"], doc["bytes"], doc["sha256"])


# -- status -------------------------------------------------------------------------------------


def figures(fields: dict[str, str], rows: dict[str, dict[str, Any]]) -> None:
    """A series' source targets summed per source into ``rows`` (status's per-source figures,
    the names the one-process view gives)."""
    for name, raw in fields.items():
        if not name.startswith("t:"):
            continue
        doc = orjson.loads(raw)
        if doc.get("off"):
            continue
        source = name[2:].partition("|")[0]
        row = rows.setdefault(
            source,
            {"source": source, "targets": 0, "targets_done": 0, "pages": 0, "products_found": 0,
             "items": 0, "credits": 0, "failed": 0},
        )  # fmt: skip
        row["targets"] += 1
        row["targets_done"] += doc.get("status") == "done"
        row["failed"] += doc.get("status") == "failed"
        row["pages"] += doc.get("pages", 0)
        row["items"] += doc.get("records", 0)
        row["credits"] += doc.get("credits", 0)
        row["products_found"] += int(fields.get("f" + name[1:], 0))
