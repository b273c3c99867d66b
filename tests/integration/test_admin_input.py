"""The admin API never answers 500 to input: a real 2-worker gateway, raw and hostile
requests, each refused with the right 4xx, a JSON error, the field path and the limit."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from conftest import ADMIN_TOKEN, ROOT, basic_config

EXTRA = """
[keys]
store = "keys.db"
[plans.free]
limits = ["5/second"]
[plans.gold]
limits = ["1000/second"]
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def gw(start_gateway, upstream):
    return start_gateway(basic_config(upstream, extra=EXTRA))


def raw(gw, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> httpx.Response:
    """Send exactly these bytes as the body (httpx would encode a json= itself)."""
    h = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.request(method, gw.admin_url + path, content=body, headers=h, timeout=10)


def refused(r: httpx.Response, status: int, code: str = "bad_request") -> str:
    """The error contract: status, JSON {"error": {code, message, request_id}}; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == code and err["request_id"] == r.headers["x-request-id"], err
    return err["message"]


def test_malformed_json_bodies_are_400_with_the_path(gw):
    for body, expect in [
        (b"", "$: expected a JSON object (CreateKey), the body is empty"),
        (b"   ", "the body is empty"),
        (b'{"name": "x"', "truncated"),
        (b'{"name": "x",', "truncated"),
        (b"\x00", "U+0000 (a NUL byte)"),
        (b'{"name": "x"}\x00', "trailing characters"),
        (b'{"name": "\\ud800"}', "$.name: contains a lone UTF-16 surrogate U+D800"),
        (b'{"name": "x", "metadata": {"k": "\\udc00x"}}', "$.metadata.k: contains a lone UTF-16 surrogate U+DC00"),
        (b'{"name": "\xff"}', "not valid UTF-8"),
        (b"[]", "$: Expected `object`, got `array`"),
        (b'"x"', "$: Expected `object`, got `str`"),
        (b'{"name": 5}', "$.name: Expected `str`, got `int`"),
        (b'{"name": "x", "bogus": 1}', "unknown field `bogus` (known fields: name, owner,"),
    ]:
        msg = refused(raw(gw, "POST", "/keys", body), 400)
        assert expect in msg, (body, msg)
    # nothing was stored by any of them
    assert gw.admin("GET", "/keys", expect=200).json()["keys"] == []


def test_deep_and_large_values_are_bounded(gw):
    deep = b'{"name": "x", "metadata": {"a": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}}"
    msg = refused(raw(gw, "POST", "/keys", deep), 400)
    assert msg.startswith("$.metadata[...][...]: Expected") and "at most 2 levels deep" in msg, msg
    deep_list = b'{"name": "x", "scopes": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    assert "$.scopes[0]: Expected `str`, got `array`" in refused(raw(gw, "POST", "/keys", deep_list), 400)
    many = {"name": "x", "scopes": [f"GET /s/{i}" for i in range(10_000)]}
    assert "$.scopes: Expected `array` of length <= 256" in refused(gw.admin("POST", "/keys", json=many), 400)
    for body, expect in [
        ({"name": "x" * 201}, "$.name: Expected `str` of length <= 200"),
        ({"name": "x", "metadata": {f"k{i}": i for i in range(33)}}, "$.metadata: Expected `object` of length <= 32"),
        ({"name": "x", "metadata": {"k": "v" * 257}}, "$.metadata[...]: Expected `str` of length <= 256"),
        ({"name": "x", "metadata": {"k": list(range(17))}}, "$.metadata[...]: Expected `array` of length <= 16"),
        ({"name": "x", "metadata": {"k": 1 << 64}}, "$.metadata[...]: Expected `int` <= 9223372036854775807"),
        ({"name": "x", "allow_cidrs": ["10.0.0.0/8"] * 257}, "$.allow_cidrs: Expected `array` of length <= 256"),
        ({"name": "x", "limits": ["1/second", "2/second"]}, "$.limits[1]: a second limit is already set"),
    ]:
        msg = refused(gw.admin("POST", "/keys", json=body), 400)
        assert expect in msg, (body, msg)
    # 1 MiB + 1 byte: 413, before the body is read
    r = raw(gw, "POST", "/keys", b" " * ((1 << 20) + 1))
    refused(r, 413, "body_too_large")


def test_text_fields_refuse_control_characters(gw):
    for field in ("name", "owner", "plan"):
        for bad, shown in [("a\x00b", "U+0000 (a NUL byte) at index 1"), ("a\nb", "U+000A (a newline)"),
                           ("ab\u202e", "U+202E (a right-to-left override) at index 2"), ("a\x1b[31m", "U+001B"),
                           ("a\u2028", "U+2028 (a line separator)"), ("a\x85", "U+0085")]:
            body = {"name": "ok", field: bad}
            msg = refused(gw.admin("POST", "/keys", json=body), 400)
            assert msg.startswith(f"$.{field}: control characters are not allowed, found {shown}"), (field, msg)
    assert "$.name: expected a name that is not blank" in refused(gw.admin("POST", "/keys", json={"name": "  "}), 400)
    msg = refused(gw.admin("POST", "/keys", json={"name": "x", "metadata": {"a\tb": 1}}), 400)
    assert msg.startswith("$.metadata: key 'a\\tb': control characters are not allowed, found U+0009")
    # "name\n": a regex with $ (as msgspec applies it) would let this one through
    assert "U+000A" in refused(gw.admin("POST", "/keys", json={"name": "name\n"}), 400)
    rec = gw.admin("POST", "/keys", json={"name": "ok", "metadata": {"note": "multi\nline"}}, expect=201).json()
    for field, bad in (("name", "x\u202ey"), ("owner", "\x07")):
        refused(gw.admin("PATCH", f"/keys/{rec['id']}", json={field: bad}), 400)
    assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["name"] == "ok"


def test_scopes_cidrs_limits_and_plans_are_validated_as_declared(gw):
    for body, expect in [
        ({"name": "x", "scopes": ["BOGUS"]}, "$.scopes[0]: expected 'METHOD[,METHOD] /path'"),
        ({"name": "x", "scopes": ["get /x"]}, "$.scopes[0]: expected 'METHOD[,METHOD] /path' (methods in capitals"),
        ({"name": "x", "scopes": ["GET /a*b"]}, "$.scopes[0]"),
        ({"name": "x", "allow_cidrs": ["10.0.0.0/33"]}, "$.allow_cidrs[0]: expected an IPv4 or IPv6 address or CIDR"),
        ({"name": "x", "deny_cidrs": ["", "1.2.3.4"]}, "$.deny_cidrs[0]: Expected `str` of length >= 2"),
        ({"name": "x", "limits": ["5/fortnight"]}, "$.limits[0]: expected N/second|minute|hour|day|month"),
        ({"name": "x", "limits": ["0/second"]}, "$.limits[0]"),
        ({"name": "x", "plan": "platinum"}, "$.plan: expected one of the configured plans (free, gold), found 'platinum'"),
    ]:
        msg = refused(gw.admin("POST", "/keys", json=body), 400)
        assert expect in msg, (body, msg)
    # host bits are cleared, as in the config's [ip] lists; addresses become /32 and /128
    rec = gw.admin("POST", "/keys", json={"name": "x", "allow_cidrs": ["10.1.2.3/8", "192.0.2.7", "2001:DB8::1/32"],
                                          "plan": "gold"}, expect=201).json()
    assert rec["allow_cidrs"] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


def test_expiry_in_the_past_is_refused_and_times_keep_milliseconds(gw):
    msg = refused(gw.admin("POST", "/keys", json={"name": "x", "expires_at": "2020-01-01T00:00:00Z"}), 400)
    assert msg.startswith("$.expires_at: 2020-01-01T00:00:00.000Z is not in the future")
    for bad in ("tomorrow", "2030-01-01", "2030-01-01T00:00:00", "2030-01-01 00:00:00Z", "2030-02-30T00:00:00Z"):
        assert "$.expires_at:" in refused(gw.admin("POST", "/keys", json={"name": "x", "expires_at": bad}), 400)
    # any RFC 3339 in, milliseconds out (UTC, 'Z'); a longer fraction is truncated, never rounded up
    rec = gw.admin("POST", "/keys", json={"name": "x", "expires_at": "2099-12-01t23:43:20.9309+02:00"},
                   expect=201).json()
    assert rec["expires_at"] == "2099-12-01T21:43:20.930Z"
    for k in ("created_at", "updated_at"):
        dt.datetime.strptime(rec[k], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert len(rec[k]) == 24, rec[k]
    assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["expires_at"] == "2099-12-01T21:43:20.930Z"
    # PATCH: a past expiry is refused too; null clears it
    msg = refused(gw.admin("PATCH", f"/keys/{rec['id']}", json={"expires_at": "2001-01-01T00:00:00+01:00"}), 400)
    assert "is not in the future" in msg
    assert gw.admin("PATCH", f"/keys/{rec['id']}", json={"expires_at": None}, expect=200).json()["expires_at"] is None
    # rotation with a grace: grace_until to the millisecond in the reply and in GET; 3600.0 is an integer
    rot = gw.admin("POST", f"/keys/{rec['id']}/rotate", json={"grace_seconds": 3600.0}, expect=200).json()
    until = dt.datetime.strptime(rot["grace_until"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(rot["grace_until"]) == 24 and until > dt.datetime.utcnow()
    assert gw.admin("GET", f"/keys/{rec['id']}", expect=200).json()["grace_until"] == rot["grace_until"]
    assert "multiple of 1" in refused(gw.admin("POST", f"/keys/{rec['id']}/rotate", json={"grace_seconds": 1.5}), 400)
    # the CLI shows the same strings
    env = {**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    out = subprocess.run([sys.executable, "-m", "fastgate", "keys", "show", rec["id"], "--admin", gw.admin_url],
                         capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert f"grace_until  {rot['grace_until']}" in out.stdout
    gw.admin("PATCH", f"/keys/{rec['id']}", json={"expires_at": "2099-12-01T21:43:20.930Z"}, expect=200)
    out = subprocess.run([sys.executable, "-m", "fastgate", "keys", "list", "--admin", gw.admin_url],
                         capture_output=True, text=True, timeout=30, env=env, cwd=str(ROOT))
    assert out.returncode == 0 and "2099-12-01T21:43:20.930Z" in out.stdout, out


def test_methods_paths_and_parameters(gw):
    rec = gw.admin("POST", "/keys", json={"name": "x"}, expect=201).json()
    for method, path, allow in [("PUT", "/keys", "POST, GET"), ("DELETE", "/keys", "POST, GET"),
                                ("TRACE", f"/keys/{rec['id']}", "GET, PATCH, DELETE"),
                                ("GET", f"/keys/{rec['id']}/rotate", "POST"), ("POST", "/healthz", "GET"),
                                ("OPTIONS", "/metrics", "GET"), ("GET", "/reload", "POST")]:
        r = httpx.request(method, gw.admin_url + path, headers=AUTH, timeout=10)
        assert refused(r, 405, "method_not_allowed").startswith(f"{method} is not allowed")
        assert r.headers["allow"] == allow
    # HEAD gets the 405 head without a body, and the connection stays usable
    with httpx.Client(base_url=gw.admin_url, headers=AUTH, timeout=10) as c:
        r = c.head("/keys")
        assert r.status_code == 405 and r.content == b""
        assert c.get("/healthz").status_code == 200
    refused(gw.admin("GET", "/nope"), 404, "not_found")
    refused(gw.admin("GET", "/keys/"), 400)  # an empty id, not the list
    assert "path parameter 'id'" in refused(gw.admin("GET", "/keys/has_under"), 400)
    assert "path parameter 'id'" in refused(gw.admin("GET", "/keys/%00"), 400)
    refused(gw.admin("GET", "/keys/AAAA"), 404, "not_found")
    refused(gw.admin("POST", "/keys/AAAA/revoke"), 404, "not_found")
    for query, expect in [("limit=0", "query parameter 'limit': Expected `int` >= 1"),
                          ("limit=1001", "Expected `int` <= 1000"), ("limit=x", "expected a whole number"),
                          ("limit=", "expected a whole number"), ("after=%00", "query parameter 'after'"),
                          ("owner=", "query parameter 'owner'"), ("owner=a%0Ab", "U+000A")]:
        assert expect in refused(gw.admin("GET", f"/keys?{query}"), 400), query
    assert gw.admin("GET", "/keys?limit=1.0&unknown=1", expect=200).json()["keys"]
    for query in ("after=79033016067961896960", "after=-1", "limit=0"):
        refused(gw.admin("GET", f"/audit?{query}"), 400)
    msg = refused(gw.admin("GET", f"/keys/{rec['id']}/usage?by=week"), 400)
    assert msg == "query parameter 'by': expected minute, hour or day, found 'week'"
    refused(gw.admin("GET", "/usage/top?n=100000"), 400)
    # an undecodable request line is a JSON 400 too
    s = socket.create_connection(("127.0.0.1", int(gw.admin_url.rsplit(":", 1)[1])), timeout=5)
    try:
        s.sendall(b"GET /keys HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        head = s.recv(65536)
    finally:
        s.close()
    assert head.startswith(b"HTTP/1.1 400") and b'"code":"bad_request"' in head


def test_openapi_covers_every_endpoint_with_formats_and_limits(gw):
    from fastgate.admin.server import ROUTES

    doc = gw.admin("GET", "/openapi.json", expect=200).json()
    declared = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert declared == {(op.method, op.path) for op in ROUTES}
    for want in [("GET", "/keys/{id}/usage"), ("GET", "/usage/top"), ("GET", "/metrics"), ("POST", "/reload"),
                 ("GET", "/openapi.json"), ("GET", "/healthz"), ("GET", "/readyz")]:
        assert want in declared, want
    s = doc["components"]["schemas"]
    create = s["CreateKey"]["properties"]
    assert create["name"]["maxLength"] == 200 and "pattern" in create["name"]
    assert create["scopes"]["maxItems"] == 256 and "pattern" in create["scopes"]["items"]
    assert create["expires_at"]["anyOf"][0]["format"] == "date-time"
    assert create["plan"]["anyOf"][0]["enum"] == ["free", "gold"]
    assert create["metadata"]["maxProperties"] == 32
    assert s["RotateKey"]["properties"]["grace_seconds"]["type"] == "integer"
    assert s["KeyOut"]["properties"]["created_at"]["anyOf"][0]["format"] == "date-time"
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/keys"]["post"]["responses"]["503"]
    # the document is valid JSON Schema 2020-12 where it declares schemas (jsonschema-rs compiles each)
    import jsonschema_rs

    for name, schema in s.items():
        jsonschema_rs.validator_for({**schema, "components": doc["components"]})
    assert json.dumps(doc)
