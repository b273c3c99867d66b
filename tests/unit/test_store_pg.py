"""The PostgreSQL key store against a real server (tests/pg_kit.py), beyond the interface
tests test_store.py runs on both backends: versioned schema, the shared secret, per-node
slots, change numbers, one valid chain under concurrent writers, tamper detection (done
with a raw superuser connection, as an attacker would), a server restart mid-run, and the
SQLite -> PostgreSQL migration round trip."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from fastgate import core
from fastgate.keys import KeyRecord, KeyStore, StoreError, StoreUnavailable, open_store
from fastgate.keys.audit import ZERO_HASH, chain_hash
from fastgate.keys.store_pg import SCHEMA_VERSION_PG, PgKeyStore, verify_url

ROOT = Path(__file__).resolve().parents[2]


def new_key(store, **fields) -> tuple[str, KeyRecord]:
    key = core.make_key(store.new_key_id())
    kid = core.key_id_of(key.encode()).decode()
    return key, KeyRecord(id=kid, name=fields.pop("name", "k"), digest=core.key_digest(store.secret, key.encode()),
                          **fields)


def sql(url, *statements, params=None):
    with psycopg.connect(url, autocommit=True) as c:
        out = None
        for s in statements:
            cur = c.execute(s, params if params and "%s" in s else None)
            out = cur.fetchall() if cur.description else None
        return out


@pytest.fixture
def pstore(pg_url):
    s = PgKeyStore(pg_url, node_id="n1")
    yield s
    s.close()


def history(s) -> list[str]:
    """Seven events on three keys; returns the ids."""
    a = s.create(new_key(s, name="a")[1], "admin")
    b = s.create(new_key(s, name="b")[1], "admin")
    s.update(a.id, {"name": "a2", "plan": "pro"}, "alice")
    s.rotate(a.id, b"\x01" * 32, 0, "alice")
    s.revoke(b.id, "bob")
    c = s.create(new_key(s, name="c")[1], "admin")
    s.delete(b.id, "bob")
    return [a.id, b.id, c.id]


# ---------------------------------------------------------------- schema, secret, slots


def test_schema_is_versioned_and_migrated_once(pg_url):
    with open_store(pg_url, node_id="n1") as s:
        assert isinstance(s, PgKeyStore) and s.schema_version() == SCHEMA_VERSION_PG
    with open_store(pg_url, node_id="n2") as s:  # a second start migrates nothing
        assert s.schema_version() == SCHEMA_VERSION_PG
    versions = sql(pg_url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION_PG + 1)]
    sql(pg_url, "INSERT INTO schema_version (version, description) VALUES (99, 'from the future')")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        PgKeyStore(pg_url)


def test_foreign_database_and_bad_url_are_refused(pg, pg_url):
    sql(pg_url, "CREATE TABLE keys (x int)")
    with pytest.raises(StoreError, match="not a fastgate key store"):
        PgKeyStore(pg_url)
    with pytest.raises(StoreError, match="expected a URL postgresql://"):
        PgKeyStore("mysql://u:secret@h/db")
    # nothing listens there: unavailable, and the password is never in the message
    with pytest.raises(StoreUnavailable) as exc:
        PgKeyStore(f"postgresql://fastgate:hunter2@127.0.0.1:{pg.port + 1 if pg.port < 65535 else 1}/x",
                   connect_timeout=2)
    assert "hunter2" not in str(exc.value) and "***" in str(exc.value)


def test_secret_is_shared_by_every_node_and_never_reminted(pg_url):
    a = PgKeyStore(pg_url, node_id="a")
    b = PgKeyStore(pg_url, node_id="b")
    try:
        assert a.secret == b.secret and len(a.secret) == 32
        key, rec = new_key(a)
        a.create(rec, "admin")
        # a key made on node a is checked on node b with b's secret: the same digest
        assert b.get(rec.id).digest == core.key_digest(b.secret, key.encode())
    finally:
        a.close()
        b.close()
    sql(pg_url, "DELETE FROM store_secret")
    with pytest.raises(StoreError, match="secret .* is missing but .* holds 1 keys"):
        PgKeyStore(pg_url)


def test_no_plaintext_key_in_the_database(pstore):
    key, rec = new_key(pstore, name="plain")
    pstore.create(rec, "admin")
    key2 = core.make_key(rec.id)
    pstore.rotate(rec.id, core.key_digest(pstore.secret, key2.encode()), int(time.time() * 1000) + 60_000, "admin")
    dump = " ".join(str(r) for t in ("keys", "audit", "key_slots", "audit_head")
                    for r in sql(pstore.url, f"SELECT t::text FROM {t} t"))
    for k in (key, key2):
        secret_part = k.rsplit("_", 1)[-1]
        assert k not in dump and secret_part[:20] not in dump
    assert rec.id in dump  # the id is not secret; the dump is real


def test_slots_are_per_node(pg_url):
    a = PgKeyStore(pg_url, node_id="a")
    b = PgKeyStore(pg_url, node_id="b")
    try:
        recs = [a.create(new_key(a)[1], "admin") for _ in range(3)]
        a.set_slots([(recs[0].id, 0), (recs[1].id, 1), ("nosuchkey", 5)])
        b.set_slots([(recs[0].id, 7), (recs[2].id, 0)])
        assert a.id_slots() == {recs[0].id: 0, recs[1].id: 1}
        assert b.id_slots() == {recs[0].id: 7, recs[2].id: 0}
        assert a.get(recs[0].id).slot == 0 and b.get(recs[0].id).slot == 7 and b.get(recs[1].id).slot == -1
        assert b.by_slot(0).id == recs[2].id and a.by_slot(0).id == recs[0].id
        a.delete(recs[0].id, "admin")  # a deleted key leaves no slot behind on any node
        assert recs[0].id not in b.id_slots()
    finally:
        a.close()
        b.close()


def test_change_numbers(pstore, tmp_path):
    ids = history(pstore)
    changes = pstore.changes_since(0)
    assert [seq for seq, _ in changes] == list(range(1, 8)) and pstore.change_seq() == 7
    assert [k for _, k in changes] == [e.key_id for e in pstore.audit(limit=100)]
    assert pstore.changes_since(5) == changes[5:] and pstore.changes_since(7) == []
    # each record carries the number of its last change
    rows = dict(sql(pstore.url, "SELECT id, change_seq FROM keys"))
    assert rows == {ids[0]: 4, ids[2]: 6}
    # the SQLite store numbers its changes the same way
    with KeyStore(str(tmp_path / "keys.db")) as s:
        history(s)
        assert [seq for seq, _ in s.changes_since(0)] == list(range(1, 8)) and s.change_seq() == 7


# ---------------------------------------------------------------- concurrent writers


def test_concurrent_writers_keep_one_valid_chain(pg_url):
    """Four writers, each with its own store (its own connection), as four nodes: one
    gap-free chain in commit order, every change numbered once."""
    PgKeyStore(pg_url).close()  # schema and secret first, as the first node would
    per, errors, made = 15, [], []

    def writer(n: int) -> None:
        try:
            with PgKeyStore(pg_url, node_id=f"node{n}") as s:
                for i in range(per):
                    rec = s.create(new_key(s, name=f"w{n}-{i}")[1], f"node{n}")
                    s.update(rec.id, {"owner": f"o{n}"}, f"node{n}")
                    made.append(rec.id)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    with PgKeyStore(pg_url) as s:
        assert s.verify_audit() == (True, [], 4 * per * 2)
        events = s.audit(limit=1000)
        assert [e.seq for e in events] == list(range(1, 4 * per * 2 + 1))
        assert sorted({e.actor for e in events}) == [f"node{n}" for n in range(4)]
        assert s.count() == len(made) == 4 * per
        assert [seq for seq, _ in s.changes_since(0, limit=1000)] == list(range(1, 4 * per * 2 + 1))


# ---------------------------------------------------------------- tamper detection


@pytest.fixture
def chain(pg_url):
    with PgKeyStore(pg_url) as s:
        history(s)
    return pg_url


def tamper(url, *statements, params=None):
    """As a superuser attacker: switch the append-only triggers off first."""
    sql(url, "ALTER TABLE audit DISABLE TRIGGER USER", "ALTER TABLE audit_head DISABLE TRIGGER USER",
        *statements, params=params)


def verify(url):
    with PgKeyStore(url) as s:
        return s.verify_audit()


def test_audit_is_append_only_in_sql_too(chain):
    for stmt in ("UPDATE audit SET actor = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 1",
                 "TRUNCATE audit", "UPDATE audit_head SET seq = 3", "DELETE FROM audit_head"):
        with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="append-only|only moves forward"):
            sql(chain, stmt)
    assert verify(chain) == (True, [], 7)


def test_detects_edited_deleted_reordered_truncated_and_appended_rows(pg):
    def fresh():
        url = pg.new_database()
        with PgKeyStore(url) as s:
            history(s)
        return url

    url = fresh()
    tamper(url, "UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    ok, problems, _ = verify(url)
    assert not ok and any("seq 3" in p and "edited" in p for p in problems)

    url = fresh()
    row = sql(url, "SELECT seq, ts, actor, event, key_id, changes, prev_hash FROM audit WHERE seq = 3")[0]
    forged = chain_hash(row[6], row[0], row[1], "mallory", row[3], row[4], row[5])
    tamper(url, "UPDATE audit SET actor = 'mallory', hash = %s WHERE seq = 3", params=(forged,))
    ok, problems, _ = verify(url)
    assert not ok and any("seq 4" in p and "prev_hash" in p for p in problems)

    url = fresh()
    tamper(url, "DELETE FROM audit WHERE seq = 4")
    ok, problems, rows = verify(url)
    assert not ok and rows == 6 and any("seq 5" in p and "4 are missing" in p for p in problems)

    url = fresh()
    tamper(url, "UPDATE audit a SET actor = b.actor, ts = b.ts, event = b.event, key_id = b.key_id, "
                "changes = b.changes, prev_hash = b.prev_hash, hash = b.hash FROM audit b "
                "WHERE a.seq IN (2, 3) AND b.seq = 5 - a.seq")
    ok, problems, _ = verify(url)
    assert not ok and any("seq 2" in p for p in problems) and any("seq 3" in p for p in problems)

    url = fresh()
    tamper(url, "DELETE FROM audit WHERE seq >= 6")
    ok, problems, rows = verify(url)
    assert not ok and rows == 5 and any("truncated" in p and "seq 7" in p for p in problems)

    url = fresh()  # the whole chain re-forged from seq 2 on: the head no longer matches
    rows = sql(url, "SELECT seq, ts, actor, event, key_id, changes FROM audit ORDER BY seq")
    prev, new = ZERO_HASH, []
    for seq, ts, actor, event, key_id, changes in rows:
        actor = "mallory" if seq == 2 else actor
        h = chain_hash(prev, seq, ts, actor, event, key_id, changes)
        new.append((actor, prev, h, seq))
        prev = h
    sql(url, "ALTER TABLE audit DISABLE TRIGGER USER")
    with psycopg.connect(url, autocommit=True) as c:
        c.cursor().executemany("UPDATE audit SET actor = %s, prev_hash = %s, hash = %s WHERE seq = %s", new)
    ok, problems, _ = verify(url)
    assert not ok and problems == ["seq 7: hash differs from the audit head's (the chain was rewritten)"]

    url = fresh()  # appended behind fastgate's back (without moving the head)
    last = sql(url, "SELECT hash FROM audit WHERE seq = 7")[0][0]
    h = chain_hash(last, 8, "2030-01-01T00:00:00Z", "mallory", "created", "x", "{}")
    sql(url, "INSERT INTO audit VALUES (8, '2030-01-01T00:00:00Z', 'mallory', 'created', 'x', '{}', %s, %s)",
        params=(last, h))
    ok, problems, _ = verify(url)
    assert not ok and any("past the audit head" in p for p in problems)

    # `fastgate audit verify` reports it on PostgreSQL as on SQLite (exit 1, JSON too)
    out = io.StringIO()
    assert verify_url(url, as_json=True, out=out) == 1 and json.loads(out.getvalue())["ok"] is False
    out = io.StringIO()
    assert verify_url(chain_url := fresh(), out=out) == 0 and "audit trail OK: 7 events" in out.getvalue()
    assert verify_url(chain_url.rsplit("/", 1)[0] + "/nosuchdb", out=io.StringIO()) == 2


# ---------------------------------------------------------------- the server goes away


def test_restart_mid_run_fails_cleanly_then_works(pg, pg_url):
    s = PgKeyStore(pg_url, node_id="n1", connect_timeout=2)
    try:
        first = s.create(new_key(s)[1], "admin")
        pg.stop("immediate")  # a crash, not a polite shutdown
        try:
            for call in (lambda: s.create(new_key(s)[1], "admin"), lambda: s.revoke(first.id, "admin"),
                         lambda: s.update(first.id, {"name": "z"}, "admin"), lambda: s.get(first.id),
                         lambda: s.set_slot(first.id, 3)):
                with pytest.raises(StoreUnavailable):
                    call()
        finally:
            pg.start()
        second = s.create(new_key(s)[1], "admin")  # reconnects by itself
        s.revoke(first.id, "admin")
        assert s.get(first.id).revoked_at and s.get(second.id)
        assert s.verify_audit() == (True, [], 3)
        assert [e.event for e in s.audit()] == ["created", "created", "revoked"]
    finally:
        s.close()


# ---------------------------------------------------------------- migration


def fastgate(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def sqlite_with_history(path) -> dict[str, str]:
    """A single node's store: keys made the way the admin API makes them. {id: key}."""
    keys = {}
    with KeyStore(str(path)) as s:
        for name in ("alpha", "beta", "gamma"):
            key, rec = new_key(s, name=name, owner="acme", scopes=["GET /x/*"], limits=["5/second"],
                               expires_at="2020-01-01T00:00:00Z" if name == "gamma" else None)
            s.create(rec, "admin")
            keys[rec.id] = key
        ids = list(keys)
        s.revoke(ids[1], "admin")
        assert s.mark_expired(ids[2]) is True
        s.set_slot(ids[0], 4)
    return keys


def test_migrate_round_trip(tmp_path, pg, pg_url):
    src = tmp_path / "node" / "keys.db"
    keys = sqlite_with_history(src)
    with KeyStore(str(src)) as s:
        src_events = s.audit(limit=100)
        src_secret = s.secret
    # a node that started on the empty database first minted its own secret: it is replaced
    PgKeyStore(pg_url).close()
    p = fastgate("store", "migrate", "--from", f"sqlite:{src}", "--to", pg_url)
    assert p.returncode == 0, p.stderr
    assert "migrated 3 keys and 5 audit events" in p.stdout and "audit chain verified" in p.stdout

    with PgKeyStore(pg_url, node_id="n1") as t:
        assert t.secret == src_secret
        assert t.audit(limit=100) == src_events  # the same chain, row for row
        assert t.verify_audit() == (True, [], 5) and t.change_seq() == 5
        ids = list(keys)
        for kid, key in keys.items():  # every key still authenticates: same digest, same secret
            assert t.get(kid).digest == core.key_digest(t.secret, key.encode())
        assert t.get(ids[1]).revoked_at is not None
        assert t.due_expired() == [] and t.mark_expired(ids[2]) is False  # its expiry was logged already
        assert t.id_slots() == {}  # slots belong to a node's shared memory: not copied
        t.revoke(ids[0], "admin")  # the cluster goes on writing the same chain
    assert fastgate("audit", "verify", "--store", pg_url).returncode == 0

    # re-run: the target holds this chain (and one newer event): nothing to do
    p = fastgate("store", "migrate", "--from", f"sqlite:{src}", "--to", pg_url, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["already_migrated"] is True and doc["newer_events"] == 1
    # another store into the same target: refused, nothing changed
    other = tmp_path / "other" / "keys.db"
    sqlite_with_history(other)
    p = fastgate("store", "migrate", "--from", f"sqlite:{other}", "--to", pg_url)
    assert p.returncode == 1 and "is not empty" in p.stderr and "refusing to merge" in p.stderr
    with PgKeyStore(pg_url) as t:
        assert t.count() == 3 and t.verify_audit() == (True, [], 6)
    # usage errors
    assert fastgate("store", "migrate", "--from", str(src), "--to", pg_url).returncode == 2
    assert fastgate("store", "migrate", "--from", f"sqlite:{src}", "--to", "mysql://x/y").returncode == 2
    p = fastgate("store", "migrate", "--from", f"sqlite:{tmp_path / 'nope.db'}", "--to", pg.new_database())
    assert p.returncode == 1 and "no SQLite key store" in p.stderr


class _CommitBreaks:
    """The store's connection, except that COMMIT is answered by a lost connection: after the
    server committed (``commit_first``) or before it could (the transaction rolled back)."""

    def __init__(self, conn, commit_first: bool):
        self._conn = conn
        self._commit_first = commit_first

    def execute(self, query, *args, **kw):
        if query == "COMMIT":
            self._conn.execute("COMMIT" if self._commit_first else "ROLLBACK")
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return self._conn.execute(query, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_connection_lost_during_commit_is_resolved_from_the_chain(pstore):
    first = pstore.create(new_key(pstore)[1], "admin")
    pstore._conn = _CommitBreaks(pstore._c, commit_first=True)
    rec = pstore.create(new_key(pstore)[1], "admin")  # committed: reported as done, not as a failure
    assert pstore.get(rec.id) == rec and not isinstance(pstore._conn, _CommitBreaks)
    pstore._conn = _CommitBreaks(pstore._c, commit_first=False)
    with pytest.raises(StoreUnavailable, match="nothing changed"):
        pstore.revoke(first.id, "admin")
    assert pstore.get(first.id).revoked_at is None
    assert pstore.verify_audit() == (True, [], 2)
