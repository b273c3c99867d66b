"""fastgate.admin.snapshot: the key snapshot behind fast start, against a real SQLite
store and real arenas: a round trip with changes made after the snapshot, every
reason a snapshot is not used (each still ends in a correct full load), and a crash
in the middle of writing one."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3

import pytest

from fastgate import config as cfg
from fastgate import core
from fastgate.admin import keysync, snapshot
from fastgate.keys import KeyRecord, KeyStore

pytestmark = pytest.mark.skipif(core.IMPLEMENTATION != "cython", reason="snapshots need the compiled core")

GET = core.method_bit(b"GET")
PEER = bytes([127, 0, 0, 1])


def _config(path, capacity=64, interval=30.0):
    return cfg.Config(keys=cfg.KeysConfig(store=str(path), capacity=capacity, snapshot_interval=interval))


def _arena_factory(config):
    kc = config.keys
    return lambda: core.Arena.create(key_capacity=kc.capacity, rate_capacity=16, ext_bytes=kc.ext_bytes)


class Node:
    """A store plus what the master and the admin process do with it, in this process."""

    def __init__(self, tmp_path, capacity=64):
        self.path = tmp_path / "keys.db"
        self.config = _config(self.path, capacity)
        self.store = KeyStore(str(self.path))
        self.keys: dict[str, str] = {}  # id -> key

    def create(self, name="k", slot=-1, **kw) -> str:
        kid = self.store.new_key_id()
        key = core.make_key(kid)
        self.store.create(KeyRecord(id=kid, name=name, slot=slot, digest=core.key_digest(self.store.secret,
                                                                                          key.encode()), **kw),
                          actor="test")
        self.keys[kid] = key
        return kid

    def start(self, capacity=None):
        """The master's load: (arena, table, how)."""
        config = self.config if capacity is None else _config(self.path, capacity)
        arena, n, _, how = snapshot.load(config, self.store, _arena_factory(config))
        return arena, core.KeyTable(arena, secret=self.store.secret), how

    def snapshot(self, arena):
        """What the admin process does at shutdown."""
        table = core.KeyTable(arena, secret=self.store.secret)
        s = snapshot.Snapshotter(self.config, self.store, table, arena)
        s.final()
        return s

    def answer(self, table, kid) -> int:
        return table.check_key(self.keys[kid].encode(), GET, b"/", PEER, keysync.now_ms())


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.store.close()


def _good(node, table, revoked=(), gone=(), denied=()):
    for kid in node.keys:
        want = (core.KEY_REVOKED if kid in revoked else core.NO_SUCH_KEY if kid in gone
                else core.SCOPE_DENIED if kid in denied else None)
        got = node.answer(table, kid)
        if want is None:
            assert got >= 0, (kid, got)
        else:
            assert got == want, (kid, got)


def test_round_trip_replays_changes_after_the_snapshot(node):
    a, b, c = node.create("a"), node.create("b"), node.create("c", scopes=["GET /"])
    arena, table, how = node.start()
    assert how == "full load" and len(table) == 3
    slots = node.store.id_slots()
    s = node.snapshot(arena)
    assert s.written == 1 and os.path.getsize(snapshot.path_for(node.config)) > snapshot.HEADER_SIZE
    assert os.stat(snapshot.path_for(node.config)).st_mode & 0o777 == 0o600
    # while the node is down: a revoke, a delete, a new key without a slot, an update
    node.store.revoke(a, "test")
    node.store.delete(b, "test")
    d = node.create("d")
    node.store.update(c, {"scopes": ["POST /"]}, "test")
    arena2, table2, how2 = node.start()
    assert how2.startswith("from snapshot") and "then 4 changed keys" in how2, how2
    _good(node, table2, revoked={a}, gone={b}, denied={c})  # the update of c's scopes reached it
    # the new key got a slot of its own, recorded in the store; the others kept theirs
    now = node.store.id_slots()
    assert now[c] == slots[c] and now[a] == slots[a] and now[d] not in (slots[a], slots[c])
    assert table2.meta(now[d]) and keysync.decode_meta(table2.meta(now[d]))[0] == d
    assert len(table2) == 3
    # and the next start, after a snapshot of that, needs no replay
    node.snapshot(arena2)
    _, table3, how3 = node.start()
    assert "then 0 changed keys" in how3
    _good(node, table3, revoked={a}, gone={b}, denied={c})


def _fallback(node, caplog, why: str, **start):
    with caplog.at_level(logging.INFO, logger="fastgate.keys"):
        caplog.clear()
        arena, table, how = node.start(**start)
    assert how == "full load"
    lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], lines
    return table


@pytest.fixture
def snapped(node):
    """Three keys, one revoked, and a good snapshot of them."""
    kids = [node.create(f"k{i}") for i in range(3)]
    node.store.revoke(kids[0], "test")
    arena, _, _ = node.start()
    node.snapshot(arena)
    return node, kids


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_no_snapshot(node, caplog):
    node.create()
    _fallback(node, caplog, "there is none")


def test_corrupt_byte(snapped, caplog):
    node, kids = snapped
    p = snapshot.path_for(node.config)
    with open(p, "rb") as f:
        f.seek(snapshot.HEADER_SIZE + 700)
        b = f.read(1)
    _patch(p, snapshot.HEADER_SIZE + 700, bytes([b[0] ^ 0x40]))
    _good(node, _fallback(node, caplog, "checksum"), revoked={kids[0]})


def test_truncated(snapped, caplog):
    node, kids = snapped
    p = snapshot.path_for(node.config)
    os.truncate(p, os.path.getsize(p) - 1)
    _good(node, _fallback(node, caplog, "truncated"), revoked={kids[0]})
    os.truncate(p, 100)
    _good(node, _fallback(node, caplog, "truncated"), revoked={kids[0]})


def test_other_secret(snapped, caplog, tmp_path):
    node, kids = snapped
    p = snapshot.path_for(node.config)
    arena = core.Arena.create(key_capacity=64, rate_capacity=16)
    snapshot.write(p, arena.export_keys(), secret=b"x" * 32, layout=core.LAYOUT_VERSION, key_capacity=64,
                   ext_bytes=arena.header()["ext_bytes"], seq=node.store.change_seq(),
                   seq_hash=snapshot.audit_hash(node.store, node.store.change_seq()), node="")
    _good(node, _fallback(node, caplog, "another server secret"), revoked={kids[0]})


def test_other_layout(snapped, caplog):
    node, kids = snapped
    _patch(snapshot.path_for(node.config), 12, (core.LAYOUT_VERSION + 1).to_bytes(4, "little"))
    _good(node, _fallback(node, caplog, "arena layout"), revoked={kids[0]})


def test_other_capacity(snapped, caplog):
    node, kids = snapped
    _good(node, _fallback(node, caplog, "key capacity 64", capacity=128), revoked={kids[0]})


def test_header_forged_without_the_secret(snapped, caplog):
    """A header edited to claim a later change number: the MAC covers the header too."""
    node, kids = snapped
    p = snapshot.path_for(node.config)
    seq = node.store.change_seq()
    _patch(p, 32, (seq - 1).to_bytes(8, "little"))  # the seq field
    node.store.revoke(kids[1], "test")  # a change a forged, earlier seq would replay anyway
    t = _fallback(node, caplog, "")
    _good(node, t, revoked={kids[0], kids[1]})


def test_store_behind(node, caplog, tmp_path):
    kids = [node.create(f"k{i}") for i in range(2)]
    backup = tmp_path / "backup.db"
    with sqlite3.connect(str(backup)) as dst:
        sqlite3.connect(str(node.path)).backup(dst)
    kids.append(node.create("later"))
    arena, _, _ = node.start()
    node.snapshot(arena)
    node.store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(node.path) + suffix):
            os.unlink(str(node.path) + suffix)
    shutil.copy(backup, node.path)
    node.store = KeyStore(str(node.path))
    t = _fallback(node, caplog, "the store is behind it")
    _good(node, t, gone={kids[2]})


def test_store_diverged(node, caplog, tmp_path):
    """Another store with the same change number (a restored backup that took other
    changes since): the audit hash at the snapshot's change tells them apart."""
    kids = [node.create(f"k{i}") for i in range(2)]
    backup = tmp_path / "backup.db"
    with sqlite3.connect(str(backup)) as dst:
        sqlite3.connect(str(node.path)).backup(dst)
    kids.append(node.create("later"))
    arena, _, _ = node.start()
    node.snapshot(arena)
    node.store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(node.path) + suffix):
            os.unlink(str(node.path) + suffix)
    shutil.copy(backup, node.path)
    node.store = KeyStore(str(node.path))
    kids.append(node.create("other"))  # the same change number as "later" had
    t = _fallback(node, caplog, "audit trail differs")
    _good(node, t, gone={kids[2]})


def test_too_many_changes(snapped, caplog, monkeypatch):
    node, kids = snapped
    monkeypatch.setattr(snapshot, "MAX_REPLAY", 2)
    more = [node.create(f"m{i}") for i in range(3)]
    _good(node, _fallback(node, caplog, "more than 2 keys changed"), revoked={kids[0]})
    assert all(node.answer(node.start()[1], k) >= 0 for k in more)


def test_slot_taken_by_another_key(snapped, caplog):
    """The store gives a changed key a slot that, in the snapshot, holds another key."""
    node, kids = snapped
    slots = node.store.id_slots()
    node.store.update(kids[2], {"name": "moved"}, "test")
    node.store.set_slots([(kids[2], slots[kids[1]])])
    t = _fallback(node, caplog, f"slot {slots[kids[1]]} holds key")
    _good(node, t, revoked={kids[0]})


def test_a_crash_mid_write_leaves_the_previous_snapshot(snapped, caplog):
    node, kids = snapped
    p = snapshot.path_for(node.config)
    with open(p, "rb") as f:
        before = f.read()
    node.store.revoke(kids[1], "test")
    arena, _, how = node.start()
    assert how.startswith("from snapshot")
    pid = os.fork()
    if pid == 0:  # the child dies half way through writing the next snapshot
        snapshot._CRASH_AFTER = "1000"
        try:
            while arena.writer_pid != os.getpid():  # handed over by the parent, as the master does
                pass
            node.store = KeyStore(str(node.path))  # a connection of its own, not the parent's
            node.snapshot(arena)
        finally:
            os._exit(1)
    arena.set_writer(pid)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 70
    arena.set_writer(os.getpid())
    with open(p, "rb") as f:
        assert f.read() == before
    leftovers = [f for f in os.listdir(os.path.dirname(p)) if ".snapshot.tmp." in f]
    assert leftovers
    _, table, how = node.start()
    assert how.startswith("from snapshot") and "then 1 changed keys" in how
    _good(node, table, revoked={kids[0], kids[1]})
    node.snapshot(arena)  # the next good write clears what the crash left
    assert not [f for f in os.listdir(os.path.dirname(p)) if ".snapshot.tmp." in f]


def test_admin_catch_up_in_chunks(snapped, monkeypatch):
    """The admin process catches up a few keys per loop turn: the watermark only
    passes changes it has applied."""
    node, kids = snapped
    arena, table, _ = node.start()
    s = snapshot.Snapshotter(node.config, node.store, table, arena)
    start = s.watermark
    new = [node.create(f"n{i}") for i in range(5)]
    assert s.catch_up(2) == start + 2
    assert node.answer(table, new[0]) >= 0 and node.answer(table, new[2]) == core.NO_SUCH_KEY
    assert s.catch_up() == node.store.change_seq()
    assert all(node.answer(table, k) >= 0 for k in new)
