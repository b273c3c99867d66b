"""Issue 10, must-have 2, through the real 2-worker gateway: with a tiny
rate_capacity, keys past it still get 200 under their exact limits (keys have
their own counters), and a flood of failed key checks cannot fill anything."""

from __future__ import annotations

import httpx

from conftest import basic_config

EXTRA = """
[keys]
store = "keys.db"
rate_capacity = 16
auth_capacity = 16
failed_auth_limit = "1000/minute"
[plans.tiny]
limits = ["3/minute"]
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
[[routes]]
name = "open-limited"
path = "/echo/open"
upstream = "app"
auth = "none"
ip_limits = ["1000/minute"]
"""


def test_keys_past_the_rate_capacity_keep_exact_limits(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream, extra=EXTRA))
    from fastgate import core

    # failed checks and an ip_limits route use the address tables first
    for _ in range(40):
        assert httpx.get(gw.url + "/echo/x", headers={"x-api-key": core.make_key("nope")}).status_code == 401
    assert httpx.get(gw.url + "/echo/open/x").status_code == 200
    keys = [gw.admin("POST", "/keys", json={"name": f"k{i}", "plan": "tiny"}, expect=201).json()["key"]
            for i in range(40)]
    with httpx.Client() as c:
        for key in keys:
            got = [c.get(gw.url + "/echo/x", headers={"x-api-key": key}) for _ in range(4)]
            assert [r.status_code for r in got] == [200, 200, 200, 429], key
            assert [r.headers["ratelimit-remaining"] for r in got[:3]] == ["2", "1", "0"]
            assert got[3].json()["error"]["code"] == "rate_limited"
