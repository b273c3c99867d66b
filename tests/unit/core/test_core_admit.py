"""RateTable.admit(): steps 5-7 (key, scope, key CIDRs, rate limits) in one call.

Pins that admit() answers exactly what the call sequence it replaces answers
(check_key -> generation -> hit_key under the plan's policy -> the four rate
fields), that the plan -> policy table installed by set_plans() is what picks
the policy (no Python per request), and the plan ids the admin writes."""

import pytest
from corehelp import SECRET, T0
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastgate import _core_py as P

GET, POST = P.method_bit(b"GET"), P.method_bit(b"POST")
V4 = bytes([10, 1, 2, 3])
HYP = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# two plan names with one plan id (found by search; test_plan_id_collision re-checks it)
COLLIDING = ("plan38162", "plan50457")


def test_plan_id_is_stable_and_in_range():
    assert P.plan_id(None) == P.plan_id("") == 0
    # pinned: the admin process and every worker derive it from the name alone,
    # so a change here must change both at once
    assert P.plan_id("free") == 1764221770
    assert P.plan_id("pro") == 1113485109
    for name in ("free", "pro", "x", "ünïcode", "a" * 300):
        assert 1 <= P.plan_id(name) < 1 << 31
    with pytest.raises(P.CoreError, match="plan name must be a string"):
        P.plan_id(7)


def test_admit_returns_index_and_fills_result(core, keys, rates, new_key):
    plan = rates.policy("key", ["3/second"])
    rates.set_plans({"free": plan})
    key = new_key(5, plan_id=P.plan_id("free"))
    out = core.Admission()
    assert out.index == core.NO_SUCH_KEY, "a fresh result never reads as key 0"
    got = [rates.admit(keys, key, GET, b"/x", V4, T0, out) for _ in range(4)]
    assert got == [5, 5, 5, core.RATE_LIMITED]
    assert (out.index, out.generation, out.plan_id, out.policy) == (5, 1, P.plan_id("free"), plan)
    assert (out.rate, out.limit, out.remaining, out.reset_ms, out.retry_after_ms) == \
        (core.RATE_LIMITED, 3, 0, 1000, rates.retry_after_ms)
    assert out.retry_after_ms > 0
    # the table's own fields say the same (the worker's existing header code reads them)
    assert (rates.limit, rates.remaining, rates.reset_ms) == (3, 0, 1000)


def test_admit_key_failure_codes(core, keys, rates, new_key):
    out = core.Admission()
    revoked = new_key(1, flags=P.FLAG_REVOKED)
    scoped = new_key(2, scopes=["GET /orders/*"], allow_cidrs=["10.0.0.0/8"])
    later = new_key(3, not_before_ms=T0 + 1)
    for key, path, peer, want in (
        (b"fg_nope", b"/", V4, core.KEY_MALFORMED),
        (P.make_key("zz").encode(), b"/", V4, core.NO_SUCH_KEY),
        (revoked, b"/", V4, core.KEY_REVOKED),
        (scoped, b"/other", V4, core.SCOPE_DENIED),
        (scoped, b"/orders/1", bytes([192, 0, 2, 1]), core.KEY_IP_DENIED),
        (scoped, b"/orders/1", b"", core.KEY_IP_DENIED),
        (later, b"/", V4, core.KEY_NOT_YET_VALID),
    ):
        assert rates.admit(keys, key, GET, path, peer, T0, out) == want
        assert (out.index, out.rate, out.generation, out.plan_id, out.policy) == (want, want, 0, 0, -1)
        assert (out.limit, out.remaining, out.reset_ms, out.retry_after_ms) == (0, 0, 0, 0)
    assert rates.admit(keys, scoped, GET, b"/orders/1", V4, T0, out) == 2
    assert out.rate == core.UNLIMITED and out.limit == out.remaining == core.UNLIMITED


def test_failed_key_leaves_the_tables_rate_fields(core, keys, rates, new_key):
    plan = rates.policy("key", ["9/minute"])
    rates.set_plans({"": plan})
    good = new_key(1)
    out = core.Admission()
    assert rates.admit(keys, good, GET, b"/", V4, T0, out) == 1
    before = (rates.limit, rates.remaining, rates.reset_ms, rates.retry_after_ms)
    assert rates.admit(keys, b"junk", GET, b"/", V4, T0, out) == core.KEY_MALFORMED
    after = (rates.limit, rates.remaining, rates.reset_ms, rates.retry_after_ms)
    assert after == before == (9, 8, 60_000 - T0 % 60_000, 0)


def test_plan_table_picks_the_policy(core, keys, rates, new_key):
    none = rates.policy("key", [])
    free = rates.policy("key", ["2/second"], where="plans.free.limits")
    pro = rates.policy("key", ["5/second", "100/day"], where="plans.pro.limits")
    rates.set_plans({"": none, "free": free, "pro": pro})
    out = core.Admission()
    k_free = new_key(1, plan_id=P.plan_id("free"))
    k_pro = new_key(2, plan_id=P.plan_id("pro"), limits=["1/day"])  # own day limit replaces the plan's
    k_gone = new_key(3, plan_id=P.plan_id("gone"), limits=["1/second"])  # plan unknown here
    k_none = new_key(4)
    assert rates.admit(keys, k_free, GET, b"/", V4, T0, out) == 1 and (out.policy, out.limit) == (free, 2)
    assert rates.admit(keys, k_pro, GET, b"/", V4, T0, out) == 2 and (out.policy, out.limit) == (pro, 1)
    assert rates.admit(keys, k_pro, GET, b"/", V4, T0, out) == core.RATE_LIMITED, "1/day binds"
    assert rates.admit(keys, k_gone, GET, b"/", V4, T0, out) == 3 and (out.policy, out.limit) == (none, 1)
    assert rates.admit(keys, k_none, GET, b"/", V4, T0, out) == 4 and out.rate == core.UNLIMITED
    # a reload that drops "pro" and has no fallback: pro keys keep only their own limits
    rates.set_plans({"free": free})
    assert rates.admit(keys, k_pro, GET, b"/", V4, T0 + 2 * 86_400_000, out) == 2
    assert (out.policy, out.limit) == (-1, 1)
    assert rates.admit(keys, k_none, GET, b"/", V4, T0, out) == 4 and (out.policy, out.rate) == (-1, core.UNLIMITED)
    # ... and one that adds it back under a new policy id
    pro2 = rates.policy("key", ["7/second"])
    rates.set_plans({"free": free, "pro": pro2, "": none})
    assert rates.admit(keys, k_pro, GET, b"/", V4, T0 + 4 * 86_400_000, out) == 2
    assert (out.policy, out.limit, out.remaining) == (pro2, 1, 0)


def test_many_plans(core, keys, rates, new_key):
    """The C table is open addressing: every installed plan is found, none confused."""
    pids = {f"p{i}": rates.policy("key", [f"{i + 1}/hour"]) for i in range(40)}
    rates.set_plans(pids)
    out = core.Admission()
    for i in range(0, 40, 3):
        key = new_key(i, plan_id=P.plan_id(f"p{i}"))
        assert rates.admit(keys, key, GET, b"/", V4, T0, out) == i
        assert (out.policy, out.limit) == (pids[f"p{i}"], i + 1)


def test_set_plans_errors(core, rates):
    pid = rates.policy("key", ["1/second"])
    with pytest.raises(P.CoreError, match=r"plan 'x' at plans: 5 is not a policy id of this rate table \(0\.\.0\)"):
        rates.set_plans({"x": 5})
    with pytest.raises(P.CoreError, match="not a policy id"):
        rates.set_plans({"": -1})
    with pytest.raises(P.CoreError, match="not a policy id"):
        rates.set_plans({"x": True})
    with pytest.raises(P.CoreError, match="plan names must be strings"):
        rates.set_plans({3: pid})
    with pytest.raises(P.CoreError, match="expected a mapping"):
        rates.set_plans([("x", pid)])
    assert P.plan_id(COLLIDING[0]) == P.plan_id(COLLIDING[1])
    with pytest.raises(P.CoreError, match=r"plans 'plan38162' and 'plan50457' have the same plan id \d+; rename one"):
        rates.set_plans({COLLIDING[0]: pid, COLLIDING[1]: pid}, where="config.plans")


def test_failed_set_plans_keeps_the_old_table(core, keys, rates, new_key):
    pid = rates.policy("key", ["1/second"])
    rates.set_plans({"a": pid})
    with pytest.raises(P.CoreError):
        rates.set_plans({"a": pid, "b": 99})
    out = core.Admission()
    key = new_key(1, plan_id=P.plan_id("a"))
    assert rates.admit(keys, key, GET, b"/", V4, T0, out) == 1 and out.policy == pid


def test_generation_is_the_records_and_follows_updates(core, keys, rates, new_key):
    key = new_key(7, plan_id=P.plan_id("a"))
    out = core.Admission()
    assert rates.admit(keys, key, GET, b"/", V4, T0, out) == 7 and out.generation == keys.generation(7) == 1
    keys.put(7, keys.digest(key), plan_id=P.plan_id("b"), limits=["2/second"])
    assert rates.admit(keys, key, GET, b"/", V4, T0, out) == 7
    assert (out.generation, out.plan_id, out.limit) == (keys.generation(7), P.plan_id("b"), 2)
    keys.rotate(7, keys.digest(P.make_key("new").encode()), T0 + 5)
    assert rates.admit(keys, key, GET, b"/", V4, T0, out) == 7, "the old digest in its grace"
    assert out.generation == keys.generation(7) == 3
    keys.revoke(7)
    assert rates.admit(keys, key, GET, b"/", V4, T0, out) == core.KEY_REVOKED and out.generation == 0


def test_cost_and_type_checks(core, keys, rates, new_key):
    rates.set_plans({"": rates.policy("key", ["10/second"])})
    key = new_key(1)
    out = core.Admission()
    assert rates.admit(keys, key, GET, b"/", V4, T0, out, 4) == 1 and out.remaining == 6
    assert rates.admit(keys, key, GET, b"/", V4, T0, out, cost=7) == core.RATE_LIMITED
    assert rates.admit(keys, key, GET, b"/", V4, T0, out, cost=6) == 1 and out.remaining == 0
    with pytest.raises(TypeError):
        rates.admit(keys, key, GET, b"/", V4, T0, None)
    with pytest.raises(TypeError):
        rates.admit(None, key, GET, b"/", V4, T0, out)


# ------------------------------------------------------------------ differential

LIMIT_SPECS = st.lists(st.sampled_from(["2/second", "3/second", "4/minute", "6/hour", "5/day", "9/month"]),
                       max_size=3, unique_by=lambda s: s.split("/")[1])
PLAN_NAMES = ["", "free", "pro", "gone"]
SCOPES = ["GET /orders/*", "POST /orders", "* /public*", "GET,POST /a"]
CIDRS = ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "::ffff:10.1.0.0/112"]
PEERS = [V4, bytes([192, 0, 2, 9]), bytes([198, 51, 100, 1]), bytes.fromhex("20010db8" + "00" * 12),
         bytes(10) + b"\xff\xff" + V4, b""]
PATHS = [b"/", b"/orders", b"/orders/1", b"/public/x", b"/a", b"/ab"]


def _maybe(draw, strategy, empty):
    # restrictions are the exception, so that most requests reach the rate step
    return draw(strategy) if draw(st.integers(0, 7)) == 0 else empty


@st.composite
def key_spec(draw):
    return dict(
        plan=draw(st.sampled_from(PLAN_NAMES)),
        limits=draw(LIMIT_SPECS),
        scopes=_maybe(draw, st.lists(st.sampled_from(SCOPES), min_size=1, max_size=2, unique=True), []),
        allow=_maybe(draw, st.lists(st.sampled_from(CIDRS), min_size=1, max_size=2, unique=True), []),
        deny=_maybe(draw, st.lists(st.sampled_from(CIDRS), min_size=1, max_size=1), []),
        nb=_maybe(draw, st.just(T0 + 1500), 0),
        ex=_maybe(draw, st.just(T0 + 600_000), 0),
        flags=_maybe(draw, st.sampled_from([P.FLAG_REVOKED, P.FLAG_DISABLED]), 0),
    )


def _put(keys, i, key, spec):
    keys.put(i, keys.digest(key), plan_id=P.plan_id(spec["plan"]), flags=spec["flags"], not_before_ms=spec["nb"],
             expires_ms=spec["ex"], scopes=spec["scopes"], allow_cidrs=spec["allow"], deny_cidrs=spec["deny"],
             limits=spec["limits"])


class Side:
    """One arena with the same keys and the worker's plan policies."""

    def __init__(self, core, plans):
        self.core = core
        self.arena = core.Arena.create(key_capacity=8, rate_capacity=8)
        self.keys = core.KeyTable(self.arena, secret=SECRET)
        self.rates = core.RateTable(self.arena)
        self.out = core.Admission()
        self.install(plans, True)

    def install(self, plans, with_fallback):
        # as the worker does per config: one policy per plan plus "" (no limits)
        self.policies = {"": self.rates.policy("key", [])}
        for name, limits in plans.items():
            self.policies[name] = self.rates.policy("key", limits)
        self.rates.set_plans(self.policies if with_fallback else {k: v for k, v in self.policies.items() if k})
        self.with_fallback = with_fallback

    def admit(self, key, mbit, path, peer, now, cost):
        o = self.out
        st_ = self.rates.admit(self.keys, key, mbit, path, peer, now, o, cost)
        return (st_, o.index, o.generation, o.plan_id, o.policy, o.rate, o.limit, o.remaining, o.reset_ms,
                o.retry_after_ms)

    def legacy(self, key, mbit, path, peer, now, cost, plan_of):
        """What the worker does today: check_key, generation, the plan's policy from the
        plan name it decoded from meta, hit_key, then the four rate fields."""
        k, r = self.keys, self.rates
        idx = k.check_key(key, mbit, path, peer, now)
        if idx < 0:
            return (idx, idx, 0, 0, -1, idx, 0, 0, 0, 0)
        gen = k.generation(idx)
        plan = plan_of[idx]
        pid = self.policies.get(plan) if plan else None
        if pid is None:
            pid = self.policies[""]
        rr = r.hit_key(pid, k, idx, now, cost)
        shown = pid if (plan and plan in self.policies) or self.with_fallback else -1
        return (_status(idx, rr), idx, gen, P.plan_id(plan), shown, rr, r.limit, r.remaining,
                r.reset_ms, r.retry_after_ms)


def _status(idx, rr):
    return P.RATE_LIMITED if rr == P.RATE_LIMITED else idx


REQ = st.tuples(st.just("req"), st.integers(0, 5), st.sampled_from([GET, GET, POST, P.METHOD_OTHER]),
                st.sampled_from(PATHS), st.sampled_from(PEERS[:1] * 4 + PEERS),
                st.sampled_from([0, 0, 0, 1, 10, 400, 1500, 70_000, 4_000_000]), st.integers(1, 3))


@HYP
@given(
    plans=st.fixed_dictionaries({"free": LIMIT_SPECS, "pro": LIMIT_SPECS}),
    specs=st.lists(key_spec(), min_size=1, max_size=4),
    ops=st.lists(
        st.one_of(REQ, REQ, REQ, REQ, REQ, st.tuples(st.just("update"), st.integers(0, 3), key_spec()),
                  st.tuples(st.just("reload"), st.booleans(), st.booleans())),
        min_size=4, max_size=60,
    ),
)
def test_admit_equals_check_key_then_hit_key(core, plans, specs, ops):
    """For random keys, scopes, CIDRs, limits, plans, updates, reloads and times,
    admit() returns and fills exactly what the old sequence gives; with the
    compiled core, the twin's admit() agrees too."""
    sides = [Side(core, plans), Side(core, plans)]
    if core is not P:
        sides.append(Side(P, plans))
    key_bytes = [P.make_key(f"k{i}").encode() for i in range(len(specs))]
    plan_of = {}
    for i, spec in enumerate(specs):
        plan_of[i] = spec["plan"]
        for s in sides:
            _put(s.keys, i, key_bytes[i], spec)
    extra = [P.make_key("unknown").encode(), b"fg_bad_" + b"A" * 30]
    now = T0
    for op in ops:
        if op[0] == "update":
            i = op[1] % len(specs)
            plan_of[i] = op[2]["plan"]
            for s in sides:
                _put(s.keys, i, key_bytes[i], op[2])
            continue
        if op[0] == "reload":
            cur = dict(plans) if op[1] else {"free": plans["free"]}
            for s in sides:
                s.install(cur, op[2])
            continue
        _, ki, mbit, path, peer, dt, cost = op
        now += dt
        key = key_bytes[ki % len(key_bytes)] if ki < 4 else extra[ki - 4]
        want = sides[1].legacy(key, mbit, path, peer, now, cost, plan_of)
        event("admitted" if want[0] >= 0 else "rate limited" if want[0] == P.RATE_LIMITED else "key refused")
        assert sides[0].admit(key, mbit, path, peer, now, cost) == want
        if want[1] >= 0:  # the rate step ran: the table's own fields agree too
            r = sides[0].rates
            assert (r.limit, r.remaining, r.reset_ms, r.retry_after_ms) == want[6:]
        for s in sides[2:]:
            assert s.admit(key, mbit, path, peer, now, cost) == want
