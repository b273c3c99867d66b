"""Durable key store (SQLite, or PostgreSQL in cluster mode) and the hash-chained key
lifecycle audit trail.

    from fastgate.keys import KeyStore, KeyRecord
    store = KeyStore("fastgate-data/keys.db")        # + keys.db.secret, keys.db.audit-head
    key = core.make_key(store.new_key_id())           # shown once, never stored
    rec = store.create(KeyRecord(id=core.key_id_of(key.encode()).decode(), name="ci",
                                 digest=core.key_digest(store.secret, key.encode())), actor="admin")

    store = open_store("postgresql://fastgate@db/fastgate", node_id="gw-1:8080")  # PgKeyStore, same interface
"""

from typing import Any

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



def open_store(target: str, *, node_id: str = "default", connect_timeout: float = 5.0,
               query_timeout: float = 10.0, create_secret: bool = True) -> Any:
    """The key store at ``target``: ``postgresql://...`` (or ``postgres://``) opens the
    PostgreSQL store (fastgate.keys.store_pg, needs psycopg: the ``cluster`` extra);
    ``sqlite:PATH`` or a plain path opens the SQLite store. Both have the same interface.
    ``node_id`` names this node's shared-memory slots in the PostgreSQL store."""
    from fastgate.urls import is_pg_url

    if is_pg_url(target):
        from fastgate.keys.store_pg import PgKeyStore

        return PgKeyStore(target, node_id=node_id, connect_timeout=connect_timeout, query_timeout=query_timeout,
                          create_secret=create_secret)
    if target.startswith("sqlite:"):
        target = target[len("sqlite:"):]
        if target.startswith("//"):  # sqlite:///abs/path
            target = target[2:]
    return KeyStore(target)


def open_config_store(config: Any, path: str | None = None) -> Any:
    """The store a gateway with ``config`` uses: ``[cluster] store`` when it is set, else
    the SQLite file ``path`` (default ``[keys] store``)."""
    cl = getattr(config, "cluster", None)
    if cl is not None and cl.store:
        from fastgate.config import node_id

        return open_store(cl.store, node_id=node_id(config), connect_timeout=cl.connect_timeout,
                          query_timeout=cl.query_timeout)
    return KeyStore(path or config.keys.store)


__all__ = [
    "open_store", "open_config_store", "AuditEvent", "Conflict", "EDITABLE", "InvalidValue", "KeyRecord", "KeyStore", "NotFound", "SCHEMA_VERSION",
    "StoreError", "StoreUnavailable", "ms_to_ts", "now_ts", "parse_ts", "ts_to_ms", "verify_chain", "verify_store",
]
