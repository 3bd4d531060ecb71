"""A coordinated job's state read from Redis, for status and the run report: the whole job."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import orjson

from crawler.config import BudgetSettings
from crawler.coordination.sources import figures, unit
from crawler.coordination.store import ledger_from, prefix_of
from crawler.coordination.writes import totals_from
from crawler.state import Ledger, ShardInfo, TargetState, Totals
from crawler.state.events import Status
from crawler.state.rules import REFRESH_FIGURES
from crawler.state.verdict import missing


class RedisView:
    """The same reading surface as ``SqliteView``, plus the workers."""

    def __init__(self, redis_url: str, job: str, budget: BudgetSettings | None = None) -> None:
        import redis  # noqa: PLC0415 -- only a coordinated job needs the client

        self._redis: Any = redis.Redis.from_url(redis_url, decode_responses=True)
        self._p = prefix_of(job)
        self.job = {
            "runs": self._redis.llen(self._p + "runs"),
            "open_shard": next(iter(self._open_shards()), None),
        }
        # one process marks its pending targets stopped_budget when the budget runs out; here
        # no worker owns that moment, so what the budget no longer covers is shown so instead.
        # While walks are under way (a lease not run out) their workers' leased credits may
        # still walk pending targets: only the credits spent count then.
        ledger = self.ledger
        seconds, micros = self._redis.time()
        now_ms = seconds * 1000 + micros // 1000
        self.walking = bool(self._redis.zcount(self._p + "leases", now_ms, "+inf"))
        spent = ledger.credits if self.walking else max(ledger.leased, ledger.credits)
        # a worker's run the budget stopped (``rules.BUDGET_STOPPED``): other workers may have
        # given back leftovers since, but no walk goes on until a run with a larger budget
        self.budget_stopped = (
            self._redis.hget(self._p + "meta", "budget_stopped") == "1" and not self.walking
        )
        self.spent_out = self.budget_stopped or (
            budget is not None and budget.max_credits - spent < budget.credits_per_request
        )

    @property
    def ledger(self) -> Ledger:
        ledger = self._redis.hgetall(self._p + "ledger")
        return ledger_from(ledger)

    def totals(self) -> Totals:
        return totals_from(self._redis.hgetall(self._p + "totals"))

    def _shard_docs(self) -> list[dict[str, Any]]:
        order = self._redis.zrange(self._p + "shardorder", 0, -1)
        shards = self._redis.hgetall(self._p + "shards")
        return [orjson.loads(shards[f]) for f in order if f in shards]

    def shards(self) -> list[ShardInfo]:
        return [_info(d) for d in self._shard_docs() if d["sha256"] is not None]

    def _open_shards(self) -> list[ShardInfo]:
        return [_info(d) for d in self._shard_docs() if d["sha256"] is None and d["records"]]

    def refreshes(self) -> list[dict[str, Any]]:
        """Per refresh, its figures as the workers counted them (``rules.refresh_figures``)."""
        out = []
        started = self._redis.hgetall(self._p + "refreshes")
        for refresh in sorted(started, key=int):
            figures = self._redis.hgetall(f"{self._p}refresh:{refresh}")
            out.append(
                {
                    "refresh": int(refresh),
                    **orjson.loads(started[refresh]),
                    **{name: int(figures.get(name, 0)) for name in REFRESH_FIGURES},
                }
            )
        return out

    def sources(self) -> list[dict[str, Any]]:
        """Per source: targets, done, failed, pages, products found, items, credits."""
        rows: dict[str, dict[str, Any]] = {}
        for name in sorted(self._redis.smembers(self._p + "series")):
            figures(self._redis.hgetall(f"{self._p}p:{unit(name)}"), rows)
        return list(rows.values())

    def last_run(self) -> dict[str, Any] | None:
        run = self._redis.lindex(self._p + "runs", 0)
        return orjson.loads(run) if run else None

    def attention(self, limit: int) -> list[dict[str, Any]]:
        """Failed targets, those at their credit cap and those short of their count, then walks
        under way (leased now)."""
        rows: list[dict[str, Any]] = []
        for key in sorted(self._redis.sscan_iter(self._p + "attention"))[:limit]:
            product_id, _, region = key.rpartition(":")
            rows += self._targets(product_id, region)
        held = self._redis.zrange(self._p + "leases", 0, -1)
        # walks a budget stop cut short were queued again, at the end
        stopped = self._redis.lrange(self._p + "todo", -_SCANNED, -1) if self.spent_out else []
        listed = {(r["product_id"], r["region"]) for r in rows}
        # a budget the job spent shows its cut-short walks as stopped_budget (see __init__)
        under_way = Status.BUDGET if self.spent_out else Status.PENDING
        for product_id in dict.fromkeys([*held, *reversed(stopped)]):
            if len(rows) >= limit:
                break
            rows += [
                r
                for r in self._targets(product_id)
                if r["status"] == under_way
                and r["walk_pages"]
                and (r["product_id"], r["region"]) not in listed
            ][: limit - len(rows)]
        return rows

    def _targets(self, product_id: str, region: str | None = None) -> list[dict[str, Any]]:
        fields = self._redis.hgetall(f"{self._p}p:{product_id}")
        docs = [
            (name[2:], orjson.loads(raw))
            for name, raw in sorted(fields.items())
            if name.startswith("r:") and (region is None or name[2:] == region)
        ]
        # a target the job file no longer lists is kept, not shown (as one process keeps it)
        rows = [
            {"product_id": product_id, "region": name, **_DEFAULTS, **doc}
            for name, doc in docs
            if not doc.pop("off", False)
        ]
        for row in rows:
            row["missing"] = missing(row["verdict"], row["base_count"], row["seen"])
        if self.spent_out:  # a walk cut short (``rules.BUDGET_STOPPED``), not one never begun
            for row in rows:
                if row["status"] == Status.PENDING and row["walk_pages"]:
                    row["status"] = str(Status.BUDGET)
        return rows

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]:
        """Every target's ``columns``, product by product (in no particular order)."""
        for key in self._redis.scan_iter(match=self._p + "p:*", count=1000):
            for row in self._targets(key[len(self._p) + 2 :]):
                row["seconds"] = round(row["seconds"], 3)
                yield tuple(row.get(name) for name in columns)

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's liveness: seconds since its heartbeat, products held, its rate (pages
        committed per second over its last heartbeat's interval)."""
        seconds, micros = self._redis.time()
        now = seconds + micros / 1e6
        held = self._held()
        out = []
        for name, beat in self._redis.zrange(self._p + "workers", 0, -1, withscores=True):
            state = self._redis.hgetall(f"{self._p}w:{name}")
            live = orjson.loads(state.get("live", "{}"))
            out.append(
                {
                    "worker": name,
                    "seconds_since_heartbeat": round(max(0.0, now - beat / 1000), 1),
                    "stopped": bool(live.get("stopped")),
                    "products_held": held.get(name, 0),
                    "rate": live.get("rate", 0.0),
                    "open_shard": state.get("open_shard") or None,
                }
            )
        return out

    def _held(self) -> dict[str, int]:
        """Products leased now, by worker: read from the leases, not from the last heartbeat,
        which is up to a third of a lease old."""
        held: dict[str, int] = {}
        for product_id in self._redis.zrange(self._p + "leases", 0, -1):
            owner = self._redis.hget(f"{self._p}p:{product_id}", "o") or ""
            if owner:
                name = owner.rpartition("#")[0]
                held[name] = held.get(name, 0) + 1
        return held

    def close(self) -> None:
        self._redis.close()


_DEFAULTS = {**asdict(TargetState(0)), "max_pages": None}
_SCANNED = 1000  # products at the end of the queue read for walks a budget stop cut short


def _info(doc: dict[str, Any]) -> ShardInfo:
    return ShardInfo(doc["file"], doc["records"], doc["bytes"], doc["sha256"])
