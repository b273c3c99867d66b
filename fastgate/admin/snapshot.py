"""Fast start: a snapshot file of the key part of the shared arena, replayed forward.

A full load reads every key from the store and compiles it into the arena (about
15 s for 1M keys). Instead the master copies a snapshot of what a load builds
(``Arena.export_keys``: key records and their extension heap; the digest index is
rebuilt, rate counters start empty as after any restart) into the fresh arena, then
applies the current store record of every key changed after the snapshot's change
number (``store.changes_since``), and only then forks the workers.

The file (``<[keys] store>.snapshot``; in cluster mode
``<dir of [keys] store>/keys.<node id>.snapshot``, since slots are per node) is a
512-byte header, then the payload::

    magic "FGSNAP01", format, arena layout version, key capacity, extension bytes,
    store change number it reflects, the audit hash at that number, node id,
    fingerprint of the server secret, payload length, written-at, MAC

The MAC is keyed BLAKE2b-256 (hashlib) over header and payload, keyed from the
server secret. A CRC-32 (zlib) is about 3x faster (0.1 s against 0.3 s for 256 MB
here) but only catches accidents; the snapshot decides which digests the gateway
admits, so it must be unforgeable by anyone without the secret, and a snapshot
made under another secret must never be used (the fingerprint says so early, the
MAC proves it).

Any mismatch -- no file, a short or corrupt one, another format, layout, key
capacity, secret or node, a store whose change number is below the snapshot's or
whose audit hash at it differs (a restored or another store), too many changes to
replay, a replayed key that does not fit where the store says -- means a full load,
with one log line saying why.

Writing: only the admin process (the arena's single writer) takes snapshots. On a
single node it is the store's only writer and applies each write before answering,
so the arena holds every stored change between two writes; on a cluster store it
first catches up with the other nodes' changes (every change after its watermark,
a few hundred keys per event-loop turn, so the admin API keeps answering). Then in
one loop callback -- between two key writes, which are synchronous -- copies the key part
(memcpy, ~0.1 s for 1M keys) and reads the change number, then hashes and writes
the copy in a thread: temp file, fsync, rename, fsync of the directory. A crash at
any point leaves the previous snapshot intact. One is written soon after a start
that had to do a full load, every ``[keys] snapshot_interval`` seconds while keys
change, and at a clean shutdown.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import mmap
import os
import struct
import threading
import time

from .. import core
from . import keysync

log = logging.getLogger("fastgate.keys")

MAGIC = b"FGSNAP01"
FORMAT = 1
HEADER_SIZE = 512
# magic, format, layout, key_capacity, ext_bytes, seq, seq hash, node id,
# fingerprint, payload length, written at (ms), then the MAC (not covered by itself)
_HDR = struct.Struct("<8sIIQQQ64s128s16sQQ")
_MAC_AT = _HDR.size
assert _MAC_AT + 32 <= HEADER_SIZE
MAX_REPLAY = 20_000  # changed keys; past this a full load is about as fast, and simpler
CHUNK = 256  # keys the admin process catches up per event-loop turn

# Set in the master by load() and inherited by the admin process at fork: the change
# number the arena reflects (every change up to it is in), and the one on disk.
STATE = {"seq": 0, "on_disk": None}

# TEST ONLY: "N" makes a process that writes a snapshot die (os._exit(70)) after N
# payload bytes, as a crash mid-write would (tests/integration/test_fast_start.py).
_CRASH_AFTER = os.environ.get("FASTGATE_TEST_CRASH_IN_SNAPSHOT")


class Unusable(Exception):
    """Why a snapshot is not used (one line, for the log)."""


def enabled(config) -> bool:
    return config.keys.snapshot_interval > 0


def path_for(config) -> str:
    store = os.path.abspath(config.keys.store)
    cl = getattr(config, "cluster", None)
    if cl is not None and cl.store:
        from ..config import node_id

        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in node_id(config))
        return os.path.join(os.path.dirname(store), f"keys.{safe}.snapshot")
    return store + ".snapshot"


def _node(config) -> str:
    cl = getattr(config, "cluster", None)
    if cl is not None and cl.store:
        from ..config import node_id

        return node_id(config)
    return ""


def _fingerprint(secret: bytes) -> bytes:
    return hashlib.blake2b(b"fastgate key snapshot: fingerprint", key=secret, digest_size=16).digest()


def _mac_key(secret: bytes) -> bytes:
    return hashlib.blake2b(b"fastgate key snapshot: mac", key=secret, digest_size=32).digest()


def _mac(secret: bytes, header: bytes, payload) -> bytes:
    h = hashlib.blake2b(key=_mac_key(secret), digest_size=32)
    h.update(header[:_MAC_AT])
    h.update(payload)
    return h.digest()


def audit_hash(store, seq: int) -> str:
    """The audit chain's hash at change number seq ('' for 0): what ties a snapshot
    to the store it was taken from."""
    if seq <= 0:
        return ""
    ev = store.audit(after_seq=seq - 1, limit=1)
    return ev[0].hash if ev and ev[0].seq == seq else ""


# ---------------------------------------------------------------- file


def write(path: str, payload: bytes, *, secret: bytes, layout: int, key_capacity: int, ext_bytes: int,
          seq: int, seq_hash: str, node: str) -> int:
    """Write a snapshot atomically (temp file, fsync, rename, fsync dir); returns its size."""
    d = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a writer that crashed
        try:
            os.unlink(stale)
        except OSError:
            pass
    head = _HDR.pack(MAGIC, FORMAT, layout, key_capacity, ext_bytes, seq, seq_hash.encode().ljust(64, b"\0"),
                     node.encode().ljust(128, b"\0"), _fingerprint(secret), len(payload), time.time_ns() // 1_000_000)
    head += _mac(secret, head, payload)
    head = head.ljust(HEADER_SIZE, b"\0")
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, head)
        view = memoryview(payload)
        if _CRASH_AFTER is not None:
            _write_all(fd, view[:int(_CRASH_AFTER)])
            os._exit(70)
        _write_all(fd, view)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return HEADER_SIZE + len(payload)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:1 << 26])
        view = view[n:]


class Snapshot:
    """An opened, checked snapshot file: header fields and the payload (an mmap view)."""

    def __init__(self, path: str, secret: bytes, *, layout: int, key_capacity: int, node: str):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Unusable("there is none") from None
        except OSError as exc:
            raise Unusable(f"cannot open it: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                raise Unusable(f"it is truncated ({size} bytes, shorter than its header)")
            (magic, fmt, lay, cap, self.ext_bytes, self.seq, shash, snode, fp, plen,
             self.written_ms) = _HDR.unpack_from(head)
            mac = head[_MAC_AT:_MAC_AT + 32]
            if magic != MAGIC:
                raise Unusable("it is not a fastgate key snapshot (bad magic)")
            if fmt != FORMAT:
                raise Unusable(f"it has snapshot format {fmt}; this build writes {FORMAT}")
            if lay != layout:
                raise Unusable(f"it is of arena layout v{lay}; this build has v{layout}")
            if cap != key_capacity:
                raise Unusable(f"it was taken with key capacity {cap}; [keys] capacity is now {key_capacity}")
            if fp != _fingerprint(secret):
                raise Unusable("it was made under another server secret")
            self.node = snode.rstrip(b"\0").decode("utf-8", "replace")
            if self.node != node:
                raise Unusable(f"it belongs to node {self.node!r}, not {node!r}")
            if size != HEADER_SIZE + plen:
                raise Unusable(f"it is truncated or padded ({size} bytes; its header says {HEADER_SIZE + plen})")
            self.seq_hash = shash.rstrip(b"\0").decode("ascii", "replace")
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if plen else None
        finally:
            os.close(fd)
        self.payload = memoryview(self._mm)[HEADER_SIZE:] if self._mm is not None else memoryview(b"")
        self._head, self._mac, self._secret = head, mac, secret

    def verify(self) -> None:
        if _mac(self._secret, self._head, self.payload) != self._mac:
            raise Unusable("its checksum (keyed BLAKE2b) does not match: the file is corrupt")

    def close(self) -> None:
        self.payload.release()
        if self._mm is not None:
            self._mm.close()


# ---------------------------------------------------------------- replay


def _prefix(key_id: str) -> bytes:
    # keysync.meta_bytes is a msgpack array of 4 whose first item is the id
    return b"\x94" + keysync._meta_enc.encode(key_id)


def changed_keys(store, since: int, limit: int | None = None) -> tuple[dict[str, int], int]:
    """{key id: its last change number} for the changes after since, and the last
    number seen; at most about limit keys (None: all)."""
    ids: dict[str, int] = {}
    last = since
    while True:
        batch = store.changes_since(last, limit=10_000 if limit is None else max(1, min(10_000, limit)))
        for seq, kid in batch:
            ids[kid] = seq
        if batch:
            last = batch[-1][0]
        if len(batch) < 10_000 or (limit is not None and len(ids) >= limit):
            return ids, last


def replay(store, table, ids, slot_ids: dict | None = None) -> int:
    """Make the table say what the store says now for these key ids: apply the
    current record of each (in the slot the store gives it, or a new one recorded
    in the store, as load_all does), delete those the store no longer has. Returns
    the keys written. Raises Unusable where the table cannot follow (a slot the
    store gives this key holds another one)."""
    now = keysync.now_ms()
    cap = table.capacity
    recs = {kid: store.get(kid) for kid in ids}
    lost = [kid for kid, r in recs.items() if r is None or not 0 <= r.slot < cap]
    found = table.indexes_by_meta([_prefix(k) for k in lost]) if lost else {}
    n = 0
    for kid in lost:
        if recs[kid] is None:
            k = found.get(_prefix(kid))
            if k is not None:
                table.delete(k)
                n += 1
                if slot_ids is not None:
                    slot_ids.pop(k, None)
    assigned = []
    for kid, rec in recs.items():
        if rec is None:
            continue
        if not 0 <= rec.slot < cap:
            k = found.get(_prefix(kid))
            rec.slot = table.allocate() if k is None else k
            assigned.append((kid, rec.slot))
            if slot_ids is not None:
                slot_ids[rec.slot] = kid
        else:
            meta = table.meta(rec.slot)
            if meta and keysync.decode_meta(meta)[0] != kid:
                raise Unusable(f"key {kid}'s slot {rec.slot} holds key {keysync.decode_meta(meta)[0]} in it")
        try:
            keysync.apply(table, rec, now)
        except core.CoreError as exc:
            raise Unusable(f"key {kid} does not fit where the store puts it: {exc}") from None
        n += 1
    if assigned:
        store.set_slots(assigned)
    return n


# ---------------------------------------------------------------- master: start


def load(config, store, new_arena):
    """The master's key load: (arena, keys, seconds, how). From the snapshot when
    one is usable (then the changes after it), else a full load into a fresh arena."""
    t0 = time.perf_counter()
    secret = store.secret
    if enabled(config) and core.IMPLEMENTATION == "cython":
        path = path_for(config)
        arena = new_arena()
        snap = None
        try:
            snap = Snapshot(path, secret, layout=core.LAYOUT_VERSION, key_capacity=arena.key_capacity,
                            node=_node(config))
            head = store.change_seq()
            if head < snap.seq:
                raise Unusable(f"the store is behind it (store change {head}, snapshot change {snap.seq}): "
                               "a restored or another store")
            if audit_hash(store, snap.seq) != snap.seq_hash:
                raise Unusable(f"the store's audit trail differs at change {snap.seq}: another or restored store")
            ids, last = changed_keys(store, snap.seq, MAX_REPLAY + 1)
            if len(ids) > MAX_REPLAY:
                raise Unusable(f"more than {MAX_REPLAY} keys changed after it")
            snap.verify()
            try:
                arena.import_keys(snap.payload)
            except core.CoreError as exc:
                raise Unusable(str(exc)) from None
            table = core.KeyTable(arena, secret=secret)
            on_disk = snap.seq
            snap.close()
            snap = None
            n_replayed = replay(store, table, ids)
            STATE.update(seq=last, on_disk=on_disk)
            how = f"from snapshot {path} at change {on_disk}, then {n_replayed} changed keys up to change {last}"
            return arena, len(table), time.perf_counter() - t0, how
        except Unusable as why:
            # a first start has none: not worth a warning
            (log.info if not os.path.exists(path) else log.warning)(
                "key snapshot %s not used (%s): loading every key from the store", path, why)
        except Exception as exc:  # the snapshot is an optimisation: never a reason not to start
            log.warning("key snapshot %s not used (%s: %s): loading every key from the store", path,
                        type(exc).__name__, exc)
        finally:
            if snap is not None:
                snap.close()
        t0 = time.perf_counter()
    arena = new_arena()
    seq = store.change_seq()  # before the read: changes after it are replayed again, harmlessly
    table = core.KeyTable(arena, secret=secret)
    n, _ = keysync.load_all(store, table)
    STATE.update(seq=seq, on_disk=None)
    return arena, n, time.perf_counter() - t0, "full load"


# ---------------------------------------------------------------- admin: write


class Snapshotter:
    """In the admin process (the arena's writer): keeps the snapshot current."""

    def __init__(self, config, store, table, arena, loop=None, slot_ids: dict | None = None):
        self.config, self.store, self.table, self.arena, self.loop = config, store, table, arena, loop
        self.slot_ids = slot_ids  # the admin's {slot: key id}, kept up to date by catch_up
        self.path = path_for(config)
        self.interval = config.keys.snapshot_interval
        self.on = enabled(config) and core.IMPLEMENTATION == "cython"
        self.watermark = STATE["seq"]  # every change up to this is in the arena
        # Single node (SQLite): this process is the store's only writer (instance lock) and
        # applies each of its writes before it answers, so between two writes the arena
        # holds every change the store has: no catching up. A cluster store also takes
        # other nodes' changes: those are caught up before a copy.
        cl = getattr(config, "cluster", None)
        self.exclusive = not (cl is not None and cl.store)
        if self.exclusive and STATE.get("admin_spawns", 1) > 1:
            # That holds for the first admin process after the master's load. One the master
            # respawned cannot tell whether its predecessor died between a store commit and
            # the shared-memory write, so it writes no snapshot: the last one (taken before
            # that) stays, and the next start replays every change after it, or loads fully.
            self.on = False
        self.on_disk = STATE["on_disk"]
        self._thread: threading.Thread | None = None
        self._target: int | None = None
        self.written = 0

    def start(self) -> None:
        """Schedule snapshots on the loop: soon if there is none for this arena."""
        if self.on and self.loop is not None:
            self.loop.call_later(1.0 if self.on_disk is None else self.interval, self._due)

    def note_applied(self, seq: int) -> None:
        """For a fan-out that applies changes in order: every change up to seq is in."""
        if seq > self.watermark:
            self.watermark = seq

    def _due(self) -> None:
        try:
            self._begin()
        except Exception as exc:
            log.warning("key snapshot not taken (%s: %s); trying again in %.0fs", type(exc).__name__, exc,
                        self.interval)
            self._target = None
            self.loop.call_later(self.interval, self._due)

    def _begin(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_later(1.0, self._due)
            return
        head = self.store.change_seq()
        if self.on_disk is not None and head <= self.on_disk:
            self.loop.call_later(self.interval, self._due)  # nothing changed
            return
        self._target = head
        self._step()

    def _step(self) -> None:
        """Catch up a chunk; when at the target, take the copy and hand it to a thread."""
        try:
            if self._target is None:
                return
            if not self.exclusive and self.catch_up(CHUNK) < self._target:
                self.loop.call_soon(self._step)
                return
            payload, fields = self.copy()
            self._target = None
            self._thread = threading.Thread(target=self._write, args=(payload, fields),
                                            name="fastgate-snapshot", daemon=True)
            self._thread.start()
        except Exception as exc:
            log.warning("key snapshot not taken (%s: %s); trying again in %.0fs", type(exc).__name__, exc,
                        self.interval)
            self._target = None
        self.loop.call_later(self.interval, self._due)

    def catch_up(self, limit: int | None = None) -> int:
        """Apply the changes after the watermark (about limit keys; None: all); returns it."""
        ids, last = changed_keys(self.store, self.watermark, limit)
        if ids:
            replay(self.store, self.table, ids, self.slot_ids)
        self.watermark = max(self.watermark, last)
        return self.watermark

    def copy(self) -> tuple[bytes, dict]:
        """Synchronous, between two key writes: the key part and the change it reflects."""
        if self.exclusive:
            self.watermark = max(self.watermark, self.store.change_seq())
        payload = self.arena.export_keys()
        return payload, dict(secret=self.store.secret, layout=core.LAYOUT_VERSION,
                             key_capacity=self.arena.key_capacity, ext_bytes=self.arena.header()["ext_bytes"],
                             seq=self.watermark, seq_hash=audit_hash(self.store, self.watermark),
                             node=_node(self.config))

    def _write(self, payload: bytes, fields: dict) -> None:
        t0 = time.perf_counter()
        seq = fields["seq"]
        try:
            size = write(self.path, payload, **fields)
        except OSError as exc:
            log.warning("key snapshot %s not written: %s", self.path, exc)
            return
        self.on_disk = seq
        self.written += 1
        log.info("wrote key snapshot %s at change %d (%d MiB) in %.2fs", self.path, seq, size >> 20,
                 time.perf_counter() - t0)

    def final(self) -> None:
        """At a clean shutdown (the admin API has stopped): catch up, write, wait."""
        if not self.on:
            return
        try:
            if self._thread is not None:
                self._thread.join()
            if self.exclusive:
                self.watermark = max(self.watermark, self.store.change_seq())
            else:
                self.catch_up()
            if self.on_disk is not None and self.watermark <= self.on_disk:
                return
            self._write(*self.copy())
        except Exception as exc:
            log.warning("key snapshot not written at shutdown (%s: %s)", type(exc).__name__, exc)
