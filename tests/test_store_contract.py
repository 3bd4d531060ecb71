"""One contract, two stores: every test here runs against the SQLite store and the Redis store
(a real redis-server), through the ``StateStore`` seam a run uses. The job's rules live once, in
``crawler.state.rules``; these tests say that both stores keep what the rules decide."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from crawler.coordination.link import Link
from crawler.coordination.store import RedisStore
from crawler.coordination.view import RedisView
from crawler.errors import LeaseLost, StateError
from crawler.output.layout import Layout
from crawler.sources import Source, SourceTarget
from crawler.state import StateStore
from crawler.state.events import (
    Commit,
    Finish,
    PageCommitted,
    SeriesShard,
    ShardOpened,
    SourcePage,
    Status,
    TargetFailed,
    WriterPosition,
)
from crawler.state.model import Claimed, ShardInfo
from crawler.state.sqlite import SqliteStore, SqliteView
from crawler.targets import REGION_INDEX, TargetList
from tests.conftest import RedisServer

OUTPUT = {"shard_max_records": 10, "compression": "none"}
A, B = "1729679758111249333", "1729679758111249334"

Opener = Callable[..., Awaitable[StateStore]]


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: Any, tmp_path: Path) -> AsyncIterator[Opener]:
    """``await open_store(worker=...)``: the job's store as one process (or one worker) opens
    it; every store opened is closed at the end."""
    opened: list[StateStore] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    async def open_one(worker: str = "w1", output: dict[str, Any] | None = None) -> StateStore:
        layout = Layout(tmp_path / "out")
        store: StateStore
        if server is None:
            store = await SqliteStore.open(layout, output or OUTPUT)
        else:
            link = Link(server.url, unavailable_seconds=5)
            store = await RedisStore.open(
                link, job="job", worker=worker, layout=layout, output=output or OUTPUT,
                lease_seconds=30,
            )  # fmt: skip
        opened.append(store)
        return store

    # the fixture's second face: the job's state as status reads it
    open_one.view = (  # type: ignore[attr-defined]
        (lambda: SqliteView.open(Layout(tmp_path / "out")))
        if server is None
        else (lambda: RedisView(server.url, "job"))
    )
    yield open_one
    for store in opened:
        with contextlib.suppress(Exception):  # a test may have closed it already
            await store.close()


def targets(*rows: tuple[str, str, int | None]) -> TargetList:
    listed = TargetList()
    for product_id, region, cap in rows:
        listed.append(product_id, REGION_INDEX[region], cap)
    return listed


async def start(store: StateStore, listed: TargetList) -> list[Claimed]:
    """A run's start, then every target it would walk."""
    await store.sync_targets(listed)
    await store.begin_run(refresh=False, mode="early_stop")
    return await claim_all(store)


async def claim_all(store: StateStore) -> list[Claimed]:
    claimed = []
    while (one := await store.claim()) is not None:
        claimed.append(one)
    return claimed


def page(claimed: Claimed, *, last: bool = False, ids: int = 0) -> PageCommitted:
    cursor = (claimed.saved.cursor or 1) if isinstance(claimed.saved.cursor, int) else 1
    return PageCommitted(
        claimed.saved.id, claimed.fence, cursor + 1, Status.DONE if last else Status.PENDING,
        Finish.END if last else None, 10, ids, 0, 2, 0, 0, 0.1, 100, None, None,
    )  # fmt: skip


async def commit(store: StateStore, *changes: PageCommitted | TargetFailed) -> None:
    await store.commit(Commit(list(changes), [], store.position))


def keys(claimed: list[Claimed]) -> set[str]:
    return {c.target.key for c in claimed}


async def end(store: StateStore, *, budget_stopped: bool = False) -> None:
    await store.end_run({"finished_at": 0.0, "exit_status": 0}, budget_stopped=budget_stopped)


async def test_a_target_removed_from_the_job_file_is_neither_walked_nor_counted(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", None), (A, "GB", None), (B, "US", None)))
    assert keys(first) == {f"{A}:US", f"{A}:GB", f"{B}:US"}
    await commit(store, *(page(c) for c in first))  # each walk under way
    await end(store)
    await store.close()
    store = await open_store()
    again = await start(store, targets((A, "US", None)))
    assert keys(again) == {f"{A}:US"}
    assert again[0].saved.walk_pages == 1  # the kept target goes on from its cursor
    assert store.totals.targets == 1
    await end(store)
    await store.close()
    store = await open_store()  # listed again: back, with what it had walked
    back = await start(store, targets((A, "US", None), (B, "US", None)))
    assert {c.target.key: c.saved.walk_pages for c in back} == {f"{A}:US": 1, f"{B}:US": 1}
    assert store.totals.targets == 2


async def test_a_raised_or_removed_cap_walks_on_and_a_lowered_one_ends_the_walk(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", 1), (A, "GB", 5), (B, "US", 1)))
    capped = {c.target.key: c for c in first}
    done = PageCommitted(
        capped[f"{A}:US"].saved.id, capped[f"{A}:US"].fence, 2, Status.DONE, Finish.CAP,
        10, 10, 0, 2, 0, 0, 0.1, 100, None, None,
    )  # fmt: skip
    done_b = PageCommitted(
        capped[f"{B}:US"].saved.id, capped[f"{B}:US"].fence, 2, Status.DONE, Finish.CAP,
        10, 10, 0, 2, 0, 0, 0.1, 100, None, None,
    )  # fmt: skip
    await commit(store, done, done_b, page(capped[f"{A}:GB"]), page(capped[f"{A}:GB"]))
    await end(store)
    await store.close()
    store = await open_store()
    # A:US raised to 3, B:US's cap removed, A:GB (2 pages walked) lowered to 2
    again = await start(store, targets((A, "US", 3), (A, "GB", 2), (B, "US", None)))
    assert {c.target.key: (c.saved.walk_pages, c.target.max_pages) for c in again} == {
        f"{A}:US": (1, 3),
        f"{B}:US": (1, None),
    }
    assert store.totals.count(Status.DONE) == 1  # A:GB: at its lowered cap, no page more


async def test_a_budget_stop_leaves_the_walks_for_a_larger_budget(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", None), (B, "US", None)))
    granted = 0
    while size := await store.lease(100, 2, 40):
        granted += size
    assert granted == 40  # the ceiling, whatever the lease sizes
    await commit(store, *(page(c) for c in first))
    await end(store, budget_stopped=True)
    await store.close()
    store = await open_store()
    again = await start(store, targets((A, "US", None), (B, "US", None)))
    assert keys(again) == {f"{A}:US", f"{B}:US"}
    assert await store.lease(100, 2, 40) == 0
    assert await store.lease(100, 2, 1000) > 0  # raised: the walks go on


async def test_leases_shrink_as_the_budget_nears_its_end(open_store):
    store = await open_store()
    await start(store, targets((A, "US", None)))
    sizes = []
    while size := await store.lease(1000, 2, 1000):
        sizes.append(size)
    assert sum(sizes) == 1000 and sizes[0] <= 1000 // 8
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 2


async def test_a_crashed_lease_is_counted_as_forfeited(open_store):
    store = await open_store()
    await start(store, targets((A, "US", None)))
    leased = await store.lease(100, 2, 10_000)
    await store.give_back(10)
    await store.close()  # killed here: the rest neither given back nor the run ended
    store = await open_store()
    assert store.ledger.forfeited == leased - 10
    assert store.ledger.leased == leased - 10  # still counted as spent: the ceiling holds
    await store.lease(10, 2, 10_000)
    await end(store)
    await store.close()
    store = await open_store()  # a clean end forfeits nothing
    assert store.ledger.forfeited == leased - 10


async def test_a_stale_writer_changes_nothing(open_store, tmp_path: Path):
    store = await open_store()
    first = await start(store, targets((A, "US", None)))
    if isinstance(store, SqliteStore):
        with pytest.raises(StateError, match="another crawler is running"):
            await open_store()
        return
    await open_store()  # the same worker's name started again: the first one is retired
    with pytest.raises(LeaseLost):
        await commit(store, page(first[0]))
    fresh = await open_store(worker="w2")
    view = await claim_all(fresh)
    assert [c.saved.walk_pages for c in view] == [0]  # nothing of the stale commit counted


async def test_the_output_settings_a_job_began_with_are_kept(open_store):
    store = await open_store()
    await start(store, targets((A, "US", None)))
    await end(store)
    await store.close()
    with pytest.raises(StateError, match="output settings changed"):
        await open_store(output={**OUTPUT, "compression": "gzip"})


async def test_a_commit_sent_again_after_a_lost_answer_counts_once(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", None)))
    if isinstance(store, SqliteStore):
        pytest.skip("one process commits in its own transaction: no answer to lose")
    assert isinstance(store, RedisStore)
    from crawler.coordination.writes import Writes  # noqa: PLC0415 -- this test's alone

    writes = Writes()
    writes.op("HINCRBY", store.key("ledger"), "credits", 2)
    assert await store.apply(writes, chan="commit_seq", seq=7) == ["ok"]
    assert await store.apply(writes, chan="commit_seq", seq=7) == ["ok"]  # the repeat
    ledger = await store.link.call(lambda: store.link.redis.hgetall(store.key("ledger")))
    assert ledger["credits"] == "2"
    assert orjson.loads(orjson.dumps(first[0].target.key)) == f"{A}:US"


async def test_each_refresh_keeps_its_own_figures(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", None), (B, "US", None)))
    await commit(store, *(page(c, last=True, ids=10) for c in first))
    await end(store)
    for refresh in (1, 2):
        await store.close()
        store = await open_store()
        await store.sync_targets(targets((A, "US", None), (B, "US", None)))
        assert await store.begin_run(refresh=True, mode="early_stop") == refresh
        walks = await claim_all(store)
        assert {(c.saved.walk, c.saved.walk_pages) for c in walks} == {(refresh, 0)}
        await commit(store, *(page(c, last=True, ids=refresh) for c in walks))
        await end(store)
    view = open_store.view()
    try:
        figures = [
            (r["refresh"], r["targets"], r["new_reviews"], r["done"]) for r in view.refreshes()
        ]
    finally:
        view.close()
    assert figures == [(1, 2, 2, 2), (2, 2, 4, 2)]  # the second left the first's as they were


async def test_the_refresh_a_plan_probed_is_the_one_the_next_run_carries_on(open_store):
    store = await open_store()
    first = await start(store, targets((A, "US", None)))
    await commit(store, page(first[0], last=True, ids=10))
    await end(store)
    await store.close()
    store = await open_store()  # plan --refresh: the refresh's page 1, which finds nothing new
    await store.sync_targets(targets((A, "US", None)))
    assert await store.begin_run(refresh=True, mode="early_stop", probe=True) == 1
    (probed,) = await claim_all(store)
    await commit(store, page(probed, last=True))
    await end(store)
    for expected_refresh, walks in ((1, 0), (2, 1)):  # run --refresh: carried on; then anew
        await store.close()
        store = await open_store()
        await store.sync_targets(targets((A, "US", None)))
        assert await store.begin_run(refresh=True, mode="early_stop") == expected_refresh
        claimed = await claim_all(store)
        assert len(claimed) == walks  # page 1 of refresh 1 is not bought again
        await commit(store, *(page(c, last=True) for c in claimed))
        await end(store)


def ended(claimed: Claimed, finish: Finish, *, shown: int, count: int | None) -> PageCommitted:
    """The page that ends a walk: ``shown`` reviews the walk had not met, of ``count`` said."""
    return PageCommitted(
        claimed.saved.id, claimed.fence, 2, Status.DONE, finish, shown + 3, shown, 0, 2, 0, 0,
        0.1, count, None, None, shown=shown,
    )  # fmt: skip


async def test_each_finished_target_keeps_its_verdict_and_a_refresh_says_if_still_short(
    open_store,
):
    store = await open_store()
    listed = targets((A, "US", None), (A, "GB", None), (B, "US", None), (B, "GB", None))
    walks = {c.target.key: c for c in await start(store, listed)}
    await commit(
        store,
        ended(walks[f"{A}:US"], Finish.END, shown=96, count=100),  # within 5: complete
        ended(walks[f"{A}:GB"], Finish.END, shown=60, count=100),  # the feed ended at 60
        ended(walks[f"{B}:US"], Finish.END, shown=4, count=None),
        TargetFailed(walks[f"{B}:GB"].saved.id, walks[f"{B}:GB"].fence, "cap", 2, 0, 0,
                     Status.BUDGET),
    )  # fmt: skip
    await end(store)
    await store.close()
    view = open_store.view()
    try:
        totals = view.totals()
        by_verdict = {v: int(totals.total(v)) for v in ("complete", "short", "capped", "unknown")}
        assert by_verdict == {"complete": 1, "short": 1, "capped": 1, "unknown": 1}
        assert (totals.total("missing"), totals.total("said")) == (40, 200)
        (short,) = [r for r in view.attention(20) if r.get("verdict") == "short"]
        assert (short["region"], short["missing"]) == ("GB", 40)
        rows = {(r[0], r[1]): r[2:] for r in view.rows(("product_id", "region", "verdict",
                                                         "missing"))}  # fmt: skip
        assert rows[(A, "GB")] == ("short", 40) and rows[(A, "US")] == ("complete", 0)
    finally:
        view.close()
    store = await open_store()  # a refresh: page 1 says the same count and shows nothing new
    await store.sync_targets(listed)
    await store.begin_run(refresh=True, mode="early_stop")
    again = {c.target.key: c for c in await claim_all(store)}
    view = open_store.view()
    assert view.totals().total("short") == 0  # A:GB under way: judged when its walk ends
    view.close()
    await commit(store, ended(again[f"{A}:GB"], Finish.SAME, shown=0, count=100))
    await end(store)
    await store.close()
    view = open_store.view()
    try:
        assert view.totals().total("short") == 1
        assert [r["short"] for r in view.refreshes()] == [1]  # the refresh found it still short
    finally:
        view.close()


# -- sources: the targets an endpoint's pages find, committed with the page --------------------

SELLERS = tuple(
    SourceTarget("shop_products", (("region", "US"), ("seller_id", seller)))
    for seller in ("7001", "7010")
)
SHOP = Source("shop_products", "shop_products", SELLERS, "product_id", ())
SERIES_FILE = "shop_products-w1-000001.jsonl"


async def start_sources(store: StateStore, listed: TargetList, *, refresh: bool = False) -> None:
    await store.sync_targets(listed)
    await store.sync_sources((SHOP,))
    await store.begin_run(refresh=refresh, mode="early_stop")


def listing(
    claimed: Claimed, found: list[tuple[str, str]], *, last: bool = False, items: int = 0
) -> SourcePage:
    """A page of a seller's listing: ``items`` new item ids, the review targets it names."""
    change = PageCommitted(
        claimed.saved.id, claimed.fence, None if last else "4",
        Status.DONE if last else Status.PENDING, Finish.END if last else None,
        len(found), items, 0, 2, 0, 0, 0.1, None, None, None,
    )  # fmt: skip
    ids = [f"{claimed.saved.id}-{claimed.saved.walk_pages}-{i}" for i in range(items)]
    change.other_ids = orjson.dumps(ids) if ids else b""
    return SourcePage(change, "shop_products", found)


async def commit_sources(store: StateStore, *pages: SourcePage, opened: bool = False) -> None:
    batch = Commit(position=store.position, sources=list(pages))
    if opened:
        batch.series_shards = [SeriesShard("shop_products", ShardOpened(SERIES_FILE))]
    records = sum(p.change.new for p in pages if isinstance(p.change, PageCommitted))
    batch.series_positions = {"shop_products": WriterPosition(100 * records, records)}
    await store.commit(batch)


async def test_a_product_found_twice_or_listed_is_one_target_walked_once(open_store):
    store = await open_store()
    await start_sources(store, targets((A, "US", None)))
    first, second = await store.claim(), await store.claim()
    assert first is not None and second is not None
    assert {first.target.key, second.target.key} == {t.key for t in SELLERS}
    await commit_sources(
        store,
        listing(first, [(A, "US"), (B, "US")], items=2),  # A: listed already
        listing(second, [(B, "US"), (B, "GB")], items=2),  # B:US: found by the first page
        opened=True,
    )
    walks = await claim_all(store)
    assert sorted(c.target.key for c in walks) == [f"{A}:US", f"{B}:GB", f"{B}:US"]
    assert store.totals.targets == 3
    assert await store.series_manifest() == {
        "shop_products": ([], [ShardInfo(SERIES_FILE, 4, 400)])
    }
    await commit_sources(store, listing(first, [], last=True), listing(second, [], last=True))
    await end(store)
    await store.close()
    view = open_store.view()
    try:
        (figures,) = view.sources()
    finally:
        view.close()
    assert figures["source"] == "shop_products"
    assert (figures["targets"], figures["targets_done"], figures["pages"]) == (2, 2, 4)
    assert (figures["products_found"], figures["items"], figures["credits"]) == (2, 4, 8)


async def test_a_source_walk_resumes_from_its_cursor_with_what_it_found(open_store):
    store = await open_store()
    await start_sources(store, targets((A, "US", None)))
    first = await store.claim()
    assert first is not None
    await commit_sources(store, listing(first, [(B, "US")], items=1), opened=True)
    await store.close()  # killed: neither the run ended nor the source's lease given back
    store = await open_store()
    await start_sources(store, targets((A, "US", None)))
    walks = {c.target.key: c.saved for c in await claim_all(store)}
    assert walks[first.target.key].cursor == "4" and walks[first.target.key].walk_pages == 1
    assert {k for k in walks if ":" in k and not k.startswith("{")} == {f"{A}:US", f"{B}:US"}
    assert len(walks) == 4  # both sellers, A listed, B found: nothing lost, nothing twice


async def test_a_stale_series_holder_changes_nothing(open_store):
    store = await open_store()
    await start_sources(store, targets())
    first = await store.claim()
    assert first is not None
    if isinstance(store, SqliteStore):
        pytest.skip("one process: nobody takes a source over")
    await open_store()  # the same worker's name started again: the first one is retired
    with pytest.raises(LeaseLost):
        await commit_sources(store, listing(first, [(B, "US")], items=1))
    other = await open_store(worker="w2")
    await other.sync_sources((SHOP,))
    walks = await claim_all(other)
    assert sorted(c.saved.walk_pages for c in walks) == [0, 0]  # the stale page did not count
    assert other.totals.targets == 0  # nor did what it found


async def test_a_refresh_walks_the_sources_again_and_refreshes_what_they_found(open_store):
    store = await open_store()
    await start_sources(store, targets((A, "US", None)))
    sellers = [await store.claim(), await store.claim()]
    assert all(c is not None for c in sellers)
    await commit_sources(
        store, *(listing(c, [(B, "US")], last=True) for c in sellers if c is not None)
    )
    walks = await claim_all(store)
    await commit(store, *(page(c, last=True, ids=3) for c in walks))
    await end(store)
    await store.close()
    store = await open_store()
    await start_sources(store, targets((A, "US", None)), refresh=True)
    again = await claim_all(store)
    assert sorted(c.target.key for c in again) == sorted(
        [*(t.key for t in SELLERS), f"{A}:US", f"{B}:US"]
    )
    assert {(c.saved.walk, c.saved.cursor, c.saved.walk_pages) for c in again} == {(1, None, 0)}


async def test_a_listed_target_a_source_found_too_stays_when_the_file_drops_it(open_store):
    store = await open_store()
    await start_sources(store, targets((A, "US", None), (B, "US", None)))
    first = await store.claim()
    assert first is not None
    await commit_sources(store, listing(first, [(A, "US")]))
    await end(store)
    await store.close()
    store = await open_store()
    await start_sources(store, targets())  # the job file lists neither any more
    assert store.totals.targets == 1  # A: the source found it; B: dropped
    walks = [c.target.key for c in await claim_all(store)]
    assert f"{A}:US" in walks and f"{B}:US" not in walks
