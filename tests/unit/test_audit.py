"""Audit trail: hash chain, anchor file, and detection of edited, deleted, reordered and
truncated rows (tampering done with a raw sqlite3 connection, as an attacker would)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate import core
from fastgate.keys import KeyRecord, KeyStore, verify_store
from fastgate.keys.audit import ZERO_HASH, read_head


def new_rec(store: KeyStore, **fields) -> KeyRecord:
    key = core.make_key(store.new_key_id())
    kid = core.key_id_of(key.encode()).decode()
    return KeyRecord(id=kid, name=fields.pop("name", "k"), digest=core.key_digest(store.secret, key.encode()), **fields)


@pytest.fixture
def db(tmp_path):
    """A store with a 7-event history, closed; returns its path."""
    path = str(tmp_path / "keys.db")
    with KeyStore(path) as s:
        a = s.create(new_rec(s, name="a"), "admin")
        b = s.create(new_rec(s, name="b"), "admin")
        s.update(a.id, {"name": "a2", "plan": "pro"}, "alice")
        s.rotate(a.id, b"\x01" * 32, 0, "alice")
        s.revoke(b.id, "bob")
        s.create(new_rec(s, name="c"), "admin")
        s.delete(b.id, "bob")
    return path


def tamper(path, *sql, params=()):
    c = sqlite3.connect(path)
    try:
        c.execute("DROP TRIGGER audit_no_update")
        c.execute("DROP TRIGGER audit_no_delete")
        for stmt in sql:
            c.execute(stmt, params if "?" in stmt else ())
        c.commit()
    finally:
        c.close()


def verify(path):
    with KeyStore(path) as s:
        return s.verify_audit()


def test_chain_is_well_formed_and_recomputable(db):
    with KeyStore(db) as s:
        events = s.audit(limit=100)
        assert [e.event for e in events] == ["created", "created", "updated", "rotated", "revoked", "created",
                                             "deleted"]
        assert [e.seq for e in events] == list(range(1, 8))
        assert events[0].prev_hash == ZERO_HASH
        for prev, e in zip(events, events[1:]):
            assert e.prev_hash == prev.hash
        assert s.verify_audit() == (True, [], 7)
        # pagination and per-key filter
        assert [e.seq for e in s.audit(after_seq=3, limit=2)] == [4, 5]
        a_id = events[0].key_id
        assert [e.event for e in s.audit(key_id=a_id)] == ["created", "updated", "rotated"]
    # recompute with nothing but sqlite3 + hashlib (the documented formula)
    c = sqlite3.connect(db)
    try:
        prev = ZERO_HASH
        for seq, ts, actor, event, key_id, changes, prev_hash, h in c.execute(
                "SELECT seq, ts, actor, event, key_id, changes, prev_hash, hash FROM audit ORDER BY seq"):
            assert prev_hash == prev
            assert json.loads(changes) is not None
            assert changes == json.dumps(json.loads(changes), sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False)
            body = json.dumps([seq, ts, actor, event, key_id, changes], separators=(",", ":"), ensure_ascii=False)
            assert hashlib.sha256(prev.encode() + body.encode()).hexdigest() == h
            prev = h
    finally:
        c.close()
    assert read_head(db + ".audit-head") == {"seq": 7, "hash": prev}


def test_changes_never_hold_digests(db):
    c = sqlite3.connect(db)
    try:
        digests = [r[0] for r in c.execute("SELECT digest FROM keys")] + [b"\x01" * 32]
        changes = " ".join(r[0] for r in c.execute("SELECT changes FROM audit"))
    finally:
        c.close()
    for d in digests:
        assert d.hex() not in changes
    assert "digest" not in changes


def test_audit_is_append_only_in_sql_too(db):
    c = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("UPDATE audit SET actor = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute("DELETE FROM audit WHERE seq = 1")
    finally:
        c.close()


def test_detects_edited_row(db):
    tamper(db, "UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    ok, problems, rows = verify(db)
    assert not ok and rows == 7
    assert any("seq 3" in p and "edited" in p for p in problems)


def test_detects_edited_row_with_recomputed_hash(db):
    c = sqlite3.connect(db)
    seq, ts, actor, event, key_id, changes, prev_hash = c.execute(
        "SELECT seq, ts, actor, event, key_id, changes, prev_hash FROM audit WHERE seq = 3").fetchone()
    c.close()
    from fastgate.keys.audit import chain_hash
    forged = chain_hash(prev_hash, seq, ts, "mallory", event, key_id, changes)
    tamper(db, "UPDATE audit SET actor = 'mallory', hash = ? WHERE seq = 3", params=(forged,))
    ok, problems, _ = verify(db)
    assert not ok and any("seq 4" in p and "prev_hash" in p for p in problems)


def test_detects_deleted_middle_row(db):
    tamper(db, "DELETE FROM audit WHERE seq = 4")
    ok, problems, rows = verify(db)
    assert not ok and rows == 6
    assert any("seq 5" in p and "4 are missing" in p for p in problems)
    assert any("prev_hash" in p for p in problems)


def test_detects_deleted_first_row(db):
    tamper(db, "DELETE FROM audit WHERE seq = 1")
    ok, problems, _ = verify(db)
    assert not ok and any("1 are missing" in p for p in problems)


def test_detects_reordered_rows(db):
    # swap the contents of rows 2 and 3 (keeping each seq in place)
    cols = "ts, actor, event, key_id, changes, prev_hash, hash"
    tamper(db,
           f"CREATE TEMP TABLE r AS SELECT seq, {cols} FROM audit WHERE seq IN (2, 3)",
           *(f"UPDATE audit SET {c} = (SELECT {c} FROM r WHERE r.seq = 5 - audit.seq) WHERE seq IN (2, 3)"
             for c in cols.split(", ")))
    ok, problems, _ = verify(db)
    assert not ok
    assert any("seq 2" in p for p in problems) and any("seq 3" in p for p in problems)


def test_detects_truncated_tail(db):
    tamper(db, "DELETE FROM audit WHERE seq >= 6")
    ok, problems, rows = verify(db)
    assert not ok and rows == 5
    assert any("truncated" in p and "seq 7" in p for p in problems)


def test_detects_rewritten_chain(db):
    from fastgate.keys.audit import chain_hash
    c = sqlite3.connect(db)
    try:
        rows = c.execute("SELECT seq, ts, actor, event, key_id, changes FROM audit ORDER BY seq").fetchall()
        prev, new = ZERO_HASH, []
        for seq, ts, actor, event, key_id, changes in rows:
            actor = "mallory" if seq == 2 else actor
            h = chain_hash(prev, seq, ts, actor, event, key_id, changes)
            new.append((actor, prev, h, seq))
            prev = h
        c.execute("DROP TRIGGER audit_no_update")
        c.executemany("UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", new)
        c.commit()
    finally:
        c.close()
    ok, problems, _ = verify(db)
    assert not ok and problems == ["seq 7: hash differs from the audit head's (the chain was rewritten)"]


def test_detects_rows_appended_outside_fastgate(db):
    from fastgate.keys.audit import chain_hash
    c = sqlite3.connect(db)
    try:
        last = c.execute("SELECT hash FROM audit WHERE seq = 7").fetchone()[0]
        h = chain_hash(last, 8, "2030-01-01T00:00:00Z", "mallory", "created", "x", "{}")
        c.execute("INSERT INTO audit VALUES (8, '2030-01-01T00:00:00Z', 'mallory', 'created', 'x', '{}', ?, ?)",
                  (last, h))
        c.commit()
    finally:
        c.close()
    ok, problems, _ = verify(db)
    assert not ok and any("past the audit head" in p for p in problems)


def test_missing_anchor_is_reported(db):
    os.unlink(db + ".audit-head")
    ok, problems, _ = verify(db)
    assert not ok and any("missing" in p for p in problems)


def test_pending_anchor_covers_a_crash_around_commit(db):
    """The anchor written before COMMIT names the pending tail: either side of a crash verifies."""
    from fastgate.keys.audit import write_head
    c = sqlite3.connect(db)
    h6, h7 = (r[0] for r in c.execute("SELECT hash FROM audit WHERE seq IN (6, 7) ORDER BY seq"))
    c.close()
    write_head(db + ".audit-head", 6, h6, pending=(7, h7))  # crashed after COMMIT, before the final anchor
    assert verify(db) == (True, [], 7)
    write_head(db + ".audit-head", 7, h7, pending=(8, "f" * 64))  # crashed before COMMIT
    assert verify(db) == (True, [], 7)


def test_verify_store_cli_function(db, tmp_path):
    out = io.StringIO()
    assert verify_store(db, out=out) == 0
    assert "audit trail OK: 7 events" in out.getvalue()
    out = io.StringIO()
    assert verify_store(db, as_json=True, out=out) == 0
    doc = json.loads(out.getvalue())
    assert doc["ok"] is True and doc["rows_checked"] == 7 and doc["problems"] == [] and doc["last_seq"] == 7

    tamper(db, "UPDATE audit SET changes = '{}' WHERE seq = 2")
    out = io.StringIO()
    assert verify_store(db, out=out) == 1
    assert "FAILED" in out.getvalue() and "seq 2" in out.getvalue()
    out = io.StringIO()
    assert verify_store(db, as_json=True, out=out) == 1
    assert json.loads(out.getvalue())["ok"] is False

    missing = str(tmp_path / "nope.db")
    out = io.StringIO()
    assert verify_store(missing, out=out) == 2
    assert not os.path.exists(missing)  # verify never creates a store
    out = io.StringIO()
    assert verify_store(missing, as_json=True, out=out) == 2
    assert json.loads(out.getvalue())["ok"] is False


def test_empty_store_verifies(tmp_path):
    path = str(tmp_path / "keys.db")
    KeyStore(path).close()
    assert verify(path) == (True, [], 0)
    assert verify_store(path, out=io.StringIO()) == 0


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(min_value=0, max_value=2**63), parts=st.lists(st.text(), min_size=5, max_size=5))
def test_fast_chain_hash_matches_documented_formula(seq, parts):
    from fastgate.keys.audit import _chain_hash_reference, chain_hash
    assert chain_hash(ZERO_HASH, seq, *parts) == _chain_hash_reference(ZERO_HASH, seq, *parts)


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.text(), st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)))
def test_canonical_changes_is_sorted_compact_json(changes):
    from fastgate.keys.audit import canonical_changes
    assert canonical_changes(changes) == json.dumps(changes, sort_keys=True, separators=(",", ":"),
                                                    ensure_ascii=False)
