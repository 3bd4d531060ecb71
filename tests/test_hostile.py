"""A hostile server: what it sends is a page or one target's failure, and never shows the key."""

from __future__ import annotations

import asyncio
import gzip
import re
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from crawler import load_job, logs
from crawler.api.client import ApiClient
from crawler.api.inflate import Inflater
from crawler.api.redact import NOTHING, Redactor
from crawler.errors import ServerError
from crawler.output.layout import Layout
from crawler.output.shards import read_lines
from crawler.sandbox import Sandbox, SandboxOptions
from tests.conftest import (
    ENV,
    KEY,
    PRODUCTS,
    output_ids,
    run_crawler,
    subprocess_env,
    target_rows,
    write_job,
)

# an answer for one product: a response, or None to let the sandbox's own page through
Answer = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]


class HostileApi:
    """The sandbox's answers, except where a product has an answer of its own."""

    def __init__(self, answers: Mapping[str, Answer]) -> None:
        self.box = Sandbox(SandboxOptions())
        self.answers = answers
        self.hostile: Counter[str] = Counter()  # hostile answers sent, per product

    async def reviews(self, request: web.Request) -> web.StreamResponse:
        product_id = request.query.get("product_id", "")
        answer = self.answers.get(product_id)
        if answer is not None:
            region, offset = request.query.get("region", ""), int(request.query.get("offset", 1))
            response = await answer(request, self.box.page_body(product_id, region, offset))
            if response is not None:
                self.hostile[product_id] += 1
                return response
        return await self.box.reviews(request)


@asynccontextmanager
async def serve_hostile(answers: Mapping[str, Answer]) -> AsyncIterator[tuple[str, HostileApi]]:
    api = HostileApi(answers)
    app = web.Application()
    app.router.add_get("/v1/tiktok/product/reviews", api.reviews)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server  # aiohttp exposes the bound sockets only here
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", api
    finally:
        await runner.cleanup()


def offset(request: web.Request) -> int:
    return int(request.query.get("offset", 1))


def json_answer(body: bytes, status: int = 200, **headers: str) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# -- 1. the key never leaks through what the server says

PERCENT = "".join(f"%{byte:02X}" for byte in KEY.encode())  # the key wholly URL-encoded
PARTLY = KEY.replace("_", "%5f")  # partly, in lower case
FORMS = [KEY, PERCENT, PERCENT.lower(), PARTLY, KEY.replace("_", "%5F")]


def _says_the_key(status: int, code: int) -> Answer:
    async def answer(request: web.Request, _: bytes) -> web.Response:
        echoed = request.headers.get("Authorization", "")  # "Bearer <key>"
        message = (
            f"refused {echoed}; key={KEY}; as sent: {PERCENT} {PARTLY}; "
            f"split: {KEY[:4]}\x00{KEY[4:]} {KEY[:6]}\u200b{KEY[6:]}\r\n\x1b[31m{KEY}"
        )
        body = {"code": code, "message": message, "data": None}
        return json_answer(orjson.dumps(body), status)

    return answer


async def _redirects_with_the_key(_: web.Request, __: bytes) -> web.Response:
    where = f"https://login.example/{KEY}/{PERCENT}/{PARTLY}?key={KEY}"
    return web.Response(status=302, headers={"Location": where})


async def test_the_key_is_in_no_output_whatever_the_server_says(tmp_path: Path):
    """Error answers carry the key (echoed as the Bearer header, plain, URL-encoded, split by
    control characters): not one byte of any output, log, state or status shows it."""
    answers = {
        PRODUCTS[1]: _says_the_key(500, 50000),
        PRODUCTS[2]: _says_the_key(200, 40001),
        PRODUCTS[3]: _says_the_key(400, 40000),
        PRODUCTS[4]: _redirects_with_the_key,
        PRODUCTS[5]: _says_the_key(401, 40100),
    }
    normal = {"product_id": PRODUCTS[0], "region": "DE"}
    first = [normal, *({"product_id": p, "region": "US"} for p in PRODUCTS[1:4])]
    api = {"retry": {"max_attempts": 2, "base_seconds": 0}}
    outputs: list[bytes] = []
    log_file = tmp_path / "crawler.log"
    async with serve_hostile(answers) as (url, server):
        job = write_job(tmp_path, url, first, api=api)
        # the 500, the 200 with code != 0, the 400: each fails its target, the run goes on
        status, stdout, stderr = await run_crawler(
            "--log-file", str(log_file), "run", "--no-progress", str(job)
        )
        assert status == 1, stderr.decode()
        outputs += [stdout, stderr]
        # a redirect stops the run; console logs on stderr this time
        write_job(tmp_path, url, [*first, {"product_id": PRODUCTS[4], "region": "US"}], api=api)
        status, stdout, stderr = await run_crawler(
            "--log-format", "console", "run", "--no-progress", str(job)
        )
        assert status == 5, stderr.decode()
        outputs += [stdout, stderr]
        # a refused key stops it too; JSON logs on stderr
        write_job(tmp_path, url, [*first, {"product_id": PRODUCTS[5], "region": "US"}], api=api)
        status, stdout, stderr = await run_crawler("run", "--no-progress", str(job))
        assert status == 4, stderr.decode()
        outputs += [stdout, stderr]
        assert all(server.hostile[p] > 0 for p in answers)
    shown = []
    for command in (["status"], ["status", "--all"], ["status", "--csv"], ["status", "--json"]):
        status, stdout, stderr = await run_crawler(*command, str(job))
        assert status == 0, stderr.decode()
        shown.append(stdout.decode())
        outputs += [stdout, stderr]
    outputs.append(log_file.read_bytes())
    out = tmp_path / "out"
    files = sorted(path for path in out.rglob("*") if path.is_file())
    assert out / "state" / "state.db" in files and out / "run-report.json" in files
    outputs += [path.read_bytes() for path in files]
    for text in outputs:
        for form in FORMS:
            assert form.encode() not in text
    # what the server said is still told, with the key blotted out
    reasons = {row["product_id"]: row["reason"] for row in target_rows(out)}
    assert reasons[PRODUCTS[1]].startswith("500 server error: refused Bearer ***; key=***;")
    assert reasons[PRODUCTS[2]].startswith("API code 40001: refused Bearer ***; key=***;")
    assert reasons[PRODUCTS[3]].startswith("400 invalid parameters: refused Bearer ***;")
    for reason in reasons.values():
        assert reason is None or ("\x00" not in reason and "\x1b" not in reason)
    assert b"redirecting to https://login.example/***/***/***" in outputs[3]
    assert b"401 missing or invalid API key: refused Bearer ***" in outputs[5]


# -- the key in no repr, no traceback, and the redactor itself


async def test_no_repr_shows_the_key(tmp_path: Path):
    @dataclass
    class Holder:  # as the runner's options hold it
        api_key: str

    job = load_job(
        write_job(tmp_path, "http://127.0.0.1:1", [{"product_id": "12345678", "region": "US"}])
    )
    key = job.api_key(ENV)
    assert key == KEY and f"Bearer {key}" == f"Bearer {KEY}"  # the value where it is used
    assert repr(key) == "'***'" and repr(Holder(key)).endswith("Holder(api_key='***')")
    assert KEY not in repr(job)
    async with ApiClient("http://127.0.0.1:1", key, concurrency=1, timeout_seconds=1) as client:
        assert KEY not in repr(client) and KEY not in repr(vars(client).get("_redact"))


def test_console_tracebacks_show_no_locals(capsys):
    """structlog's console renderer used rich's tracebacks, which print every frame's locals."""
    logs.configure(log_format="console")
    try:
        secret = KEY
        try:
            raise ValueError("boom")
        except ValueError:
            logs.get_logger("test").exception("failed", holding=len(secret))
    finally:
        logs.reset()
    shown = capsys.readouterr().err
    assert "ValueError: boom" in shown and KEY not in shown


def test_the_redactor_blots_out_every_form_of_a_secret():
    redact = Redactor(["sk_live_Ab/9+z"])
    for said in (
        "sk_live_Ab/9+z",
        "SK_LIVE_AB/9+Z",  # a server that shouts it
        "sk_live_Ab%2F9%2Bz",  # URL-encoded, in part
        "%73%6b%5f%6c%69%76%65%5f%41%62%2f%39%2b%7a",  # wholly, in lower case
        "sk_live_Ab%252F9%252Bz",  # twice
        "sk_live\x00_Ab/9+z",  # cut by a control character
        "sk_live_\u200bAb/9\u2028+z",  # by invisible ones
        "sk_live_Ab/9 +z",  # by a space
        "sk_live_Ab/9%0A+z",  # by an encoded line feed
    ):
        assert redact(f"key {said} refused") == "key *** refused", said
    assert redact("Authorization: Bearer eyJhbGciOi.J9-x_y~z+/=") == "Authorization: Bearer ***"
    assert redact("line\r\nbreak\x1b[2J\u202eevil\ud800") == "line break [2J evil"
    assert redact("x" * 500) == "x" * 200 and redact("word " * 10, limit=12) == "word word wo"
    assert redact(None) == "None" and redact({"message": "sk_live_Ab/9+z"}) == "{'message': '***'}"
    # a secret past what is searched, or cut where the search stops, is not shown either
    long = "sk_live_Ab/9+z " * 10_000
    assert set(redact(long).split()) == {"***"}
    assert redact("\u200b" * (2**16 - 5) + "sk_live_Ab/9+z") == ""  # not "sk_li"
    assert redact.finds("a sk_live_Ab%2F9+z b") and not redact.finds("sk_live_Ab")
    assert repr(redact) == "Redactor(1 secrets)"
    assert NOTHING("sk_live_Ab/9+z\x00") == "sk_live_Ab/9+z"


# -- 2. one hostile page is one target's failure, never the run's end

MORE = str(int(PRODUCTS[-1]) + 1)  # one more sandbox product, with pages in the US


def first_id(page: bytes, replacement: bytes) -> bytes:
    """The page with its first review id's JSON value replaced."""
    return re.sub(rb'"review_id":"\d+"', b'"review_id":' + replacement, page, count=1)


def _from_page_2(change: Callable[[bytes], bytes], status: int = 200) -> Answer:
    async def answer(request: web.Request, page: bytes) -> web.Response | None:
        return json_answer(change(page), status) if offset(request) >= 2 else None

    return answer


def _nested(page: bytes) -> bytes:
    deep = b"[" * 1200 + b"]" * 1200
    return page.replace(b'"sku_id":', b'"deep":' + deep + b',"sku_id":', 1)


def _bad_cursor(page: bytes) -> bytes:
    return re.sub(rb'"next_cursor":\d+', b'"next_cursor":"3\xff\xfe"', page, count=1)


def _huge_cursor(page: bytes) -> bytes:
    return re.sub(rb'"next_cursor":\d+', b'"next_cursor":%d' % 2**70, page, count=1)


HOSTILE_PAGES = {
    PRODUCTS[1]: (_from_page_2(_nested), "JSON nested too deep"),
    PRODUCTS[2]: (
        _from_page_2(lambda page: first_id(page, b'"17\xff29"')),
        "a review id is not valid UTF-8",
    ),
    PRODUCTS[3]: (_from_page_2(_bad_cursor), "next_cursor is not valid UTF-8"),
    PRODUCTS[4]: (
        _from_page_2(lambda _: b'{"code":50000,"message":"\xc3\x28 d\xe9faillance"}', 500),
        "500 server error: \ufffd( d\ufffdfaillance",
    ),
    PRODUCTS[7]: (_from_page_2(_huge_cursor), "next_cursor is a number too large to keep"),
    MORE: (
        _from_page_2(lambda _: b'{"code":50001,"message":"\xc3\x28 d\xe9faillance"}'),
        "API code 50001: \ufffd( d\ufffdfaillance",
    ),
}


async def test_a_hostile_page_fails_its_target_and_the_run_goes_on(tmp_path: Path):
    """JSON nested 1,200 deep, a review id and a cursor that are not UTF-8, a message that is
    not UTF-8 (with a 500, and with a 200 whose code is not 0), a cursor too large to save: each
    target fails with its reason after its tries, the others end exact."""
    normal = [(PRODUCTS[0], "DE"), (PRODUCTS[5], "GB"), (PRODUCTS[6], "GB")]
    hostile = [(p, "US") for p in HOSTILE_PAGES]
    targets = [{"product_id": p, "region": r} for p, r in normal + hostile]
    api = {"retry": {"max_attempts": 3, "base_seconds": 0}}
    answers = {p: answer for p, (answer, _) in HOSTILE_PAGES.items()}
    async with serve_hostile(answers) as (url, server):
        job = write_job(tmp_path, url, targets, api=api)
        status, _, stderr = await run_crawler("run", "--no-progress", str(job))
        box = server.box
        assert status == 1, stderr.decode()
        assert b"Traceback" not in stderr
        assert all(server.hostile[p] == 3 for p in HOSTILE_PAGES)  # each page tried 3 times
        rows = {(row["product_id"], row["region"]): row for row in target_rows(tmp_path / "out")}
        for pair in normal:
            assert rows[pair]["status"] == "done"
        for product_id, (_, says) in HOSTILE_PAGES.items():
            row = rows[product_id, "US"]
            assert row["status"] == "failed" and row["pages"] == 1, row
            assert says in row["reason"] and "gave up after 3 attempts" in row["reason"], row
        # exact: every review of the normal targets, and page 1 of the hostile ones, once each
        expected = {i for pair in normal for i in box.catalogue.ids(*pair)}
        expected |= {i for pair in hostile for i in box.catalogue.page(*pair, 1).ids}
        ids = output_ids(tmp_path / "out")
        assert len(ids) == len(set(ids)) and set(ids) == expected
        # and the next run walks the failed targets again, without crashing either
        status, _, stderr = await run_crawler("run", "--no-progress", str(job))
        assert status == 1 and b"Traceback" not in stderr, stderr.decode()
        assert all(server.hostile[p] == 6 for p in HOSTILE_PAGES)


def _item(review_id: bytes, text: bytes = b'"fine"') -> bytes:
    return b'{"review":{"review_id":%b,"rating":5,"display_text":%b},"sku_id":"1"}' % (
        review_id,
        text,
    )


def _page(items: list[bytes], *, more: bool = False, cursor: int = 2, count: bytes = b"0") -> bytes:
    return b'{"code":0,"message":"success","data":{"review_items":[%b],"has_more":%b,' % (
        b",".join(items),
        b"true" if more else b"false",
    ) + b'"next_cursor":%d,"review_count":%b},"requestId":"x"}' % (cursor, count)


def _one_page(body: bytes) -> Answer:
    async def answer(_: web.Request, __: bytes) -> web.Response:
        return json_answer(body)

    return answer


def _kept(n: int) -> list[bytes]:
    """A page of reviews 9n00...1 to 9n00...4 and items that are not reviews."""
    return [
        _item(b'"9%d00000000000000001"' % n, b'"caf\xe9 \xff\xfe ok"'),  # not UTF-8: kept
        _item(b"9%d00000000000000002" % n),  # an id sent as a number: kept, as its digits
        _item(b"1.5"),  # ids that are not ids: skipped
        _item(b"null"),
        _item(b'["9%d00000000000000003"]' % n),
        _item(b"-4"),
        b'{"sku_id":"no review here"}',
        _item(b'"9%d00000000000000004"' % n, b'{"deep":' + b"[" * 100 + b"]" * 100 + b"}"),
    ]


async def test_what_can_be_kept_of_a_strange_page_is_kept_as_valid_utf8(tmp_path: Path):
    """Bytes that are not UTF-8 inside a review's text are replaced with U+FFFD (the review is
    kept, its line valid UTF-8 JSON), also when the page is spread over lines; ids that are no
    id are skipped; a review_count no count could be is taken as unknown."""
    compact = _page(_kept(1), count=b"1" + b"0" * 30)
    spread = _page(_kept(2), count=b"-1").replace(b",", b",\n  ")  # as if pretty-printed
    answers = {"91000000001": _one_page(compact), "91000000002": _one_page(spread)}
    async with serve_hostile(answers) as (url, _):
        targets = [{"product_id": p, "region": "US"} for p in answers]
        job = write_job(tmp_path, url, targets)
        status, _, stderr = await run_crawler("run", "--no-progress", str(job))
        assert status == 0 and b"Traceback" not in stderr, stderr.decode()
    out = tmp_path / "out"
    lines = [line for path in Layout(out).shard_files() for line in read_lines(path)]
    records = [orjson.loads(line.decode("utf-8")) for line in lines]  # strict UTF-8 and JSON
    assert sorted((r["product_id"], r["review_id"]) for r in records) == [
        (f"9100000000{p}", f"9{p}0000000000000000{n}") for p in (1, 2) for n in (1, 2, 4)
    ]
    texts = {r["item"]["review"]["display_text"] for r in records if r["review_id"][-1] == "1"}
    assert texts == {"caf\ufffd \ufffd\ufffd ok"}
    assert all(row["status"] == "done" and row["review_count"] is None for row in target_rows(out))
    status, stdout, _ = await run_crawler("verify", str(job))
    assert status == 0, stdout.decode()


# ids as JSON: line breaks of every kind (\r, U+0085, U+2028 and U+2029, \v, \f, \x1c: Python's
# splitlines cuts at each), a line feed, a leading quote, leading zeros, a number past 64 bits
ODD_IDS = [
    r'"7\r8"',
    r'"p\u0085q"',
    r'"x\u2028y"',
    r'"a\u2029b"',
    r'"c\u000bd\u000ce\u001cf"',
    r'"line\nfeed"',
    r'"\"quoted\""',
    r'"\"not json"',
    '"0077"',
    '"123456789012345678901234567890"',
    '"\u00e9t\u00e9"',
    '"plain"',
]


def _odd_feed(request: web.Request) -> web.Response:
    """Two pages: the odd ids on page 1, the same ids again and a few more on page 2."""
    items = [_item(i.encode()) for i in ODD_IDS]
    if offset(request) == 1:
        return json_answer(_page(items, more=True, cursor=2, count=b"15"))
    more = [_item(b'"odd-%d"' % n) for n in range(3)]
    return json_answer(_page(items[::-1] + more, count=b"15"))


async def test_odd_review_ids_are_written_once_across_runs(tmp_path: Path):
    """Review ids that are not numbers go to seen-other.txt; read back on the next run, each must
    be the id it was (splitlines cut ids at \\r, U+2028 or U+0085 into two that were never seen,
    and the refresh wrote them again)."""
    sent: Counter[int] = Counter()

    async def answer(request: web.Request, _: bytes) -> web.Response:
        sent[offset(request)] += 1
        return _odd_feed(request)

    async with serve_hostile({"91000000003": answer}) as (url, _):
        job = write_job(tmp_path, url, [{"product_id": "91000000003", "region": "US"}])
        for command in (["run"], ["run", "--refresh"], ["run", "--refresh"]):
            status, _, stderr = await run_crawler(*command, "--no-progress", str(job))
            assert status == 0 and b"Traceback" not in stderr, stderr.decode()
    ids = output_ids(tmp_path / "out")
    expected = [orjson.loads(i) for i in ODD_IDS] + [f"odd-{n}" for n in range(3)]
    assert sorted(ids) == sorted(expected)  # each once
    # the refreshes found nothing new on page 1 of an unchanged count: one request each
    assert sent == {1: 3, 2: 1}
    status, stdout, _ = await run_crawler("verify", str(job))
    assert status == 0, stdout.decode()


# -- 3. bodies are capped: read up to api.max_body_bytes, decompressed, and no further

CAP = 256 * 1024
HUGE = 256 * 1024 * 1024  # what each hostile answer would make of the body, read to its end
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size at fork, and pytest
# has grown past this test's bound by the time a whole suite reaches it
_MEASURED = (
    "import re, sys\n"
    "from pathlib import Path\n"
    "from crawler.cli import main\n"
    "status = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)\n"
    "print(f'peak_rss_kib={hwm}', file=sys.stderr)\n"
    "sys.exit(status)\n"
)


async def _endless_page(request: web.Request, __: bytes) -> web.StreamResponse:
    """A page that starts well and goes on: HUGE bytes of white space inside its JSON."""
    head, blank = b'{"code":0,"message":"success","data":', b" " * (1 << 20)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(head) + HUGE + 1
    await response.prepare(request)
    await response.write(head)
    try:
        for _ in range(HUGE // len(blank)):
            await response.write(blank)
    except (ConnectionError, RuntimeError):  # the client stopped reading: as it should
        return response
    await response.write(b"}")
    return response


def _bomb() -> bytes:
    """A gzip body of about 250 KB that inflates to HUGE bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header
    blank = b" " * (1 << 20)
    parts = [packer.compress(b'{"code":0,"data":')]
    parts += [packer.compress(blank) for _ in range(HUGE // len(blank))]
    return b"".join([*parts, packer.compress(b"}"), packer.flush()])


async def test_a_body_past_the_cap_is_not_read(tmp_path: Path):
    """A page of 256 MB, and a gzip body of 250 KB that inflates to 256 MB, against a cap of
    256 KiB: each read stops at the cap, the target fails after its tries, the others end, and
    the process never holds the body (its peak memory stays far below one). A 400 whose body
    passes the cap still fails its target at once, by its status."""
    bomb = _bomb()
    assert len(bomb) < HUGE // 500

    async def gzip_bomb(_: web.Request, __: bytes) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=bomb, headers=headers)

    async def long_refusal(_: web.Request, __: bytes) -> web.Response:
        message = b"no " * CAP  # over the cap: the status still says what to do
        return json_answer(b'{"code":40000,"message":"%b"}' % message, 400)

    answers = {PRODUCTS[1]: _endless_page, PRODUCTS[2]: gzip_bomb, PRODUCTS[3]: long_refusal}
    normal = (PRODUCTS[0], "DE")
    targets = [{"product_id": p, "region": r} for p, r in [normal, *((p, "US") for p in answers)]]
    api = {"max_body_bytes": CAP, "retry": {"max_attempts": 2, "base_seconds": 0}}
    async with serve_hostile(answers) as (url, server):
        job = write_job(tmp_path, url, targets, api=api)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MEASURED, "run", "--no-progress", str(job),
            env=subprocess_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            _, stderr = await process.communicate()
        assert process.returncode == 1, stderr.decode()
        assert server.hostile == {PRODUCTS[1]: 2, PRODUCTS[2]: 2, PRODUCTS[3]: 1}
        box = server.box
    rows = {row["product_id"]: row for row in target_rows(tmp_path / "out")}
    assert rows[normal[0]]["status"] == "done"
    assert rows[PRODUCTS[3]]["reason"] == "400 invalid parameters"  # the message is not read
    for product_id in (PRODUCTS[1], PRODUCTS[2]):
        assert rows[product_id]["status"] == "failed"
        assert rows[product_id]["reason"] == (
            f"body over api.max_body_bytes ({CAP:,} bytes): not read further "
            "(gave up after 2 attempts)"
        )
    assert set(output_ids(tmp_path / "out")) == set(box.catalogue.ids(*normal))
    peak_kib = int(re.findall(rb"peak_rss_kib=(\d+)", stderr)[-1])
    assert peak_kib * 1024 < HUGE // 2, peak_kib  # 65 MB here; 600 MB when read uncapped


async def test_the_body_cap_is_checked_at_load(tmp_path: Path):
    for wrong in (1000, 2 * 1024**3):
        job = write_job(tmp_path, "http://127.0.0.1:1", [], api={"max_body_bytes": wrong})
        status, _, stderr = await run_crawler("plan", str(job))
        assert status == 2
        assert b"api.max_body_bytes: Input should be" in stderr, stderr.decode()


def test_a_bomb_arriving_at_once_inflates_only_to_the_cap():
    """aiohttp inflated each chunk whole as it came (a loaded machine read 250 KB of bomb at once:
    256 MB held); the client's own inflater stops at the cap, in gzip, zlib and raw deflate."""
    data = b"{" + b" " * (16 << 20) + b"}"  # 64 times the cap
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bodies = {
        "gzip": gzip.compress(data, 9),
        "deflate": zlib.compress(data, 9),
        "x-raw": raw.compress(data) + raw.flush(),
    }
    for name, body in bodies.items():
        inflater = Inflater("deflate" if name == "x-raw" else name, CAP)
        out = inflater.feed(body)
        assert inflater.over, name
        assert len(out) <= CAP + 1, name
    small = Inflater("gzip", CAP)
    assert small.feed(gzip.compress(b"ab") + gzip.compress(b"cd")) == b"abcd"  # two members
    assert not small.over
    with pytest.raises(ServerError):
        Inflater("br", CAP)
