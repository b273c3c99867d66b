"""`fastgate keys ...` / `fastgate audit ...` run as real subprocesses against a real
multi-worker gateway and the real upstream; keys the CLI prints are then used through
the gateway, and the audit trail is tampered with raw sqlite3 as an attacker would."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ADMIN_TOKEN, ROOT, basic_config

CLI_TIMEOUT = 30
KEY_RE = re.compile(r"\bfg_[0-9A-Za-z_]+")

EXTRA = """
[keys]
store = "keys.db"
[plans.gold]
limits = ["1000/second"]
[[routes]]
name = "echo"
path = "/echo"
upstream = "app"
auth = "key"
"""


def cli(*args, token=ADMIN_TOKEN, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTGATE_ADMIN_TOKEN"}
    if token is not None:
        env["FASTGATE_ADMIN_TOKEN"] = token
    env["USER"] = "cli-test"
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env, cwd=cwd or str(ROOT))


def ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def jcli(gw, *args):
    return json.loads(ok(cli(*args, "--admin", gw.admin_url, "--json")).stdout)


def call(gw, key, path="/echo/x"):
    return httpx.get(gw.url + path, headers={"x-api-key": key}, timeout=10)


def wait_status(gw, key, status, path="/echo/x", timeout=5.0):
    """Changes are applied before the API answers; poll briefly only to be robust."""
    deadline = time.monotonic() + timeout
    while True:
        r = call(gw, key, path)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def upstream_headers(resp) -> dict:
    return {k.lower(): v for k, v in resp.json()["headers"]}


@pytest.fixture
def gw(start_gateway, upstream):
    return start_gateway(basic_config(upstream, extra=EXTRA), workers=2)


def test_key_lifecycle_through_the_gateway(gw):
    admin = ("--admin", gw.admin_url)

    # create (human output): the key is printed once with the note, and works on an auth=key route
    p = ok(cli("keys", "create", "--name", "alpha", "--owner", "acme", "--scope", "GET /echo/*",
               "--limit", "100/second", "--expires-in", "30d", "--meta", "team=core", *admin))
    assert "shown once, store it now" in p.stdout
    keys = KEY_RE.findall(p.stdout)
    assert len(keys) == 1, p.stdout
    key1 = keys[0]
    key_id = re.search(r"created key (\S+)", p.stdout).group(1)
    assert "acme" in p.stdout and "GET /echo/*" in p.stdout and "team=core" in p.stdout
    r = call(gw, key1)
    assert r.status_code == 200, r.text
    h = upstream_headers(r)
    assert h["x-fastgate-key-id"] == key_id and "x-api-key" not in h
    assert call(gw, key1, "/echo").status_code in (200, 403)  # scope is GET /echo/*
    assert httpx.post(gw.url + "/echo/x", headers={"x-api-key": key1}, timeout=10).status_code == 403
    assert call(gw, "fg_nope_" + "A" * 30).status_code == 401
    assert httpx.get(gw.url + "/echo/x", timeout=10).status_code == 401

    # create --json: parses, carries the key once and the record
    rec2 = jcli(gw, "keys", "create", "--name", "beta", "--owner", "other", "--expires-at", "2099-01-01T00:00:00Z")
    assert rec2["key"].startswith("fg_") and rec2["name"] == "beta" and rec2["expires_at"].startswith("2099-01-01")
    assert call(gw, rec2["key"]).status_code == 200

    # list / show
    p = ok(cli("keys", "list", *admin))
    assert key_id in p.stdout and rec2["id"] in p.stdout and "ID" in p.stdout.splitlines()[0]
    assert not KEY_RE.search(p.stdout)  # never a secret outside create/rotate
    page = jcli(gw, "keys", "list", "--owner", "acme")
    assert [k["id"] for k in page["keys"]] == [key_id]
    page = jcli(gw, "keys", "list", "--limit", "1")
    assert len(page["keys"]) == 1 and page["next_after"]
    page2 = jcli(gw, "keys", "list", "--limit", "1", "--after", page["next_after"])
    assert len(page2["keys"]) == 1 and page2["keys"][0]["id"] != page["keys"][0]["id"]
    shown = jcli(gw, "keys", "show", key_id)
    assert shown["id"] == key_id and shown["owner"] == "acme" and "key" not in shown
    assert shown["metadata"] == {"team": "core"} and shown["status"] == "active"
    p = ok(cli("keys", "show", key_id, *admin))
    assert "acme" in p.stdout and not KEY_RE.search(p.stdout)

    # update: plan change reaches the upstream identity headers; meta merges; clears work
    upd = jcli(gw, "keys", "update", key_id, "--plan", "gold", "--meta", "env=prod", "--clear-scopes", "--no-expiry")
    assert upd["plan"] == "gold" and upd["scopes"] == [] and upd.get("expires_at") is None
    assert upd["metadata"] == {"team": "core", "env": "prod"}
    r = wait_status(gw, key1, 200, "/echo")
    assert r.status_code == 200 and upstream_headers(r).get("x-fastgate-plan") == "gold"
    p = ok(cli("keys", "update", key_id, "--name", "alpha2", *admin))
    assert "alpha2" in p.stdout
    p = cli("keys", "update", key_id, "--plan", "platinum", *admin)
    assert p.returncode == 1 and "plan" in p.stderr and "gold" in p.stderr, p.stderr
    p = cli("keys", "update", key_id, *admin)
    assert p.returncode == 2 and "nothing to update" in p.stderr

    # rotate with grace: old and new both work; the new one is printed once
    p = ok(cli("keys", "rotate", key_id, "--grace", "1h", *admin))
    assert "shown once, store it now" in p.stdout and "keeps working until" in p.stdout
    (key1b,) = KEY_RE.findall(p.stdout)
    assert key1b != key1
    assert call(gw, key1b).status_code == 200
    assert call(gw, key1).status_code == 200
    # rotate without grace (JSON): the previous key stops at once
    rot = jcli(gw, "keys", "rotate", rec2["id"])
    assert rot["key"].startswith("fg_") and rot["key"] != rec2["key"]
    assert wait_status(gw, rec2["key"], 401).status_code == 401
    assert call(gw, rot["key"]).status_code == 200

    # revoke: the key (new and old secret) gets 401 in every worker
    p = ok(cli("keys", "revoke", key_id, *admin))
    assert "revoked" in p.stdout
    for _ in range(6):  # several connections: spread over both workers
        assert call(gw, key1b).status_code == 401
        assert call(gw, key1).status_code == 401
    assert jcli(gw, "keys", "show", key_id)["status"] == "revoked"
    p = cli("keys", "rotate", key_id, *admin)
    assert p.returncode == 1 and "revoked" in p.stderr

    # delete
    assert jcli(gw, "keys", "delete", rec2["id"]) == {"id": rec2["id"], "deleted": True}
    assert wait_status(gw, rot["key"], 401).status_code == 401
    p = cli("keys", "show", rec2["id"], *admin)
    assert p.returncode == 1 and "no key with id" in p.stderr and p.stdout == ""

    # --expires-in: a short expiry ends the key in every worker and shows as expired
    short = jcli(gw, "keys", "create", "--name", "short", "--expires-in", "2s")
    assert call(gw, short["key"]).status_code == 200
    r = wait_status(gw, short["key"], 401, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_expired"
    assert jcli(gw, "keys", "show", short["id"])["status"] == "expired"
    p = ok(cli("keys", "list", *admin))
    assert re.search(rf"{short['id']}\s+short\s+-\s+-\s+expired", p.stdout), p.stdout

    # audit list: every lifecycle event, with the CLI's actor (the admin process records
    # the expiry on its 1 s sweep: wait for it so the trail is complete)
    deadline = time.monotonic() + 10
    while True:
        events = jcli(gw, "audit", "list")["events"]
        if ("expired", short["id"]) in [(e["event"], e["key_id"]) for e in events] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    kinds = [(e["event"], e["key_id"]) for e in events]
    for want in [("created", key_id), ("created", rec2["id"]), ("updated", key_id), ("rotated", key_id),
                 ("rotated", rec2["id"]), ("revoked", key_id), ("deleted", rec2["id"]),
                 ("created", short["id"])]:
        assert want in kinds, (want, kinds)
    assert all(e["actor"] == "cli-test" for e in events if e["event"] != "expired")
    only = jcli(gw, "audit", "list", "--key", key_id)["events"]
    assert only and {e["key_id"] for e in only} == {key_id}
    later = jcli(gw, "audit", "list", "--after", str(events[1]["seq"]), "--limit", "2")["events"]
    assert [e["seq"] for e in later] == [events[2]["seq"], events[3]["seq"]]
    p = ok(cli("audit", "list", *admin))
    assert "SEQ" in p.stdout and "revoked" in p.stdout and "deleted" in p.stdout
    assert not KEY_RE.search(p.stdout)

    # audit verify (local, no API): OK via --config and --store, JSON too
    db = gw.config_path.parent / "keys.db"
    p = ok(cli("audit", "verify", "--config", str(gw.config_path), cwd=str(gw.config_path.parent), token=None))
    assert "OK" in p.stdout
    v = json.loads(ok(cli("audit", "verify", "--store", str(db), "--json", token=None)).stdout)
    assert v["ok"] is True and v["rows_checked"] >= len(events)

    # tamper: edit one audit row with raw sqlite3 (an attacker drops the append-only
    # trigger first); verify fails (exit 1) and names the row
    victim = events[2]["seq"]
    conn = sqlite3.connect(str(db))
    try:
        with pytest.raises(sqlite3.IntegrityError):  # the trigger stops a casual edit
            conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = ?", (victim,))
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = ?", (victim,))
        conn.commit()
    finally:
        conn.close()
    p = cli("audit", "verify", "--store", str(db), token=None)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "FAILED" in p.stdout and f"seq {victim}:" in p.stdout and "edited" in p.stdout
    v = json.loads(cli("audit", "verify", "--store", str(db), "--json", token=None).stdout)
    assert v["ok"] is False and any(f"seq {victim}" in x for x in v["problems"])


def test_errors_and_exit_codes(gw, tmp_path):
    admin = ("--admin", gw.admin_url)
    # wrong token: the API's message on stderr, exit 1
    p = cli("keys", "list", *admin, token="wrong-token")
    assert p.returncode == 1 and "missing or wrong admin token" in p.stderr and p.stdout == ""
    p = cli("keys", "list", *admin, "--json", token="wrong-token")
    assert p.returncode == 1 and json.loads(p.stderr)["error"]["code"] == "unauthorized"
    # no token: says which variable, exit 2 (also the config's token_env)
    p = cli("keys", "list", *admin, token=None)
    assert p.returncode == 2 and "FASTGATE_ADMIN_TOKEN" in p.stderr
    cfg = tmp_path / "other.toml"
    cfg.write_text('[admin]\nlisten = "127.0.0.1:1"\ntoken_env = "MY_GW_TOKEN"\n')
    p = cli("keys", "list", "--config", str(cfg), token=None)
    assert p.returncode == 2 and "MY_GW_TOKEN" in p.stderr
    cfg0 = tmp_path / "port0.toml"
    cfg0.write_text('[admin]\nlisten = "127.0.0.1:0"\n')
    p = cli("keys", "list", "--config", str(cfg0))
    assert p.returncode == 2 and "--admin URL" in p.stderr
    # connection refused: names the URL, suggests fastgate run
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    p = cli("keys", "list", "--admin", dead)
    assert p.returncode == 1 and dead in p.stderr and "fastgate run" in p.stderr
    # the admin address comes from --config [admin] listen
    port = gw.admin_url.rsplit(":", 1)[1]
    cfg2 = tmp_path / "admin.toml"
    cfg2.write_text(f'[admin]\nlisten = "127.0.0.1:{port}"\n')
    assert "keys" in json.loads(ok(cli("keys", "list", "--config", str(cfg2), "--json")).stdout)
    # validation errors from the API: exit 1 with its message
    p = cli("keys", "create", "--name", "x", "--allow-cidr", "10.0.0.0/33", *admin)
    assert p.returncode == 1 and "allow_cidrs" in p.stderr
    # usage errors: exit 2
    for args in (["keys", "create", *admin],  # --name is required
                 ["keys", "create", "--name", "x", "--expires-in", "soon", *admin],
                 ["keys", "create", "--name", "x", "--meta", "novalue", *admin],
                 ["keys", "create", "--name", "x", "--expires-in", "1d", "--expires-at", "2099-01-01T00:00:00Z"],
                 ["audit", "verify", "--store", str(tmp_path / "missing.db")]):
        p = cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
