"""The command line: parse arguments, call the library, map errors to exit statuses. No logic."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from crawler import logs, planner, report
from crawler.config import Job, load_job
from crawler.errors import JobError, OutputError
from crawler.layout import Layout
from crawler.runner import EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_USAGE, run_job
from crawler.sandbox import FAULT_KINDS, SandboxOptions, serve
from crawler.state import load
from crawler.verify import verify


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    opened = logs.configure(
        log_format=args.log_format, level=args.log_level, log_file=args.log_file
    )
    try:
        status: int = args.handler(args)
        return status
    except JobError as exc:
        _say(exc)
        return EXIT_USAGE
    except OutputError as exc:
        _say(exc)
        return EXIT_OUTPUT
    except OSError as exc:  # a full disk, a folder without permission: the file and the reason
        _say(OutputError.from_os(exc, exc.filename or "output"))
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if opened is not None:
            opened.close()


def _say(exc: Exception) -> None:
    for line in str(exc).splitlines():
        print(f"crawler: {line}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crawler", description=__doc__)
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="default: console on a terminal, json otherwise",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--log-file", type=Path, default=None, help="write logs here (JSON)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run or resume a job")
    run.add_argument("job", type=Path)
    run.add_argument(
        "--fresh", action="store_true", help="start over: remove this job's shards and state first"
    )
    run.add_argument("--no-progress", action="store_true", help="no live display")
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", help="check a job and estimate pages, credits and time")
    plan.add_argument("job", type=Path)
    plan.add_argument(
        "--probe",
        action="store_true",
        help="fetch page 1 of each target (counted, and kept as part of the crawl)",
    )
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=_plan)

    status = commands.add_parser("status", help="the job's progress from saved state, offline")
    status.add_argument("job", type=Path)
    status.add_argument("--json", action="store_true")
    status.add_argument("--all", action="store_true", help="list finished targets too")
    status.set_defaults(handler=_status)

    check = commands.add_parser("verify", help="check shards against the manifest; no duplicates")
    check.add_argument("job", type=Path)
    check.set_defaults(handler=_verify)

    sandbox = commands.add_parser("sandbox", help="serve the API emulator")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8700, help="0: any free port")
    sandbox.add_argument("--page-size", type=int, default=10)
    sandbox.add_argument(
        "--keys", default=None, help="comma-separated keys accepted (default any sk_...)"
    )
    sandbox.add_argument("--forbidden-keys", default="", help="keys answered with 403")
    sandbox.add_argument("--credits", type=int, default=None, help="balance of each key")
    sandbox.add_argument("--charge-failures", action="store_true")
    sandbox.add_argument("--rate", type=float, default=None, help="requests/s allowed per key")
    sandbox.add_argument(
        "--burst",
        type=float,
        default=None,
        help="requests a key may send at once (default: max(2, rate/10))",
    )
    sandbox.add_argument("--fault-rate", type=float, default=0.0)
    sandbox.add_argument("--faults", default=",".join(FAULT_KINDS))
    sandbox.add_argument("--slow-seconds", type=float, default=2.0)
    sandbox.add_argument("--latency-ms", default="0-0", help="e.g. 50-300")
    sandbox.add_argument("--seed", type=int, default=0)
    sandbox.set_defaults(handler=_sandbox)
    return parser


def _run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    job.api_key()  # a missing key is a usage error before anything starts
    live = sys.stderr.isatty() and not args.no_progress
    result = asyncio.run(run_job(job, fresh=args.fresh, handle_signals=True, live_progress=live))
    _print_outcome(result.report, result.exit_status)
    return result.exit_status


def _print_outcome(doc: dict[str, Any], status: int) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(doc["targets_by_status"].items()))
    totals = doc["totals"]
    print(
        f"{doc['targets_total']} targets: {counts}; {totals['records']:,} reviews in "
        f"{_plural(totals['shards'], 'shard')}; {totals['credits_charged']:,} of "
        f"{totals['max_credits']:,} credits (exit {status})",
        file=sys.stderr,
    )
    failed = [row for row in doc["targets"] if row["status"] == "failed"]
    for row in failed[:_LISTED]:
        print(f"  {row['product_id']} {row['region']}: failed: {row['reason']}", file=sys.stderr)
    if len(failed) > _LISTED:
        print(f"  ... and {len(failed) - _LISTED} more failed (crawler status)", file=sys.stderr)
    if doc["targets_by_status"].get("stopped_budget"):
        print(
            "  stopped at the credit budget: raise budget.max_credits (or "
            "max_credits_per_target) and run again to carry on",
            file=sys.stderr,
        )
    stopped = doc.get("run", {}).get("stop_message")
    if stopped:
        print(f"  stopped: {stopped}", file=sys.stderr)


_LISTED = 20  # failed targets named at the end of a run; status lists them all


def _plan(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    if args.probe:
        job.api_key()
        result = asyncio.run(run_job(job, max_pages=1, handle_signals=True))
        if result.exit_status not in (0, 1):
            _print_outcome(result.report, result.exit_status)
            return result.exit_status
    state = _saved_state(job)
    doc = planner.estimate(job, state)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    table = Table("product_id", "region", "reviews", "pages done", "pages left")
    for row in doc["targets"]:
        table.add_row(
            row["product_id"],
            row["region"],
            _n(row["review_count"]),
            str(row["pages_done"]),
            _n(row["pages_left"]),
        )
    console = Console()
    console.print(table)
    covers = {None: "unknown (run plan --probe)", True: "yes", False: "NO"}[doc["budget_covers"]]
    console.print(
        f"{len(job.targets)} targets; at least {doc['pages_left']:,} pages left "
        f"({doc['targets_unknown']} targets unknown); {doc['credits_needed']:,} credits needed, "
        f"{doc['credits_available']:,} available; about {doc['seconds']:,} s at "
        f"{job.api.requests_per_second}/s; budget covers it: {covers}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    state = _saved_state(job)
    if state is None:
        print(f"crawler: {job.output.dir}: the job has not run yet", file=sys.stderr)
        return EXIT_USAGE
    doc = report.build(job, state)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    totals = doc["totals"]
    runs = _plural(state.runs, "run")
    table = Table(
        "product_id",
        "region",
        "status",
        "pages",
        "reviews",
        "dups",
        "credits",
        "retries",
        "429s",
        title=f"{job.path}: {runs}, {totals['credits_charged']:,} of "
        f"{totals['max_credits']:,} credits, {_plural(totals['shards'], 'shard')}",
    )
    shown = [row for row in doc["targets"] if args.all or row["status"] != "done"]
    for row in shown:
        status = row["status"] + (f" ({row['reason']})" if row.get("reason") else "")
        figures = (row[k] for k in _COLUMNS)
        table.add_row(row["product_id"], row["region"], status, *(f"{n:,}" for n in figures))
    if len(shown) < len(doc["targets"]):
        table.caption = f"{len(doc['targets']) - len(shown)} finished targets not listed (--all)"
    table.add_section()
    by_status = ", ".join(f"{n} {s}" for s, n in doc["targets_by_status"].items())
    table.add_row("total", "", by_status, *(f"{totals[k]:,}" for k in _COLUMNS))
    Console(width=120).print(table)
    return 0


_COLUMNS = ("pages", "records", "duplicates", "credits", "retries", "rate_limited")


def _saved_state(job: Job) -> Any:
    layout = Layout(job.output.dir)
    if not layout.snapshot.exists():
        return None
    return load(layout)[0]


def _verify(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    verdict = verify(Layout(job.output.dir))
    for note in verdict.notes:
        print(f"note: {note}")
    for problem in verdict.problems:
        print(f"problem: {problem}")
    print(
        f"{verdict.shards} shards, {verdict.records:,} reviews: "
        f"{'ok' if verdict.ok else f'{len(verdict.problems)} problems'}"
    )
    return 0 if verdict.ok else 1


def _sandbox(args: argparse.Namespace) -> int:
    low, _, high = args.latency_ms.partition("-")
    options = SandboxOptions(
        page_size=args.page_size,
        keys=frozenset(args.keys.split(",")) if args.keys else None,
        forbidden_keys=frozenset(k for k in args.forbidden_keys.split(",") if k),
        credits=args.credits,
        charge_failures=args.charge_failures,
        rate=args.rate,
        burst=args.burst,
        fault_rate=args.fault_rate,
        faults=tuple(k for k in args.faults.split(",") if k),
        slow_seconds=args.slow_seconds,
        latency=(float(low) / 1000, float(high or low) / 1000),
        seed=args.seed,
    )
    unknown = set(options.faults) - set(FAULT_KINDS)
    if unknown:
        print(
            f"crawler sandbox: unknown fault kinds {sorted(unknown)}; one of {FAULT_KINDS}",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def serve_forever() -> None:
        async with serve(options, args.host, args.port) as (base_url, _):
            print(f"sandbox listening on {base_url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever())
    return 0


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
