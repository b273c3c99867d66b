"""Router: host, longest path prefix on segment boundaries, methods."""

from __future__ import annotations

import pytest

from fastgate.config import build_config
from fastgate.server.routing import Router
from fastgate.upstream.pool import build_groups


def make_router(routes, **server) -> Router:
    raw = {
        "server": server,
        "upstreams": [
            {"name": "a", "targets": ["127.0.0.1:9001"]},
            {"name": "b", "targets": ["127.0.0.1:9002"]},
        ],
        "routes": [{"upstream": "a", "auth": "none", **r} for r in routes],
    }
    config = build_config(raw, "test.toml")
    groups, _ = build_groups(config.upstreams, {})
    return Router(config, groups)


def name(router, path, host=None):
    r = router.match(host, path)
    return None if r is None else r.name


@pytest.fixture
def router():
    return make_router(
        [
            {"name": "root", "path": "/"},
            {"name": "orders", "path": "/orders"},
            {"name": "order-items", "path": "/orders/items"},
            {"name": "api-v1", "path": "/api/v1/"},
            {"name": "get-only", "path": "/ro", "methods": ["GET", "HEAD"]},
            {"name": "orders-host", "path": "/orders", "host": "Shop.Example"},
            {"name": "host-root", "path": "/", "host": "only.example", "upstream": "b"},
        ]
    )


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/orders", "orders"),
        (b"/orders/", "orders"),
        (b"/orders/1", "orders"),
        (b"/orders/1/lines", "orders"),
        (b"/ordersX", "root"),
        (b"/orders.json", "root"),
        (b"/order", "root"),
        (b"/orders/items", "order-items"),
        (b"/orders/items/7", "order-items"),
        (b"/orders/itemsX", "orders"),
        (b"/api/v1", "api-v1"),
        (b"/api/v1/x", "api-v1"),
        (b"/api/v10", "root"),
        (b"/api", "root"),
        (b"/", "root"),
        (b"/anything/else", "root"),
    ],
)
def test_longest_prefix_on_segment_boundaries(router, path, expected):
    assert name(router, path) == expected


def test_host_specific_beats_host_agnostic(router):
    assert name(router, b"/orders/1", b"shop.example") == "orders-host"
    # hosts are matched case-insensitively (config lower-cases them; the worker lower-cases the request)
    assert router.match(b"shop.example", b"/orders").host == b"shop.example"
    # a path the host-specific table does not cover falls back to the agnostic table
    assert name(router, b"/other", b"shop.example") == "root"
    assert name(router, b"/orders/items/1", b"shop.example") == "orders-host"
    # another host, or none, never sees host-specific routes
    assert name(router, b"/orders/1", b"other.example") == "orders"
    assert name(router, b"/orders/1", None) == "orders"


def test_host_catch_all(router):
    assert name(router, b"/orders/1", b"only.example") == "host-root"
    assert name(router, b"/", b"only.example") == "host-root"


def test_no_catch_all_means_no_route():
    r = make_router([{"name": "orders", "path": "/orders"}])
    assert name(r, b"/orders/1") == "orders"
    assert name(r, b"/") is None
    assert name(r, b"/ordersX") is None
    assert name(r, b"/other/orders") is None


def test_only_host_specific_routes():
    r = make_router([{"name": "h", "path": "/", "host": "a.example"}])
    assert name(r, b"/x", b"a.example") == "h"
    assert name(r, b"/x", b"b.example") is None
    assert name(r, b"/x", None) is None


def test_methods_and_allow_header(router):
    ro = router.match(None, b"/ro/1")
    assert ro.name == "get-only"
    assert ro.methods == frozenset({b"GET", b"HEAD"})
    assert ro.allow_header == b"allow: GET, HEAD\r\n"
    any_method = router.match(None, b"/orders")
    assert any_method.methods is None
    assert any_method.allow_header == b""


def test_route_carries_upstream_and_body_limit():
    r = make_router(
        [
            {"name": "small", "path": "/small", "max_body_bytes": "1k", "upstream": "b"},
            {"name": "default", "path": "/default"},
            {"name": "unlimited", "path": "/unlimited", "max_body_bytes": 0},
        ],
        max_body_bytes="2k",
    )
    small = r.match(None, b"/small")
    assert small.max_body == 1024
    assert small.upstream.name == "b"
    assert r.match(None, b"/default").max_body == 2048
    assert r.match(None, b"/default").upstream.name == "a"
    assert r.match(None, b"/unlimited").max_body >= 1 << 60


def test_trailing_slash_route_covers_bare_prefix():
    r = make_router([{"name": "docs", "path": "/docs/"}])
    assert name(r, b"/docs") == "docs"
    assert name(r, b"/docs/") == "docs"
    assert name(r, b"/docs/a") == "docs"
    assert name(r, b"/docsa") is None


def test_deep_path_many_routes():
    routes = [{"name": f"r{i}", "path": f"/p{i}"} for i in range(200)]
    r = make_router(routes)
    assert name(r, b"/p150/" + b"x/" * 100) == "r150"
    assert name(r, b"/p200") is None
