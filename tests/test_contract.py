"""The contract sample parses, and the sandbox answers in the same shape and statuses."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import orjson
import pytest

from crawler import load_job
from crawler.api.client import parse_retry_after
from crawler.api.endpoint import REVIEWS
from crawler.errors import ServerError
from crawler.runner import run_job
from tests.conftest import ENV, KEY, PRODUCTS, target_rows, write_job

SAMPLE = Path(__file__).resolve().parent.parent / "crawler" / "sandbox" / "sample-reviews-page.json"


def test_contract_sample_parses():
    body = SAMPLE.read_bytes()
    page = REVIEWS.decode(body)
    assert page.has_more and page.next_cursor == 2 and page.total == 26134
    assert page.ids == ["7585673214710253325"]
    # the sample is pretty-printed: its item is made one line, the same JSON value
    (item,) = page.items
    assert b"\n" not in bytes(item)
    assert orjson.loads(bytes(item)) == orjson.loads(body)["data"]["review_items"][0]


def test_items_stay_the_bytes_the_api_sent():
    item = b'{"review":{"review_id":"7585673214710253325","n":12345678901234567890123},"x":1.10}'
    body = b'{"code":0,"data":{"review_items":[%b,{"review":{"review_id":42}}],' % item
    body += b'"has_more":false,"review_count":2},"requestId":"r"}'
    page = REVIEWS.decode(body)
    assert [bytes(i) for i in page.items] == [item, b'{"review":{"review_id":42}}']
    assert page.ids == ["7585673214710253325", "42"] and not page.has_more


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"code":0,"data":{"review_items":[{"review":', "truncated or non-JSON body"),
        (b"<html>busy</html>", "truncated or non-JSON body"),
        (b'{"code":0,"data":{"has_more":false}}', "does not fit the contract"),
        (b'{"code":0,"data":{"review_items":[],"has_more":"no"}}', "does not fit the contract"),
        (b'{"code":0,"data":{"review_items":{},"has_more":false}}', "does not fit the contract"),
        (b'{"code":0,"data":null}', "does not fit the contract"),
        (b'{"code":50001,"message":"try later","data":null}', "API code 50001: try later"),
        (b'{"code":0,"data":{"review_items":[],"has_more":true}}', "gives no next cursor"),
    ],
)
def test_malformed_pages_are_server_faults_to_retry(body, why):
    with pytest.raises(ServerError, match=why):
        REVIEWS.decode(body)


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None


async def test_sandbox_answers_like_the_contract(served):
    url, box = served
    sample = json.loads(SAMPLE.read_text())
    params = {"product_id": PRODUCTS[0], "region": "GB", "offset": "1"}
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(url + REVIEWS.path, params=params, headers=auth) as r:
            doc = await r.json()
        assert set(doc) == set(sample) and set(doc["data"]) == set(sample["data"])
        item = doc["data"]["review_items"][0]
        assert set(item) == set(sample["data"]["review_items"][0])
        assert doc["data"]["next_cursor"] == 2 and doc["data"]["has_more"] is True
        async with session.get(url + REVIEWS.path, params=params) as r:
            assert r.status == 401
        async with session.get(
            url + REVIEWS.path, params={**params, "region": "UK"}, headers=auth
        ) as r:
            assert r.status == 400 and (await r.json())["code"] != 0
        async with session.get(url + "/_sandbox/ids", params=params) as r:
            ids = (await r.json())["ids"]
    assert ids == box.catalogue.ids(PRODUCTS[0], "GB") and len(ids) == len(set(ids))


async def test_plan_probe_pages_are_kept(tmp_path, served):
    url, box = served
    targets = [{"product_id": PRODUCTS[0], "regions": ["US", "GB"]}]
    job = load_job(write_job(tmp_path, url, targets))
    probe = await run_job(job, environ=ENV, max_pages=1)
    assert probe.exit_status == 0 and probe.report["totals"]["pages"] == 2
    rows = {r["region"]: r for r in target_rows(job.output.dir)}
    assert rows["GB"]["review_count"] == 545 and rows["GB"]["status"] == "pending"
    sent = sum(b.requests for b in box.ledgers.values())
    full = await run_job(job, environ=ENV)
    pages = full.report["totals"]["pages"]
    assert sum(b.requests for b in box.ledgers.values()) - sent == pages - 2  # page 1 not again
