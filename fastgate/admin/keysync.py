"""Store records -> shared-memory key table. Used by the master at start
(load everything) and by the admin process after each write."""

from __future__ import annotations

import logging
import os
import time

import msgspec

from .. import core
from .schemas import rfc3339_ms

log = logging.getLogger("fastgate.keys")

_meta_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(tuple[str, str, str, list[str]])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def meta_bytes(rec) -> bytes:
    """What workers need per key beyond the record: identity headers and the
    limits to describe in RateLimit-Policy."""
    return _meta_enc.encode((rec.id, rec.owner or "", rec.plan or "", list(rec.limits or ())))


def decode_meta(blob: bytes) -> tuple[str, str, str, list[str]]:
    return _meta_dec.decode(blob)


def expires_ms(rec) -> int:
    """The core's expires_ms: 0 = never (no expires_at); otherwise epoch ms,
    clamped to at least 1, because an instant at or before the epoch is long
    expired and must not turn into 0 = "never". Exact integer milliseconds
    (a float timestamp() * 1000 lands 1 ms early for about 1 value in 200)."""
    if not rec.expires_at:
        return 0
    return max(1, rfc3339_ms(rec.expires_at))


# TEST ONLY: "NAME:N" makes this process die inside the core's write section
# of its N-th write of the key named NAME (tests/integration/test_writer_crash.py).
_CRASH_AT = os.environ.get("FASTGATE_TEST_CRASH_IN_PUT")
_crash_count = [0, 0]  # pid, writes of NAME by that process (a forked child counts afresh)


def _maybe_crash(rec) -> None:
    if _crash_count[0] != os.getpid():
        _crash_count[:] = [os.getpid(), 0]
    name, _, nth = _CRASH_AT.rpartition(":")
    if rec.name == name:
        _crash_count[1] += 1
        if _crash_count[1] == int(nth) and core.IMPLEMENTATION == "cython":
            from fastgate import _core

            _core._set_crash_hook(1)


def apply(table, rec, now: int | None = None) -> None:
    """Write one record into its slot (writer process only)."""
    if _CRASH_AT is not None:
        _maybe_crash(rec)
    now = now_ms() if now is None else now
    grace = rec.grace_until_ms if rec.prev_digest and rec.grace_until_ms and rec.grace_until_ms > now else 0
    table.put(
        rec.slot,
        rec.digest,
        plan_id=core.plan_id(rec.plan),  # admit() picks the plan's rate policy by this id
        flags=core.FLAG_REVOKED if rec.revoked_at else 0,
        expires_ms=expires_ms(rec),
        scopes=rec.scopes or None,
        allow_cidrs=rec.allow_cidrs or None,
        deny_cidrs=rec.deny_cidrs or None,
        limits=rec.limits or None,
        meta=meta_bytes(rec),
        where=f"keys[{rec.id}]",
        prev_digest=rec.prev_digest if grace else None,
        grace_until_ms=grace,
    )


def load_all(store, table) -> tuple[int, float]:
    """Load every stored key into the table; keys without a usable slot (new
    capacity, duplicates) get a fresh one, recorded in the store."""
    t0 = time.perf_counter()
    now = now_ms()
    cap = table.capacity
    used: set[int] = set()
    later = []
    n = 0
    for rec in store.iter_all():
        slot = rec.slot
        if slot is None or slot < 0 or slot >= cap or slot in used:
            later.append(rec)
            continue
        used.add(slot)
        apply(table, rec, now)
        n += 1
    assigned = []
    for rec in later:
        rec.slot = table.allocate()
        assigned.append((rec.id, rec.slot))
        apply(table, rec, now)
        n += 1
    if assigned:  # one transaction, not one per key (a fresh node on a shared store assigns them all)
        store.set_slots(assigned)
    return n, time.perf_counter() - t0


def resync_slot(store, table, slot: int) -> str:
    """After a writer died inside a write to this slot (the core rolled the
    record back to its state before that write): make the slot say what the
    store says, since the store commits first and may hold the change that was
    being written (a revoke, say). Returns what was done, for the log."""
    for key_id, s in store.id_slots().items():
        if s == slot:
            rec = store.get(key_id)
            if rec is not None:
                apply(table, rec)
                return f"re-applied key {key_id}"
    return "deleted a key the store no longer has" if table.delete(slot) else "nothing to do"
