"""`fastgate run` with `[cluster] store = "postgresql://..."` on a real PostgreSQL server
(tests/pg_kit.py): keys migrated from a single node's SQLite store still authenticate, a
key is created, used and revoked through the admin API, PostgreSQL going down turns admin
writes into 503 store_unavailable while traffic goes on, and the audit chain verifies."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from conftest import ROOT, basic_config
from fastgate import core
from fastgate.keys import KeyRecord, KeyStore

EXTRA = """
[keys]
store = "local/keys.db"
capacity = 1024
[cluster]
store = "{url}"
node_id = "it-node-1"
connect_timeout = 2.0
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""


def fastgate(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "FASTGATE_ADMIN_TOKEN"}
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=str(cwd))


def get(gw, key):
    return httpx.get(gw.url + "/echo/x", headers={"x-api-key": key}, timeout=10).status_code


def test_gateway_on_the_postgresql_store(tmp_path, pg, pg_url, start_gateway, upstream):
    # a single node's store, migrated into the cluster store
    src = tmp_path / "single" / "keys.db"
    with KeyStore(str(src)) as s:
        old_key = core.make_key(s.new_key_id())
        old_id = core.key_id_of(old_key.encode()).decode()
        s.create(KeyRecord(id=old_id, name="from-sqlite", digest=core.key_digest(s.secret, old_key.encode())),
                 "admin")
    p = fastgate("store", "migrate", "--from", f"sqlite:{src}", "--to", pg_url)
    assert p.returncode == 0, p.stderr

    gw = start_gateway(basic_config(upstream, extra=EXTRA.format(url=pg_url)))
    assert "loaded 1 keys from postgresql://" in gw.log()
    assert get(gw, old_key) == 200  # no new secret: the migrated key works as it did
    listed = gw.admin("GET", "/keys", expect=200).json()["keys"]
    assert [k["id"] for k in listed] == [old_id]

    new = gw.admin("POST", "/keys", json={"name": "on-pg"}, expect=201).json()
    assert get(gw, new["key"]) == 200
    gw.admin("POST", f"/keys/{new['id']}/revoke", expect=200)
    assert get(gw, new["key"]) == 401
    # the record is in PostgreSQL, digest only
    with _pg(pg_url) as t:
        rec = t.get(new["id"])
        assert rec.revoked_at is not None and rec.digest == core.key_digest(t.secret, new["key"].encode())
        assert new["id"] in t.id_slots() or t.get(new["id"]).slot == -1  # this node's slot (or none yet)

    # PostgreSQL down: writes answer 503 store_unavailable, serving goes on from shared memory
    pg.stop("fast")
    try:
        r = gw.admin("POST", "/keys", json={"name": "while-down"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert gw.admin("POST", f"/keys/{old_id}/revoke").json()["error"]["code"] == "store_unavailable"
        assert get(gw, old_key) == 200 and get(gw, new["key"]) == 401
    finally:
        pg.start()
    after = gw.admin("POST", "/keys", json={"name": "after"}, expect=201).json()
    assert get(gw, after["key"]) == 200
    gw.admin("POST", f"/keys/{old_id}/revoke", expect=200)
    assert get(gw, old_key) == 401

    events = gw.admin("GET", "/audit", expect=200).json()["events"]
    assert [(e["event"], e["key_id"]) for e in events] == [
        ("created", old_id), ("created", new["id"]), ("revoked", new["id"]), ("created", after["id"]),
        ("revoked", old_id)]
    # `fastgate audit verify --config` reads [cluster] store
    p = fastgate("audit", "verify", "--config", str(gw.config_path))
    assert p.returncode == 0 and "audit trail OK: 5 events" in p.stdout, (p.stdout, p.stderr)
    assert "Traceback" not in gw.log()


def _pg(url):
    from fastgate.keys.store_pg import PgKeyStore

    return PgKeyStore(url, node_id="it-node-1")
