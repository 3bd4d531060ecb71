"""The job's rules: what a sync, a run's start, a commit, a credit lease and a run's end change.

Written once, here, in Python; both stores call these and only keep what they decide (SQLite in
one transaction, Redis in one script). A rule over targets takes a ``TargetState`` and changes it
in place, returning whether it changed; ``Rule.statuses`` says which states it can change, so a
store reads only those (a million finished targets cost nothing at a run's start).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from crawler.state.events import (
    WALKABLE,
    Finish,
    PageCommitted,
    SourcePage,
    Status,
    TargetFailed,
)
from crawler.state.model import Ledger, TargetState, Totals
from crawler.state.verdict import Verdict, judged, seen_after

FINAL = (Status.DONE, Status.FAILED, Status.BUDGET)
# a credit lease is at most this share of what is left of the budget: near its end leases shrink,
# so a crashed worker (whose lease counts as spent) forfeits at most a small part of any budget
LEASE_SHARE = 1 / 8


@dataclass(frozen=True)
class Rule:
    """A change to targets of the given statuses (the others it leaves alone)."""

    statuses: tuple[Status, ...]
    change: Callable[[TargetState], bool]

    def __call__(self, state: TargetState) -> bool:
        return state.status in self.statuses and self.change(state)


# -- a commit ---------------------------------------------------------------------------------


def applied(state: TargetState, change: PageCommitted | TargetFailed) -> None:
    """A committed page or failure, applied to its target: the one place a walk moves on."""
    state.credits += change.credits
    state.walk_credits += change.credits
    state.retries += change.retries
    state.rate_limited += change.rate_limited
    state.status = change.status
    if isinstance(change, TargetFailed):
        state.reason = change.reason
        # at its own credit cap the walk ended short of its feed; a failure is judged by no one
        state.verdict = Verdict.CAPPED if change.status is Status.BUDGET else None
        return
    state.reason = None
    state.finish = change.finish
    state.cursor = change.cursor
    if state.walk_pages == 0:
        state.walk_count = change.review_count
    state.walk_pages += 1
    state.walk_new += change.new
    state.walk_shown += change.items if change.shown is None else change.shown
    state.pages += 1
    state.items += change.items
    state.records += change.new
    state.duplicates += change.duplicates
    state.seconds += change.seconds
    if change.review_count is not None:
        state.review_count = change.review_count
    if change.walk_goal is not None:
        state.walk_goal = change.walk_goal
    if change.expected is not None:
        state.walk_expected = change.expected
    if change.status is Status.DONE:
        _ended(state)


def _ended(state: TargetState) -> None:
    # the count when the walk began, not when it ended: a review added meanwhile where the walk
    # had passed was not seen, and the next refresh must count it as new
    state.base_count = state.walk_count if state.walk_count is not None else state.review_count
    state.seen = seen_after(state.finish, state.walk_shown, state.walk_new, state.seen)
    state.verdict = judged(state.finish, state.base_count, state.seen)


@dataclass
class Delta:
    """What changes of targets change in the job's sums: the totals by status, each refresh's
    figures, and the credits committed."""

    totals: Totals = field(default_factory=Totals)
    refreshes: dict[int, Counter[str]] = field(default_factory=dict)
    credits: int = 0

    def moved(self, before: TargetState | None, after: TargetState | None) -> None:
        """A target's state went from ``before`` to ``after`` (None: not counted there)."""
        if before is not None:
            self.totals.add(before, -1)
        if after is not None:
            self.totals.add(after)
        if before is not None and after is not None:  # (a target coming back was counted)
            # a refresh keeps what happened during it: a target that moves on to the next
            # refresh leaves its figures in this one
            figures = refresh_figures(after)
            if before.walk == after.walk:
                figures.subtract(refresh_figures(before))
            if after.walk and any(figures.values()):
                self.refreshes.setdefault(after.walk, Counter()).update(figures)

    def change(self, state: TargetState, rule: Callable[[TargetState], bool]) -> bool:
        """``rule`` applied to ``state`` in place, its effect counted here; whether it changed
        (no copy of the state: this is on the per-page path)."""
        self.totals.add(state, -1)
        walk = state.walk
        before = refresh_figures(state) if walk else None
        changed = rule(state)
        self.totals.add(state)
        if changed and state.walk:
            figures = refresh_figures(state)
            if before is not None and walk == state.walk:
                figures.subtract(before)
            if any(figures.values()):
                self.refreshes.setdefault(state.walk, Counter()).update(figures)
        return changed


def changed(state: TargetState, rule: Callable[[TargetState], bool], delta: Delta) -> bool:
    """``rule`` applied to ``state``, its effect counted in ``delta``; whether it changed."""
    return delta.change(state, rule)


def committed(states: dict[int, TargetState], changes: list[PageCommitted | TargetFailed]) -> Delta:
    """A batch's changes applied to the targets' states, and what they change in the sums."""
    delta = Delta()
    for change in changes:
        delta.change(states[change.target_id], partial(_applying, change))
        delta.credits += change.credits
    return delta


def _applying(change: PageCommitted | TargetFailed, state: TargetState) -> bool:
    applied(state, change)
    return True


def source_committed(states: dict[int, TargetState], pages: list[SourcePage]) -> None:
    """A batch's source pages applied to their source targets' states: a source target walks
    as a review target does (cursor, pages, credits, status)."""
    for page in pages:
        applied(states[page.change.target_id], page.change)


def found(page: SourcePage) -> list[tuple[str, str]]:
    """The review targets a source page adds to the job: each (product, region) once, pending
    from page 1 (a new target's state is ``TargetState``'s defaults). One the job has already
    (listed, or found by another source or page) is left as it is: walked once."""
    return list(dict.fromkeys(page.found))


REFRESH_FIGURES = (
    "targets", "probed", "changed", "new_reviews", "credits", "pages", "done", "short",
)  # fmt: skip


def refresh_figures(state: TargetState) -> Counter[str]:
    """What a target of refresh ``state.walk`` adds to that refresh's figures (walk 0, the
    first harvest, is no refresh)."""
    if state.walk == 0:
        return Counter()
    probed = state.walk_pages > 0
    # changed: page 1 told of another count or of unseen reviews (a one-page feed with nothing
    # new is as unchanged as a page 1 with the same count)
    one_page_same = state.finish is Finish.END and state.walk_pages == 1 and state.walk_new == 0
    return Counter(
        targets=1,
        probed=int(probed),
        changed=int(probed and state.finish is not Finish.SAME and not one_page_same),
        new_reviews=state.walk_new,
        credits=state.walk_credits,
        pages=state.walk_pages,
        done=int(state.status is Status.DONE),
        short=int(state.status is Status.DONE and state.verdict is Verdict.SHORT),  # still
    )


# -- a sync: the job file's targets become the saved ones --------------------------------------


def configured(state: TargetState, max_pages: int | None) -> bool:
    """A target whose page cap is now ``max_pages``: a walk that ended at a lower cap goes on,
    a walk under way that has reached a lowered one ends (no page more is bought)."""
    if state.status is Status.DONE:
        if state.finish is Finish.CAP and (max_pages is None or state.walk_pages < max_pages):
            state.status, state.finish, state.verdict = Status.PENDING, None, None
            return True
        return False
    if state.status in WALKABLE and max_pages is not None and 0 < max_pages <= state.walk_pages:
        state.status, state.finish, state.reason = Status.DONE, Finish.CAP, None
        _ended(state)
        return True
    return False


# -- a run's start and end ---------------------------------------------------------------------


def _reopen(state: TargetState) -> bool:
    state.status, state.verdict = Status.PENDING, None
    return True


# targets a budget stopped are walked again at the next run: the budget may have been raised
BUDGET_REOPENED = Rule((Status.BUDGET,), _reopen)


def _stop(state: TargetState) -> bool:
    if not state.walk_pages:  # never begun: nothing was cut short, it waits as it was
        return False
    state.status = Status.BUDGET
    return True


# a run the job's budget stopped: the walks it cut short wait for a larger budget (stopped_budget);
# targets whose walk had not begun stay pending (shown as not_started)
BUDGET_STOPPED = Rule((Status.PENDING,), _stop)


def refresh_started(refresh: int) -> Rule:
    """Refresh ``refresh`` is under way: a target finished before it starts a new walk from
    page 1; one whose walk was not finished carries it on, as the refresh's. Applied at the
    refresh's start or at any time after (Redis applies it as it hands a product out): a
    target already in the refresh is left alone."""

    def join(state: TargetState) -> bool:
        if state.walk >= refresh:
            return False
        state.walk = refresh
        if state.status is Status.DONE:
            state.status, state.finish, state.cursor = Status.PENDING, None, None
            state.walk_pages = state.walk_new = state.walk_credits = state.walk_shown = 0
            state.verdict = None  # the last walk's ``seen`` stays: an early stop builds on it
            state.walk_goal = state.walk_expected = state.walk_count = None
        return True

    return Rule((Status.DONE, *WALKABLE), join)


def refresh_to_walk(current: int, *, asked: bool, under_way: bool, by_plan: bool) -> int:
    """The refresh a run works on: a new one when asked and the last is over; else the one
    there is. A refresh a plan's probe started (``plan --refresh``) and no run has walked since
    is the one the next ``run --refresh`` carries on, even if the probe finished every target:
    its pages 1 are that refresh's, never bought twice."""
    if asked and not under_way and not by_plan:
        return current + 1
    return current


def walkable(state: TargetState) -> bool:
    """Whether a run walks this target (from its committed cursor)."""
    return state.status in WALKABLE


def _judge_old(state: TargetState) -> bool:
    if state.walk == 0:  # a first harvest: every item it received is its walk's (a review the
        state.walk_shown = state.items  # feed showed twice counted twice: no record says which)
        if state.status is Status.DONE:
            _ended(state)
            return True
    if state.status is Status.BUDGET and state.reason is not None:  # its own credit cap
        state.verdict = Verdict.CAPPED
    return state.walk == 0 or state.verdict is not None


# state saved before verdicts: each target judged from what it kept. A refresh's walk (walk > 0)
# kept no count of its items: one finished is left unjudged; one under way is judged when it
# ends from the pages after the upgrade only (it may say short of a feed it saw whole)
VERDICTS_JUDGED = Rule((Status.DONE, *WALKABLE), _judge_old)


# -- credits -----------------------------------------------------------------------------------


def lease_size(leased: int, asked: int, cost: int, ceiling: int) -> int:
    """Credits a lease of ``asked`` gets when ``leased`` are leased already: within the ceiling,
    at most ``LEASE_SHARE`` of what is left (never under one request), a multiple of ``cost``;
    0 when not even one request fits."""
    room = ceiling - leased
    if room < cost:
        return 0
    size = min(asked, room, max(cost, int(room * LEASE_SHARE)))
    return size - size % cost


def crashed(ledger: Ledger, outstanding: int) -> None:
    """A process ended without giving its lease back (killed, or taken for dead): its unused
    credits may have been spent, so they stay leased, and are counted as forfeited."""
    ledger.forfeited += max(0, outstanding)
