"""Rate counters: sliding windows on a fake clock, month boundaries, all-or-nothing,
and a differential test against an event-list reference model.

Stated bound (what the tests pin): per window kind with limit L and length W,
  1. in every aligned window [kW, (k+1)W) at most L are admitted -- exact,
     also across processes (see test_core_mp.py);
  2. in every sliding span of length W at most L + prev*f < 2L are admitted,
     where prev is the previous aligned window's count and f the fraction of
     the current window elapsed; the estimate ceil(prev*(1-f)) + curr assumes
     prev was spread evenly, so it is exact for even traffic and errs towards
     refusing when prev's hits came late;
  3. a refused request is answered with retry_after_ms, the smallest wait
     after which the same request would be admitted if nobody else hits.
"""

import calendar
import datetime as dt

import pytest
from corehelp import SECRET, T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import _core_py as P

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEC, MIN, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000


def ms(y, m, d, hh=0, mm=0, ss=0, milli=0):
    return calendar.timegm((y, m, d, hh, mm, ss)) * 1000 + milli


# ------------------------------------------------------------------ reference model


def month_start(t):
    d = dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc)
    return ms(d.year, d.month, 1)


def add_months(start, n):
    d = dt.datetime.fromtimestamp(start / 1000, dt.timezone.utc)
    y, m = divmod(d.month - 1 + n, 12)
    return ms(d.year + y, m + 1, 1)


def window(w, t):
    """(start, length, previous start) of window kind w containing t, from datetime."""
    if w < 4:
        W = (SEC, MIN, HOUR, DAY)[w]
        s = t - t % W
        return s, W, s - W
    s = month_start(t)
    return s, add_months(s, 1) - s, add_months(s, -1)


class Model:
    """Counts admitted events by timestamp; knows nothing about buckets."""

    def __init__(self, limits):
        self.limits = limits
        self.events = []

    def estimate(self, w, t):
        s, W, ps = window(w, t)
        curr = sum(c for e, c in self.events if s <= e < s + W)
        prev = sum(c for e, c in self.events if ps <= e < s)
        return curr + -(-prev * (W - (t - s)) // W), s, W

    def hit(self, t, cost):
        best = None
        for w, L in enumerate(self.limits):
            if not L:
                continue
            est, s, W = self.estimate(w, t)
            if est + cost > L:
                return P.RATE_LIMITED, L, 0, s + W - t, self.retry(w, L, t, cost)
            rem = L - est - cost
            if best is None or rem < best[0]:
                best = (rem, L, s + W - t)
        self.events.append((t, cost))
        return best[0], best[1], best[0], best[2], 0

    def retry(self, w, L, t, cost):
        """Smallest wait after which window w alone admits `cost` (binary search: the estimate never rises).

        A cost above the limit is never admitted; the core then answers with the window's reset."""
        if cost > L:
            s, W, _ = window(w, t)
            return s + W - t
        lo, hi = 1, 3 * 31 * DAY
        while lo < hi:
            mid = (lo + hi) // 2
            if self.estimate(w, t + mid)[0] + cost <= L:
                hi = mid
            else:
                lo = mid + 1
        return lo


def run(rates, pid, subject, t, cost=1):
    r = rates.hit(pid, subject, t, cost)
    return r, rates.limit, rates.remaining, rates.reset_ms, rates.retry_after_ms


# ------------------------------------------------------------------ unit tests


def test_single_window_exact(core, rates):
    pid = rates.policy("p", ["3/second"])
    assert [rates.hit(pid, 1, T0 + i) for i in range(5)] == [2, 1, 0, P.RATE_LIMITED, P.RATE_LIMITED]
    assert (rates.limit, rates.remaining, rates.reset_ms) == (3, 0, 1000 - 4)
    assert rates.hit(pid, 2, T0) == 2, "subjects are independent"


def test_rollover_weights_previous_window(core, rates):
    pid = rates.policy("p", ["10/second"])
    for _ in range(10):
        rates.hit(pid, 1, T0)
    nxt = T0 + 1000
    assert rates.hit(pid, 1, nxt) == P.RATE_LIMITED  # prev weight ceil(10 * 1000/1000) = 10
    assert rates.retry_after_ms == 100  # at t=100 the weight is ceil(9.0) = 9
    assert rates.hit(pid, 1, nxt + 99) == P.RATE_LIMITED
    assert rates.hit(pid, 1, nxt + 100) == 0
    assert rates.hit(pid, 1, nxt + 550) == 3  # weight ceil(4.5) = 5, curr 1 -> 10 - (5 + 1 + 1)
    assert rates.hit(pid, 1, T0 + 2000 + 999) == 8  # prev 2, weight ceil(0.002) = 1, curr 0
    assert rates.hit(pid, 1, T0 + 5000) == 9, "two windows later nothing is left"


def test_retry_after_when_current_window_is_full(core, rates):
    pid = rates.policy("p", ["4/minute"])
    for _ in range(4):
        rates.hit(pid, 1, T0)
    assert rates.hit(pid, 1, T0 + 5) == P.RATE_LIMITED
    start = T0 - T0 % MIN
    # next window: ceil(4 * (W - t)/W) + 1 <= 4 needs t >= W/4
    assert rates.retry_after_ms == (start + MIN - (T0 + 5)) + MIN // 4
    assert rates.reset_ms == start + MIN - (T0 + 5)


def test_all_or_nothing(core, rates):
    pid = rates.policy("shared", ["5/second", "3/minute"])
    assert [rates.hit(pid, 1, T0) for _ in range(4)] == [2, 1, 0, P.RATE_LIMITED]
    assert rates.limit == 3
    # a policy with the same name shares the counters: the refused 4th hit
    # must not have stayed in the second window
    sec_only = rates.policy("shared", ["5/second"])
    assert rates.hit(sec_only, 1, T0) == 1  # 5 - (3 + 1)


def test_remaining_is_tightest_window(core, rates):
    pid = rates.policy("p", ["100/second", "5/hour", "50/day"])
    assert rates.hit(pid, 1, T0) == 4
    assert rates.limit == 5
    start = T0 - T0 % HOUR
    assert rates.reset_ms == start + HOUR - T0


def test_cost(core, rates):
    pid = rates.policy("p", ["10/second"])
    assert rates.hit(pid, 1, T0, 7) == 3
    assert rates.hit(pid, 1, T0, 4) == P.RATE_LIMITED
    assert rates.hit(pid, 1, T0, 3) == 0
    assert rates.hit(pid, 1, T0, 11) == P.RATE_LIMITED


@pytest.mark.parametrize("first,last,next_len", [
    (ms(2024, 1, 31, 23, 59, 59, 999), ms(2024, 2, 1), 29),   # leap February
    (ms(2023, 1, 31, 23, 59, 59, 999), ms(2023, 2, 1), 28),
    (ms(2023, 12, 31, 23, 59, 59, 999), ms(2024, 1, 1), 31),  # year boundary
])
def test_month_boundaries(core, rates, first, last, next_len):
    pid = rates.policy("p", ["2/month"])
    assert rates.hit(pid, 1, first) == 1
    assert rates.hit(pid, 1, first) == 0
    assert rates.reset_ms == 1
    assert rates.hit(pid, 1, first) == P.RATE_LIMITED
    # new month: previous (2) weighted by nearly 1 -> still full until half way
    assert rates.hit(pid, 1, last) == P.RATE_LIMITED
    assert rates.retry_after_ms == next_len * DAY // 2
    assert rates.hit(pid, 1, last + next_len * DAY // 2) == 0
    assert rates.reset_ms == next_len * DAY // 2


def test_policy_errors(core, rates):
    cases = [
        (["10/fortnight"], "cannot parse limit '10/fortnight' at plans.free.limits[0]: unknown window 'fortnight'"),
        (["ten/second"], "cannot parse limit 'ten/second' at plans.free.limits[0]: expected 'N/second|minute|hour|day|month'"),
        (["0/second"], "cannot parse limit '0/second' at plans.free.limits[0]: expected 1..4294967294 requests, found 0"),
        (["1/second", "2/second"], "cannot parse limit '2/second' at plans.free.limits[1]: a second limit is already set"),
        ([5], "cannot parse limit 5 at plans.free.limits[0]: expected 'N/unit' or (N, unit)"),
    ]
    for limits, msg in cases:
        with pytest.raises(P.CoreError) as ei:
            rates.policy("p", limits, where="plans.free.limits")
        assert str(ei.value).startswith(msg)
    with pytest.raises(P.CoreError, match="policy name must be a non-empty string"):
        rates.policy("", ["1/second"])
    with pytest.raises(P.CoreError, match="unknown rate policy id 7"):
        rates.hit(7, 1, T0)
    assert rates.policy("tuple", [(3, "minute")]) >= 0


def test_unlimited(core, rates):
    pid = rates.policy("none", [])
    assert rates.hit(pid, 1, T0) == P.UNLIMITED
    assert rates.stats()["used"] == 0


def test_refuse_policy_fails_closed_then_reclaims(core, rates):
    pid = rates.policy("p", ["1/second"])
    for s in range(64):
        assert rates.hit(pid, s, T0) == 0
    assert rates.hit(pid, 64, T0) == P.RATE_TABLE_FULL, "ip_limits never fail open"
    assert rates.retry_after_ms > 0
    assert rates.hit(pid, 3, T0) == P.RATE_LIMITED, "existing subjects keep working"
    st = rates.stats()
    assert (st["capacity"], st["used"]) == (64, 64)
    # one second later every entry still counts as the previous window ...
    assert rates.hit(pid, 65, T0 + 1000) == P.RATE_TABLE_FULL
    # ... two seconds later none can count any more: entries are reused
    t = T0 - T0 % 1000 + 2000
    for s in range(100, 164):
        assert rates.hit(pid, s, t) == 0
    assert rates.hit(pid, 99, t) == P.RATE_TABLE_FULL
    assert rates.hit(pid, 100, t) == P.RATE_LIMITED, "a reused entry counts for its new subject"
    assert rates.hit(pid, 3, t + 2000) == 0, "an old subject starts again from zero"
    assert rates.stats()["reclaimed"] >= 64 and rates.stats()["used"] == 64


def test_hit_key_uses_key_limits(core, arena, keys, rates):
    key = P.make_key("k1").encode()
    keys.put(1, keys.digest(key), limits=["2/second"])
    keys.put(2, keys.digest(P.make_key("k2").encode()))
    plan = rates.policy("key", ["5/second", "100/day"])
    assert keys.check_key(key, 1, b"/", b"", T0) == 1
    assert [rates.hit_key(plan, keys, 1, T0) for _ in range(3)] == [1, 0, P.RATE_LIMITED]
    assert [rates.hit_key(plan, keys, 2, T0) for _ in range(2)] == [4, 3], "no own limits: the plan's"
    # a fresh KeyTable (another worker) reads the limits from the arena
    other = core.KeyTable(arena, secret=SECRET)
    assert rates.hit_key(plan, other, 1, T0 + 1000) == P.RATE_LIMITED


# ------------------------------------------------------------------ differential


limits_st = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=5, max_size=5).filter(any)
steps_st = st.lists(
    st.tuples(st.sampled_from([0, 0, 1, 7, 120, 999, 1000, 1500, 59_000, 3_600_000, 40 * DAY]), st.integers(1, 3)),
    min_size=1, max_size=40,
)
start_st = st.sampled_from([T0, ms(2024, 2, 28, 23, 59, 59), ms(2023, 12, 31, 23, 59), 0])


@HYP
@given(limits_st, steps_st, start_st)
def test_matches_reference_model(core, limits, steps, start):
    rates = core.RateTable(core.Arena.create(key_capacity=1, rate_capacity=4))
    units = P.WINDOWS
    pid = rates.policy("m", [f"{n}/{u}" for n, u in zip(limits, units) if n])
    model = Model(limits)
    t = start
    for dt_, cost in steps:
        t += dt_
        assert run(rates, pid, 7, t, cost) == model.hit(t, cost), (t, cost)
    # bound 1: aligned windows never exceed their limit
    for w, L in enumerate(limits):
        if L:
            for e, _ in model.events:
                s, W, _ = window(w, e)
                assert sum(c for x, c in model.events if s <= x < s + W) <= L


def test_sliding_bound_holds_for_bursts(core):
    """Bursts at the end of one window and the start of the next: the worst case."""
    rates = core.RateTable(core.Arena.create(key_capacity=1, rate_capacity=4))
    L = 10
    pid = rates.policy("b", [f"{L}/second"])
    admitted = []
    t0 = T0 - T0 % SEC
    for t in [t0 + 999] * 12 + [t0 + 1000 + k for k in range(0, 1000, 5)]:
        if rates.hit(pid, 1, t) >= 0:
            admitted.append(t)
    for t in admitted:
        span = sum(1 for x in admitted if t - SEC < x <= t)
        s = t - t % SEC
        prev = sum(1 for x in admitted if s - SEC <= x < s)
        assert span <= L + prev * (t - s) / SEC
        assert span < 2 * L
