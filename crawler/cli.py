"""The command line: parse arguments, call the library, map errors to exit statuses. No logic.

Each command imports what it uses when it runs, so ``--help``, ``status`` and a bad job file
answer without loading the HTTP client or the sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from crawler.config import Job
    from crawler.state import StateView

# exit statuses, as README lists them (runner.py has the same numbers for the library)
EXIT_USAGE, EXIT_OUTPUT, EXIT_COORDINATION, EXIT_INTERRUPTED = 2, 7, 8, 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    status = _main(argv)
    if "obstore" in sys.modules:
        # obstore's Tokio threads outlive the event loop and may touch the interpreter while
        # it finalizes: a command that had finished, output and state committed, then aborted
        # (SIGABRT, SIGBUS) now and then. Everything durable is already fsynced and closed, so
        # the process ends here, after its output is flushed, without finalizing.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
    return status


def _main(argv: Sequence[str] | None) -> int:  # noqa: PLR0911 -- one per way out
    parser = _parser()
    args = parser.parse_args(argv)
    from crawler import logs  # noqa: PLC0415 -- after --help, which needs none of it
    from crawler.errors import ConfigError, CoordinationError, JobError, OutputError  # noqa: PLC0415

    try:
        opened = logs.configure(
            log_format=args.log_format, level=args.log_level, log_file=args.log_file
        )
    except OSError as exc:
        _say(ConfigError(f"--log-file {args.log_file}: cannot open: {exc.strerror or exc}"))
        return EXIT_USAGE
    try:
        status: int = args.handler(args)
        sys.stdout.flush()  # here, where a reader gone away (a pipe to head) is handled
        return status
    except (JobError, OutputError, CoordinationError) as exc:
        _say(exc)
        if isinstance(exc, JobError):
            return EXIT_USAGE
        return EXIT_OUTPUT if isinstance(exc, OutputError) else EXIT_COORDINATION
    except BrokenPipeError:  # `crawler status job.yaml | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a full disk, a folder without permission: the file and the reason
        _say(OutputError.from_os(exc, exc.filename or "output"))
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if opened is not None:
            opened.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("crawler")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked (importlib.metadata
    costs a run 20 ms before its first request)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"crawler {_version()}")
        parser.exit()


def _say(exc: Exception) -> None:
    for line in str(exc).splitlines():
        print(f"crawler: {line}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crawler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version)
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
    run.add_argument(
        "--refresh",
        action="store_true",
        help="walk finished targets again for their new reviews (only what changed)",
    )
    run.add_argument("--no-progress", action="store_true", help="no live display")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="serve Prometheus metrics on this port while the run goes on (0: any free port)",
    )
    run.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="the address metrics are served on (default 127.0.0.1: this machine only)",
    )
    run.add_argument(
        "--live",
        action="store_true",
        help="a coordinated worker alone on its terminal: draw the live display (by default "
        "workers, which may share one terminal, print one progress line every 10 s)",
    )
    _coordination_arguments(run, worker=True)
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", help="check a job and estimate pages, credits and time")
    plan.add_argument("job", type=Path)
    plan.add_argument(
        "--probe",
        action="store_true",
        help="fetch page 1 of each target not started (counted, and kept as part of the crawl)",
    )
    plan.add_argument(
        "--refresh",
        action="store_true",
        help="start (or go on with) a refresh and fetch its page 1 of each target, kept",
    )
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--all", action="store_true", help="list every target")
    plan.set_defaults(handler=_plan)

    status = commands.add_parser("status", help="the job's progress from saved state, offline")
    status.add_argument("job", type=Path)
    status.add_argument("--json", action="store_true")
    status.add_argument("--all", action="store_true", help="list every target")
    status.add_argument("--csv", action="store_true", help="every target's figures as CSV")
    _coordination_arguments(status, worker=False)
    status.set_defaults(handler=_status)

    check = commands.add_parser("verify", help="check shards against the manifest; no duplicates")
    check.add_argument("job", type=Path)
    check.set_defaults(handler=_verify)

    export = commands.add_parser(
        "export", help="sealed shards -> reviews, review_media, product_snapshots tables"
    )
    export.add_argument("job", type=Path)
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    export.add_argument(
        "--to", metavar="DIR", default=None, help="where the tables go (default: output.dir/export)"
    )
    export.add_argument(
        "--include-reviewer",
        action="store_true",
        help="add the reviewer's name, user id and avatar (personal data: off by default)",
    )
    export.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    export.set_defaults(handler=_export)

    sandbox = commands.add_parser("sandbox", help="serve the API emulator")
    from crawler.sandbox_cli import add_arguments, serve_sandbox  # noqa: PLC0415 -- argparse only

    add_arguments(sandbox)
    sandbox.set_defaults(handler=serve_sandbox)
    return parser


def _coordination_arguments(parser: argparse.ArgumentParser, *, worker: bool) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="work the job with other processes through this Redis (redis://HOST:PORT/DB)",
    )
    if worker:
        parser.add_argument(
            "--worker", default=None, help="this worker's name (default: host name and pid)"
        )


def _load(args: argparse.Namespace) -> Job:
    """The job file, coordinated through ``--redis`` when given (``Job.coordinated`` checks the
    URL and says what is wrong with it, password masked)."""
    from crawler.config import load_job  # noqa: PLC0415

    return load_job(args.job).coordinated(getattr(args, "redis", None))


def _run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 -- see the module docstring

    job = _load(args).with_metrics(args.metrics_port, args.metrics_host)
    job.api_key()  # a missing key is a usage error before anything starts
    from crawler.runner import run_job  # noqa: PLC0415 -- a bad job file never needs it

    # the live display redraws its lines in place: two processes drawing on one terminal
    # garble each other, so a worker of a coordinated job (the README starts three in one) prints
    # one progress line every 10 s instead, unless it is told it is alone (--live)
    alone = job.coordination is None or args.live
    live = sys.stderr.isatty() and not args.no_progress and alone
    result = asyncio.run(
        run_job(
            job,
            fresh=args.fresh,
            refresh=args.refresh,
            handle_signals=True,
            live_progress=live,
            worker=args.worker,
        )
    )
    from crawler.show import print_outcome  # noqa: PLC0415

    print_outcome(result.report, result.exit_status)
    return result.exit_status


def _plan(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 -- see the module docstring

    job = _load(args)
    if args.probe or args.refresh:
        from crawler.runner import run_job  # noqa: PLC0415

        job.api_key()
        result = asyncio.run(run_job(job, max_pages=1, refresh=args.refresh, handle_signals=True))
        if result.exit_status not in (0, 1):
            from crawler.show import print_outcome  # noqa: PLC0415

            print_outcome(result.report, result.exit_status)
            return result.exit_status
    shown = _show(job, args, title="plan")
    from crawler.errors import ConfigError  # noqa: PLC0415

    try:  # the plan checks the job: one that cannot run is not a job that passed
        job.api_key()
    except ConfigError as exc:
        _say(exc)
        return EXIT_USAGE
    return shown


def _status(args: argparse.Namespace) -> int:
    return _show(_load(args), args, title="status")


def _show(job: Job, args: argparse.Namespace, *, title: str) -> int:
    """The job's summary, what needs attention, and (with --all) every target."""
    if job.coordination is None:
        return _show_state(job, args, title=title)
    import redis.exceptions  # noqa: PLC0415 -- a coordinated job's state is in Redis

    from crawler.config import masked_url  # noqa: PLC0415
    from crawler.coordination.link import unreachable  # noqa: PLC0415

    try:
        return _show_state(job, args, title=title)
    except redis.exceptions.RedisError as exc:
        raise unreachable(exc, str(masked_url(job.redis_url))) from None


def _show_state(job: Job, args: argparse.Namespace, *, title: str) -> int:
    from crawler import report  # noqa: PLC0415

    view = _view(job)
    if view is None:
        if title == "status":
            print(f"crawler: {job.output.dir}: the job has not run yet", file=sys.stderr)
            return EXIT_USAGE
        _print_unstarted(job, as_json=args.json)
        return 0
    try:
        if getattr(args, "csv", False):
            report.write_csv(job, view, sys.stdout)
            return 0
        doc = report.build(job, view)
        workers = getattr(view, "workers", None)  # a coordinated job's view has them
        if workers is not None:
            doc["workers"] = workers()
        if args.all:
            doc["targets"] = list(report.rows(job, view))
        if args.json:
            import orjson  # noqa: PLC0415

            sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        from crawler.show import print_summary  # noqa: PLC0415

        print_summary(job, doc, doc["targets"] if args.all else doc["attention"], every=args.all)
        if "workers" in doc:
            from crawler.show import print_workers  # noqa: PLC0415

            print_workers(doc["workers"])
    finally:
        view.close()
    return 0


def _view(job: Job) -> StateView | None:
    """The saved state to read: the job's SQLite file, or Redis for a coordinated job."""
    if job.coordination is not None:
        from crawler.coordination.view import RedisView  # noqa: PLC0415

        return RedisView(job.redis_url, job.name, job.budget)
    from crawler.output.layout import Layout  # noqa: PLC0415
    from crawler.state.sqlite import SqliteView  # noqa: PLC0415

    return SqliteView.open(Layout(job.output.dir))


def _print_unstarted(job: Job, *, as_json: bool) -> None:
    from crawler.planner import estimate  # noqa: PLC0415
    from crawler.state import Ledger, Totals  # noqa: PLC0415

    doc = estimate(job, Totals(), Ledger(), unlisted=len(job.targets))
    if as_json:
        import orjson  # noqa: PLC0415

        print(orjson.dumps({"targets_total": len(job.targets), "estimate": doc}).decode())
        return
    from crawler.screen import plural, prose, width_of  # noqa: PLC0415

    width = width_of(sys.stdout)
    if job.sources:
        count = sum(len(s.targets) for s in job.sources)
        text = (
            f"{plural(len(job.sources), 'source')} of {count:,} targets walked first; the "
            "products they find are walked after (their number is unknown until then)"
        )
        for line in prose(text, width, lead=f"{job.path}: "):
            print(line)
    cost = job.budget.credits_per_request
    text = (
        f"{plural(len(job.targets), 'target')}, none started; {job.budget.max_credits:,} "
        f"credits available. Each target costs at least one request "
        f"({plural(cost, 'credit')}): at least {len(job.targets) * cost:,} credits. "
        "`crawler plan --probe` fetches page 1 of each target (kept as part of the crawl) to "
        "estimate the rest."
    )
    for line in prose(text, width, lead=f"{job.path}: "):
        print(line)


def _verify(args: argparse.Namespace) -> int:
    from crawler.output.layout import Layout  # noqa: PLC0415
    from crawler.output.verify import verify  # noqa: PLC0415
    from crawler.screen import plural  # noqa: PLC0415

    job = _load(args)
    if job.output.bucket is not None:  # obstore imported only for a bucket
        import asyncio  # noqa: PLC0415

        from crawler.output.bucket import Bucket, BucketUrl  # noqa: PLC0415
        from crawler.output.verify import verify_bucket  # noqa: PLC0415
        from crawler.pacing.retry import RetryPolicy  # noqa: PLC0415

        policy = RetryPolicy.from_settings(job.api.retry)
        bucket = Bucket.open(BucketUrl.parse(job.output.bucket), policy)
        verdict = asyncio.run(verify_bucket(bucket))
    else:
        verdict = verify(Layout(job.output.dir))
    for note in verdict.notes:
        _say_fitted(f"note: {note}", sys.stdout)
    for problem in verdict.problems:
        _say_fitted(f"problem: {problem}", sys.stdout)
    print(
        f"{plural(verdict.shards, 'shard')}, {plural(verdict.records, 'review')}: "
        f"{'ok' if verdict.ok else plural(len(verdict.problems), 'problem')}"
    )
    return 0 if verdict.ok else 1


def _say_fitted(line: str, stream: TextIO) -> None:
    """``line`` in lines that fit the terminal (80 columns off one), broken between words and
    indented under its first word; whole when a word alone would not fit (a path is never cut)."""
    from crawler.screen import prose, width_of  # noqa: PLC0415

    width = width_of(stream)
    text = line.lstrip(" ")
    first, _, rest = text.partition(" ")
    lead = line[: len(line) - len(text)] + first + " "
    if len(line) <= width or not rest or max(len(w) for w in text.split()) > width - 4:
        print(line, file=stream)
        return
    for one in prose(rest, width, lead=lead):
        print(one, file=stream)


def _export(args: argparse.Namespace) -> int:
    from crawler.config import load_job  # noqa: PLC0415
    from crawler.export.exporter import ExportOptions, export_job  # noqa: PLC0415

    options = ExportOptions(args.format, args.to, reviewer=args.include_reviewer)
    summary = export_job(load_job(args.job), options)
    for line in summary.lines():
        _say_fitted(line, sys.stderr)
    if args.json:
        import orjson  # noqa: PLC0415

        sys.stdout.write(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    return 0 if summary.ok else 1
