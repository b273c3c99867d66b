"""Fast start end to end: a real `fastgate run` restarted from its key snapshot, with
keys changed in the store while it was down; a corrupt snapshot means a full load."""

from __future__ import annotations

import httpx

from conftest import basic_config

from fastgate import core
from fastgate.keys import KeyRecord, KeyStore

EXTRA = """
[keys]
store = "keys.db"
capacity = 64
snapshot_interval = 30.0
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""


def _call(gw, key: str) -> int:
    return httpx.get(gw.url + "/echo/x", headers={"x-api-key": key}, timeout=10).status_code


def _new(gw) -> tuple[str, str]:
    data = gw.admin("POST", "/keys", json={"name": "t"}, expect=201).json()
    return data["id"], data["key"]


def test_restart_from_snapshot_with_changes_made_while_down(start_gateway, upstream, tmp_path):
    text = basic_config(upstream, extra=EXTRA)
    gw = start_gateway(text, workers=1, name="g1.toml")
    a_id, a = _new(gw)
    b_id, b = _new(gw)
    assert _call(gw, a) == 200 and _call(gw, b) == 200
    assert gw.stop() == 0
    log = gw.log()
    assert "full load" in log and "wrote key snapshot" in log, log[-3000:]
    snap = tmp_path / "keys.db.snapshot"
    assert snap.exists()

    # while it is down, straight in the store: a revoke and a new key (no slot yet)
    store = KeyStore(str(tmp_path / "keys.db"))
    try:
        store.revoke(a_id, "test")
        c_id = store.new_key_id()
        c = core.make_key(c_id)
        store.create(KeyRecord(id=c_id, name="c", digest=core.key_digest(store.secret, c.encode())), "test")
    finally:
        store.close()

    gw2 = start_gateway(text, workers=1, name="g2.toml")
    assert "from snapshot" in gw2.log() and "then 2 changed keys" in gw2.log(), gw2.log()[-3000:]
    assert _call(gw2, a) == 401 and _call(gw2, b) == 200 and _call(gw2, c) == 200
    # a key created now does not land on the one created while down
    d_id, d = _new(gw2)
    assert _call(gw2, d) == 200 and _call(gw2, c) == 200
    gw2.admin("POST", f"/keys/{b_id}/revoke", expect=200)  # a second admin action
    assert _call(gw2, b) == 401
    assert gw2.stop() == 0

    gw3 = start_gateway(text, workers=1, name="g3.toml")
    assert "then 0 changed keys" in gw3.log(), gw3.log()[-3000:]
    assert (_call(gw3, a), _call(gw3, b), _call(gw3, c), _call(gw3, d)) == (401, 401, 200, 200)
    assert gw3.stop() == 0

    # one flipped payload byte: the snapshot is not used, the full load is still right
    raw = bytearray(snap.read_bytes())
    raw[-10] ^= 0x01
    snap.write_bytes(bytes(raw))
    gw4 = start_gateway(text, workers=1, name="g4.toml")
    log4 = gw4.log()
    assert "not used (its checksum" in log4 and "full load" in log4, log4[-3000:]
    assert (_call(gw4, a), _call(gw4, b), _call(gw4, c), _call(gw4, d)) == (401, 401, 200, 200)
