"""StatsSegment: snapshots survive a writer killed mid-publish, a dead
worker's totals are carried into its replacement (gauges are not), and the
usage-queue lock is released when its holder is SIGKILLed."""

from __future__ import annotations

import fcntl
import os
import signal
import time

import pytest

from fastgate import stats as st


def snap(n: int, conns: int = 0, route: str = "app") -> dict:
    return {
        "requests": [[route, 2, "", "", n]],
        "latency": {route: [n, 0, 0.5 * n]},
        "upstream": {"t": [1, n - 1, 0]},
        "idle": {"t": 3},
        "connections": conns,
        "access_log": [n, 0],
    }


def test_publish_read_roundtrip_and_bounds():
    seg = st.StatsSegment(4)
    assert seg.read(0) is None
    assert seg.publish(0, snap(5, 2))
    assert seg.read(0) == snap(5, 2)
    assert seg.publish(0, snap(6, 1))  # the second buffer
    assert seg.read(0) == snap(6, 1)
    assert not seg.publish(99, snap(1))
    assert seg.read(-1) is None and seg.read(99) is None
    assert not seg.publish(1, {"big": b"x" * (st.MAX_SNAPSHOT + 1)})
    assert seg.read(1) is None


def test_writer_killed_mid_publish_leaves_previous_snapshot():
    seg = st.StatsSegment(2)
    seg.publish(0, snap(7))
    # What a publish leaves when its process dies between the first and the
    # last store: the spare buffer's counter odd, half a payload, no flip.
    off = 0
    (active,) = st._U64.unpack_from(seg.mm, off)
    boff = off + st._HDR + (1 - active) * st._BUF
    (seq,) = st._U64.unpack_from(seg.mm, boff)
    st._U64.pack_into(seg.mm, boff, seq | 1)
    seg.mm[boff + st._HDR : boff + st._HDR + 4] = b"\xff\xff\xff\xff"
    assert seg.read(0) == snap(7)
    # The next writer (the master's carry, or the replacement) recovers.
    seg.carry(0)
    assert seg.read(0) == st.counters_only(snap(7))
    assert seg.publish(0, snap(1))
    assert seg.read(0)["requests"] == [["app", 2, "", "", 8]]


def test_real_kill_during_publishes_never_hides_the_region():
    seg = st.StatsSegment(2)
    seg.publish(0, snap(1))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: publish as fast as it can until killed
        n = 1
        while True:
            n += 1
            seg.publish(0, snap(n, route="r" * (n % 500)))
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert seg.read(0) is not None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert seg.read(0) is not None


def test_carry_keeps_counters_drops_gauges_and_replacement_adds_on():
    seg = st.StatsSegment(2)
    seg.publish(0, snap(10, conns=4))
    seg.carry(0)  # the worker died
    after = seg.read(0)
    assert "connections" not in after and "idle" not in after
    assert after["requests"] == [["app", 2, "", "", 10]]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the replacement inherits the base across fork
        seg.publish(0, snap(3, conns=1, route="other"))
        os._exit(0)
    os.waitpid(pid, 0)
    got = seg.read(0)
    assert sorted(got["requests"]) == [["app", 2, "", "", 10], ["other", 2, "", "", 3]]
    assert got["latency"] == {"app": [10, 0, 5.0], "other": [3, 0, 1.5]}
    assert got["upstream"] == {"t": [2, 11, 0]}
    assert got["access_log"] == [13, 0]
    assert got["connections"] == 1 and got["idle"] == {"t": 3}  # the live worker's own gauges
    # It dies too, before publishing again: carrying twice loses nothing.
    seg.carry(0)
    seg.carry(0)
    assert seg.read(0)["access_log"] == [13, 0]


def test_add_counters_merges_every_shape():
    base = {"requests": [["a", 2, "", "", 5], ["b", 4, "rate", "free", 1]], "n": 2, "v": [1, 2],
            "d": {"x": {"y": 1}}, "flag": True, "connections": 9}
    new = {"requests": [["a", 2, "", "", 1]], "n": 3, "v": [1, 1, 1], "d": {"x": {"y": 2, "z": 1}},
           "flag": False, "connections": 1}
    out = st.add_counters(base, new)
    assert sorted(out["requests"]) == [["a", 2, "", "", 6], ["b", 4, "rate", "free", 1]]
    assert out["n"] == 5 and out["v"] == [2, 3, 1] and out["d"] == {"x": {"y": 3, "z": 1}}
    assert out["flag"] is False and out["connections"] == 1


def test_usage_lock_is_released_when_its_holder_is_killed():
    seg = st.StatsSegment(1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: take the lock and die holding it
        os.close(r)
        seg.lock.__enter__()
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(OSError):  # held by the live child
            fcntl.lockf(seg.lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    seg.push_usage({1: [0, 1, 0, 0, 0, 10, 20]})  # would hang with a lock the dead child kept
    assert seg.drain_usage() == [(1, 0, 1, 0, 0, 0, 10, 20)]
