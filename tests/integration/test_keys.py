"""Custom API keys end to end: a real 2-worker gateway, its admin API, a real upstream."""

from __future__ import annotations

import datetime as dt
import threading
import time

import httpx
import pytest

from conftest import basic_config

KEYS_EXTRA = """
[keys]
store = "keys.db"
failed_auth_limit = "{fal}"
[plans.free]
limits = ["5/second", "1000/day"]
[plans.gold]
limits = ["1000/second"]
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
[[routes]]
name = "q"
path = "/echo/q"
upstream = "app"
auth = "key"
key_query_param = "api_key"
[[routes]]
name = "open-limited"
path = "/echo/open"
upstream = "app"
auth = "none"
ip_limits = ["3/minute"]
"""


def keyed_config(upstream, fal: str = "1000/minute") -> str:
    return basic_config(upstream, extra=KEYS_EXTRA.format(fal=fal))


@pytest.fixture
def gw(start_gateway, upstream):
    return start_gateway(keyed_config(upstream))


def new_key(gw, **fields) -> tuple[str, dict]:
    body = {"name": "test", **fields}
    r = gw.admin("POST", "/keys", json=body, expect=201)
    data = r.json()
    return data["key"], data


def call(gw, path="/echo/x", key=None, method="GET", header="x-api-key", client=None, **kw):
    headers = kw.pop("headers", {})
    if key is not None:
        headers[header] = key if header != "authorization" else f"Bearer {key}"
    c = client or httpx
    return c.request(method, gw.url + path, headers=headers, timeout=10, **kw)


def err(r) -> str:
    return r.json()["error"]["code"]


def test_every_denial_path(gw):
    assert err(r := call(gw)) == "key_missing" and r.status_code == 401
    assert "bearer" in r.headers["www-authenticate"].lower()
    assert err(call(gw, key="not-a-key")) == "key_invalid"
    good, rec = new_key(gw)
    # A well-formed key with a wrong checksum, and a well-formed unknown key.
    assert err(call(gw, key=good[:-1] + ("A" if good[-1] != "A" else "B"))) == "key_invalid"
    from fastgate import core

    assert err(call(gw, key=core.make_key("nosuchkey"))) == "key_invalid"
    # Two different keys in one request.
    other, _ = new_key(gw)
    r = call(gw, key=good, headers={"authorization": f"Bearer {other}"})
    assert r.status_code == 400 and err(r) == "bad_request"
    # The same key twice is fine.
    assert call(gw, key=good, headers={"authorization": f"Bearer {good}"}).status_code == 200
    # Query parameter only where the route opts in.
    assert err(call(gw, path=f"/echo/x?api_key={good}")) == "key_missing"
    r = call(gw, path=f"/echo/q/x?a=1&api_key={good}&b=2")
    assert r.status_code == 200
    assert r.json()["query"] == "a=1&b=2"  # the key never reaches the upstream


def test_identity_headers_upstream_and_no_key(gw):
    key, rec = new_key(gw, owner="acme", plan="gold")
    for header in ("x-api-key", "authorization"):
        r = call(gw, key=key, header=header, headers={"x-fastgate-owner": "spoofed"})
        assert r.status_code == 200
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["x-fastgate-key-id"] == rec["id"]
        assert seen["x-fastgate-owner"] == "acme" and seen["x-fastgate-tenant"] == "acme"
        assert seen["x-fastgate-plan"] == "gold"
        assert "x-api-key" not in seen and "authorization" not in seen
        assert key not in r.text
        assert r.headers["ratelimit-limit"] == "1000"
        assert "ratelimit-remaining" in r.headers and "x-ratelimit-remaining" in r.headers
    assert key not in gw.log()
    assert key.split("_")[2] not in (gw.config_path.parent / "keys.db").read_bytes().decode("latin-1")


def test_scope_and_path_normalisation_bypass_attempts(gw):
    key, _ = new_key(gw, scopes=["GET /echo/public/*"])
    assert call(gw, "/echo/public/a", key).status_code == 200
    assert call(gw, "/echo/public", key).status_code == 200
    r = call(gw, "/echo/public/a", key, method="POST")
    assert r.status_code == 403 and err(r) == "scope_denied"
    attempts = [
        "/echo/private",
        "/echo/public/../private",
        "/echo/public/%2e%2e/private",
        "/echo/public/%2E%2E/private",
        "/echo/public/..%2fprivate",
        "/echo/public/..%2Fprivate",
        "/echo/public/..%5cprivate",
        "/echo/public%2f..%2fprivate",
        "/echo/./public/../../echo/private",
        "//echo//public/..//private",
        "/echo/publicity",
        "/echo/public/.%2e/private",
    ]
    for path in attempts:
        # httpx would normalise some of these itself: send them raw.
        import socket

        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        try:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\nx-api-key: %s\r\nConnection: close\r\n\r\n" % (path.encode(), key.encode()))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        assert data.startswith(b"HTTP/1.1 403"), (path, data[:200])
        assert b"scope_denied" in data


def test_per_key_cidrs(gw):
    denied, _ = new_key(gw, deny_cidrs=["127.0.0.0/8"])
    r = call(gw, key=denied)
    assert r.status_code == 403 and err(r) == "ip_denied"
    allowed, _ = new_key(gw, allow_cidrs=["10.0.0.0/8"])
    assert err(call(gw, key=allowed)) == "ip_denied"
    ok, _ = new_key(gw, allow_cidrs=["127.0.0.1/32", "::1/128"])
    assert call(gw, key=ok).status_code == 200


def test_expiry(gw):
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    key, rec = new_key(gw, expires_at=soon)
    assert call(gw, key=key).status_code == 200
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and call(gw, key=key).status_code == 200:
        time.sleep(0.2)
    r = call(gw, key=key)
    assert r.status_code == 401 and err(r) == "key_expired"
    time.sleep(1.5)  # the admin process records the expiry once
    events = gw.admin("GET", f"/audit?key_id={rec['id']}", expect=200).json()["events"]
    assert [e["event"] for e in events] == ["created", "expired"]
    assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["status"] == "expired"


def test_rotation_grace_then_rejection(gw):
    old, rec = new_key(gw)
    r = gw.admin("POST", f"/keys/{rec['id']}/rotate", json={"grace_seconds": 2}, expect=200)
    new = r.json()["key"]
    assert new != old and r.json()["grace_until"]
    assert call(gw, key=old).status_code == 200
    assert call(gw, key=new).status_code == 200
    # An update during the grace period does not cut the old key off.
    gw.admin("PATCH", f"/keys/{rec['id']}", json={"name": "renamed"}, expect=200)
    assert call(gw, key=old).status_code == 200
    time.sleep(2.2)
    r = call(gw, key=old)
    assert r.status_code == 401 and err(r) == "key_invalid"
    assert call(gw, key=new).status_code == 200
    # Rotation without grace: the old secret stops at once.
    r = gw.admin("POST", f"/keys/{rec['id']}/rotate", json={}, expect=200)
    assert call(gw, key=new).status_code == 401
    assert call(gw, key=r.json()["key"]).status_code == 200


def test_revocation_under_load_is_immediate_in_every_worker(gw):
    key, rec = new_key(gw, plan="gold")
    stop = threading.Event()
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def hammer():
        # A fresh connection per request spreads the load over both workers.
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = httpx.get(gw.url + "/echo/x", headers={"x-api-key": key}, timeout=5).status_code
            except httpx.HTTPError:
                continue
            with lock:
                results.append((t0, status))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.8)
        gw.admin("POST", f"/keys/{rec['id']}/revoke", expect=200)
        revoked_at = time.monotonic()
        time.sleep(0.8)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    before = [s for t0, s in results if t0 < revoked_at]
    after = [s for t0, s in results if t0 > revoked_at]
    assert before.count(200) > 10
    assert after and all(s == 401 for s in after), after


def test_limit_is_exact_across_workers(start_gateway, upstream):
    gw = start_gateway(keyed_config(upstream), workers=2)
    key, rec = new_key(gw, limits=["50/minute"])
    statuses: list[int] = []
    lock = threading.Lock()

    def burst(n):
        for _ in range(n):
            r = httpx.get(gw.url + "/echo/x", headers={"x-api-key": key}, timeout=10)
            with lock:
                statuses.append(r.status_code)
            if r.status_code == 429:
                assert err(r) == "rate_limited"
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["ratelimit-limit"] == "50"
                assert r.headers["ratelimit-remaining"] == "0"
                assert "ratelimit-reset" in r.headers and "x-ratelimit-reset" in r.headers
                assert "w=60" in r.headers["ratelimit-policy"]

    threads = [threading.Thread(target=burst, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 200
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150


def test_plan_change_takes_effect_on_next_request(gw):
    key, rec = new_key(gw, plan="free")
    assert call(gw, key=key).headers["ratelimit-limit"] == "5"
    gw.admin("PATCH", f"/keys/{rec['id']}", json={"plan": "gold"}, expect=200)
    r = call(gw, key=key)
    assert r.headers["ratelimit-limit"] == "1000"
    assert {k.lower(): v for k, v in r.json()["headers"]}["x-fastgate-plan"] == "gold"
    # Per-key limits override the plan's window.
    gw.admin("PATCH", f"/keys/{rec['id']}", json={"limits": ["2/second"]}, expect=200)
    assert call(gw, key=key).headers["ratelimit-limit"] == "2"
    # Unknown plans are refused with the field path.
    r = gw.admin("PATCH", f"/keys/{rec['id']}", json={"plan": "platinum"}, expect=400)
    assert "$.plan" in r.json()["error"]["message"]


def test_per_ip_limit_on_open_route(gw):
    statuses = [httpx.get(gw.url + "/echo/open/x", timeout=5).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


def test_failed_auth_throttling_never_locks_out_a_valid_key(start_gateway, upstream):
    # One address (think: a NAT) sends 35 bad keys with a 30/minute limit: the
    # failures beyond 30 get 429, counted across both workers (every request is
    # a new connection, spread by SO_REUSEPORT), and a valid key from the same
    # address is still checked and admitted.
    gw = start_gateway(keyed_config(upstream, fal="30/minute"))
    good, _ = new_key(gw)
    from fastgate import core

    codes = [call(gw, key=core.make_key("guess")).status_code for _ in range(35)]
    assert codes == [401] * 30 + [429] * 5, codes
    r = call(gw, key=core.make_key("guess"))
    assert r.status_code == 429 and err(r) == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert [call(gw, key=good).status_code for _ in range(10)] == [200] * 10
    # a missing key is not a failed guess
    assert call(gw).status_code == 401


def test_failed_auth_retry_after_tells_the_truth(start_gateway, upstream):
    gw = start_gateway(keyed_config(upstream, fal="5/second"))
    from fastgate import core

    # Start at the beginning of a second so the five fit in one window.
    time.sleep(1 - time.time() % 1)
    assert [call(gw, key=core.make_key("g")).status_code for _ in range(5)] == [401] * 5
    r = call(gw, key=core.make_key("g"))
    assert r.status_code == 429
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 2
    time.sleep(wait + 0.05)
    assert call(gw, key=core.make_key("g")).status_code == 401


def test_keys_survive_restart(start_gateway, upstream):
    gw = start_gateway(keyed_config(upstream))
    key, rec = new_key(gw, owner="acme")
    revoked, rrec = new_key(gw)
    gw.admin("POST", f"/keys/{rrec['id']}/revoke", expect=200)
    gw.stop()
    gw2 = start_gateway(keyed_config(upstream))
    assert gw2.config_path == gw.config_path
    r = call(gw2, key=key)
    assert r.status_code == 200
    assert {k.lower(): v for k, v in r.json()["headers"]}["x-fastgate-owner"] == "acme"
    assert call(gw2, key=revoked).status_code == 401
    assert gw2.admin("GET", f"/keys/{rec['id']}", expect=200).json()["owner"] == "acme"


def test_admin_api_is_closed_and_validates(gw):
    assert httpx.get(gw.admin_url + "/keys", timeout=5).status_code == 401
    r = httpx.get(gw.admin_url + "/keys", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert r.status_code == 401
    assert httpx.get(gw.admin_url + "/healthz", timeout=5).status_code == 200
    r = gw.admin("POST", "/keys", json={"name": 5}, expect=400)
    assert "$.name" in r.json()["error"]["message"]
    r = gw.admin("POST", "/keys", json={"name": "x", "scopes": ["BOGUS"]}, expect=400)
    assert "$.scopes[0]" in r.json()["error"]["message"]
    r = gw.admin("POST", "/keys", json={"name": "x", "limits": ["5/fortnight"]}, expect=400)
    assert "limits" in r.json()["error"]["message"]
    r = gw.admin("POST", "/keys", json={"name": "x", "expires_at": "tomorrow"}, expect=400)
    assert "expires_at" in r.json()["error"]["message"]
    r = gw.admin("POST", "/keys", json={"name": "x", "bogus": 1}, expect=400)
    gw.admin("GET", "/keys/nope", expect=404)
    # The secret is shown once: never in list/show.
    key, rec = new_key(gw)
    assert key not in gw.admin("GET", "/keys", expect=200).text
    assert key not in gw.admin("GET", f"/keys/{rec['id']}", expect=200).text
    doc = gw.admin("GET", "/openapi.json", expect=200).json()
    assert doc["openapi"].startswith("3.")
    assert {"/keys", "/keys/{id}", "/keys/{id}/rotate", "/keys/{id}/revoke", "/audit"} <= set(doc["paths"])
    assert "CreateKey" in doc["components"]["schemas"]


def test_audit_chain_records_lifecycle(gw):
    key, rec = new_key(gw)
    gw.admin("PATCH", f"/keys/{rec['id']}", json={"owner": "acme"}, expect=200)
    gw.admin("POST", f"/keys/{rec['id']}/rotate", json={}, expect=200)
    gw.admin("POST", f"/keys/{rec['id']}/revoke", expect=200)
    events = gw.admin("GET", f"/audit?key_id={rec['id']}", expect=200).json()["events"]
    assert [e["event"] for e in events] == ["created", "updated", "rotated", "revoked"]
    assert events[1]["changes"]["owner"] == {"old": None, "new": "acme"} or "owner" in events[1]["changes"]
    text = gw.admin("GET", "/audit", expect=200).text
    assert key not in text
    from fastgate.keys.store import KeyStore

    store = KeyStore(str(gw.config_path.parent / "keys.db"))
    try:
        ok, problems, n = store.verify_audit()
    finally:
        store.close()
    assert ok and not problems and n >= 4


def test_admin_process_crash_hands_the_writer_role_to_its_replacement(gw):
    import os
    import signal

    key, rec = new_key(gw)
    old_admin = gw.admin_pid()
    os.kill(old_admin, signal.SIGKILL)
    deadline = time.monotonic() + 15
    new_admin = None
    while time.monotonic() < deadline:
        try:
            new_admin = gw.admin_pid()
            if new_admin != old_admin:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert new_admin and new_admin != old_admin
    # The replacement writes the shared table: a new key works, a revoke bites.
    key2, rec2 = new_key(gw)
    assert call(gw, key=key2).status_code == 200
    gw.admin("POST", f"/keys/{rec['id']}/revoke", expect=200)
    assert call(gw, key=key).status_code == 401
    assert "admin process" in gw.log()


def test_a_key_that_does_not_fit_is_refused_and_not_stored(start_gateway, upstream):
    # A tiny extension heap: capacity 16 gets the 64 KiB minimum.
    extra = KEYS_EXTRA.format(fal="1000/minute").replace('store = "keys.db"', 'store = "keys.db"\ncapacity = 16')
    gw = start_gateway(basic_config(upstream, extra=extra))
    big = {"name": "big", "scopes": [f"GET /echo/{'x' * 400}/{i}/*" for i in range(200)]}  # ~80 KB
    r = gw.admin("POST", "/keys", json=big, expect=503)
    assert r.json()["error"]["code"] == "key_table_full"
    assert gw.admin("GET", "/keys", expect=200).json()["keys"] == []
    # Small keys still fit and work.
    key, rec = new_key(gw)
    assert call(gw, key=key).status_code == 200
    # An update that does not fit leaves the key as it was.
    r = gw.admin("PATCH", f"/keys/{rec['id']}", json={"scopes": big["scopes"]}, expect=503)
    assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["scopes"] == []
    assert call(gw, key=key).status_code == 200
