"""Key lifecycle audit trail: an append-only, hash-chained SQLite table plus an anchor file.

Each row of the ``audit`` table (seq, ts, actor, event, key_id, changes, prev_hash, hash)
is chained to the one before it::

    hash = sha256(prev_hash.encode("ascii") + canonical(seq, ts, actor, event, key_id, changes)).hexdigest()
    canonical(...) = json.dumps([seq, ts, actor, event, key_id, changes],
                                separators=(",", ":"), ensure_ascii=False).encode("utf-8")

where ``changes`` is the stored JSON *text* (itself canonical: sorted keys, compact) and the
first row's ``prev_hash`` is 64 zeros. Anyone can re-check the chain with sqlite3 + hashlib.

What :func:`verify_chain` detects
---------------------------------
* an edited row (any column): its recomputed hash differs from the stored one;
* an edited row whose hash was recomputed too: the next row's ``prev_hash`` no longer matches;
* a deleted row in the middle or at the start: a gap in ``seq`` (rows are numbered 1, 2, 3...)
  and a ``prev_hash`` mismatch;
* reordered rows (contents swapped between seqs): hash and ``prev_hash`` mismatches;
* a truncated tail, and a re-forged chain: the anchor file ``<db>.audit-head`` (mode 0600,
  rewritten after every commit) holds the last seq and hash; verify compares the table's tail
  with it, so dropping the last rows or rewriting history (which changes every later hash)
  shows up as an anchor mismatch;
* rows appended behind fastgate's back (the table runs past the anchor).

What it cannot detect (honest limits)
-------------------------------------
The chain is unkeyed: it proves internal consistency, not authorship. An attacker who can
rewrite **both** the database and the anchor file can forge a complete, valid new chain
(or truncate both consistently). To raise the bar, ship the anchor (``seq`` + ``hash``)
off-box periodically (log it, or copy the file to write-once storage) and compare against
that copy: any history before a shipped anchor is then fixed. Deleting the whole database
together with the anchor is reported as "no audit trail", not as tampering.

Crash safety of the anchor: before each commit the anchor is rewritten as
``{committed, pending}`` and after the commit as ``{committed}`` only, so a crash on either
side of the commit leaves a tail that matches one of the two — never a false alarm.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import msgspec

from fastgate.keys.schema import AUDIT_COLUMNS, SCHEMA_VERSION

try:
    from json.encoder import c_encode_basestring as _enc_str  # what json.dumps uses (ensure_ascii=False)
except ImportError:  # pragma: no cover - pure-Python json
    from json.encoder import py_encode_basestring as _enc_str  # type: ignore[assignment]
if _enc_str is None:  # pragma: no cover
    from json.encoder import py_encode_basestring as _enc_str  # type: ignore[assignment]

ZERO_HASH = "0" * 64
EVENTS = ("created", "updated", "rotated", "revoked", "expired", "deleted")
MAX_PROBLEMS = 100  # problems listed in detail; the rest are counted


class AuditEvent(msgspec.Struct, frozen=True):
    seq: int
    ts: str
    actor: str
    event: str
    key_id: str
    changes: dict[str, Any]
    prev_hash: str
    hash: str


_encode_changes = msgspec.json.Encoder(order="sorted").encode
_sha256 = hashlib.sha256


def canonical_changes(changes: dict[str, Any]) -> str:
    """The stored JSON text of ``changes``: sorted keys (nested too), compact, UTF-8 without
    ASCII escaping, i.e. ``json.dumps(changes, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` for the values the store writes (strings, ints, lists, objects, null)."""
    return _encode_changes(changes).decode()


def chain_hash(prev_hash: str, seq: int, ts: str, actor: str, event: str, key_id: str, changes: str) -> str:
    """``changes`` is the stored JSON text; see the module docstring for the exact formula.

    The body is built by hand from json's own string encoder, byte for byte what
    ``json.dumps([seq, ts, actor, event, key_id, changes], separators=(",", ":"),
    ensure_ascii=False)`` returns (tests check the two agree), at a fraction of the cost."""
    if type(seq) is not int:  # noqa: E721  (bool and int subclasses would print differently)
        raise TypeError(f"seq must be an int, found {type(seq).__name__}")
    body = (f"[{seq},{_enc_str(ts)},{_enc_str(actor)},{_enc_str(event)},{_enc_str(key_id)},"
            f"{_enc_str(changes)}]")
    return _sha256(prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


def _chain_hash_reference(prev_hash: str, seq: int, ts: str, actor: str, event: str, key_id: str,
                          changes: str) -> str:
    """The documented formula, spelled with json.dumps (used by the tests as the oracle)."""
    body = json.dumps([seq, ts, actor, event, key_id, changes], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev_hash.encode("ascii") + body.encode("utf-8")).hexdigest()


def head_path(db_path: str) -> str:
    return db_path + ".audit-head"


# ---------------------------------------------------------------- anchor file


def read_head(path: str) -> dict[str, Any] | None:
    """The anchor: {"seq", "hash"} and optionally {"pending_seq", "pending_hash"}; None if absent."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    head = json.loads(data)
    if not isinstance(head, dict) or not isinstance(head.get("seq"), int) or not isinstance(head.get("hash"), str):
        raise ValueError(f"{path}: not an audit head (expected {{'seq': int, 'hash': str}})")
    return head


def write_head(path: str, seq: int, hash_: str, pending: tuple[int, str] | None = None) -> None:
    """Atomically replace the anchor file (0600): write a temp file, fsync, rename, fsync the dir."""
    head: dict[str, Any] = {"seq": seq, "hash": hash_}
    if pending is not None:
        head["pending_seq"], head["pending_hash"] = pending
    data = json.dumps(head, sort_keys=True).encode() + b"\n"
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- verification


def verify_chain(conn: sqlite3.Connection, head_file: str) -> tuple[bool, list[str], int]:
    """Walk the whole ``audit`` table in seq order and compare its tail with the anchor file.

    Returns (ok, problems, rows_checked). Problems are human sentences; at most
    MAX_PROBLEMS are listed, then a count of the rest.
    """
    cur = conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")
    try:
        batches = iter(lambda: cur.fetchmany(4096), [])

        def anchor() -> dict[str, Any] | None:
            return read_head(head_file)

        return verify_rows(batches, anchor, f"audit head {head_file}")
    finally:
        cur.close()


def verify_rows(batches: Iterable[Sequence[tuple]], anchor: Callable[[], dict[str, Any] | None],
                where: str) -> tuple[bool, list[str], int]:
    """The chain check of :func:`verify_chain` over any source of audit rows (batches of
    ``AUDIT_COLUMNS`` tuples in seq order): the SQLite table, or the PostgreSQL store's.
    ``anchor()`` is called after the walk and returns the head ({"seq", "hash"}, optionally
    {"pending_seq", "pending_hash"}) or None if there is none; ``where`` names it in problems."""
    problems: list[str] = []
    extra = 0

    def problem(msg: str) -> None:
        nonlocal extra
        if len(problems) < MAX_PROBLEMS:
            problems.append(msg)
        else:
            extra += 1

    expected_seq = 1
    running = ZERO_HASH
    rows = 0
    last_seq, last_hash = 0, ZERO_HASH
    for batch in batches:
        for seq, ts, actor, event, key_id, changes, prev_hash, stored in batch:
            rows += 1
            if seq != expected_seq:
                if seq > expected_seq:
                    gap = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                    problem(f"seq {seq}: rows {gap} are missing (deleted?)")
                else:  # cannot happen with an INTEGER PRIMARY KEY, kept for other backends
                    problem(f"seq {seq}: out of order after seq {expected_seq - 1}")
            if prev_hash != running:
                problem(f"seq {seq}: prev_hash does not match the hash of the row before it "
                        "(a row was deleted, reordered or rewritten)")
            try:
                actual = chain_hash(prev_hash, seq, ts, actor, event, key_id, changes)
            except (TypeError, UnicodeError, AttributeError) as exc:
                actual = f"<unhashable: {exc}>"
            if actual != stored:
                problem(f"seq {seq}: contents do not match its hash (the row was edited)")
            if event not in EVENTS:
                problem(f"seq {seq}: unknown event {event!r}")
            running = stored
            expected_seq = seq + 1
            last_seq, last_hash = seq, stored

    try:
        head = anchor()
    except (OSError, ValueError) as exc:
        problem(f"{where}: unreadable ({exc})")
        head = {"seq": -1, "hash": ""}
    if head is None:
        if rows:
            problem(f"{where} is missing but the log has {rows} rows "
                    "(cannot tell whether the tail was truncated)")
    elif head["seq"] >= 0:
        anchors = [(head["seq"], head["hash"])]
        if isinstance(head.get("pending_seq"), int):
            anchors.append((head["pending_seq"], head.get("pending_hash")))
        if (last_seq, last_hash) not in anchors:
            top = max(s for s, _ in anchors)
            if last_seq < head["seq"]:
                problem(f"log ends at seq {last_seq} but the audit head records seq {head['seq']}: "
                        "the tail was truncated")
            elif last_seq > top:
                problem(f"log runs to seq {last_seq} past the audit head at seq {top}: "
                        "rows were appended outside fastgate")
            else:
                problem(f"seq {last_seq}: hash differs from the audit head's "
                        "(the chain was rewritten)")
    if extra:
        problems.append(f"... and {extra} more problems")
    return (not problems, problems, rows)


def verify_store(path: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """``fastgate audit verify``: check the audit chain of the store at ``path``.

    Opens the database read-only (never creates it) and needs no server secret.
    Prints a human summary, or one JSON object with ``as_json``. Exit code: 0 the trail
    verifies, 1 problems were found, 2 the store cannot be read.
    """
    out = out or sys.stdout
    hp = head_path(path)

    def fail(msg: str) -> int:
        return report_failure(out, as_json, path, msg)

    if not os.path.isfile(path):
        return fail(f"no key store at {path}")
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return fail(f"cannot open {path}: {exc}")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            return fail(f"{path}: schema version {version}, this fastgate reads version {SCHEMA_VERSION}")
        ok, problems, rows = verify_chain(conn, hp)
        tail = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        return fail(f"cannot read {path}: {exc}")
    finally:
        conn.close()
    return report(out, as_json, path, ok, problems, rows, tail, anchor=hp, extra={"head_file": hp})


def report_failure(out: TextIO, as_json: bool, path: str, msg: str) -> int:
    """``fastgate audit verify`` could not read the store: print why; exit code 2."""
    if as_json:
        out.write(json.dumps({"ok": False, "path": path, "error": msg}) + "\n")
    else:
        out.write(f"fastgate audit verify: {msg}\n")
    return 2


def report(out: TextIO, as_json: bool, path: str, ok: bool, problems: list[str], rows: int,
           tail: tuple[int, str] | None, *, anchor: str, extra: dict[str, Any] | None = None) -> int:
    """Print a verification result (either store); exit code 0 verified, 1 problems found."""
    if as_json:
        out.write(json.dumps({
            "ok": ok, "path": path, **(extra or {}), "rows_checked": rows, "problems": problems,
            "last_seq": tail[0] if tail else 0, "last_hash": tail[1] if tail else ZERO_HASH,
        }) + "\n")
    elif ok:
        where = f"head seq {tail[0]} hash {tail[1][:16]}..." if tail else "empty log"
        out.write(f"audit trail OK: {rows} events checked, {where}, anchor {anchor} matches\n")
    else:
        out.write(f"audit trail FAILED: {len(problems)} problem(s) in {rows} events of {path}\n")
        for p in problems:
            out.write(f"  - {p}\n")
    return 0 if ok else 1
