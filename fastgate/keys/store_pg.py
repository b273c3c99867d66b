"""Durable key store on PostgreSQL (psycopg 3), for cluster mode: the same interface and
guarantees as the SQLite :class:`fastgate.keys.store.KeyStore`, shared by every node.

    store = PgKeyStore("postgresql://fastgate@db:5432/fastgate", node_id="gw-1:8080")

What lives in the database (the schema is created and migrated on start, see MIGRATIONS)::

    schema_version   one row per applied migration (version, description, applied_at)
    store_secret     the server secret (one row), see below
    keys             the key records: keyed digests only, never a key; change_seq = the change
                     number of the record's last change
    key_slots        (node_id, key_id) -> shared-memory slot: each node has its own arena, so
                     slots are per node (the SQLite store keeps one slot column)
    audit            the hash-chained audit trail, same rows and chain formula as SQLite's
                     (fastgate.keys.audit), append-only (triggers refuse UPDATE, DELETE, TRUNCATE)
    audit_head       one row (seq, hash): the chain head. Every write locks it
                     (SELECT ... FOR UPDATE) for its transaction, so writers on any number of
                     nodes append to ONE chain, in commit order; it is also the anchor verify
                     compares the table's tail with (it can only move forward)

Change numbers: every key change appends exactly one audit event in the transaction that
makes it, under the head lock, so the audit seq is the change number: gap-free and in commit
order (a reader that sees change N has every change before N; a plain sequence would not
give that, since its numbers are taken before commit). :meth:`changes_since` reads them.

The server secret (the pepper of ``core.key_digest``) must be the same on every node, so
it is stored in the database, not in a file beside it: table ``store_secret``, created once
by the first node (INSERT .. ON CONFLICT DO NOTHING, so racing nodes agree). Protect it as
the SQLite store's ``.secret`` file: only the fastgate database role may read the schema
(PostgreSQL grants nothing on a new table to other roles; do not GRANT it), and backups of
the database carry it — without it no stored key can be checked. A store that holds keys
but no secret refuses to start rather than mint a new one.

Writes: one transaction per call that also appends its audit event and moves the head,
committed (synchronous_commit as the server sets it; keep it on) before the call returns.
Failures raise the store's errors: Conflict (unique violations), InvalidValue (bad input,
checked before any SQL), StoreUnavailable (the server is down or unreachable, shutting down,
out of disk, read-only, or a statement/lock timeout) and StoreError for the rest. The
connection is re-opened on the next call after it broke. If the connection breaks during
COMMIT itself, the store reconnects and reads the chain (waiting on the head lock, so an
in-flight commit finishes first) to learn whether the write committed: it returns normally if
it did and raises StoreUnavailable if it did not or cannot tell (the message says which).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

from fastgate.keys.audit import (
    ZERO_HASH,
    AuditEvent,
    canonical_changes,
    chain_hash,
    verify_rows,
)
from fastgate.keys.schema import AUDIT_COLUMNS
from fastgate.keys.store import (
    _B62,
    _COLS,
    _LIST_FIELDS,
    SECRET_BYTES,
    Conflict,
    InvalidValue,
    KeyRecord,
    NotFound,
    StoreError,
    StoreUnavailable,
    _check_digest,
    _check_field,
    _created_changes,
    _dec_obj,
    _jl,
    _ms_or_none,
    _record_to_row,
    _row_to_record,
    bulk_import_chunked,
    ms_to_ts,
    now_ms,
    now_ts,
    parse_ts,
    ts_to_ms,
    validated_record,
)
from fastgate.urls import check_pg_url, redact

try:
    import psycopg
except ImportError:  # pragma: no cover - depends on the install
    psycopg = None  # type: ignore[assignment]

# One bigint for pg_advisory_xact_lock while the schema is created or migrated: nodes that
# start together run the migrations once, one after the other.
_SCHEMA_LOCK = 0x66617374676174  # "fastgat"

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "keys, per-node slots, hash-chained audit trail and its head, server secret", [
        """CREATE TABLE store_secret (
            id         integer PRIMARY KEY CHECK (id = 1),
            secret     bytea NOT NULL CHECK (length(secret) BETWEEN 32 AND 64),
            created_at text NOT NULL
        )""",
        """CREATE TABLE keys (
            id             text COLLATE "C" PRIMARY KEY,  -- "C": ids and timestamps sort by byte, as in SQLite
            name           text NOT NULL,
            owner          text,
            plan           text,
            scopes         text,              -- JSON list; NULL = []
            allow_cidrs    text,              -- JSON list; NULL = []
            deny_cidrs     text,              -- JSON list; NULL = []
            limits         text,              -- JSON list; NULL = []
            expires_at     text COLLATE "C",  -- RFC 3339 'Z', sorts as text
            metadata       text,              -- JSON object; NULL = {}
            created_at     text NOT NULL,
            updated_at     text NOT NULL,
            revoked_at     text,
            digest         bytea NOT NULL CHECK (length(digest) = 32),  -- keyed digest, never the key
            prev_digest    bytea CHECK (length(prev_digest) = 32),
            grace_until_ms bigint NOT NULL DEFAULT 0,
            expired_noted  text COLLATE "C",              -- the expires_at value an 'expired' event was logged for
            change_seq     bigint NOT NULL    -- the audit seq of the record's last change
        )""",
        "CREATE INDEX keys_owner ON keys (owner, id) WHERE owner IS NOT NULL",
        "CREATE INDEX keys_expires ON keys (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX keys_change ON keys (change_seq)",
        """CREATE TABLE key_slots (
            node_id text NOT NULL,
            key_id  text COLLATE "C" NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
            slot    integer NOT NULL CHECK (slot >= 0),
            PRIMARY KEY (node_id, key_id)
        )""",
        "CREATE INDEX key_slots_slot ON key_slots (node_id, slot)",
        "CREATE INDEX key_slots_key ON key_slots (key_id)",
        """CREATE TABLE audit (
            seq       bigint PRIMARY KEY CHECK (seq > 0),
            ts        text NOT NULL,
            actor     text NOT NULL,
            event     text NOT NULL,
            key_id    text NOT NULL,
            changes   text NOT NULL,          -- canonical JSON, never secrets or digests
            prev_hash text NOT NULL,
            hash      text NOT NULL
        )""",
        "CREATE INDEX audit_key ON audit (key_id, seq)",
        """CREATE FUNCTION fastgate_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the audit trail is append-only' USING ERRCODE = 'integrity_constraint_violation';
        END $$""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
            FOR EACH ROW EXECUTE FUNCTION fastgate_audit_append_only()""",
        """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
            FOR EACH STATEMENT EXECUTE FUNCTION fastgate_audit_append_only()""",
        """CREATE TABLE audit_head (
            id   integer PRIMARY KEY CHECK (id = 1),
            seq  bigint NOT NULL,
            hash text NOT NULL
        )""",
        f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{ZERO_HASH}')",
        """CREATE FUNCTION fastgate_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'UPDATE' OR NEW.seq < OLD.seq OR NEW.id <> OLD.id THEN
                RAISE EXCEPTION 'the audit head only moves forward' USING ERRCODE = 'integrity_constraint_violation';
            END IF;
            RETURN NEW;
        END $$""",
        """CREATE TRIGGER audit_head_forward BEFORE UPDATE OR DELETE ON audit_head
            FOR EACH ROW EXECUTE FUNCTION fastgate_audit_head_forward()""",
        """CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
            FOR EACH STATEMENT EXECUTE FUNCTION fastgate_audit_head_forward()""",
    ]),
    (2, "cluster fan-out: nodes (heartbeat, applied change number), change and ack notifications", [
        # One row per node (fastgate.cluster): the change number its shared memory has applied,
        # its heartbeat (the server's clock, so node clocks never matter), and the highest
        # change a writer saw it miss the ack of (it reports unready until applied >= that).
        """CREATE TABLE nodes (
            node_id      text COLLATE "C" PRIMARY KEY,
            applied_seq  bigint NOT NULL DEFAULT 0,
            missed_seq   bigint NOT NULL DEFAULT 0,
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            started_at   timestamptz NOT NULL DEFAULT now()
        )""",
        # NOTIFY is transactional: sent on COMMIT only, in commit order, never for a rollback.
        # The head moves once per writing transaction, so this is one notification per write,
        # whoever writes (any node, `fastgate store migrate`, the CLI), with the new change
        # number as its payload. Listeners treat it as a wake-up only: they read the changes
        # from the audit table, so a notification lost while a listener reconnects loses nothing.
        """CREATE FUNCTION fastgate_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('fastgate_changes', NEW.seq::text);
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER audit_head_notify AFTER UPDATE ON audit_head
            FOR EACH ROW EXECUTE FUNCTION fastgate_notify_change()""",
        # An ack: a node's applied change number moved; payload "SEQ NODE_ID".
        """CREATE FUNCTION fastgate_notify_ack() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' OR NEW.applied_seq IS DISTINCT FROM OLD.applied_seq THEN
                PERFORM pg_notify('fastgate_acks', NEW.applied_seq::text || ' ' || NEW.node_id);
            END IF;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER nodes_notify_ack AFTER INSERT OR UPDATE ON nodes
            FOR EACH ROW EXECUTE FUNCTION fastgate_notify_ack()""",
    ]),
]
SCHEMA_VERSION_PG = MIGRATIONS[-1][0]

_SEL = ("SELECT " + ", ".join("s.slot" if c == "slot" else f"k.{c}" for c in _COLS.split(", ")) +
        " FROM keys k LEFT JOIN key_slots s ON s.key_id = k.id AND s.node_id = %s")
_KEY_COLS = [c for c in _COLS.split(", ") if c != "slot"]
_INSERT = f"INSERT INTO keys ({', '.join(_KEY_COLS)}, change_seq) VALUES ({', '.join(['%s'] * (len(_KEY_COLS) + 1))})"
_AUDIT_INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"

# SQLSTATEs that mean "the database cannot be used now", not bad input or a bug: connection
# (08), resources such as a full disk (53), operator intervention such as a shutdown or a
# statement timeout (57), system errors (58), a lock not available (55P03), a read-only
# server (25006), and serialisation failures (40001, 40P01).
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
_UNAVAILABLE_STATES = {"55P03", "25006", "40001", "40P01"}


def pg_unavailable(exc: BaseException) -> bool:
    """Whether a psycopg error means the store is unavailable (503) rather than a bug."""
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return False
    state = getattr(exc, "sqlstate", None)
    if state:
        return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
    return isinstance(exc, psycopg.OperationalError)  # no server answer: connection lost or refused


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    state = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {state})" if state else text


def _row(rec: KeyRecord, change_seq: int) -> list:
    row = list(_record_to_row(rec))
    del row[13]  # slot: per node, in key_slots
    row.append(change_seq)
    return row


class PgKeyStore:
    """PostgreSQL key store; see the module docstring for tables and guarantees."""

    def __init__(self, url: str, *, node_id: str = "default", connect_timeout: float = 5.0,
                 query_timeout: float = 10.0, create_secret: bool = True, migrate: bool = True) -> None:
        if psycopg is None:
            raise StoreError("the PostgreSQL key store needs psycopg 3: pip install 'fastgate[cluster]'")
        try:
            check_pg_url(url)
        except ValueError as exc:
            raise StoreError(f"[cluster] store: {exc}") from None
        self.url = url
        self.path = redact(url)  # what messages name (never the password)
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._lock = threading.RLock()
        self._conn: Any = None
        self._closed = False
        self._secret = b""
        self.last_write_seq = 0  # see _write
        try:
            if migrate:
                self._migrate()
            else:
                self._check_schema()
            if create_secret or self._read_secret() is not None:
                self._secret = self._load_secret()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ connections

    def _connect(self, *, fresh: bool = False) -> Any:
        """A psycopg connection in autocommit mode (each transaction is explicit)."""
        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout)),
                application_name=f"fastgate {self.node_id}"[:63],
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            )
        except psycopg.Error as exc:
            cls = StoreUnavailable if pg_unavailable(exc) else StoreError
            raise cls(f"key store {self.path}: cannot connect: {_describe(exc)}") from None
        try:
            ms = max(1, int(self.query_timeout * 1000))
            conn.execute(f"SET statement_timeout = {ms}")
            conn.execute(f"SET lock_timeout = {ms}")
            conn.execute("SET idle_in_transaction_session_timeout = %s" % (ms * 3))
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"key store {self.path}: cannot set up the connection: {_describe(exc)}") from None
        return conn

    @property
    def _c(self) -> Any:
        if self._closed:
            raise StoreError(f"key store {self.path} is closed")
        c = self._conn
        if c is None or c.closed or c.broken:
            if c is not None:
                try:
                    c.close()
                except psycopg.Error:
                    pass
            self._conn = None
            self._conn = c = self._connect()
        return c

    def _fail(self, exc: BaseException, what: str) -> BaseException:
        """The store error for a psycopg error (the connection is dropped if it broke)."""
        if isinstance(exc, psycopg.IntegrityError):
            return Conflict(f"key store {self.path}: {_describe(exc)}")
        cls = StoreUnavailable if pg_unavailable(exc) else StoreError
        return cls(f"key store {self.path}: {what}: {_describe(exc)}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001  (closing a broken connection)
                    pass
                self._conn = None

    def __enter__(self) -> PgKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ schema and secret

    def _migrate(self) -> None:
        with self._lock:
            c = self._c
            try:
                with c.transaction():
                    c.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    has_versions = c.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
                    if not has_versions:
                        foreign = [t for t in ("keys", "audit", "audit_head", "store_secret", "key_slots")
                                   if c.execute("SELECT to_regclass(%s) IS NOT NULL", (t,)).fetchone()[0]]
                        if foreign:
                            raise StoreError(f"{self.path}: the database has table(s) {', '.join(foreign)} but no "
                                             "schema_version: it is not a fastgate key store (use an empty database "
                                             "or schema for fastgate)")
                        c.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL, "
                                  "applied_at timestamptz NOT NULL DEFAULT now())")
                    version = c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
                    if version > SCHEMA_VERSION_PG:
                        raise StoreError(f"{self.path}: key store schema version {version} is newer than this fastgate "
                                         f"understands (it reads up to version {SCHEMA_VERSION_PG}); use the fastgate "
                                         "release that wrote it, or a newer one")
                    for v, desc, stmts in MIGRATIONS:
                        if v <= version:
                            continue
                        for stmt in stmts:
                            c.execute(stmt)
                        c.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)", (v, desc))
            except StoreError:
                raise
            except psycopg.Error as exc:
                raise self._fail(exc, "cannot create or migrate the schema") from None

    def _check_schema(self) -> None:
        """Without migrating (readers such as audit verify): refuse a database that holds no
        fastgate store, or one of another schema version."""
        with self._reading() as c:
            if not c.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]:
                raise StoreError(f"no fastgate key store in {self.path} (no schema_version table)")
            version = c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        if version != SCHEMA_VERSION_PG:
            raise StoreError(f"{self.path}: schema version {version}, this fastgate reads version {SCHEMA_VERSION_PG}")

    def schema_version(self) -> int:
        with self._reading() as c:
            return c.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    def _read_secret(self) -> bytes | None:
        with self._reading() as c:
            row = c.execute("SELECT secret FROM store_secret WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    def _load_secret(self) -> bytes:
        data = self._read_secret()
        if data is not None:
            return data
        n = self.count()
        if n:
            raise StoreError(f"the server secret (table store_secret) is missing but {self.path} holds {n} keys: "
                             "restore it from backup (a new one would invalidate every key)")
        with self._reading() as c:
            c.execute("INSERT INTO store_secret (id, secret, created_at) VALUES (1, %s, %s) ON CONFLICT (id) DO NOTHING",
                      (secrets.token_bytes(SECRET_BYTES), now_ts()))
        data = self._read_secret()  # the one that won if another node raced us
        assert data is not None
        return data

    @property
    def secret(self) -> bytes:
        """The server secret for core.key_digest / core.KeyTable(secret=...), shared by every node."""
        if not self._secret:
            raise StoreError(f"key store {self.path} has no server secret yet")
        return self._secret

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _write(self, chain: bool = True) -> Iterator[_PgTx]:
        """BEGIN .. COMMIT holding the chain head (chain=True); StoreError on any failure."""
        with self._lock:
            c = self._c
            try:
                c.execute("BEGIN")
                head = (0, ZERO_HASH)
                if chain:
                    row = c.execute("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
                    if row is None:
                        raise StoreError(f"{self.path}: the audit head row is missing (table audit_head): "
                                         "the store was tampered with; run fastgate audit verify")
                    head = (row[0], row[1])
                tx = _PgTx(c, head, chain)
                yield tx
                tx.flush()
                if tx.head != head:
                    c.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", tx.head)
            except BaseException as exc:
                self._rollback(c)
                if isinstance(exc, psycopg.Error):
                    raise self._fail(exc, "write failed, nothing changed") from None
                raise
            try:
                c.execute("COMMIT")
            except psycopg.Error as exc:
                self._rollback(c)
                if tx.head == head or not pg_unavailable(exc):
                    raise self._fail(exc, "write failed, nothing changed") from None
                if self._committed(tx.head):
                    if chain:
                        self.last_write_seq = tx.head[0]
                    return
                raise self._fail(exc, "write failed, nothing changed (checked after reconnecting)") from None
            if chain:
                # The change number this write made, or for a write that changed nothing (revoking
                # a revoked key) the head it read: every change to its key is at or below it.
                self.last_write_seq = tx.head[0]

    def _rollback(self, c: Any) -> None:
        try:
            if not c.closed and c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                c.execute("ROLLBACK")
        except psycopg.Error:
            pass  # a broken connection: the server rolls the transaction back by itself

    def _committed(self, head: tuple[int, str]) -> bool:
        """After COMMIT failed on a lost connection: did it commit? Waits on the head lock, so
        a commit still in flight on the old connection finishes first. StoreUnavailable if
        the server cannot be asked."""
        old, self._conn = self._conn, None
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001  (it broke; the server drops its side)
                pass
        try:
            c = self._c
            with c.transaction():
                c.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
                row = c.execute("SELECT hash FROM audit WHERE seq = %s", (head[0],)).fetchone()
        except (psycopg.Error, StoreError) as exc:
            raise StoreUnavailable(f"key store {self.path}: the connection broke during COMMIT and the server cannot "
                                   f"be asked whether the write was committed ({exc}); it may or may not have been: "
                                   "read the key back or check the audit trail once the store is back") from None
        return row is not None and row[0] == head[1]

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """One read (autocommit) under the lock; psycopg errors become StoreUnavailable / StoreError."""
        with self._lock:
            c = self._c
            try:
                yield c
            except psycopg.Error as exc:
                raise self._fail(exc, "read failed") from None

    def _get(self, c: Any, key_id: str, lock: bool = False) -> KeyRecord:
        row = c.execute(f"{_SEL} WHERE k.id = %s{' FOR UPDATE OF k' if lock else ''}",
                        (self.node_id, key_id)).fetchone()
        if row is None:
            raise NotFound(f"no key with id {key_id!r}")
        return _row_to_record(row)

    # ------------------------------------------------------------ reads

    def new_key_id(self) -> str:
        """16 base62 characters (~95 bits) from secrets, not used by any stored key."""
        while True:
            kid = "".join(secrets.choice(_B62) for _ in range(16))
            if self.get(kid) is None:
                return kid

    def get(self, key_id: str) -> KeyRecord | None:
        with self._reading() as c:
            row = c.execute(f"{_SEL} WHERE k.id = %s", (self.node_id, key_id)).fetchone()
        return None if row is None else _row_to_record(row)

    def list(self, owner: str | None = None, limit: int = 100, after: str | None = None) -> list[KeyRecord]:
        """Keys ordered by id; pass the last id of a page as ``after`` for the next one."""
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidValue(f"limit: expected 1..10000, found {limit!r}")
        where, args = [], [self.node_id]
        if owner is not None:
            where.append("k.owner = %s")
            args.append(owner)
        if after is not None:
            where.append("k.id > %s")  # (ids are COLLATE "C")
            args.append(after)
        sql = f"{_SEL} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY k.id LIMIT %s"
        with self._reading() as c:
            rows = c.execute(sql, (*args, limit)).fetchall()
        return [_row_to_record(r) for r in rows]

    def count(self) -> int:
        with self._reading() as c:
            return c.execute("SELECT count(*) FROM keys").fetchone()[0]

    def iter_all(self, batch: int = 10_000) -> Iterator[KeyRecord]:
        """Every record in id order, streamed in batches from one server-side cursor in one
        REPEATABLE READ snapshot on its own connection, so writes may continue meanwhile."""
        if self._closed:
            raise StoreError(f"key store {self.path} is closed")
        conn = self._connect()
        try:
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                with conn.cursor(name="fastgate_iter_all") as cur:
                    cur.itersize = batch
                    cur.execute(f"{_SEL} ORDER BY k.id", (self.node_id,))
                    while rows := cur.fetchmany(batch):
                        for r in rows:
                            yield _row_to_record(r)
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise self._fail(exc, "read failed") from None
        finally:
            conn.close()

    def by_slot(self, slot: int) -> KeyRecord | None:
        with self._reading() as c:
            row = c.execute(f"{_SEL} WHERE s.slot = %s ORDER BY k.id LIMIT 1", (self.node_id, slot)).fetchone()
        return None if row is None else _row_to_record(row)

    def id_slots(self) -> dict[str, int]:
        """{id: slot} for every key with a slot assigned on this node."""
        with self._reading() as c:
            return dict(c.execute("SELECT key_id, slot FROM key_slots WHERE node_id = %s", (self.node_id,)))

    def due_expired(self, now: str | None = None, limit: int = 1000) -> list[str]:
        """Ids of keys whose expires_at has passed and whose 'expired' event is not logged yet."""
        now_at = ts_to_ms(now) if now else now_ms()
        with self._reading() as c:  # a second of margin, as in the SQLite store
            rows = c.execute(
                "SELECT id, expires_at FROM keys WHERE expires_at IS NOT NULL AND expires_at <= %s "
                "AND (expired_noted IS NULL OR expired_noted <> expires_at) ORDER BY expires_at LIMIT %s", (ms_to_ts(now_at + 1000), limit)).fetchall()
        return [r[0] for r in rows if _ms_or_none(r[1]) is not None and _ms_or_none(r[1]) <= now_at]

    def audit(self, after_seq: int = 0, limit: int = 100, key_id: str | None = None) -> list[AuditEvent]:
        """Audit events with seq > after_seq, oldest first (page with the last seq seen)."""
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidValue(f"limit: expected 1..10000, found {limit!r}")
        if not isinstance(after_seq, int) or not 0 <= after_seq < (1 << 63):
            raise InvalidValue(f"after_seq: expected 0..2**63-1, found {after_seq!r}")
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > %s"
        args: list[Any] = [after_seq]
        if key_id is not None:
            sql += " AND key_id = %s"
            args.append(key_id)
        with self._reading() as c:
            rows = c.execute(sql + " ORDER BY seq LIMIT %s", (*args, limit)).fetchall()
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], _dec_obj(r[5]), r[6], r[7]) for r in rows]

    def verify_audit(self) -> tuple[bool, list[str], int]:
        """(ok, problems, rows_checked): the chain walked and compared with the audit head
        row, both read in one snapshot; see fastgate.keys.audit for what is detected."""
        ok, problems, rows, _ = self._verify()
        return ok, problems, rows

    def _verify(self) -> tuple[bool, list[str], int, tuple[int, str] | None]:
        if self._closed:
            raise StoreError(f"key store {self.path} is closed")
        conn = self._connect()
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            tail = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            with conn.cursor(name="fastgate_verify") as cur:
                cur.execute(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")
                ok, problems, rows = verify_rows(iter(lambda: cur.fetchmany(4096), []),
                                                 lambda: None if head is None else {"seq": head[0], "hash": head[1]},
                                                 "audit head (table audit_head)")
            conn.execute("COMMIT")
            return ok, problems, rows, (tail[0], tail[1]) if tail else None
        except psycopg.Error as exc:
            raise self._fail(exc, "read failed") from None
        finally:
            conn.close()

    def change_seq(self) -> int:
        """The store's change number: the seq of its last audit event (0 when there is none)."""
        with self._reading() as c:
            return c.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()[0]

    def changes_since(self, seq: int, limit: int = 10_000) -> list[tuple[int, str]]:
        """(change number, key id) of every key change after ``seq``, oldest first (page with
        the last number seen). A key may appear more than once; read its current state."""
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidValue(f"limit: expected 1..100000, found {limit!r}")
        if not isinstance(seq, int) or not 0 <= seq < (1 << 63):
            raise InvalidValue(f"seq: expected 0..2**63-1, found {seq!r}")
        with self._reading() as c:
            return [tuple(r) for r in c.execute("SELECT seq, key_id FROM audit WHERE seq > %s ORDER BY seq LIMIT %s",
                                                (seq, limit))]

    # ------------------------------------------------------------ cluster nodes (see fastgate.cluster)

    def listen(self, *channels: str) -> Any:
        """A new connection of its own (autocommit) that LISTENs on ``channels``; the caller
        reads its notifications (``conn.pgconn``) and closes it. StoreUnavailable if the
        server cannot be reached."""
        conn = self._connect()
        try:
            for ch in channels:
                conn.execute(f"LISTEN {ch}")
        except psycopg.Error as exc:
            conn.close()
            raise self._fail(exc, "LISTEN failed") from None
        return conn

    def node_join(self, node_id: str, loaded_seq: int) -> int:
        """(Re-)register this node with a heartbeat now. Its applied change number becomes
        max(loaded_seq, what its row held): a row's number was written only after its
        changes were in shared memory, so it is what a respawned admin process's arena has;
        after a whole-node restart it is at most loaded_seq. Returns that number."""
        with self._reading() as c:
            row = c.execute("SELECT applied_seq FROM nodes WHERE node_id = %s", (node_id,)).fetchone()
            applied = max(loaded_seq, row[0] if row else 0)
            c.execute("INSERT INTO nodes (node_id, applied_seq) VALUES (%s, %s) ON CONFLICT (node_id) DO UPDATE "
                      "SET applied_seq = EXCLUDED.applied_seq, heartbeat_at = now(), started_at = now()",
                      (node_id, applied))
        return applied

    def node_beat(self, node_id: str, applied_seq: int, live_window: float) -> tuple[int | None, int, int]:
        """Heartbeat and ack in one statement: record ``applied_seq`` (a change notifies
        'fastgate_acks'). Returns (missed_seq, or None when the row is gone; the store's
        change number; how many other nodes are live, i.e. beat within ``live_window`` s)."""
        with self._reading() as c:
            row = c.execute(
                "WITH me AS (UPDATE nodes SET heartbeat_at = now(), applied_seq = %s WHERE node_id = %s "
                "RETURNING missed_seq) SELECT (SELECT missed_seq FROM me), (SELECT seq FROM audit_head WHERE id = 1), "
                "(SELECT count(*) FROM nodes WHERE node_id <> %s AND heartbeat_at > now() - make_interval(secs => %s))",
                (applied_seq, node_id, node_id, live_window)).fetchone()
        return row[0], row[1], row[2]

    def cluster_nodes(self, live_window: float, forget_after: float) -> list[tuple[str, int, bool]]:
        """(node_id, applied_seq, live) of every node that beat within ``forget_after`` s;
        live = within ``live_window`` s (the server's clock)."""
        with self._reading() as c:
            return [tuple(r) for r in c.execute(
                "SELECT node_id, applied_seq, heartbeat_at > now() - make_interval(secs => %s) FROM nodes "
                "WHERE heartbeat_at > now() - make_interval(secs => %s) ORDER BY node_id", (live_window, forget_after))]

    def nodes_missed(self, node_ids: list[str], seq: int) -> None:
        """Record that these nodes did not ack change ``seq`` in time (they report unready
        until they have applied it)."""
        with self._reading() as c:
            c.execute("UPDATE nodes SET missed_seq = GREATEST(missed_seq, %s) WHERE node_id = ANY(%s)",
                      (seq, list(node_ids)))

    def node_leave(self, node_id: str) -> None:
        """A node that stops cleanly: writers stop waiting for it or listing it."""
        with self._reading() as c:
            c.execute("DELETE FROM nodes WHERE node_id = %s", (node_id,))

    # ------------------------------------------------------------ writes

    def create(self, rec: KeyRecord, actor: str) -> KeyRecord:
        """Insert a new key (rec.digest = core.key_digest(store.secret, key)); returns the stored record."""
        now = now_ts()
        rec = validated_record(rec, now, now)
        with self._write() as tx:
            seq = tx.event(actor, "created", rec.id, _created_changes(rec))
            try:
                tx.c.execute(_INSERT, _row(rec, seq))
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"a key with id {rec.id!r} already exists") from None
            if rec.slot >= 0:
                tx.c.execute("INSERT INTO key_slots (node_id, key_id, slot) VALUES (%s, %s, %s)",
                             (self.node_id, rec.id, rec.slot))
        return rec

    def update(self, key_id: str, changes: dict[str, Any], actor: str) -> KeyRecord:
        """Change some of EDITABLE; the audit event lists each changed field as {"old", "new"}."""
        if not isinstance(changes, dict):
            raise InvalidValue(f"changes: expected an object, found {changes!r}")
        clean = {f: _check_field(f, v) for f, v in changes.items()}
        with self._write() as tx:
            old = self._get(tx.c, key_id, lock=True)
            diff = {f: {"old": getattr(old, f), "new": v} for f, v in clean.items() if getattr(old, f) != v}
            if not diff:
                return old
            new = msgspec.structs.replace(old, updated_at=now_ts(), **{f: clean[f] for f in diff})
            seq = tx.event(actor, "updated", key_id, diff)
            sets = ", ".join(f"{f} = %s" for f in diff)
            vals = [_jl(new.metadata) if f == "metadata" else _jl(getattr(new, f)) if f in _LIST_FIELDS
                    else getattr(new, f) for f in diff]
            tx.c.execute(f"UPDATE keys SET {sets}, updated_at = %s, change_seq = %s WHERE id = %s",
                         (*vals, new.updated_at, seq, key_id))
        return new

    def rotate(self, key_id: str, new_digest: bytes, grace_until_ms: int, actor: str) -> KeyRecord:
        """The current digest becomes prev_digest, valid while now_ms < grace_until_ms (see KeyStore.rotate)."""
        new_digest = _check_digest("new_digest", new_digest)
        if not isinstance(grace_until_ms, int) or grace_until_ms < 0:
            raise InvalidValue(f"grace_until_ms: expected an int >= 0, found {grace_until_ms!r}")
        if grace_until_ms <= time.time() * 1000:
            grace_until_ms = 0
        with self._write() as tx:
            old = self._get(tx.c, key_id, lock=True)
            if old.revoked_at is not None:
                raise Conflict(f"key {key_id!r} is revoked; a revoked key cannot be rotated")
            prev = old.digest if grace_until_ms else None
            new = msgspec.structs.replace(old, digest=new_digest, prev_digest=prev, grace_until_ms=grace_until_ms,
                                          updated_at=now_ts())
            seq = tx.event(actor, "rotated", key_id,
                           {"previous_valid_until": ms_to_ts(grace_until_ms) if grace_until_ms else None})
            tx.c.execute("UPDATE keys SET digest = %s, prev_digest = %s, grace_until_ms = %s, updated_at = %s, "
                         "change_seq = %s WHERE id = %s",
                         (new.digest, new.prev_digest, new.grace_until_ms, new.updated_at, seq, key_id))
        return new

    def revoke(self, key_id: str, actor: str) -> KeyRecord:
        """Set revoked_at; revoking a revoked key changes nothing and logs nothing."""
        with self._write() as tx:
            old = self._get(tx.c, key_id, lock=True)
            if old.revoked_at is not None:
                return old
            now = now_ts()
            new = msgspec.structs.replace(old, revoked_at=now, updated_at=now)
            seq = tx.event(actor, "revoked", key_id, {"revoked_at": now})
            tx.c.execute("UPDATE keys SET revoked_at = %s, updated_at = %s, change_seq = %s WHERE id = %s",
                         (now, now, seq, key_id))
        return new

    def delete(self, key_id: str, actor: str) -> KeyRecord:
        """Remove the key; the audit event keeps its last public state. Returns the deleted record."""
        with self._write() as tx:
            old = self._get(tx.c, key_id, lock=True)
            tx.event(actor, "deleted", key_id, _created_changes(old))
            tx.c.execute("DELETE FROM keys WHERE id = %s", (key_id,))
        return old

    def mark_expired(self, key_id: str, actor: str = "system") -> bool:
        """Log the 'expired' event for a key whose expires_at has passed, once per expiry."""
        with self._write() as tx:
            old = self._get(tx.c, key_id, lock=True)
            if old.expires_at is None or (_ms_or_none(old.expires_at) or 0) > now_ms():
                return False
            noted = tx.c.execute("SELECT expired_noted FROM keys WHERE id = %s", (key_id,)).fetchone()[0]
            if noted == old.expires_at:
                return False
            seq = tx.event(actor, "expired", key_id, {"expires_at": old.expires_at})
            tx.c.execute("UPDATE keys SET expired_noted = %s, change_seq = %s WHERE id = %s",
                         (old.expires_at, seq, key_id))
        return True

    def set_slot(self, key_id: str, slot: int) -> None:
        """Record this node's shared-memory key index (-1 clears it). Not audited."""
        self.set_slots([(key_id, slot)])

    def set_slots(self, pairs: Iterable[tuple[str, int]]) -> int:
        """set_slot for many keys in one transaction; returns how many stored keys were named."""
        last = dict(pairs)  # a key named twice: the last slot wins, as in the SQLite store
        if not last:
            return 0
        with self._write(chain=False) as tx:
            c = tx.c
            c.execute("CREATE TEMP TABLE IF NOT EXISTS fastgate_slot_in (key_id text, slot integer) "
                      "ON COMMIT DELETE ROWS")
            with c.cursor().copy("COPY fastgate_slot_in (key_id, slot) FROM STDIN") as cp:
                for k, s in last.items():
                    cp.write_row((k, s))
            c.execute("DELETE FROM key_slots s USING fastgate_slot_in i WHERE s.node_id = %s AND s.key_id = i.key_id",
                      (self.node_id,))
            c.execute("INSERT INTO key_slots (node_id, key_id, slot) SELECT %s, i.key_id, i.slot "
                      "FROM fastgate_slot_in i JOIN keys k ON k.id = i.key_id WHERE i.slot >= 0", (self.node_id,))
            n = c.execute("SELECT count(*) FROM fastgate_slot_in i JOIN keys k ON k.id = i.key_id").fetchone()[0]
        return n

    def bulk_import(self, records: Iterable[KeyRecord], actor: str, batch: int = 10_000) -> int:
        """Insert many records in ONE transaction, each with its 'created' event; all or nothing
        (see KeyStore.bulk_import). Keeps the records' timestamps and slots (for this node)."""
        return bulk_import_chunked(self, records, actor, batch)

    def _import_chunk(self, tx: _PgTx, recs: list[KeyRecord], actor: str) -> int:
        for i, r in enumerate(recs):
            try:
                recs[i] = validated_record(r, parse_ts(r.created_at, "created_at"), parse_ts(r.updated_at, "updated_at"))
            except InvalidValue as exc:
                raise InvalidValue(f"bulk import: record {getattr(r, 'id', None)!r}: {exc}; "
                                   "nothing was imported") from None
        rows = [_row(r, tx.event(actor, "created", r.id, _created_changes(r))) for r in recs]
        try:
            with tx.c.cursor().copy(f"COPY keys ({', '.join(_KEY_COLS)}, change_seq) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"bulk import: {_describe(exc)} (duplicate key id?); nothing was imported") from None
        slots = [(self.node_id, r.id, r.slot) for r in recs if r.slot >= 0]
        if slots:
            with tx.c.cursor().copy("COPY key_slots (node_id, key_id, slot) FROM STDIN") as cp:
                for row in slots:
                    cp.write_row(row)
        return len(recs)


class _PgTx:
    """Inside one write transaction: appends chained audit rows (flushed before COMMIT)."""

    __slots__ = ("c", "head", "_rows", "_chain")

    def __init__(self, c: Any, head: tuple[int, str], chain: bool) -> None:
        self.c = c
        self.head = head
        self._rows: list[tuple] = []
        self._chain = chain

    def event(self, actor: str, event: str, key_id: str, changes: dict[str, Any]) -> int:
        """Append one event; returns its seq (the change number)."""
        if not self._chain:
            raise StoreError("internal: an audited write outside the chain lock")
        if not isinstance(actor, str) or not actor:
            raise InvalidValue(f"actor: expected a non-empty string, found {actor!r}")
        seq, prev = self.head[0] + 1, self.head[1]
        ts = now_ts()
        text = canonical_changes(changes)
        h = chain_hash(prev, seq, ts, actor, event, key_id, text)
        self._rows.append((seq, ts, actor, event, key_id, text, prev, h))
        self.head = (seq, h)
        if len(self._rows) >= 10_000:
            self.flush()
        return seq

    def flush(self) -> None:
        if not self._rows:
            return
        if len(self._rows) <= 8:
            with self.c.cursor() as cur:
                cur.executemany(_AUDIT_INSERT, self._rows)
        else:
            with self.c.cursor().copy(f"COPY audit ({AUDIT_COLUMNS}) FROM STDIN") as cp:
                for row in self._rows:
                    cp.write_row(row)
        self._rows = []


def verify_url(url: str, *, as_json: bool = False, out: Any = None) -> int:
    """``fastgate audit verify --store postgresql://...``: same output and exit codes as for SQLite
    (0 verified, 1 problems found, 2 the store cannot be read). Creates and changes nothing."""
    import sys

    from fastgate.keys.audit import report, report_failure

    out = out or sys.stdout
    shown = redact(url)
    try:
        store = PgKeyStore(url, node_id="audit-verify", create_secret=False, migrate=False)
    except StoreError as exc:
        return report_failure(out, as_json, shown, str(exc))
    try:
        ok, problems, rows, tail = store._verify()
    except StoreError as exc:
        return report_failure(out, as_json, shown, str(exc))
    finally:
        store.close()
    return report(out, as_json, shown, ok, problems, rows, tail, anchor="audit_head row",
                  extra={"head": "audit_head"})
