"""Shared statistics: per-process metric snapshots and a per-key usage queue.

One anonymous shared mapping, created by the master before it forks, holds:

- a snapshot region per process (each worker slot, and the master): the
  process publishes its counters there about once a second as msgpack, and
  only that process ever writes its region; the admin process reads every
  region and sums them for GET /metrics. A region holds two buffers and the
  index of the complete one: a publish fills the other buffer (under its own
  sequence counter, odd while writing) and then flips the index, so a process
  killed in the middle of a publish leaves its previous snapshot readable;
- a usage queue: workers accumulate per-key counts locally (one dict update per
  request) and append them here once a second under a lock that a killed
  process cannot keep; the admin process drains it and rolls the counts up
  into SQLite. A worker that finds the queue full keeps its counts and tries
  again next time, so nothing is dropped while the admin process is slow; a
  crashing worker loses at most its last second.

Counters never go backwards (Prometheus counters must not while the gateway
runs). A worker's counts live in its own memory and die with it, so when a
worker slot's process exits (crash, SIGKILL, or a reload that retires the
slot) the master calls carry(): the slot's last published snapshot, less its
gauges, becomes the slot's base, is written back as the region's snapshot at
once (so the dead worker's gauges drop to zero and its totals stay), and the
replacement worker, which inherits the base across fork, publishes base + its
own counts. What a killed worker counted after its last publish (at most about
one publish interval, ~1 s plus one timer tick) is lost; nothing before it is.

Carrying is generic: numbers add, dicts add key by key, lists of numbers add
element by element, and lists of rows ([label..., count], like "requests")
add by labels. Every snapshot field is a counter except the names in GAUGES:
a new gauge field must be added there, or it would be summed across deaths.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time

import msgspec

REGION_BYTES = 512 * 1024
USAGE_ENTRIES = 65_536
# One usage entry: key slot, then requests by status class 1xx..5xx, bytes in, bytes out.
USAGE_FIELDS = 8
_ENTRY = struct.Struct("<%dQ" % USAGE_FIELDS)
_U64 = struct.Struct("<Q")
_HDR = 64  # region header: index of the complete buffer (u64), padding; buffer header: seq, length
_BUF = (REGION_BYTES - _HDR) // 2
MAX_SNAPSHOT = _BUF - _HDR

# Snapshot fields that are levels, not totals: never carried past a process's death.
GAUGES = frozenset({"connections", "idle"})

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _add(base, new):
    """base + new for one snapshot field (see the module docstring)."""
    if new is None:
        return base
    if isinstance(base, bool) or isinstance(new, bool):
        return new
    if isinstance(base, (int, float)) and isinstance(new, (int, float)):
        return base + new
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(base, list) and isinstance(new, list):
        if any(isinstance(r, list) for r in base) or any(isinstance(r, list) for r in new):
            rows: dict = {}
            for r in base:
                rows[tuple(r[:-1])] = r[-1]
            for r in new:
                k = tuple(r[:-1])
                rows[k] = rows[k] + r[-1] if k in rows else r[-1]
            return [[*k, n] for k, n in rows.items()]
        longer, shorter = (base, new) if len(base) >= len(new) else (new, base)
        out = list(longer)
        for i, v in enumerate(shorter):
            out[i] = _add(out[i], v)
        return out
    return new


def add_counters(base: dict, snap: dict) -> dict:
    """snap with base's counters added in; snap's gauges are kept as they are."""
    out = dict(snap)
    for k, v in base.items():
        if k not in GAUGES:
            out[k] = _add(v, snap.get(k))
    return out


def counters_only(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k not in GAUGES}


class _KillSafeLock:
    """A lock across forked processes that its holder's death releases: a POSIX
    record lock (per process, dropped by the kernel when the process dies) on
    an anonymous file, plus a thread lock for threads of one process. (A
    multiprocessing.Lock held by a SIGKILLed worker would stay taken forever
    and stall every other worker and the admin process.)"""

    def __init__(self):
        self.fd = os.memfd_create("fastgate-stats-lock", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 1)
        self._thread = threading.Lock()
        self._pid = os.getpid()

    def __enter__(self):
        if self._pid != os.getpid():  # forked: a thread lock copied while taken would deadlock
            self._thread = threading.Lock()
            self._pid = os.getpid()
        self._thread.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()


class StatsSegment:
    def __init__(self, slots: int):
        """slots: the most worker slots there can be; region `slots` is the master's."""
        self.slots = slots
        self.regions = slots + 1
        self._usage_off = self.regions * REGION_BYTES
        size = self._usage_off + _HDR + USAGE_ENTRIES * _ENTRY.size
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self.lock = _KillSafeLock()
        # region -> carried totals of the slot's earlier processes. Set by the
        # master only; a worker forked afterwards inherits it with the segment.
        self.base: dict[int, dict] = {}

    # -- snapshots --------------------------------------------------------------
    def publish(self, region: int, data) -> bool:
        """Write this process's snapshot (plus the region's carried totals);
        False when it does not fit (then the previous snapshot stays)."""
        base = self.base.get(region)
        if base is not None:
            data = add_counters(base, data)
        return self._write(region, _enc.encode(data))

    def _write(self, region: int, payload: bytes) -> bool:
        if len(payload) > MAX_SNAPSHOT or not 0 <= region < self.regions:
            return False
        mm = self.mm
        off = region * REGION_BYTES
        (active,) = _U64.unpack_from(mm, off)
        nxt = 1 - (active & 1)
        boff = off + _HDR + nxt * _BUF
        (seq,) = _U64.unpack_from(mm, boff)
        seq = (seq + 1) | 1  # odd while writing (also after a writer died mid-publish)
        _U64.pack_into(mm, boff, seq)
        mm[boff + _HDR : boff + _HDR + len(payload)] = payload
        _U64.pack_into(mm, boff + 8, len(payload))
        _U64.pack_into(mm, boff, seq + 1)
        _U64.pack_into(mm, off, nxt)  # readers switch to the complete buffer
        return True

    def read(self, region: int):
        if not 0 <= region < self.regions:
            return None
        mm = self.mm
        off = region * REGION_BYTES
        for attempt in range(2000):
            if attempt >= 100:
                # a writer publishing back to back keeps winning the race:
                # yield the CPU so one of our tries falls between its publishes
                time.sleep(0)
            (active,) = _U64.unpack_from(mm, off)
            boff = off + _HDR + (active & 1) * _BUF
            (seq,) = _U64.unpack_from(mm, boff)
            if seq & 1:  # two publishes passed since we read the index
                continue
            (n,) = _U64.unpack_from(mm, boff + 8)
            if n == 0 or n > MAX_SNAPSHOT:
                return None
            payload = bytes(mm[boff + _HDR : boff + _HDR + n])
            if _U64.unpack_from(mm, boff)[0] == seq:
                return _dec.decode(payload)
        return None

    def carry(self, region: int) -> None:
        """Master only, once the region's process has exited and before a
        replacement is forked: keep its last published totals (see the module
        docstring). Safe to call more than once."""
        snap = self.read(region)
        if snap is None:
            return  # nothing published since the last carry: the base stands
        kept = counters_only(snap)
        self.base[region] = kept
        self._write(region, _enc.encode(kept))

    def clear(self, region: int) -> None:
        """Forget a region entirely (its totals leave the sums): only for a
        region whose counts must not be reported any more."""
        self.base.pop(region, None)
        self._write(region, b"")

    # -- usage queue ------------------------------------------------------------
    def push_usage(self, usage: dict[int, list[int]]) -> int:
        """Append {key_slot: [1xx, 2xx, 3xx, 4xx, 5xx, bytes_in, bytes_out]};
        the entries written are removed from `usage`. Returns how many."""
        if not usage:
            return 0
        mm = self.mm
        base = self._usage_off
        with self.lock:
            (count,) = _U64.unpack_from(mm, base)
            room = USAGE_ENTRIES - count
            if room <= 0:
                return 0
            done = []
            off = base + _HDR + count * _ENTRY.size
            for slot, c in usage.items():
                if len(done) >= room:
                    break
                _ENTRY.pack_into(mm, off, slot, *c)
                off += _ENTRY.size
                done.append(slot)
            _U64.pack_into(mm, base, count + len(done))
        for slot in done:
            del usage[slot]
        return len(done)

    def drain_usage(self) -> list[tuple[int, ...]]:
        mm = self.mm
        base = self._usage_off
        with self.lock:
            (count,) = _U64.unpack_from(mm, base)
            data = bytes(mm[base + _HDR : base + _HDR + count * _ENTRY.size])
            _U64.pack_into(mm, base, 0)
        return list(_ENTRY.iter_unpack(data))
