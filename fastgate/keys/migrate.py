"""``fastgate store migrate --from sqlite:PATH --to postgresql://...``: move a single node's
key store into the shared PostgreSQL store of a cluster, without issuing new secrets.

What moves, in ONE PostgreSQL transaction:
* the server secret (the pepper every stored digest was made with), so every existing key
  still authenticates: no key is re-issued and no digest recomputed;
* every key record as stored: digests, the previous digest and its grace, revocation,
  expiry and whether its 'expired' event was logged; each record's change number is the
  seq of its last audit event;
* the whole audit chain, row for row (same seq, timestamps, actors, hashes), and its head.
Slots are not copied (they index one node's shared memory; each node assigns its own).
Plans are not in the store: they live in the config file, which every node reads.

Checks: the source chain must verify first; the target must be empty (no keys and no audit
events; a secret minted by a node that started on the empty database is replaced, and such
a node must be restarted); the target chain is verified inside the transaction before
COMMIT and once more after it. Re-running on a target that already holds exactly this
chain (same secret, same head hash at the source's last seq), or this chain followed by
newer events, does nothing and succeeds. Any other non-empty target is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from fastgate.keys.audit import verify_rows
from fastgate.keys.schema import AUDIT_COLUMNS
from fastgate.keys.store import _COLS, KeyStore, StoreError, now_ts
from fastgate.urls import redact


class MigrationRefused(StoreError):
    """The migration was not done (and nothing was changed); the message says why."""


@dataclass
class MigrationResult:
    keys: int
    events: int
    head: tuple[int, str]
    already: bool = False  # the target held this chain already: nothing was written
    newer_events: int = 0  # (already) events the target has after the source's last one
    replaced_secret: bool = False  # the empty target had another secret (a node started on it)


_KEY_COLS = [c for c in _COLS.split(", ") if c != "slot"]


def migrate_sqlite_to_pg(src: str, url: str, *, say: Callable[[str], None] = lambda _: None) -> MigrationResult:
    import psycopg

    from fastgate.keys.store_pg import PgKeyStore

    if src.startswith("sqlite:"):
        src = src[len("sqlite:"):]
    if not os.path.isfile(src):
        raise MigrationRefused(f"no SQLite key store at {src}")
    shown = redact(url)
    source = KeyStore(src)
    try:
        ok, problems, rows = source.verify_audit()
        if not ok:
            raise MigrationRefused(f"the audit chain of {src} does not verify ({len(problems)} problem(s), first: "
                                   f"{problems[0]}); run `fastgate audit verify --store {src}`; nothing was migrated")
        secret = source.secret
        c = source._c
        c.execute("BEGIN")  # one snapshot for keys and audit
        try:
            keys = c.execute(f"SELECT {', '.join(_KEY_COLS)}, expired_noted FROM keys ORDER BY id").fetchall()
            audit = c.execute(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq").fetchall()
            last = dict(c.execute("SELECT key_id, max(seq) FROM audit GROUP BY key_id").fetchall())
        finally:
            c.execute("COMMIT")
    finally:
        source.close()
    head = (audit[-1][0], audit[-1][7]) if audit else (0, "0" * 64)
    say(f"source {src}: {len(keys)} keys, {len(audit)} audit events, chain verified")

    target = PgKeyStore(url, node_id="migrate", create_secret=False)
    try:
        with target._lock:
            conn = target._c
            try:
                result = _copy(conn, shown, secret, keys, audit, last, head, say)
            except psycopg.Error as exc:
                target._rollback(conn)
                raise target._fail(exc, "migration failed, nothing changed") from None
            except BaseException:
                target._rollback(conn)
                raise
        ok, problems, rows, _ = target._verify()  # committed: check it again, as a new reader sees it
        if not ok:
            raise StoreError(f"the migrated chain on {shown} does not verify after COMMIT: {problems[:3]}")
        say(f"target {shown}: audit chain verified ({rows} events)")
        return result
    finally:
        target.close()


def _copy(conn, shown, secret, keys, audit, last, head, say) -> MigrationResult:
    conn.execute("BEGIN")
    thead = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
    if thead is None:
        raise MigrationRefused(f"{shown}: the audit head row is missing (table audit_head); run fastgate audit verify")
    conn.execute("LOCK TABLE keys IN SHARE ROW EXCLUSIVE MODE")
    n_keys = conn.execute("SELECT count(*) FROM keys").fetchone()[0]
    n_audit = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    row = conn.execute("SELECT secret FROM store_secret WHERE id = 1").fetchone()
    tsecret = bytes(row[0]) if row else None

    if n_keys or n_audit:
        same = False
        if audit and tsecret == secret:
            at = conn.execute("SELECT hash FROM audit WHERE seq = %s", (head[0],)).fetchone()
            same = at is not None and at[0] == head[1]
        if not same:
            raise MigrationRefused(
                f"the target {shown} is not empty ({n_keys} keys, {n_audit} audit events) and does not hold this "
                "store's audit chain: refusing to merge two stores; migrate into an empty database (nothing was "
                "changed)")
        ok, problems, _ = _verify(conn)
        if not ok:
            raise MigrationRefused(f"the target {shown} holds this chain but does not verify: {problems[0]}")
        conn.execute("COMMIT")
        newer = thead[0] - head[0]
        say(f"target {shown} already holds this store's chain (head seq {head[0]})"
            + (f" and {newer} newer events" if newer else "") + ": nothing to do")
        return MigrationResult(n_keys, n_audit, (thead[0], thead[1]), already=True, newer_events=newer)

    replaced = tsecret is not None and tsecret != secret
    conn.execute("INSERT INTO store_secret (id, secret, created_at) VALUES (1, %s, %s) "
                 "ON CONFLICT (id) DO UPDATE SET secret = EXCLUDED.secret, created_at = EXCLUDED.created_at",
                 (secret, now_ts()))
    with conn.cursor().copy(f"COPY keys ({', '.join(_KEY_COLS)}, expired_noted, change_seq) FROM STDIN") as cp:
        for k in keys:
            cp.write_row((*k, last.get(k[0], 0)))
    with conn.cursor().copy(f"COPY audit ({AUDIT_COLUMNS}) FROM STDIN") as cp:
        for a in audit:
            cp.write_row(a)
    conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", head)
    ok, problems, rows = _verify(conn)
    if not ok or rows != len(audit):
        raise MigrationRefused(f"the copied chain does not verify on {shown} ({problems[:1]}); nothing was changed")
    conn.execute("COMMIT")
    if replaced:
        say(f"note: {shown} had another server secret but no keys (a node started on it): it was replaced; "
            "restart any gateway already running on it")
    return MigrationResult(len(keys), len(audit), head, replaced_secret=replaced)


def _verify(conn) -> tuple[bool, list[str], int]:
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    with conn.cursor(name="fastgate_migrate_verify") as cur:  # server-side: the chain may be long
        cur.execute(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")
        return verify_rows(iter(lambda: cur.fetchmany(4096), []),
                           lambda: None if head is None else {"seq": head[0], "hash": head[1]},
                           "audit head (table audit_head)")
