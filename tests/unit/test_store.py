"""Key store: real SQLite files in tmp_path. Durability across reopen, the 0600 secret,
no plaintext key on disk, every method, pagination, and all-or-nothing failed writes.

The tests that go through the store's public interface run on both backends: the SQLite
store and the PostgreSQL one (a real server, tests/pg_kit.py); those that reach into
SQLite's files and pragmas use ``sqlite_store``. PostgreSQL-only checks: test_store_pg.py."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time

import msgspec
import pytest

from fastgate import core
from fastgate.keys import (
    Conflict,
    InvalidValue,
    KeyRecord,
    KeyStore,
    NotFound,
    StoreError,
    StoreUnavailable,
    parse_ts,
    ts_to_ms,
)


@pytest.fixture
def sqlite_store(tmp_path):
    s = KeyStore(str(tmp_path / "data" / "keys.db"))
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = KeyStore(str(tmp_path / "data" / "keys.db"))
    else:
        from fastgate.keys.store_pg import PgKeyStore

        s = PgKeyStore(request.getfixturevalue("pg_url"), node_id="test-node")
    yield s
    s.close()


def head_of(store):
    """The audit anchor as stored: the SQLite store's head file, the PostgreSQL head row."""
    if isinstance(store, KeyStore):
        return slurp(store.head_path)
    import psycopg

    with psycopg.connect(store.url) as c:
        return c.execute("SELECT seq, hash FROM audit_head").fetchall()


def stored_count(store, table) -> int:
    """Rows in a table, read behind the store's back."""
    if isinstance(store, KeyStore):
        return count(store.path, table)
    import psycopg

    with psycopg.connect(store.url) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def new_key(store: KeyStore, **fields) -> tuple[str, KeyRecord]:
    key = core.make_key(store.new_key_id())
    kid = core.key_id_of(key.encode()).decode()
    rec = KeyRecord(id=kid, name=fields.pop("name", "k"), digest=core.key_digest(store.secret, key.encode()), **fields)
    return key, rec


def raw(path):
    """A raw connection for inspecting the file behind the store's back."""
    return sqlite3.connect(str(path))


def slurp(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def count(path, table) -> int:
    c = raw(path)
    try:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        c.close()


# ---------------------------------------------------------------- files, modes, durability


def test_files_modes_and_pragmas(tmp_path):
    path = tmp_path / "a" / "b" / "keys.db"
    with KeyStore(str(path)) as s:
        assert len(s.secret) == 32
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(str(path) + ".secret").st_mode) == 0o600
        assert s._c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._c.execute("PRAGMA user_version").fetchone()[0] == 1
        _, rec = new_key(s)
        s.create(rec, "admin")
        assert stat.S_IMODE(os.stat(str(path) + ".audit-head").st_mode) == 0o600


def test_reopen_sees_committed_data_and_same_secret(tmp_path):
    path = str(tmp_path / "keys.db")
    s = KeyStore(path)
    key, rec = new_key(s, name="ci", owner="acme", scopes=["GET /orders/*"], metadata={"team": "x"})
    s.create(rec, "admin")
    s.revoke(rec.id, "admin")
    secret = s.secret
    s.close()
    with KeyStore(path) as s2:
        assert s2.secret == secret
        got = s2.get(rec.id)
        assert got is not None and got.owner == "acme" and got.metadata == {"team": "x"}
        assert got.revoked_at is not None
        assert got.digest == core.key_digest(s2.secret, key.encode())
        assert [e.event for e in s2.audit()] == ["created", "revoked"]


def test_secret_refused_when_group_or_world_readable(tmp_path):
    path = str(tmp_path / "keys.db")
    KeyStore(path).close()
    os.chmod(path + ".secret", 0o644)
    with pytest.raises(StoreError, match=r"mode 0644.*chmod 600"):
        KeyStore(path)
    os.chmod(path + ".secret", 0o600)
    KeyStore(path).close()


def test_missing_secret_with_keys_is_refused_not_regenerated(tmp_path):
    path = str(tmp_path / "keys.db")
    with KeyStore(path) as s:
        s.create(new_key(s)[1], "admin")
    os.unlink(path + ".secret")
    with pytest.raises(StoreError, match="secret .* is missing"):
        KeyStore(path)
    assert not os.path.exists(path + ".secret")


def test_unknown_schema_version_and_foreign_db(tmp_path):
    path = str(tmp_path / "keys.db")
    KeyStore(path).close()
    c = raw(path)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(StoreError, match="schema version 99"):
        KeyStore(path)
    other = str(tmp_path / "other.db")
    c = raw(other)
    c.execute("CREATE TABLE t (x)")
    c.close()
    with pytest.raises(StoreError, match="not a fastgate key store"):
        KeyStore(other)


def test_no_plaintext_key_in_db_or_wal(tmp_path):
    path = str(tmp_path / "keys.db")
    s = KeyStore(path)
    key, rec = new_key(s, name="secret-test")
    s.create(rec, "admin")
    key2 = core.make_key(rec.id)
    s.rotate(rec.id, core.key_digest(s.secret, key2.encode()), int(time.time() * 1000) + 60_000, "admin")
    secret_parts = [k.split("_", 2)[2].encode() for k in (key, key2)]
    # inspect while the WAL still holds the pages, then again after a checkpoint
    files = [path, path + "-wal", path + ".audit-head"]
    blobs = b"".join(slurp(f) for f in files if os.path.exists(f))
    assert rec.id.encode() in blobs  # sanity: we are looking at the right bytes
    for part in secret_parts:
        assert part[:20] not in blobs
    s.close()
    blob = slurp(path)
    for part in secret_parts:
        assert part[:20] not in blob


# ---------------------------------------------------------------- records


def test_create_get_public_and_record_shape(store):
    _, rec = new_key(store, name="ci", owner="acme", plan="free", scopes=["GET /x/*"], allow_cidrs=["10.0.0.0/8"],
                     deny_cidrs=["10.1.0.0/16"], limits=["5/second"], expires_at="2030-01-01T01:00:00+01:00",
                     metadata={"a": [1, 2]})
    out = store.create(rec, "admin")
    assert out.expires_at == "2030-01-01T00:00:00.000Z"
    assert out.created_at == out.updated_at and out.created_at.endswith("Z") and len(out.created_at) == 24
    assert store.get(rec.id) == out
    assert store.get("nope") is None
    pub = out.public()
    assert set(pub) == {"id", "name", "owner", "plan", "scopes", "allow_cidrs", "deny_cidrs", "limits",
                        "expires_at", "metadata", "created_at", "updated_at"}
    assert "digest" not in msgspec.json.encode(pub).decode()
    bare = store.create(new_key(store)[1], "admin").public()
    assert "owner" not in bare and "revoked_at" not in bare and bare["scopes"] == []
    # msgspec encoding omits None defaults
    assert b'"owner"' not in msgspec.json.encode(store.get(bare["id"]))


def test_new_key_id_shape(store):
    ids = {store.new_key_id() for _ in range(200)}
    assert len(ids) == 200
    for kid in ids:
        assert len(kid) == 16 and kid.isalnum() and kid.isascii()
        core.make_key(kid)  # accepted by the core's key format


def test_create_validates(store):
    _, rec = new_key(store)
    for bad, msg in [
        (msgspec.structs.replace(rec, id="has_underscore"), "id"),
        (msgspec.structs.replace(rec, id="x" * 33), "id"),
        (msgspec.structs.replace(rec, digest=b"short"), "digest"),
        (msgspec.structs.replace(rec, name=""), "name"),
        (msgspec.structs.replace(rec, scopes="GET /x"), "scopes"),
        (msgspec.structs.replace(rec, expires_at="2030-01-01"), "expires_at"),
        (msgspec.structs.replace(rec, expires_at="2030-01-01T00:00:00"), "timezone"),
        (msgspec.structs.replace(rec, metadata={"x": object()}), "metadata"),
    ]:
        with pytest.raises(InvalidValue, match=msg):
            store.create(bad, "admin")
    assert store.count() == 0 and store.audit() == []


def test_records_follow_the_admin_api_types(store):
    """The store checks a record with the field types the admin API decodes its bodies with
    (fastgate.types), so it holds nothing the API would refuse and nothing the core cannot
    compile when the next start loads every key."""
    _, rec = new_key(store)
    for field, bad, msg in [
        ("scopes", ["GET /x", "get /y"], "scopes[1]: expected 'METHOD[,METHOD] /path'"),
        ("scopes", [f"GET /{i}" for i in range(257)], "scopes: Expected `array` of length <= 256"),
        ("allow_cidrs", ["10.0.0.0/33"], "allow_cidrs[0]: expected an IPv4 or IPv6 address or CIDR"),
        ("deny_cidrs", ["fe80::1%eth0"], "deny_cidrs[0]: expected an IPv4 or IPv6 address"),
        ("limits", ["1/second", "2/second"], "limits[1]: a second limit is already set at limits[0]"),
        ("limits", ["10 / second"], "limits[0]: expected N/second|minute|hour|day|month"),
        ("name", "x" * 201, "name: Expected `str` of length <= 200"),
        ("metadata", {f"k{i}": i for i in range(33)}, "metadata: Expected `object` of length <= 32"),
        ("metadata", {"a": {"b": {"c": 1}}}, "metadata[...][...]: Expected"),
    ]:
        with pytest.raises(InvalidValue) as exc:
            store.create(msgspec.structs.replace(rec, **{field: bad}), "admin")
        assert str(exc.value).startswith(msg), (field, str(exc.value))
    assert store.count() == 0 and store.audit() == []
    # every problem of a field at once; the stored form is the canonical one
    with pytest.raises(InvalidValue) as exc:
        store.create(msgspec.structs.replace(rec, allow_cidrs=["x.y", "10.0.0.0/8", "nope"]), "admin")
    assert [p.split(":")[0] for p in str(exc.value).split("; ")] == ["allow_cidrs[0]", "allow_cidrs[2]"]
    out = store.create(msgspec.structs.replace(rec, allow_cidrs=["10.1.2.3/8", "::1"]), "admin")
    assert out.allow_cidrs == ["10.0.0.0/8", "::1/128"] and store.get(rec.id).allow_cidrs == out.allow_cidrs
    with pytest.raises(InvalidValue, match=r"^deny_cidrs\[0\]: expected"):
        store.update(rec.id, {"deny_cidrs": ["10.0.0.0/33"]}, "admin")
    assert store.update(rec.id, {"deny_cidrs": ["10.0.0.9/24"]}, "admin").deny_cidrs == ["10.0.0.0/24"]


def test_bulk_import_checks_every_record(store):
    good = [new_key(store)[1] for _ in range(5)]
    _, bad = new_key(store, scopes=["GET /x/*", "GET x"])
    with pytest.raises(InvalidValue) as exc:
        store.bulk_import([*good, bad], "migration", batch=2)
    assert str(exc.value) == (f"bulk import: record {bad.id!r}: scopes[1]: expected 'METHOD[,METHOD] /path' (methods "
                              "in capitals, or '*'; one space; the path starts with '/', has no spaces, and '*' only "
                              "at its end), found 'GET x'; nothing was imported")
    _, stale = new_key(store)
    with pytest.raises(InvalidValue, match="created_at: expected an RFC 3339 timestamp"):
        store.bulk_import([msgspec.structs.replace(stale, created_at="yesterday")], "migration")
    assert store.count() == 0 and store.audit() == [] and store.verify_audit() == (True, [], 0)
    _, cidr = new_key(store, allow_cidrs=["10.1.2.3/8"], created_at="2020-01-01T01:00:00+01:00")
    assert store.bulk_import([*good, cidr], "migration") == 6
    got = store.get(cidr.id)
    assert got.allow_cidrs == ["10.0.0.0/8"] and got.created_at == "2020-01-01T00:00:00.000Z"


def test_failed_write_changes_nothing(store):
    _, rec = new_key(store)
    store.create(rec, "admin")
    head = head_of(store)
    _, other = new_key(store)
    dup = msgspec.structs.replace(other, id=rec.id, name="dup")
    with pytest.raises(Conflict):
        store.create(dup, "admin")
    assert store.get(rec.id).name == "k"
    assert store.count() == 1 and len(store.audit()) == 1
    assert head_of(store) == head
    assert store.verify_audit()[0]
    # a failing bulk import leaves neither rows nor audit events
    batch = [new_key(store)[1] for _ in range(5)] + [msgspec.structs.replace(other, id=rec.id)]
    with pytest.raises(Conflict):
        store.bulk_import(batch, "migration")
    assert store.count() == 1 and len(store.audit(limit=1000)) == 1
    assert store.verify_audit() == (True, [], 1)
    # the raw file agrees (nothing half-written behind the store's cache)
    assert stored_count(store, "keys") == 1 and stored_count(store, "audit") == 1


def _unchanged(store, rec) -> None:
    assert store.count() == 1 and len(store.audit()) == 1 and store.get(rec.id).name == "k"
    assert store.verify_audit() == (True, [], 1)


def test_full_disk_read_only_and_locked_are_store_unavailable(sqlite_store, monkeypatch):
    store = sqlite_store
    _, rec = new_key(store)
    store.create(rec, "admin")
    # disk full while writing the audit anchor (ENOSPC): nothing committed
    import fastgate.keys.store as store_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(store_mod, "write_head", full)
        for call in (lambda: store.create(new_key(store)[1], "admin"), lambda: store.revoke(rec.id, "admin"),
                     lambda: store.update(rec.id, {"name": "z"}, "admin")):
            with pytest.raises(StoreUnavailable, match="No space left on device"):
                call()
    _unchanged(store, rec)
    # SQLite itself full (SQLITE_FULL): the database may not grow by a page
    pages = store._c.execute("PRAGMA page_count").fetchone()[0]
    store._c.execute(f"PRAGMA max_page_count = {pages}")
    # (a valid record: the store refuses one the admin API could not have sent)
    big = msgspec.structs.replace(new_key(store)[1], scopes=[f"GET /{i}/{'x' * 1000}" for i in range(256)])
    with pytest.raises(StoreUnavailable, match="SQLITE_FULL"):
        store.create(big, "admin")
    store._c.execute("PRAGMA max_page_count = 4294967294")
    _unchanged(store, rec)
    # another writer holds the lock past the busy timeout (SQLITE_BUSY)
    store._c.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.revoke(rec.id, "admin")
        other.execute("ROLLBACK")
    finally:
        other.close()
    _unchanged(store, rec)
    # and once it is fixed, writes work again
    store.create(new_key(store)[1], "admin")
    assert store.count() == 2 and store.verify_audit()[0]


def test_unavailable_classification():
    from fastgate.keys.store import unavailable

    def err(code, cls=sqlite3.OperationalError):
        e = cls("x")
        e.sqlite_errorcode = code
        return e

    for code in (5, 6, 8, 10, 13, 14, 26, 10 | (3 << 8)):  # BUSY LOCKED READONLY IOERR FULL CANTOPEN NOTADB IOERR_WRITE
        assert unavailable(err(code)), code
    for code in (1, 19, 20, 21, 25):  # ERROR CONSTRAINT MISMATCH MISUSE RANGE: bugs or bad input, not the disk
        assert not unavailable(err(code)), code
    assert unavailable(OSError(errno.ENOSPC, "full")) and unavailable(OSError(errno.EROFS, "ro"))
    assert not unavailable(ValueError("x"))


def test_names_owners_plans_refuse_control_characters(store):
    for field, bad in (("name", "a\x1b[2J"), ("owner", "x\u202ey"), ("plan", "p\n"), ("name", "  ")):
        _, rec = new_key(store, **{field: bad} if field != "name" else {})
        rec = msgspec.structs.replace(rec, **{field: bad})
        with pytest.raises(InvalidValue, match=field):
            store.create(rec, "admin")
    _, rec = new_key(store)
    with pytest.raises(InvalidValue, match="metadata: key"):
        store.create(msgspec.structs.replace(rec, metadata={"a\x00": 1}), "admin")
    store.create(msgspec.structs.replace(rec, metadata={"note": "two\nlines"}), "admin")  # values may
    with pytest.raises(InvalidValue, match="owner"):
        store.update(rec.id, {"owner": "\u2066"}, "admin")
    assert store.count() == 1


def test_seconds_records_of_older_releases_read_in_milliseconds(sqlite_store):
    store = sqlite_store
    _, rec = new_key(store, expires_at="2020-01-01T00:00:00Z")
    store.create(rec, "admin")
    c = raw(store.path)  # as an older release wrote them: whole seconds
    try:
        c.execute("UPDATE keys SET expires_at = '2000-01-01T00:00:20Z', created_at = '2000-01-01T00:00:01Z'")
        c.commit()
    finally:
        c.close()
    old = store.get(rec.id)
    assert old.public()["expires_at"] == "2000-01-01T00:00:20.000Z"
    assert old.public()["created_at"] == "2000-01-01T00:00:01.000Z"
    # due within the very second it expires (text order alone would wait for the next one)
    assert store.due_expired(now="2000-01-01T00:00:20.500Z") == [rec.id]
    assert store.due_expired(now="2000-01-01T00:00:19.999Z") == []


def test_not_found(store):
    for call in (lambda: store.update("nope", {"name": "x"}, "a"), lambda: store.revoke("nope", "a"),
                 lambda: store.rotate("nope", b"d" * 32, 0, "a"), lambda: store.delete("nope", "a"),
                 lambda: store.mark_expired("nope")):
        with pytest.raises(NotFound):
            call()
    assert store.audit() == []


def test_update_records_changed_fields(store):
    _, rec = new_key(store, name="a", scopes=["GET /x"])
    store.create(rec, "admin")
    out = store.update(rec.id, {"name": "b", "scopes": ["GET /x"], "plan": "pro", "metadata": {"k": 1},
                                "expires_at": "2031-05-05T05:05:05.9+00:00"}, "alice")
    assert (out.name, out.plan, out.metadata, out.expires_at) == ("b", "pro", {"k": 1}, "2031-05-05T05:05:05.900Z")
    assert store.get(rec.id) == out
    ev = store.audit(key_id=rec.id)[-1]
    assert (ev.event, ev.actor) == ("updated", "alice")
    assert ev.changes == {"name": {"old": "a", "new": "b"}, "plan": {"old": None, "new": "pro"},
                          "metadata": {"old": {}, "new": {"k": 1}},
                          "expires_at": {"old": None, "new": "2031-05-05T05:05:05.900Z"}}  # scopes unchanged
    # no-op update: no event
    store.update(rec.id, {"name": "b"}, "alice")
    assert len(store.audit(key_id=rec.id)) == 2
    for bad in ({"digest": b"x" * 32}, {"id": "other"}, {"created_at": "2020-01-01T00:00:00Z"}, {"slot": 3},
                {"limits": [5]}, {"owner": 7}):
        with pytest.raises(InvalidValue):
            store.update(rec.id, bad, "alice")
    assert len(store.audit(key_id=rec.id)) == 2


def test_rotate_keeps_previous_digest_for_the_grace(store):
    _, rec = new_key(store)
    store.create(rec, "admin")
    until = int(time.time() * 1000) + 3_600_000
    d2 = b"\x02" * 32
    out = store.rotate(rec.id, d2, until, "admin")
    assert (out.digest, out.prev_digest, out.grace_until_ms) == (d2, rec.digest, until)
    assert store.get(rec.id) == out
    ev = store.audit(key_id=rec.id)[-1]
    assert ev.event == "rotated" and ev.changes == {"previous_valid_until": time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(until // 1000)) + f".{until % 1000:03d}Z"}
    assert out.public()["grace_until"] == ev.changes["previous_valid_until"]
    out = store.rotate(rec.id, b"\x03" * 32, 0, "admin")  # no grace: the old digest goes at once
    assert (out.prev_digest, out.grace_until_ms) == (None, 0)
    with pytest.raises(InvalidValue):
        store.rotate(rec.id, b"short", 0, "admin")
    store.revoke(rec.id, "admin")
    with pytest.raises(Conflict, match="revoked"):
        store.rotate(rec.id, b"\x04" * 32, 0, "admin")


def test_revoke_is_idempotent(store):
    _, rec = new_key(store)
    store.create(rec, "admin")
    a = store.revoke(rec.id, "admin")
    b = store.revoke(rec.id, "someone-else")
    assert a.revoked_at and a.revoked_at == b.revoked_at
    assert [e.event for e in store.audit(key_id=rec.id)] == ["created", "revoked"]
    assert store.get(rec.id).public()["revoked_at"] == a.revoked_at


def test_delete_keeps_history(store):
    _, rec = new_key(store, name="gone", owner="acme")
    store.create(rec, "admin")
    store.delete(rec.id, "admin")
    assert store.get(rec.id) is None
    ev = store.audit(key_id=rec.id)
    assert [e.event for e in ev] == ["created", "deleted"]
    assert ev[-1].changes["name"] == "gone" and ev[-1].changes["owner"] == "acme"


def test_mark_expired_once_per_expiry(store):
    _, rec = new_key(store, expires_at="2020-01-01T00:00:00Z")
    _, live = new_key(store, expires_at="2999-01-01T00:00:00Z")
    _, never = new_key(store)
    for r in (rec, live, never):
        store.create(r, "admin")
    assert store.due_expired() == [rec.id]
    assert store.mark_expired(rec.id) is True
    assert store.mark_expired(rec.id) is False
    assert store.mark_expired(live.id) is False and store.mark_expired(never.id) is False
    assert store.due_expired() == []
    ev = store.audit(key_id=rec.id)[-1]
    assert (ev.event, ev.actor, ev.changes) == ("expired", "system", {"expires_at": "2020-01-01T00:00:00.000Z"})
    # extended, then expired again: a new event
    store.update(rec.id, {"expires_at": "2021-01-01T00:00:00Z"}, "admin")
    assert store.mark_expired(rec.id, actor="sweeper") is True
    assert [e.event for e in store.audit(key_id=rec.id)].count("expired") == 2


def test_slots(store):
    recs = [new_key(store)[1] for _ in range(3)]
    for r in recs:
        store.create(r, "admin")
    n = len(store.audit())
    store.set_slot(recs[0].id, 7)
    store.set_slots([(recs[1].id, 8), (recs[2].id, 9)])
    assert store.id_slots() == {recs[0].id: 7, recs[1].id: 8, recs[2].id: 9}
    assert store.by_slot(8).id == recs[1].id and store.by_slot(99) is None
    assert store.get(recs[0].id).slot == 7
    store.set_slot(recs[0].id, -1)
    assert recs[0].id not in store.id_slots() and store.get(recs[0].id).slot == -1
    assert len(store.audit()) == n  # slots are not audited


def test_list_pagination_and_owner(store):
    recs = []
    for i in range(25):
        _, r = new_key(store, name=f"k{i}", owner="acme" if i % 2 else "globex")
        recs.append(store.create(r, "admin"))
    ids = sorted(r.id for r in recs)
    pages, after = [], None
    while page := store.list(limit=10, after=after):
        pages.append([r.id for r in page])
        after = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == ids
    acme = store.list(owner="acme", limit=100)
    assert [r.id for r in acme] == sorted(r.id for r in recs if r.owner == "acme")
    assert [r.id for r in store.list(owner="acme", limit=3, after=acme[2].id)] == [r.id for r in acme[3:6]]
    with pytest.raises(InvalidValue):
        store.list(limit=0)


def test_iter_all_and_bulk_import(store):
    recs = [new_key(store, name=f"n{i}", scopes=["GET /a/*"] if i % 3 == 0 else [], slot=i)[1] for i in range(50)]
    assert store.bulk_import(iter(recs), "migration", batch=7) == 50
    got = list(store.iter_all(batch=16))
    assert [r.id for r in got] == sorted(r.id for r in recs)
    by_id = {r.id: r for r in recs}
    for g in got:
        want = by_id[g.id]
        assert (g.name, g.scopes, g.digest, g.slot) == (want.name, want.scopes, want.digest, want.slot)
        assert g.created_at and g.updated_at
    assert len(store.id_slots()) == 50
    ev = store.audit(limit=1000)
    assert len(ev) == 50 and {e.event for e in ev} == {"created"} and {e.actor for e in ev} == {"migration"}
    assert store.verify_audit() == (True, [], 50)
    # an abandoned iterator releases its snapshot; writes go on meanwhile
    it = store.iter_all()
    next(it)
    store.revoke(recs[0].id, "admin")
    it.close()


def test_closed_store_raises(tmp_path):
    s = KeyStore(str(tmp_path / "keys.db"))
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("x")


def test_timestamps():
    assert parse_ts("2030-01-01T00:00:00Z") == "2030-01-01T00:00:00.000Z"
    assert parse_ts("2030-01-01t05:30:00.123+05:30") == "2030-01-01T00:00:00.123Z"
    assert parse_ts("2026-12-01T21:43:20.9309999z") == "2026-12-01T21:43:20.930Z"  # truncated, never rounded up
    assert ts_to_ms("1970-01-01T00:00:10Z") == 10_000
    assert ts_to_ms("1970-01-01T00:00:10.001Z") == 10_001
    for bad in ("yesterday", "2030-01-01", "2030-01-01T00:00:00", 5, "2030-01-01 00:00:00Z", "2030-02-30T00:00:00Z",
                "2030-01-01T24:00:00Z", "2030-01-01T00:00:00+24:00", " 2030-01-01T00:00:00Z"):
        with pytest.raises(InvalidValue):
            parse_ts(bad)
