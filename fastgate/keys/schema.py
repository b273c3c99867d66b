"""The key store's on-disk layout: the SQLite schema both fastgate.keys.store (which
creates and writes it) and fastgate.keys.audit (which verifies a store read-only, without
opening a KeyStore) read. It imports nothing of theirs, so neither imports the other."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1  # PRAGMA user_version of a store this fastgate reads and writes

AUDIT_COLUMNS = "seq, ts, actor, event, key_id, changes, prev_hash, hash"

SCHEMA_V1 = """
CREATE TABLE keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    owner          TEXT,
    plan           TEXT,
    scopes         TEXT,              -- JSON list; NULL = []
    allow_cidrs    TEXT,              -- JSON list; NULL = []
    deny_cidrs     TEXT,              -- JSON list; NULL = []
    limits         TEXT,              -- JSON list; NULL = []
    expires_at     TEXT,              -- RFC 3339 'Z', sorts as text
    metadata       TEXT,              -- JSON object; NULL = {}
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    revoked_at     TEXT,
    slot           INTEGER,           -- NULL = not assigned
    digest         BLOB NOT NULL,     -- keyed digest, never the key
    prev_digest    BLOB,
    grace_until_ms INTEGER NOT NULL DEFAULT 0,
    expired_noted  TEXT               -- the expires_at value an 'expired' event was logged for
) WITHOUT ROWID;
CREATE INDEX keys_owner ON keys(owner, id) WHERE owner IS NOT NULL;
CREATE INDEX keys_slot ON keys(slot) WHERE slot IS NOT NULL;
CREATE INDEX keys_expires ON keys(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    ts        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    event     TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    changes   TEXT NOT NULL,          -- canonical JSON, never secrets or digests
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_key ON audit(key_id, seq);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


def split_sql(script: str) -> list[str]:
    """Split the schema into statements (triggers contain ';' inside BEGIN..END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            out.append(joined)
            buf = []
    return out
