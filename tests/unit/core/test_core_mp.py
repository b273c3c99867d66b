"""Cython only (the twin keeps tables in process memory): several forked
processes on one arena -- exact admission under contention, and a writer
whose updates and revocations readers see whole and at once."""

import os
import select
import struct

import pytest
from corehelp import SECRET, T0

from fastgate import _core_py as P

C = pytest.importorskip("fastgate._core")

PROCS = 4
HITS = 50_000


def fork_all(n, fn):
    """Run fn(i) in n forked children; return their results (ints, via a pipe each)."""
    kids = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                os.write(w, struct.pack("=q", fn(i)))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        kids.append((pid, r))
    out = []
    for pid, r in kids:
        data = b""
        while len(data) < 8:
            chunk = os.read(r, 8 - len(data))
            if not chunk:
                break
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        out.append(struct.unpack("=q", data)[0])
    return out


@pytest.mark.parametrize("limits,allowed", [
    (["10000/minute"], 10_000),
    (["1000000/second", "7000/minute", "1000000/hour"], 7_000),
])
def test_concurrent_hits_admit_exactly_the_limit(limits, allowed):
    a = C.Arena.create(key_capacity=1, rate_capacity=16)
    rates = C.RateTable(a)
    pid = rates.policy("hot", limits)
    now = T0 - T0 % 60_000 + 1_000  # all hits inside one minute, no previous window

    def hammer(i):
        admitted = 0
        for n in range(HITS):
            if rates.hit(pid, 42, now + (n & 511)) >= 0:
                admitted += 1
        return admitted

    counts = fork_all(PROCS, hammer)
    assert sum(counts) == allowed, counts
    assert rates.hit(pid, 42, now) == C.RATE_LIMITED


def test_refused_hits_are_taken_back_under_contention():
    """The minute window refuses most hits after the second window took them:
    every one must be given back, so the second window ends up holding exactly
    what was admitted."""
    a = C.Arena.create(key_capacity=1, rate_capacity=16)
    rates = C.RateTable(a)
    pid = rates.policy("two", ["1000000/second", "500/minute"])
    probe = rates.policy("two", ["1000000/second"])  # same name: same counters
    now = T0 - T0 % 60_000 + 7_000

    def hammer(i):
        return sum(1 for _ in range(20_000) if rates.hit(pid, 1, now) >= 0)

    assert sum(fork_all(PROCS, hammer)) == 500
    assert rates.hit(probe, 1, now) == 1_000_000 - 501


def test_writer_updates_are_never_torn_and_revocations_never_stale():
    N = 150
    a = C.Arena.create(key_capacity=N + 1, rate_capacity=1)
    keys = C.KeyTable(a, secret=SECRET)
    ks = [P.make_key(f"k{i}").encode() for i in range(N)]
    for i, k in enumerate(ks):
        keys.put(i, keys.digest(k), plan_id=7)
    churn = P.make_key("churn").encode()
    cd = keys.digest(churn)
    # two self-consistent states of one record: plan 1 <-> scope /a <-> 1/second
    state = [dict(plan_id=1, scopes=["GET /a"], limits=["1/second"], meta=b"A" * 40),
             dict(plan_id=2, scopes=["GET /b"], limits=["2/second"], meta=b"B" * 90)]
    keys.put(N, cd, **state[0])
    pipes = [os.pipe() for _ in range(PROCS)]

    def reader(i):
        r = pipes[i][0]
        bad = 0
        seen = 0
        while True:
            ra = keys.check(cd, 1, b"/a", b"", T0)
            if ra >= 0:
                seen |= 1
                if keys.last_plan != 1:
                    bad += 1
            rb = keys.check(cd, 1, b"/b", b"", T0)
            if rb >= 0:
                seen |= 2
                if keys.last_plan != 2:
                    bad += 1
            if ra < 0 and ra != C.SCOPE_DENIED or rb < 0 and rb != C.SCOPE_DENIED:
                bad += 1
            info = keys.info(N)
            if info["limits"][0] != info["plan_id"]:
                bad += 1
            m = keys.meta(N)
            if m not in (b"A" * 40, b"B" * 90):
                bad += 1
            if select.select([r], [], [], 0)[0]:
                (idx,) = struct.unpack("=i", os.read(r, 4))
                if idx < 0:
                    return 4 * bad + seen
                # the writer revoked idx before sending it: this lookup must see it
                if keys.check_key(ks[idx], 1, b"/", b"", T0) != C.KEY_REVOKED:
                    bad += 100

    kids = []
    for i in range(PROCS):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = min(reader(i), 255)
            finally:
                os._exit(code)
        kids.append(pid)
    for i in range(N):
        for s in range(7):  # odd count: the resting state alternates round by round
            keys.put(N, cd, **state[(i + s) & 1])
        assert keys.revoke(i)
        for _, w in pipes:
            os.write(w, struct.pack("=i", i))
    for _, w in pipes:
        os.write(w, struct.pack("=i", -1))
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
    for r, w in pipes:
        os.close(r)
        os.close(w)
    # code = 4 * bad reads + (saw state A) + 2 * (saw state B)
    assert [c >> 2 for c in codes] == [0] * PROCS, codes
    assert all(c & 3 for c in codes) and (codes[0] | codes[1] | codes[2] | codes[3]) & 3 == 3, codes
    assert keys.stats()["live"] == N + 1


def test_concurrent_claims_never_split_a_subject():
    """Processes claiming entries for the same new subjects at once (CAS on the
    entry's owner word): each subject ends up with one entry, so a 1/minute
    limit admits each subject exactly once in total."""
    a = C.Arena.create(key_capacity=1, rate_capacity=4096)
    rates = C.RateTable(a)
    pid = rates.policy("ip:x", ["1/minute"])
    now = T0 - T0 % 60_000 + 1_000
    n = 3000

    def hammer(i):
        order = list(range(n))
        order = order[i * 97:] + order[: i * 97]
        return sum(1 for s in order if rates.hit(pid, P.SUBJECT_V4 | s, now) >= 0)

    assert sum(fork_all(PROCS, hammer)) == n
    assert rates.stats()["used"] == n


def test_index_rebuilds_never_hide_a_live_key():
    """The writer churns other keys through many slot-area swaps while readers
    look up a stable set: no lookup of a stable key may miss."""
    a = C.Arena.create(key_capacity=1024, rate_capacity=1)  # 4096 slots, a rebuild every ~512 tombstones
    keys = C.KeyTable(a, secret=SECRET)
    stable = [P.make_key(f"s{i}").encode() for i in range(200)]
    for i, k in enumerate(stable):
        keys.put(i, keys.digest(k))
    for i in range(200, 500):
        keys.put(i, keys.digest(P.make_key(f"c{i}").encode()))
    r, w = os.pipe()

    def reader(_):
        misses = 0
        rounds = 0
        while True:
            for i, k in enumerate(stable):
                if keys.check_key(k, 1, b"/", b"", T0) != i:
                    misses += 1
            rounds += 1
            if select.select([r], [], [], 0)[0]:
                return misses if misses else -rounds

    kids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                res = reader(i)
                code = 0 if res < 0 else min(res, 250) + 1
            finally:
                os._exit(code)
        kids.append(pid)
    dig = keys.digest
    for n in range(8000):
        keys.rotate(200 + n % 300, dig(P.make_key(f"c{n}").encode()), 0)
    os.write(w, b"x")
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
    os.close(r)
    os.close(w)
    assert codes == [0, 0], "readers missed stable keys during rebuilds"
    assert keys.stats()["rebuilds"] >= 3
