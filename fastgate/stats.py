"""Shared statistics: per-process metric snapshots and a per-key usage queue.

One anonymous shared mapping, created by the master before it forks, holds:

- a snapshot region per process (each worker slot, and the master): the
  process publishes its counters there about once a second as msgpack, under a
  per-region sequence counter (odd while writing), and only that process ever
  writes its region; the admin process reads every region and sums them for
  GET /metrics, retrying a region whose counter moved during the copy;
- a usage queue: workers accumulate per-key counts locally (one dict update per
  request) and append them here once a second under a lock shared by fork; the
  admin process drains it and rolls the counts up into SQLite. A worker that
  finds the queue full keeps its counts and tries again next time, so nothing
  is dropped while the admin process is slow; a crashing worker loses at most
  its last second.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct

import msgspec

REGION_BYTES = 256 * 1024
USAGE_ENTRIES = 65_536
# One usage entry: key slot, then requests by status class 1xx..5xx, bytes in, bytes out.
USAGE_FIELDS = 8
_ENTRY = struct.Struct("<%dQ" % USAGE_FIELDS)
_U64 = struct.Struct("<Q")
_HDR = 64  # region header: seq (u64), payload length (u64), padding

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class StatsSegment:
    def __init__(self, slots: int):
        """slots: the most worker slots there can be; region `slots` is the master's."""
        self.slots = slots
        self.regions = slots + 1
        self._usage_off = self.regions * REGION_BYTES
        size = self._usage_off + _HDR + USAGE_ENTRIES * _ENTRY.size
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self.lock = multiprocessing.get_context("fork").Lock()

    # -- snapshots --------------------------------------------------------------
    def publish(self, region: int, data) -> bool:
        """Write this process's snapshot; False when it does not fit (then the
        previous snapshot stays)."""
        payload = _enc.encode(data)
        if len(payload) > REGION_BYTES - _HDR or not 0 <= region < self.regions:
            return False
        mm = self.mm
        off = region * REGION_BYTES
        (seq,) = _U64.unpack_from(mm, off)
        _U64.pack_into(mm, off, seq + 1)  # odd: readers retry
        mm[off + _HDR : off + _HDR + len(payload)] = payload
        _U64.pack_into(mm, off + 8, len(payload))
        _U64.pack_into(mm, off, seq + 2)
        return True

    def read(self, region: int):
        mm = self.mm
        off = region * REGION_BYTES
        for _ in range(100):
            (seq,) = _U64.unpack_from(mm, off)
            if seq & 1:
                continue
            (n,) = _U64.unpack_from(mm, off + 8)
            if n == 0 or n > REGION_BYTES - _HDR:
                return None
            payload = bytes(mm[off + _HDR : off + _HDR + n])
            if _U64.unpack_from(mm, off)[0] == seq:
                return _dec.decode(payload)
        return None

    def clear(self, region: int) -> None:
        """A worker slot that is gone (retired) stops counting in the sums."""
        off = region * REGION_BYTES
        (seq,) = _U64.unpack_from(self.mm, off)
        _U64.pack_into(self.mm, off, seq + 1)
        _U64.pack_into(self.mm, off + 8, 0)
        _U64.pack_into(self.mm, off, seq + 2)

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
