"""The export's section of the benchmark: reviews a second and peak memory of `crawler export`.

A job folder of sealed shards is made here (the sandbox's reviews: the contract's sample item,
about 6 KB each, with its own id, rating, text and time), so only the export is timed: each run
is `crawler export` in a process of its own, from a cold start, into an empty folder.

    .venv/bin/python bench/run.py --only export
    .venv/bin/python bench/export.py 300000 zstd      # one measurement: reviews, compression
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from crawler.output.shards import compressor

ROOT = Path(__file__).resolve().parent.parent
SHARD = 100_000  # reviews a shard holds (output.shard_max_records' default)
BATCH = 2_000  # lines compressed at once, as the writer commits them (a member or frame each)


def make_job(folder: Path, reviews: int, compression: str) -> Path:
    """A job file and its output folder: ``reviews`` reviews in sealed shards, a manifest."""
    sample = orjson.loads((ROOT / "crawler" / "sandbox" / "sample-reviews-page.json").read_bytes())
    item = sample["data"]["review_items"][0]
    item["review"].update(review_id="@ID@", rating=0, display_text="@TEXT@")
    item["review"]["review_timestamp"] = "@TIME@"
    template = orjson.dumps(item).replace(b'"rating":0', b'"rating":@RATING@')
    head = (
        b',"product_id":"1729679758111249333","region":"US","fetched_at":"2026-11-24T18:47:31.917Z"'
    )
    out = folder / "out"
    (out / "shards").mkdir(parents=True)
    compress = compressor(compression)
    suffix = {"none": "", "gzip": ".gz", "zstd": ".zst"}[compression]
    listed = []
    for first in range(0, reviews, SHARD):
        name = f"reviews-{first // SHARD + 1:06d}.jsonl{suffix}"
        path = out / "shards" / name
        count = min(SHARD, reviews - first)
        with path.open("wb") as sink:
            for start in range(first, first + count, BATCH):
                lines = [
                    _line(template, head, n)
                    for n in range(start, min(start + BATCH, first + count))
                ]
                sink.write(compress(b"".join(lines)))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        listed.append(
            {
                "file": f"shards/{name}",
                "records": count,
                "bytes": path.stat().st_size,
                "sha256": digest,
            }
        )
    manifest = {"version": 2, "records": reviews, "shards": listed, "open_shards": []}
    (out / "manifest.json").write_bytes(orjson.dumps(manifest))
    job = folder / "job.yaml"
    job.write_text(
        "api: {base_url: 'http://127.0.0.1:9'}\nbudget: {max_credits: 1}\n"
        f"output: {{dir: out, compression: {compression}}}\n"
        "targets: [{product_id: '1729679758111249333', region: US}]\n"
    )
    return job


def _line(template: bytes, head: bytes, n: int) -> bytes:
    review_id = str(7_000_000_000_000_000_000 + n * 7919).encode()
    item = (
        template.replace(b"@ID@", review_id)
        .replace(b"@RATING@", str(1 + n % 5).encode())
        .replace(b"@TEXT@", b"Sandbox review %d: %s." % (n, b"great" if n % 2 else b"fine"))
        .replace(b"@TIME@", str(1_700_000_000_000 + n * 1000).encode())
    )
    return b'{"review_id":"%s"%s,"item":%s}\n' % (review_id, head, item)


def measure(reviews: int, compression: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, shard bytes) of one `crawler export` of that many reviews."""
    with tempfile.TemporaryDirectory() as tmp:
        job = make_job(Path(tmp), reviews, compression)
        size = sum(p.stat().st_size for p in (Path(tmp) / "out" / "shards").iterdir())
        code = (
            "import sys, time\n"
            "from crawler.cli import main\n"
            "t = time.perf_counter()\n"
            "status = main(['--log-level', 'warning', 'export', sys.argv[1]])\n"
            "seconds = time.perf_counter() - t\n"
            "peak = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
            "print(seconds, peak, status)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(job)], capture_output=True, text=True, check=True
        )
        seconds, peak_kib, status = done.stdout.split()
        assert status == "0", done.stderr
        return float(seconds), int(peak_kib) / 1024, size


async def export_speed(rows: list[str]) -> None:
    rows.append(
        "`crawler export` (Parquet), a cold process each time, the contract's ~6 KB reviews in "
        f"shards of {SHARD:,}: the time from the command's start to its summary, and its peak "
        "memory. Shards are read, hashed and decompressed in a thread while the main one "
        "decodes and converts."
    )
    rows.append("")
    rows.append(
        "| reviews | shards (compression) | shard bytes | seconds | reviews/s | peak RSS (MiB) |"
    )
    rows.append("|---|---|---|---|---|---|")
    for reviews, compression in (
        (100_000, "none"),
        (300_000, "none"),
        (300_000, "gzip"),
        (300_000, "zstd"),
    ):
        seconds, peak, size = measure(reviews, compression)
        print(f"  export of {reviews:,} reviews ({compression}): {seconds:.2f} s", file=sys.stderr)
        shards = -(-reviews // SHARD)
        rows.append(
            f"| {reviews:,} | {shards} ({compression}) | {size / 2**20:,.0f} MiB | {seconds:.2f} | "
            f"{reviews / seconds:,.0f} | {peak:.0f} |"
        )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    kind = sys.argv[2] if len(sys.argv) > 2 else "none"
    took, rss, nbytes = measure(count, kind)
    print(f"{count:,} reviews ({kind}, {nbytes / 2**20:,.0f} MiB): {took:.2f} s, ", end="")
    print(f"{count / took:,.0f} reviews/s, peak {rss:.0f} MiB")
