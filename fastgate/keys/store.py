"""Durable key store: SQLite (WAL, synchronous=FULL) holding key records and the audit trail.

Files, all beside each other (``path`` is the ``[keys] store`` setting)::

    <path>               the SQLite database (created 0600; parent dirs created 0700)
    <path>-wal, -shm     SQLite's WAL files (same mode as the database)
    <path>.secret        the server secret: 32 random bytes, mode 0600, created once with
                         O_CREAT|O_EXCL; refused if group/other can access it. Losing it
                         invalidates every key (digests cannot be recomputed), so back it up
                         with the database; a store that holds keys refuses to mint a new one.
    <path>.audit-head    the audit anchor (last seq + hash, 0600), see fastgate.keys.audit

Only keyed digests (``core.key_digest(secret, key)``, keyed BLAKE2b-256) are stored, never a
key. Every mutating method runs in one ``BEGIN IMMEDIATE`` transaction that also appends its
audit event, and commits before it returns; any failure rolls back and raises StoreError
(NotFound / Conflict / InvalidValue are subclasses the admin API can map to 404/409/400;
StoreUnavailable, 503, is a disk or database that cannot be used right now: full, read-only,
I/O errors, corrupt, or locked past the busy timeout). A write either commits or raises;
nothing it reported as done is lost.

Writers: one process (the admin process) is expected to write; concurrent writers are
serialised by SQLite plus an flock on the secret file held across each commit and anchor
update, so the anchor always follows the table. Timestamps are UTC RFC 3339 with
milliseconds and 'Z' ('2026-12-01T21:43:20.930Z'); records written by older releases hold
whole seconds ('...:20Z') and are shown in the new form. Input accepts any RFC 3339
(fraction and offset optional): fastgate.types.rfc3339_ms is the one parser.

Validation: a record's editable fields are declared with the value types of fastgate.types
(the admin API's bodies and the config use the same ones), and every write checks them as
if decoded (lengths, item counts, patterns, one limit per window), stores their canonical
form (CIDR host bits cleared, timestamps in UTC milliseconds), and reports every problem of
a field at once: ``InvalidValue("allow_cidrs[1]: expected an IPv4 or IPv6 address ...")``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import sqlite3
import stat
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
    head_path,
    read_head,
    verify_chain,
    write_head,
)
from fastgate.keys.schema import AUDIT_COLUMNS, SCHEMA_V1, SCHEMA_VERSION, split_sql
from fastgate.types import (
    KEY_ID,
    TIMESTAMP,
    Cidrs,
    KeyName,
    Limits,
    Metadata,
    Owner,
    PlanName,
    Problems,
    Scopes,
    Timestamp,
    fields_validator,
    format_ms,
    rfc3339_ms,
    validator,
)

SECRET_BYTES = 32
KEY_ID_MAX = 32  # core.make_key's limit
DIGEST_BYTES = 32
EDITABLE = ("name", "owner", "plan", "scopes", "allow_cidrs", "deny_cidrs", "limits", "expires_at", "metadata")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LIST_FIELDS = ("scopes", "allow_cidrs", "deny_cidrs", "limits")


class StoreError(Exception):
    """A store operation failed; nothing was changed."""


class NotFound(StoreError):
    """No key with that id."""


class Conflict(StoreError):
    """The change conflicts with the stored state (duplicate id, revoked key...)."""


class InvalidValue(StoreError):
    """A field has the wrong type or shape."""


class StoreUnavailable(StoreError):
    """The database or its disk cannot be used now (full, read-only, I/O error, corrupt,
    locked past the busy timeout). Nothing was changed; retry once it is fixed."""


# SQLite primary result codes that mean "the store is unavailable", not "bad input"
# or "a bug": BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
_UNAVAILABLE_SQLITE = {5, 6, 7, 8, 10, 11, 13, 14, 15, 26}
_UNAVAILABLE_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOENT, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def unavailable(exc: BaseException) -> bool:
    """Whether a sqlite3/OS error means the store is unavailable (503) rather than a bug."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _UNAVAILABLE_SQLITE
        return isinstance(exc, sqlite3.OperationalError)
    if isinstance(exc, OSError):
        return exc.errno in _UNAVAILABLE_ERRNO or exc.errno is None
    return False


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


class KeyRecord(msgspec.Struct, omit_defaults=True):
    """One key. ``digest``, ``prev_digest``, ``grace_until_ms`` and ``slot`` are private:
    use :meth:`public` for API output. Field order is the store's column order."""

    id: str
    name: KeyName
    owner: Owner | None = None
    plan: PlanName | None = None
    scopes: Scopes = msgspec.field(default_factory=list)
    allow_cidrs: Cidrs = msgspec.field(default_factory=list)
    deny_cidrs: Cidrs = msgspec.field(default_factory=list)
    limits: Limits = msgspec.field(default_factory=list)
    expires_at: Timestamp | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    revoked_at: str | None = None
    slot: int = -1  # shared-memory key index; -1 = not assigned (the admin process assigns it)
    digest: bytes = b""
    prev_digest: bytes | None = None
    grace_until_ms: int = 0  # prev_digest stays valid while now_ms < grace_until_ms; 0 = none

    def public(self) -> dict[str, Any]:
        """The API view: no digests, no slot, None fields left out."""
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.owner is not None:
            out["owner"] = self.owner
        if self.plan is not None:
            out["plan"] = self.plan
        out["scopes"] = list(self.scopes)
        out["allow_cidrs"] = list(self.allow_cidrs)
        out["deny_cidrs"] = list(self.deny_cidrs)
        out["limits"] = list(self.limits)
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        out["metadata"] = dict(self.metadata)
        out["created_at"] = self.created_at
        out["updated_at"] = self.updated_at
        if self.revoked_at is not None:
            out["revoked_at"] = self.revoked_at
        if self.prev_digest is not None and self.grace_until_ms:
            out["grace_until"] = ms_to_ts(self.grace_until_ms)
        for k in ("expires_at", "created_at", "updated_at", "revoked_at"):
            if out.get(k):
                out[k] = _shown_ts(out[k])
        return out


def _shown_ts(value: str) -> str:
    """A stored timestamp in today's form (older records hold whole seconds)."""
    try:
        return format_ms(rfc3339_ms(value))
    except ValueError:
        return value


# ---------------------------------------------------------------- timestamps


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def now_ts() -> str:
    """Now, UTC RFC 3339 with milliseconds and 'Z'."""
    return format_ms(now_ms())


def parse_ts(value: str, field: str = "timestamp") -> str:
    """Normalise an RFC 3339 timestamp (any offset, optional fraction) to UTC 'Z' milliseconds."""
    try:
        return TIMESTAMP(value)
    except ValueError as exc:
        raise InvalidValue(f"{field}: {exc}") from None


def ts_to_ms(value: str) -> int:
    """Epoch milliseconds of a stored timestamp (e.g. expires_at for core.KeyTable.put); exact."""
    try:
        return rfc3339_ms(value)
    except ValueError as exc:
        raise InvalidValue(f"timestamp: {exc}") from None


def ms_to_ts(ms: int) -> str:
    return format_ms(ms)


# ---------------------------------------------------------------- validation


def _ms_or_none(value: str | None) -> int | None:
    try:
        return rfc3339_ms(value) if value else None
    except ValueError:
        return None


# The declared types of the editable fields (KeyRecord's annotations: fastgate.types'), and
# their checks: one per field (update) and one for all of them (create, import).
_FIELD_TYPES = {f.name: f.type for f in msgspec.structs.fields(KeyRecord) if f.name in EDITABLE}
_FIELD_CHECKS = {name: validator(tp) for name, tp in _FIELD_TYPES.items()}
_RECORD_CHECK = fields_validator(_FIELD_TYPES)


def _check_field(field: str, v: Any) -> Any:
    """``v`` checked as the admin API would have decoded it, in its stored form."""
    check = _FIELD_CHECKS.get(field)
    if check is None:
        raise InvalidValue(f"{field}: cannot be changed (changeable: {', '.join(EDITABLE)})")
    try:
        v = check(v, field)
    except Problems as exc:
        raise InvalidValue("; ".join(exc.problems)) from None
    return _json_round_trip(v) if field == "metadata" else v


def _json_round_trip(metadata: dict[str, Any]) -> dict[str, Any]:
    """Stored as JSON: return what a read will give back (a nan float reads back as null)."""
    return msgspec.json.decode(msgspec.json.encode(metadata)) if metadata else metadata


def _check_fields(rec: KeyRecord) -> dict[str, Any]:
    try:
        fields = _RECORD_CHECK({f: getattr(rec, f) for f in EDITABLE})
    except Problems as exc:
        raise InvalidValue("; ".join(exc.problems)) from None
    fields["metadata"] = _json_round_trip(fields["metadata"])
    return fields


def _check_id(key_id: Any) -> str:
    if not isinstance(key_id, str):
        raise InvalidValue(f"id: expected a key id (1..{KEY_ID_MAX} ASCII letters and digits), found {key_id!r}")
    try:
        return KEY_ID(key_id)
    except ValueError as exc:
        raise InvalidValue(f"id: {exc}") from None


def _check_digest(field: str, d: Any) -> bytes:
    if not isinstance(d, (bytes, bytearray)) or len(d) != DIGEST_BYTES:
        raise InvalidValue(f"{field}: expected a {DIGEST_BYTES}-byte keyed digest")
    return bytes(d)


# ---------------------------------------------------------------- schema


_COLS = ("id, name, owner, plan, scopes, allow_cidrs, deny_cidrs, limits, expires_at, metadata, "
         "created_at, updated_at, revoked_at, slot, digest, prev_digest, grace_until_ms")
_INSERT = f"INSERT INTO keys ({_COLS}) VALUES ({', '.join('?' * 17)})"
_AUDIT_INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

_dec_list = msgspec.json.Decoder(list[str]).decode
_dec_obj = msgspec.json.Decoder(dict[str, Any]).decode
_enc = msgspec.json.Encoder().encode


def _row_to_record(r: tuple) -> KeyRecord:
    return KeyRecord(
        r[0], r[1], r[2], r[3],
        _dec_list(r[4]) if r[4] else [], _dec_list(r[5]) if r[5] else [],
        _dec_list(r[6]) if r[6] else [], _dec_list(r[7]) if r[7] else [],
        r[8], _dec_obj(r[9]) if r[9] else {}, r[10], r[11], r[12],
        -1 if r[13] is None else r[13], r[14], r[15], r[16],
    )


def _jl(v: list) -> str | None:
    return _enc(v).decode() if v else None


def _record_to_row(rec: KeyRecord) -> tuple:
    return (
        rec.id, rec.name, rec.owner, rec.plan, _jl(rec.scopes), _jl(rec.allow_cidrs), _jl(rec.deny_cidrs),
        _jl(rec.limits), rec.expires_at, _jl(rec.metadata) if rec.metadata else None, rec.created_at,
        rec.updated_at, rec.revoked_at, None if rec.slot < 0 else rec.slot, rec.digest, rec.prev_digest,
        rec.grace_until_ms,
    )


def _created_changes(rec: KeyRecord) -> dict[str, Any]:
    pub = rec.public()
    for k in ("id", "created_at", "updated_at"):
        pub.pop(k, None)
    return pub


def _mkdirs_0700(d: str) -> None:
    missing = []
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for m in reversed(missing):
        try:
            os.mkdir(m, 0o700)
        except FileExistsError:
            pass


# ---------------------------------------------------------------- the store


def bulk_import_chunked(store, records: Iterable[KeyRecord], actor: str, batch: int) -> int:
    """bulk_import for either store: one write transaction, records fed to the store's
    _import_chunk in batches, empty timestamps filled with now."""
    now = now_ts()
    n = 0
    with store._write() as tx:
        chunk: list[KeyRecord] = []
        for rec in records:
            if not rec.created_at or not rec.updated_at:
                rec = msgspec.structs.replace(rec, created_at=rec.created_at or now,
                                              updated_at=rec.updated_at or now)
            chunk.append(rec)
            if len(chunk) >= batch:
                n += store._import_chunk(tx, chunk, actor)
                chunk = []
        if chunk:
            n += store._import_chunk(tx, chunk, actor)
    return n


class KeyStore:
    """SQLite key store; see the module docstring for files and guarantees."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.secret_path = self.path + ".secret"
        self.head_path = head_path(self.path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._secret_fd = -1
        _mkdirs_0700(os.path.dirname(os.path.abspath(self.path)))
        if not os.path.exists(self.path):
            try:  # SQLite would create it 0644; an empty file is a valid empty database
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create key store {self.path}: {exc}") from None
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout = 10000")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA cache_size = -65536")  # 64 MiB page cache: 1M-key imports stay in memory
            self._migrate()
            self._secret = self._load_secret()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open key store {self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def _migrate(self) -> None:
        c = self._conn
        assert c is not None
        c.execute("BEGIN IMMEDIATE")
        try:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise StoreError(f"{self.path} is an SQLite database but not a fastgate key store "
                                     "(user_version 0 with existing tables)")
                # executescript() would COMMIT first: run the statements one by one instead
                for stmt in split_sql(SCHEMA_V1):
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: key store schema version {version} is not one this fastgate "
                                 f"understands (it reads version {SCHEMA_VERSION}); "
                                 "use the fastgate release that wrote it, or a newer one")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _load_secret(self) -> bytes:
        p = self.secret_path
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            assert self._conn is not None
            n = self._conn.execute("SELECT count(*) FROM keys").fetchone()[0]
            if n:
                raise StoreError(f"server secret {p} is missing but {self.path} holds {n} keys: restore the "
                                 "secret from backup (a new one would invalidate every key)") from None
            return self._create_secret()
        except OSError as exc:
            raise StoreError(f"cannot open server secret {p}: {exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"server secret {p} is not a regular file")
            if st.st_mode & 0o077:
                raise StoreError(f"server secret {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be "
                                 f"readable by its owner only: chmod 600 {p}")
            data = os.read(fd, 4096)
        except BaseException:
            os.close(fd)
            raise
        if not SECRET_BYTES <= len(data) <= 64:
            os.close(fd)
            raise StoreError(f"server secret {p} holds {len(data)} bytes, expected {SECRET_BYTES}..64")
        self._secret_fd = fd
        return data

    def _create_secret(self) -> bytes:
        p = self.secret_path
        data = secrets.token_bytes(SECRET_BYTES)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another process won the race: use its secret
            return self._load_secret()
        except OSError as exc:
            raise StoreError(f"cannot create server secret {p}: {exc}") from None
        try:
            os.write(fd, data)
            os.fsync(fd)
            dfd = os.open(os.path.dirname(os.path.abspath(p)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            raise
        self._secret_fd = fd
        return data

    @property
    def secret(self) -> bytes:
        """The server secret for core.key_digest / core.KeyTable(secret=...)."""
        return self._secret

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._secret_fd >= 0:
                os.close(self._secret_fd)
                self._secret_fd = -1

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"key store {self.path} is closed")
        return self._conn

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        """BEGIN IMMEDIATE .. COMMIT with the audit anchor kept in step; StoreError on any failure."""
        with self._lock:
            c = self._c
            fcntl.flock(self._secret_fd, fcntl.LOCK_EX)
            try:
                c.execute("BEGIN IMMEDIATE")
                tail = c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone() or (0, ZERO_HASH)
                tx = _Tx(c, tail)
                anchored = False
                try:
                    yield tx
                    tx.flush()
                    if tx.head != tail:
                        write_head(self.head_path, tail[0], tail[1], pending=tx.head)
                        anchored = True
                    c.execute("COMMIT")
                except BaseException as exc:
                    try:
                        if c.in_transaction:
                            c.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolls a failed transaction back by itself; the write is not committed
                    if anchored:
                        try:
                            write_head(self.head_path, *tail)
                        except OSError:
                            pass  # the pending anchor still accepts the committed tail
                    if isinstance(exc, StoreError):
                        raise
                    if isinstance(exc, sqlite3.IntegrityError):
                        raise Conflict(f"{self.path}: {exc}") from None
                    if isinstance(exc, (sqlite3.Error, OSError)):
                        cls = StoreUnavailable if unavailable(exc) else StoreError
                        raise cls(f"key store {self.path}: write failed, nothing changed: {_describe(exc)}") from None
                    raise
                if tx.head != tail:
                    try:
                        write_head(self.head_path, *tx.head)
                    except OSError:
                        pass  # committed; the anchor's pending entry already matches the new tail
            except sqlite3.Error as exc:  # BEGIN itself failed (busy, disk)
                cls = StoreUnavailable if unavailable(exc) else StoreError
                raise cls(f"key store {self.path}: cannot start a write: {_describe(exc)}") from None
            finally:
                fcntl.flock(self._secret_fd, fcntl.LOCK_UN)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read under the lock; sqlite3 errors become StoreUnavailable / StoreError."""
        with self._lock:
            c = self._c
            try:
                yield c
            except sqlite3.Error as exc:
                cls = StoreUnavailable if unavailable(exc) else StoreError
                raise cls(f"key store {self.path}: read failed: {_describe(exc)}") from None

    def _get(self, c: sqlite3.Connection, key_id: str) -> KeyRecord:
        row = c.execute(f"SELECT {_COLS} FROM keys WHERE id = ?", (key_id,)).fetchone()
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
            row = c.execute(f"SELECT {_COLS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _row_to_record(row)

    def list(self, owner: str | None = None, limit: int = 100, after: str | None = None) -> list[KeyRecord]:
        """Keys ordered by id; pass the last id of a page as ``after`` for the next one."""
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidValue(f"limit: expected 1..10000, found {limit!r}")
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        sql = f"SELECT {_COLS} FROM keys {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id LIMIT ?"
        with self._reading() as c:
            rows = c.execute(sql, (*args, limit)).fetchall()
        return [_row_to_record(r) for r in rows]

    def count(self) -> int:
        with self._reading() as c:
            return c.execute("SELECT count(*) FROM keys").fetchone()[0]

    def iter_all(self, batch: int = 10_000) -> Iterator[KeyRecord]:
        """Every record in id order, streamed in batches from one query (for loading at start).

        Uses its own read connection (one consistent WAL snapshot), so writes may continue
        meanwhile; close the generator (or exhaust it) to release the snapshot."""
        conn = sqlite3.connect(f"file:{os.path.abspath(self.path)}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("BEGIN")
            cur = conn.execute(f"SELECT {_COLS} FROM keys ORDER BY id")
            conv = _row_to_record
            while rows := cur.fetchmany(batch):
                for r in rows:
                    yield conv(r)
            cur.close()
            conn.execute("COMMIT")
        finally:
            conn.close()

    def by_slot(self, slot: int) -> KeyRecord | None:
        with self._reading() as c:
            row = c.execute(f"SELECT {_COLS} FROM keys WHERE slot = ?", (slot,)).fetchone()
        return None if row is None else _row_to_record(row)

    def id_slots(self) -> dict[str, int]:
        """{id: slot} for every key with a slot assigned."""
        with self._reading() as c:
            return dict(c.execute("SELECT id, slot FROM keys WHERE slot IS NOT NULL"))

    def due_expired(self, now: str | None = None, limit: int = 1000) -> list[str]:
        """Ids of keys whose expires_at has passed and whose 'expired' event is not logged yet."""
        now_at = ts_to_ms(now) if now else now_ms()
        # Text order matches time order except within one second between the stored forms
        # ('...:20Z' of older records sorts after '...:20.500Z'): select with a second of
        # margin, then compare the milliseconds.
        with self._reading() as c:
            rows = c.execute(
                "SELECT id, expires_at FROM keys WHERE expires_at IS NOT NULL AND expires_at <= ? "
                "AND (expired_noted IS NULL OR expired_noted != expires_at) ORDER BY expires_at LIMIT ?",
                (ms_to_ts(now_at + 1000), limit)).fetchall()
        return [r[0] for r in rows if _ms_or_none(r[1]) is not None and _ms_or_none(r[1]) <= now_at]

    def audit(self, after_seq: int = 0, limit: int = 100, key_id: str | None = None) -> list[AuditEvent]:
        """Audit events with seq > after_seq, oldest first (page with the last seq seen)."""
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidValue(f"limit: expected 1..10000, found {limit!r}")
        if not isinstance(after_seq, int) or not 0 <= after_seq < (1 << 63):
            raise InvalidValue(f"after_seq: expected 0..2**63-1, found {after_seq!r}")
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?"
        args: list[Any] = [after_seq]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        with self._reading() as c:
            rows = c.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [AuditEvent(r[0], r[1], r[2], r[3], r[4], _dec_obj(r[5]), r[6], r[7]) for r in rows]

    def verify_audit(self) -> tuple[bool, list[str], int]:
        """(ok, problems, rows_checked); see fastgate.keys.audit for what is and is not detected."""
        with self._reading() as c:
            return verify_chain(c, self.head_path)

    def change_seq(self) -> int:
        """The store's change number: the seq of its last audit event (0 when there is none).

        Every key change appends exactly one audit event in the transaction that makes it,
        so the audit seq is the change number: gap-free, and in commit order."""
        with self._reading() as c:
            return c.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]

    def changes_since(self, seq: int, limit: int = 10_000) -> list[tuple[int, str]]:
        """(change number, key id) of every key change after ``seq``, oldest first (page with
        the last number seen). A key may appear more than once; read its current state."""
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidValue(f"limit: expected 1..100000, found {limit!r}")
        if not isinstance(seq, int) or not 0 <= seq < (1 << 63):
            raise InvalidValue(f"seq: expected 0..2**63-1, found {seq!r}")
        with self._reading() as c:
            return [tuple(r) for r in c.execute("SELECT seq, key_id FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                                                (seq, limit))]

    # ------------------------------------------------------------ writes

    def create(self, rec: KeyRecord, actor: str) -> KeyRecord:
        """Insert a new key (rec.digest = core.key_digest(store.secret, key)); returns the stored record."""
        now = now_ts()
        rec = self._validated(rec, created_at=now, updated_at=now)
        with self._write() as tx:
            try:
                tx.c.execute(_INSERT, _record_to_row(rec))
            except sqlite3.IntegrityError:
                raise Conflict(f"a key with id {rec.id!r} already exists") from None
            tx.event(actor, "created", rec.id, _created_changes(rec))
        return rec

    def update(self, key_id: str, changes: dict[str, Any], actor: str) -> KeyRecord:
        """Change some of EDITABLE; the audit event lists each changed field as {"old", "new"}."""
        if not isinstance(changes, dict):
            raise InvalidValue(f"changes: expected an object, found {changes!r}")
        clean = {f: _check_field(f, v) for f, v in changes.items()}
        with self._write() as tx:
            old = self._get(tx.c, key_id)
            diff = {f: {"old": getattr(old, f), "new": v} for f, v in clean.items() if getattr(old, f) != v}
            if not diff:
                return old
            new = msgspec.structs.replace(old, updated_at=now_ts(), **{f: clean[f] for f in diff})
            sets = ", ".join(f"{f} = ?" for f in diff)
            vals = [_jl(new.metadata) if f == "metadata" else _jl(getattr(new, f)) if f in _LIST_FIELDS
                    else getattr(new, f) for f in diff]
            tx.c.execute(f"UPDATE keys SET {sets}, updated_at = ? WHERE id = ?", (*vals, new.updated_at, key_id))
            tx.event(actor, "updated", key_id, diff)
        return new

    def rotate(self, key_id: str, new_digest: bytes, grace_until_ms: int, actor: str) -> KeyRecord:
        """The current digest becomes prev_digest, valid while now_ms < grace_until_ms.

        A grace that has already ended (0 or in the past) drops the old digest at once
        (prev_digest None); a second rotation within a grace replaces the older prev_digest."""
        new_digest = _check_digest("new_digest", new_digest)
        if not isinstance(grace_until_ms, int) or grace_until_ms < 0:
            raise InvalidValue(f"grace_until_ms: expected an int >= 0, found {grace_until_ms!r}")
        if grace_until_ms <= time.time() * 1000:
            grace_until_ms = 0
        with self._write() as tx:
            old = self._get(tx.c, key_id)
            if old.revoked_at is not None:
                raise Conflict(f"key {key_id!r} is revoked; a revoked key cannot be rotated")
            prev = old.digest if grace_until_ms else None
            new = msgspec.structs.replace(old, digest=new_digest, prev_digest=prev, grace_until_ms=grace_until_ms,
                                          updated_at=now_ts())
            tx.c.execute("UPDATE keys SET digest = ?, prev_digest = ?, grace_until_ms = ?, updated_at = ? WHERE id = ?",
                         (new.digest, new.prev_digest, new.grace_until_ms, new.updated_at, key_id))
            tx.event(actor, "rotated", key_id,
                     {"previous_valid_until": ms_to_ts(grace_until_ms) if grace_until_ms else None})
        return new

    def revoke(self, key_id: str, actor: str) -> KeyRecord:
        """Set revoked_at; revoking a revoked key changes nothing and logs nothing."""
        with self._write() as tx:
            old = self._get(tx.c, key_id)
            if old.revoked_at is not None:
                return old
            now = now_ts()
            new = msgspec.structs.replace(old, revoked_at=now, updated_at=now)
            tx.c.execute("UPDATE keys SET revoked_at = ?, updated_at = ? WHERE id = ?", (now, now, key_id))
            tx.event(actor, "revoked", key_id, {"revoked_at": now})
        return new

    def delete(self, key_id: str, actor: str) -> KeyRecord:
        """Remove the key; the audit event keeps its last public state. Returns the deleted record."""
        with self._write() as tx:
            old = self._get(tx.c, key_id)
            tx.c.execute("DELETE FROM keys WHERE id = ?", (key_id,))
            tx.event(actor, "deleted", key_id, _created_changes(old))
        return old

    def mark_expired(self, key_id: str, actor: str = "system") -> bool:
        """Log the 'expired' event for a key whose expires_at has passed, once per expiry
        (extending expires_at and expiring again logs again). True if an event was added."""
        with self._write() as tx:
            old = self._get(tx.c, key_id)
            if old.expires_at is None or (_ms_or_none(old.expires_at) or 0) > now_ms():
                return False
            noted = tx.c.execute("SELECT expired_noted FROM keys WHERE id = ?", (key_id,)).fetchone()[0]
            if noted == old.expires_at:
                return False
            tx.c.execute("UPDATE keys SET expired_noted = ? WHERE id = ?", (old.expires_at, key_id))
            tx.event(actor, "expired", key_id, {"expires_at": old.expires_at})
        return True

    def set_slot(self, key_id: str, slot: int) -> None:
        """Record the shared-memory key index (-1 clears it). Not audited."""
        self.set_slots([(key_id, slot)])

    def set_slots(self, pairs: Iterable[tuple[str, int]]) -> int:
        """set_slot for many keys in one transaction (e.g. after loading into a fresh arena)."""
        with self._write() as tx:
            cur = tx.c.executemany("UPDATE keys SET slot = ? WHERE id = ?",
                                   ((None if s < 0 else s, k) for k, s in pairs))
            n = cur.rowcount
        return n

    def bulk_import(self, records: Iterable[KeyRecord], actor: str, batch: int = 10_000) -> int:
        """Insert many records in ONE transaction, each with its 'created' event; all or nothing.

        Each record is validated as create() validates one (InvalidValue names the record).
        Keeps the records' timestamps (fills empty ones with now) and slots. Returns the count."""
        return bulk_import_chunked(self, records, actor, batch)

    def _import_chunk(self, tx: _Tx, recs: list[KeyRecord], actor: str) -> int:
        # Every record is checked as create() checks one (about 10..20 us each): an
        # imported value the core cannot compile would stop the next start's load_all.
        for i, r in enumerate(recs):
            try:
                recs[i] = self._validated(r, parse_ts(r.created_at, "created_at"),
                                          parse_ts(r.updated_at, "updated_at"))
            except InvalidValue as exc:
                raise InvalidValue(f"bulk import: record {getattr(r, 'id', None)!r}: {exc}; "
                                   "nothing was imported") from None
        try:
            tx.c.executemany(_INSERT, map(_record_to_row, recs))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"bulk import: {exc} (duplicate key id?); nothing was imported") from None
        for r in recs:
            tx.event(actor, "created", r.id, _created_changes(r))
        return len(recs)

    def _validated(self, rec: KeyRecord, created_at: str, updated_at: str) -> KeyRecord:
        return validated_record(rec, created_at, updated_at)


def validated_record(rec: KeyRecord, created_at: str, updated_at: str) -> KeyRecord:
    """``rec`` checked as create() checks one, in its stored form (both stores use it)."""
    if not isinstance(rec, KeyRecord):
        raise InvalidValue(f"expected a KeyRecord, found {type(rec).__name__}")
    _check_id(rec.id)
    fields = _check_fields(rec)
    _check_digest("digest", rec.digest)
    if rec.prev_digest is not None:
        _check_digest("prev_digest", rec.prev_digest)
    revoked = None if rec.revoked_at is None else parse_ts(rec.revoked_at, "revoked_at")
    return msgspec.structs.replace(rec, **fields, created_at=created_at, updated_at=updated_at,
                                   revoked_at=revoked, digest=bytes(rec.digest))


class _Tx:
    """Inside one write transaction: appends chained audit rows (flushed before COMMIT)."""

    __slots__ = ("c", "head", "_rows")

    def __init__(self, c: sqlite3.Connection, tail: tuple[int, str]) -> None:
        self.c = c
        self.head = tail
        self._rows: list[tuple] = []

    def event(self, actor: str, event: str, key_id: str, changes: dict[str, Any]) -> None:
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

    def flush(self) -> None:
        if self._rows:
            self.c.executemany(_AUDIT_INSERT, self._rows)
            self._rows = []


__all__ = [
    "SCHEMA_VERSION", "EDITABLE", "KeyStore", "KeyRecord", "AuditEvent", "StoreError", "NotFound", "Conflict",
    "InvalidValue", "StoreUnavailable", "unavailable", "now_ms", "now_ts", "parse_ts", "ts_to_ms", "ms_to_ts", "verify_chain", "read_head",
]
