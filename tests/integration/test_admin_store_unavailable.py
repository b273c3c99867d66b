"""A full disk under the key store: admin writes answer 503 store_unavailable (JSON, one
log line per incident, no traceback), nothing is half-applied, the gateway keeps serving,
and once space is freed writes work again and `fastgate audit verify` passes.

The store lives on a small tmpfs mounted for this test (`mount -t tmpfs` works as root,
here and in CI), filled to the last byte with a plain file."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ADMIN_TOKEN, ROOT, basic_config

EXTRA = """
[keys]
store = "disk/keys.db"
capacity = 1024
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""
DOWN = "key store unavailable"
UP = "key store available again"


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(d)], check=True,
                   capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


def fill(disk) -> str:
    """Write a file until the disk is full; returns its path."""
    path = os.path.join(disk, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return path


def test_disk_full_answers_503_then_recovers(start_gateway, upstream, small_disk):
    gw = start_gateway(basic_config(upstream, extra=EXTRA))
    key_a = gw.admin("POST", "/keys", json={"name": "before"}, expect=201).json()
    assert httpx.get(gw.url + "/echo/x", headers={"x-api-key": key_a["key"]}, timeout=10).status_code == 200

    filler = fill(small_disk)
    for attempt in range(3):
        r = gw.admin("POST", "/keys", json={"name": f"during-{attempt}"})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "store_unavailable" and err["request_id"] == r.headers["x-request-id"]
        assert "Nothing was changed" in err["message"]
    # revoke and update fail too, and are not half-applied: the key still works everywhere
    assert gw.admin("POST", f"/keys/{key_a['id']}/revoke").json()["error"]["code"] == "store_unavailable"
    assert gw.admin("PATCH", f"/keys/{key_a['id']}", json={"scopes": ["GET /nothing"]}).status_code == 503
    for _ in range(4):  # several connections: both workers
        assert httpx.get(gw.url + "/echo/x", headers={"x-api-key": key_a["key"]}, timeout=10).status_code == 200
    assert httpx.get(gw.url + "/status/204", timeout=10).status_code == 204  # an open route
    # reads still answer, and show that nothing was stored
    listed = gw.admin("GET", "/keys", expect=200).json()["keys"]
    assert [(k["id"], k["status"], k["scopes"]) for k in listed] == [(key_a["id"], "active", [])]

    log = gw.log()
    assert log.count(DOWN) == 1, log[-4000:]
    assert "Traceback" not in log and "internal_error" not in log, log[-4000:]

    os.unlink(filler)
    key_b = gw.admin("POST", "/keys", json={"name": "after"}, expect=201).json()
    assert httpx.get(gw.url + "/echo/x", headers={"x-api-key": key_b["key"]}, timeout=10).status_code == 200
    gw.admin("POST", f"/keys/{key_a['id']}/revoke", expect=200)
    assert httpx.get(gw.url + "/echo/x", headers={"x-api-key": key_a["key"]}, timeout=10).status_code == 401
    deadline = time.monotonic() + 5
    while UP not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.log().count(UP) == 1

    # a second incident is logged once more
    filler = fill(small_disk)
    assert gw.admin("POST", "/keys", json={"name": "again"}).status_code == 503
    assert gw.admin("POST", "/keys", json={"name": "again"}).status_code == 503
    assert gw.log().count(DOWN) == 2
    os.unlink(filler)

    # the audit trail holds exactly the writes that were acknowledged, and verifies
    events = gw.admin("GET", "/audit", expect=200).json()["events"]
    assert [(e["event"], e["key_id"]) for e in events] == [
        ("created", key_a["id"]), ("created", key_b["id"]), ("revoked", key_a["id"])]
    env = {k: v for k, v in os.environ.items() if k != "FASTGATE_ADMIN_TOKEN"}
    p = subprocess.run([sys.executable, "-m", "fastgate", "audit", "verify", "--store", str(small_disk / "keys.db")],
                       capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert p.returncode == 0 and "audit trail OK" in p.stdout, (p.stdout, p.stderr)
    assert ADMIN_TOKEN  # the gateway above ran with the admin token of conftest
