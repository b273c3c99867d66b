"""Durable key store (SQLite) and the hash-chained key lifecycle audit trail.

    from fastgate.keys import KeyStore, KeyRecord
    store = KeyStore("fastgate-data/keys.db")        # + keys.db.secret, keys.db.audit-head
    key = core.make_key(store.new_key_id())           # shown once, never stored
    rec = store.create(KeyRecord(id=core.key_id_of(key.encode()).decode(), name="ci",
                                 digest=core.key_digest(store.secret, key.encode())), actor="admin")
"""

from fastgate.keys.audit import AuditEvent, verify_chain, verify_store
from fastgate.keys.schema import SCHEMA_VERSION
from fastgate.keys.store import (
    EDITABLE,
    Conflict,
    InvalidValue,
    KeyRecord,
    KeyStore,
    NotFound,
    StoreError,
    StoreUnavailable,
    ms_to_ts,
    now_ts,
    parse_ts,
    ts_to_ms,
)

__all__ = [
    "AuditEvent", "Conflict", "EDITABLE", "InvalidValue", "KeyRecord", "KeyStore", "NotFound", "SCHEMA_VERSION",
    "StoreError", "StoreUnavailable", "ms_to_ts", "now_ts", "parse_ts", "ts_to_ms", "verify_chain", "verify_store",
]
