"""``crawler sandbox``: its arguments, and the emulator served until interrupted (the sandbox
package, and aiohttp with it, imported only when the command runs)."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def add_arguments(sandbox: argparse.ArgumentParser) -> None:
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
    sandbox.add_argument("--faults", default=None)
    sandbox.add_argument("--slow-seconds", type=float, default=2.0)
    sandbox.add_argument("--latency-ms", default="0-0", help="e.g. 50-300")
    sandbox.add_argument("--seed", type=int, default=0)
    sandbox.add_argument(
        "--endless", default="", help="comma-separated product ids whose feed never ends"
    )
    sandbox.add_argument(
        "--stuck", default="", help="comma-separated product ids whose page 2 repeats its cursor"
    )
    sandbox.add_argument(
        "--cycling", default="", help="comma-separated product ids whose page 3 points to page 2"
    )
    sandbox.add_argument(
        "--generation", type=int, default=0, help="start the catalogue at this generation"
    )
    sandbox.add_argument(
        "--shrink", action="store_true", help="each generation also removes a few reviews"
    )
    sandbox.add_argument(
        "--throttle-after",
        type=int,
        default=None,
        help="past a key's Nth request, answer 429 for --throttle-seconds",
    )
    sandbox.add_argument("--throttle-seconds", type=float, default=2.0)
    sandbox.add_argument(
        "--maintenance-seconds",
        type=float,
        default=0.0,
        help="answer 503 with a Retry-After for this long from the start",
    )
    sandbox.add_argument(
        "--retry-after", default=None, help="every 429 carries exactly this Retry-After value"
    )
    sandbox.add_argument(
        "--answer-status",
        type=int,
        default=None,
        help="the reviews endpoint answers only this status, without JSON (a wrong base_url)",
    )
    sandbox.add_argument(
        "--feed-cap",
        type=int,
        default=None,
        help="every feed ends after N reviews while its review_count says all (real feeds stop "
        "at about 5,000 per sort order)",
    )


def serve_sandbox(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 -- see the module docstring
    import contextlib  # noqa: PLC0415

    from crawler.sandbox import FAULT_KINDS, SandboxOptions, serve  # noqa: PLC0415

    low, _, high = args.latency_ms.partition("-")
    faults = FAULT_KINDS if args.faults is None else tuple(k for k in args.faults.split(",") if k)
    options = SandboxOptions(
        page_size=args.page_size,
        keys=frozenset(args.keys.split(",")) if args.keys else None,
        forbidden_keys=frozenset(k for k in args.forbidden_keys.split(",") if k),
        credits=args.credits,
        charge_failures=args.charge_failures,
        rate=args.rate,
        burst=args.burst,
        fault_rate=args.fault_rate,
        faults=faults,
        slow_seconds=args.slow_seconds,
        latency=(float(low) / 1000, float(high or low) / 1000),
        seed=args.seed,
        endless=frozenset(p for p in args.endless.split(",") if p),
        stuck=frozenset(p for p in args.stuck.split(",") if p),
        cycling=frozenset(p for p in args.cycling.split(",") if p),
        generation=args.generation,
        shrink=args.shrink,
        throttle_after=args.throttle_after,
        throttle_seconds=args.throttle_seconds,
        retry_after=args.retry_after,
        answer_status=args.answer_status,
        maintenance_seconds=args.maintenance_seconds,
        feed_cap=args.feed_cap,
    )
    problem = options.problem()
    if problem:
        print(f"crawler sandbox: {problem}", file=sys.stderr)
        return EXIT_USAGE

    async def serve_forever() -> None:
        async with serve(options, args.host, args.port) as (base_url, _):
            print(f"sandbox listening on {base_url}", flush=True)
            await asyncio.Event().wait()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever())
    except OSError as exc:  # the port taken, or not ours to bind: not an output problem
        print(
            f"crawler sandbox: cannot listen on {args.host}:{args.port}: "
            f"{exc.strerror or exc}; choose another --port (0: any free one)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return 0
