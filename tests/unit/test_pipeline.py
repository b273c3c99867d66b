"""The decision pipeline's named stages: their order, and what each route
compiles (an unconfigured stage is not in a route's list at all)."""

from __future__ import annotations

import socket

import pytest

from fastgate import pipeline
from fastgate.config import build_config
from fastgate.errors import ERRORS
from fastgate.workers.worker import Worker


def test_the_order_is_pinned():
    assert pipeline.STAGES == ("parse", "route", "client_ip", "ip", "limits", "key", "scope", "rate", "rewrite",
                               "upstream", "log")
    # compiled stages come in that order
    names = [cls.name for cls in pipeline.PER_ROUTE]
    assert [pipeline.STAGES.index(n) for n in names] == sorted(pipeline.STAGES.index(n) for n in names)


def test_every_proxy_error_names_a_stage_of_the_pipeline():
    # the access log's decision and the metrics label come from the one error table
    proxy_side = {stage for _, stage in ERRORS.values()} - {"admin", "store", "internal", "client"}
    assert proxy_side <= set(pipeline.STAGES), proxy_side - set(pipeline.STAGES)


CONFIG = {
    "upstreams": [{"name": "u", "targets": ["127.0.0.1:9"]}],
    "plans": {"p": {"limits": ["5/second"]}},
    "routes": [
        {"name": "open", "path": "/", "upstream": "u", "auth": "none", "max_body_bytes": 0},
        {"name": "keyed", "path": "/k", "upstream": "u", "auth": "key"},
        {"name": "limited", "path": "/l", "upstream": "u", "auth": "none", "ip_limits": ["10/minute"]},
        {"name": "rewritten", "path": "/r", "upstream": "u", "auth": "none", "strip_path": True},
        {"name": "legacy", "path": "/m", "upstream": "u", "auth": "key", "method_override": True},
    ],
}


@pytest.fixture
def worker():
    a, b = socket.socketpair()
    listen = socket.socket()
    try:
        yield lambda extra={}: Worker(0, build_config({**CONFIG, **extra}, "test.toml"), listen, a)
    finally:
        for s in (a, b, listen):
            s.close()


def stages_of(w, name):
    (route,) = [r for r in w.router.routes if r.name == name]
    return [s.name for s in route.stages]


def test_each_route_compiles_only_what_it_uses(worker):
    w = worker()
    assert stages_of(w, "open") == ["client_ip", "upstream"]  # no body limit, no ip rules, no key
    assert stages_of(w, "keyed") == ["client_ip", "limits", "key", "scope", "rate", "upstream"]
    assert stages_of(w, "limited") == ["client_ip", "limits", "rate", "upstream"]
    assert stages_of(w, "rewritten") == ["client_ip", "limits", "rewrite", "upstream"]
    assert stages_of(w, "legacy") == ["client_ip", "limits", "key", "scope", "rate", "rewrite", "upstream"]


def test_global_ip_rules_add_the_ip_stage_everywhere(worker):
    w = worker({"ip": {"deny": ["203.0.113.0/24"]}})
    assert stages_of(w, "open") == ["client_ip", "ip", "upstream"]
    assert stages_of(w, "keyed")[:3] == ["client_ip", "ip", "limits"]
