"""Issue 10, must-have 6, through the real gateway: the admin process (the key
table's single writer) killed inside a key write leaves no key busy or torn,
and the key ends up as the store says (the store commits first)."""

from __future__ import annotations

import time

import httpx

from hardening_kit import Harness


def test_admin_killed_mid_write_leaves_the_key_as_the_store_says(tmp_path, monkeypatch):
    # TEST ONLY hook (fastgate/admin/keysync.py): the admin process dies inside
    # the core's write section on its 2nd write of the key named "crash-me".
    monkeypatch.setenv("FASTGATE_TEST_CRASH_IN_PUT", "crash-me:2")
    h = Harness(tmp_path)
    try:
        gw = h.gw
        before = gw.admin_pid()
        rec = gw.admin("POST", "/keys", json={"name": "crash-me", "scopes": ["GET /api/public/*"]}, expect=201).json()
        key = rec["key"]
        hdr = {"x-api-key": key}
        assert httpx.get(h.gw.url + "/api/public/a", headers=hdr).status_code == 200
        # the store commits the new scope, then the admin dies writing it to shared memory
        try:
            r = gw.admin("PATCH", f"/keys/{rec['id']}", json={"scopes": ["GET /api/other/*"]})
            assert r.status_code >= 500, r.text
        except httpx.HTTPError:
            pass  # the connection died with the admin process
        deadline = time.monotonic() + 20
        after = before
        while time.monotonic() < deadline:
            try:
                after = gw.admin_pid()
                if after != before:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert after != before, "the admin process was not replaced"
        assert "died while writing key slot" in gw.log()
        # not busy, not torn: every worker sees exactly the stored record
        statuses = {(p, httpx.get(h.gw.url + p, headers=hdr).status_code)
                    for p in ["/api/other/x", "/api/public/x"] * 10}
        assert statuses == {("/api/other/x", 200), ("/api/public/x", 403)}, statuses
        assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["scopes"] == ["GET /api/other/*"]
        # and the replacement is the writer: the key can be changed again
        gw.admin("PATCH", f"/keys/{rec['id']}", json={"scopes": ["GET /api/public/*"]}, expect=200)
        assert httpx.get(h.gw.url + "/api/public/y", headers=hdr).status_code == 200
    finally:
        h.stop()
