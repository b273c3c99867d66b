"""Config loading: TOML and YAML decode into Structs; every problem is located
(file + ``$.field.path`` + what was expected / found) and all of them are
reported at once, by the library and by ``fastgate check-config``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastgate.config import build_config, load_config
from fastgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

UP = {"name": "app", "targets": ["127.0.0.1:9000"]}


def route(**kw):
    r = {"name": "r", "path": "/x", "upstream": "app", "auth": "none"}
    r.update(kw)
    return r


def problems_of(raw, source="gw.toml") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        build_config(raw, source)
    err = info.value
    assert err.source == source
    # The rendered text carries every problem as "FILE: $.path: message".
    lines = str(err).splitlines()
    assert lines == [f"{source}: {p}: {m}" for p, m in err.problems]
    return err.problems


def only_problem(raw) -> tuple[str, str]:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


GOOD_TOML = """
[server]
listen = "127.0.0.1:8080"
workers = 2
max_header_bytes = "16k"
max_url_bytes = 4096
max_body_bytes = "10m"
header_timeout = 0.5
[admin]
listen = "[::1]:9901"
[keys]
header = "X-API-Key"
[plans.free]
limits = ["10/second", "1000/day"]
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:9000", "localhost:9001"]
[[routes]]
name = "orders"
path = "/orders"
methods = ["GET", "POST"]
upstream = "orders"
auth = "key"
max_body_bytes = "1k"
host = "API.example.com"
[ip]
deny = ["203.0.113.0/24", "2001:db8::/32"]
trusted_proxies = ["10.0.0.1"]
[log]
access = "stdout"
"""

GOOD_YAML = """
server:
  listen: 127.0.0.1:8080
  max_header_bytes: 32k
plans:
  free:
    limits: ["5/minute"]
upstreams:
  - name: orders
    targets: ["127.0.0.1:9000"]
routes:
  - name: orders
    path: /orders
    upstream: orders
    auth: none
"""


def test_valid_toml(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text(GOOD_TOML)
    c = load_config(str(f))
    assert c.server.workers == 2
    assert c.server.max_header_bytes == 16 * 1024
    assert c.server.max_url_bytes == 4096
    assert c.server.max_body_bytes == 10 * 1024 * 1024
    assert c.server.header_timeout == 0.5
    assert c.keys.header == "x-api-key"
    assert c.plans["free"].limits == ["10/second", "1000/day"]
    assert [u.name for u in c.upstreams] == ["orders"]
    r = c.routes[0]
    assert (r.name, r.path, r.methods, r.auth, r.max_body_bytes, r.host) == (
        "orders", "/orders", ["GET", "POST"], "key", 1024, "api.example.com"
    )
    assert c.ip.deny == ["203.0.113.0/24", "2001:db8::/32"]
    assert c.log.access == "stdout"


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_valid_yaml(tmp_path, suffix):
    f = tmp_path / ("gw" + suffix)
    f.write_text(GOOD_YAML)
    c = load_config(str(f))
    assert c.server.max_header_bytes == 32 * 1024
    assert c.plans["free"].limits == ["5/minute"]
    assert c.routes[0].auth == "none"
    assert c.routes[0].upstream == "orders"


def test_empty_file_is_all_defaults(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text("")
    c = load_config(str(f))
    assert c.routes == [] and c.upstreams == []
    assert c.server.max_header_bytes == 32 * 1024


@pytest.mark.parametrize(
    "text, unit",
    [("16k", 1 << 10), ("16K", 1 << 10), ("16kb", 1 << 10), ("16KiB", 1 << 10), ("2m", 1 << 20), ("1g", 1 << 30), ("512", 1)],
)
def test_size_strings(text, unit):
    c = build_config({"server": {"max_url_bytes": text}}, "gw.toml")
    assert c.server.max_url_bytes == int("".join(ch for ch in text if ch.isdigit())) * unit


def test_size_int_passes_through():
    c = build_config({"server": {"max_header_bytes": 1234}}, "gw.toml")
    assert c.server.max_header_bytes == 1234


# -- every error located --------------------------------------------------------


def test_unknown_section():
    path, msg = only_problem({"bogus": {}})
    assert path == "$.bogus"
    assert "unknown section" in msg and "server" in msg and "routes" in msg


def test_unknown_field():
    path, msg = only_problem({"server": {"lisen": "127.0.0.1:1"}})
    # msgspec locates unknown fields at the object; the field must be named.
    assert path in ("$.server", "$.server.lisen")
    assert "lisen" in msg


def test_unknown_field_in_list_entry():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(pth="/y")]})
    assert path in ("$.routes[0]", "$.routes[0].pth")
    assert "pth" in msg


def test_wrong_type_located():
    path, msg = only_problem({"server": {"workers": "two"}})
    assert path == "$.server.workers"
    assert "expected" in msg.lower() and "int" in msg and "str" in msg


def test_out_of_range_located():
    path, msg = only_problem({"server": {"header_timeout": 0}})
    assert path == "$.server.header_timeout"
    assert "expected" in msg.lower()


def test_missing_required_field():
    path, msg = only_problem({"upstreams": [UP], "routes": [{"path": "/x", "upstream": "app"}]})
    assert path == "$.routes[0]"
    assert "name" in msg


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1:99999", "::1:80", "127.0.0.1:"])
def test_bad_listen(listen):
    path, msg = only_problem({"server": {"listen": listen}})
    assert path == "$.server.listen"
    assert "expected" in msg and repr(listen) in msg


def test_bad_admin_listen():
    path, msg = only_problem({"admin": {"listen": "localhost"}})
    assert path == "$.admin.listen"
    assert "expected" in msg and "'localhost'" in msg


def test_bad_limit_string():
    path, msg = only_problem({"plans": {"free": {"limits": ["10/second", "10/fortnight"]}}})
    assert path == "$.plans.free.limits[1]"
    assert "expected" in msg and "'10/fortnight'" in msg


@pytest.mark.parametrize("limit", ["0/second", "ten/second", "10 per second", "10/Second"])
def test_other_bad_limits(limit):
    path, msg = only_problem({"plans": {"p": {"limits": [limit]}}})
    assert path == "$.plans.p.limits[0]"
    assert repr(limit) in msg


def test_bad_cidr():
    path, msg = only_problem({"ip": {"deny": ["10.0.0.0/8", "10.0.0.0/33"]}})
    assert path == "$.ip.deny[1]"
    assert "expected" in msg and "'10.0.0.0/33'" in msg


@pytest.mark.parametrize("field", ["allow", "trusted_proxies"])
def test_bad_cidr_other_lists(field):
    path, msg = only_problem({"ip": {field: ["not-an-ip"]}})
    assert path == f"$.ip.{field}[0]"
    assert "'not-an-ip'" in msg


def test_bad_upstream_target():
    path, msg = only_problem({"upstreams": [{"name": "a", "targets": ["127.0.0.1:1", "nope"]}]})
    assert path == "$.upstreams[0].targets[1]"
    assert "'nope'" in msg


def test_bad_size_string():
    path, msg = only_problem({"server": {"max_body_bytes": "16x"}})
    assert path == "$.server.max_body_bytes"
    assert "expected" in msg and "'16x'" in msg


def test_bad_route_size_string():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(max_body_bytes="lots")]})
    assert path == "$.routes[0].max_body_bytes"
    assert "'lots'" in msg


def test_route_references_unknown_upstream():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(upstream="nowhere")]})
    assert path == "$.routes[0].upstream"
    assert "expected" in msg and "'nowhere'" in msg and "app" in msg


def test_duplicate_upstream_name():
    path, msg = only_problem({"upstreams": [UP, dict(UP, targets=["127.0.0.1:9001"])]})
    assert path == "$.upstreams[1].name"
    assert "duplicate" in msg and "'app'" in msg


def test_duplicate_route_name():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(), route(path="/y")]})
    assert path == "$.routes[1].name"
    assert "duplicate" in msg and "'r'" in msg


def test_duplicate_route_host_and_path():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(), route(name="r2")]})
    assert path == "$.routes[1].path"
    assert "'/x'" in msg


def test_same_path_on_different_hosts_is_fine():
    c = build_config({"upstreams": [UP], "routes": [route(), route(name="r2", host="a.example")]}, "gw.toml")
    assert len(c.routes) == 2


@pytest.mark.parametrize("bad", ["/x//y", "/x/./y", "/x/../y", "/%7euser", "/x/..", "/a%2fb"])
def test_non_normalised_route_path(bad):
    path, msg = only_problem({"upstreams": [UP], "routes": [route(path=bad)]})
    assert path == "$.routes[0].path"
    assert "expected a normalised path" in msg and repr(bad) in msg


def test_relative_route_path():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(path="x")]})
    assert path == "$.routes[0].path"
    assert "'x'" in msg


def test_lower_case_method():
    path, msg = only_problem({"upstreams": [UP], "routes": [route(methods=["GET", "post"])]})
    assert path == "$.routes[0].methods[1]"
    assert "'post'" in msg


def test_top_level_not_a_table():
    path, msg = only_problem([1, 2])
    assert path == "$"
    assert "expected" in msg


def test_routes_not_an_array():
    path, msg = only_problem({"routes": {"a": 1}})
    assert path == "$.routes"
    assert "expected an array" in msg


def test_all_problems_reported_at_once():
    raw = {
        "server": {"workers": -1},
        "ip": {"deny": ["300.1.1.1"]},
        "upstreams": [UP],
        "routes": [route(upstream="missing")],
    }
    problems = problems_of(raw)
    assert len(problems) == 3, problems
    # (exact field paths are pinned by the tests above; here: one per broken field)
    assert [p.split(".")[1].split("[")[0] for p, _ in problems] == ["server", "ip", "routes"]


def test_all_problems_in_one_section_reported():
    # Three broken fields of the same table: three problems, not the first one only.
    problems = problems_of({"server": {"listen": "nope", "workers": -1, "max_url_bytes": "8q"}})
    assert len(problems) == 3, problems
    text = "\n".join(f"{p}: {m}" for p, m in problems)
    assert "'nope'" in text and "'8q'" in text and "workers" in text


def test_all_problems_in_one_route_reported():
    problems = problems_of({"upstreams": [UP], "routes": [route(path="x", methods=["get"], upstream="nope")]})
    assert len(problems) == 3, problems
    text = "\n".join(f"{p}: {m}" for p, m in problems)
    assert "'x'" in text and "'get'" in text and "'nope'" in text


def test_invalid_toml_located(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text("[server\nlisten = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert info.value.source == str(f)
    assert str(info.value).startswith(f"{f}: $: invalid TOML")


def test_invalid_yaml_located(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert str(info.value).startswith(f"{f}: $: invalid YAML")


def test_missing_file(tmp_path):
    f = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert str(info.value).startswith(f"{f}: $: cannot read file")


def test_yaml_errors_located_like_toml(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  workers: two\nroutes:\n  - name: r\n    path: /x\n    upstream: nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert [p for p, _ in info.value.problems] == ["$.server.workers", "$.routes[0].upstream"]
    assert all(line.startswith(f"{f}: $.") for line in str(info.value).splitlines())


# -- fastgate check-config ------------------------------------------------------


def check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastgate", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
    )


def test_check_config_ok(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text(GOOD_TOML)
    r = check_config(f)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{f}: ok")
    assert "1 routes" in lines[0] and "1 upstreams" in lines[0]


def test_check_config_reports_every_problem(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text(textwrap.dedent(
        """
        [server]
        workers = -1
        [bogus]
        x = 1
        [[upstreams]]
        name = "app"
        targets = ["127.0.0.1:9000"]
        [[routes]]
        name = "r"
        path = "/x"
        upstream = "missing"
        """
    ))
    r = check_config(f)
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr
    assert f"{f}: $.server.workers: " in err
    assert f"{f}: $.bogus: unknown section" in err
    assert f"{f}: $.routes[0].upstream: " in err and "'missing'" in err
    assert f"{f}: 3 problems found" in err


def test_check_config_missing_file(tmp_path):
    f = tmp_path / "absent.toml"
    r = check_config(f)
    assert r.returncode == 2
    assert f"{f}: $: cannot read file" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_invalid_toml(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text("listen = \n")
    r = check_config(f)
    assert r.returncode == 2
    assert f"{f}: $: invalid TOML" in r.stderr
    assert "Traceback" not in r.stderr


def test_ip_lists_from_files(tmp_path):
    from fastgate.config import load_config

    (tmp_path / "deny.txt").write_text("# bad networks\n203.0.113.0/24\n\n198.51.100.7  # one host\n")
    (tmp_path / "gw.toml").write_text('[ip]\ndeny = ["192.0.2.0/24"]\ndeny_files = ["deny.txt"]\n')
    c = load_config(str(tmp_path / "gw.toml"))
    # the stored form of fastgate.types.Cidr, as the admin API stores a key's CIDRs: an address is its /32
    assert c.ip.deny == ["192.0.2.0/24", "203.0.113.0/24", "198.51.100.7/32"]


def test_ip_file_problems_are_located(tmp_path):
    from fastgate.config import load_config
    from fastgate.errors import ConfigError

    (tmp_path / "allow.txt").write_text("10.0.0.0/8\nnot-an-ip\n")
    (tmp_path / "gw.toml").write_text('[ip]\nallow_files = ["allow.txt", "missing.txt"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path / "gw.toml"))
    text = str(exc.value)
    assert "$.ip.allow_files[0]" in text and "allow.txt:2" in text and "not-an-ip" in text
    assert "$.ip.allow_files[1]" in text and "missing.txt" in text


# -- limits and CIDRs: fastgate.types' Limit and Cidr, nothing the core refuses later --------


def test_cidr_host_bits_are_cleared_and_the_core_compiles_the_result():
    # Was: `check-config` said ok, then every worker died in CidrSet.compile ("has host bits
    # set") and the master restarted them forever. Now it is the network it means (as nginx
    # reads "10.0.0.1/8", and as the admin API stores a key's CIDRs).
    from fastgate import core

    c = build_config({"ip": {"deny": ["10.0.0.1/8", "2001:DB8::1/32"], "trusted_proxies": ["10.0.0.1"]}}, "gw.toml")
    assert c.ip.deny == ["10.0.0.0/8", "2001:db8::/32"] and c.ip.trusted_proxies == ["10.0.0.1/32"]
    core.CidrSet.compile(c.ip.deny, "ip.deny")
    core.CidrSet.compile(c.ip.trusted_proxies, "ip.trusted_proxies")


@pytest.mark.parametrize("cidr", [
    "fe80::1%eth0",        # a zone id: accepted here before, then refused by the core in every worker
    " 10.0.0.1",           # spaces and the netmask form: tighter than before, for one grammar everywhere
    "10.0.0.0/255.0.0.0",
])
def test_cidrs_outside_the_shared_grammar(cidr):
    path, msg = only_problem({"ip": {"allow": [cidr]}})
    assert path == "$.ip.allow[0]"
    assert msg == f"expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, found {cidr!r}"


@pytest.mark.parametrize("limits, where, msg", [
    # each refused by the core when a worker compiled the plan, after check-config said ok
    (["1/second", "2/second"], "[1]", "a second limit is already set at {field}[0] (at most one limit per window)"),
    (["50000000000/month"], "[0]", "Expected `str` of length <= 16"),
    (["1000000000/month"], "[0]", "expected N/second|minute|hour|day|month with N 1..999999999, "
                                  "found '1000000000/month'"),
    # tighter than before, for one grammar everywhere (the admin API never took these)
    (["10 / second"], "[0]", "expected N/second|minute|hour|day|month with N 1..999999999, found '10 / second'"),
    (["010/second"], "[0]", "found '010/second'"),
    (["1/second"] * 6, "", "Expected `array` of length <= 5"),
])
def test_limits_outside_the_shared_grammar(limits, where, msg):
    for raw, path in (({"plans": {"p": {"limits": limits}}}, "$.plans.p.limits"),
                      ({"upstreams": [UP], "routes": [route(ip_limits=limits)]}, "$.routes[0].ip_limits")):
        p, m = only_problem(raw)
        assert p == path + where and msg.format(field=path.rsplit(".", 1)[1]) in m, (p, m)


def test_failed_auth_limit_is_a_limit_or_off():
    assert build_config({"keys": {"failed_auth_limit": "off"}}, "gw.toml").keys.failed_auth_limit == "off"
    path, msg = only_problem({"keys": {"failed_auth_limit": "10 per minute"}})
    assert (path, msg) == ("$.keys.failed_auth_limit",
                           "expected N/second|minute|hour|day|month with N 1..999999999, found '10 per minute'")


def test_every_bad_entry_of_a_list_is_reported():
    # msgspec stops at the first bad item; the loader goes on item by item
    problems = problems_of({"ip": {"deny": ["fe80::1%eth0", "10.0.0.0/8", "", 5, "x.y"]}})
    assert problems == [
        ("$.ip.deny[0]", "expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, "
                         "found 'fe80::1%eth0'"),
        ("$.ip.deny[2]", "Expected `str` of length >= 2"),
        ("$.ip.deny[3]", "Expected `str`, got `int`"),
        ("$.ip.deny[4]", "expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, found 'x.y'"),
    ]


def test_plan_names_follow_the_rule_keys_name_them_with():
    problems = problems_of({"plans": {"ok": {}, "a\nb": {}, " gold": {}, 7: {}}})
    assert problems == [
        ("$.plans", "plan name 'a\\nb': control characters are not allowed, found U+000A (a newline) at index 1"),
        ("$.plans", "plan name ' gold': expected a name that is not blank and does not start with a space, "
                    "found ' gold'"),
        ("$.plans", "plan name 7: expected a string, found int"),  # YAML `7:`; the workers' decode refused it
    ]


def test_ip_file_entries_follow_the_same_grammar(tmp_path):
    (tmp_path / "deny.txt").write_text("10.0.0.1/8\nfe80::1%eth0\n")
    (tmp_path / "gw.toml").write_text('[ip]\ndeny_files = ["deny.txt"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path / "gw.toml"))
    assert exc.value.problems == [("$.ip.deny_files[0]", f"{tmp_path / 'deny.txt'}:2: expected an IPv4 or IPv6 "
                                   "address or CIDR like 10.0.0.0/8 or 2001:db8::/32, found 'fe80::1%eth0'")]


def test_what_the_config_accepts_the_core_compiles():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fastgate import core
    from fastgate.types import CIDR_PATTERN, LIMIT_PATTERN

    near = st.sampled_from(["", " ", "0", "/", "%eth0", "/33", "\n", "::", ".0"])
    cidr = st.one_of(st.from_regex(CIDR_PATTERN, fullmatch=True), st.text(max_size=12),
                     st.tuples(st.from_regex(CIDR_PATTERN, fullmatch=True), near).map("".join))
    limit = st.one_of(st.from_regex(LIMIT_PATTERN, fullmatch=True), st.text(max_size=12),
                      st.tuples(st.sampled_from(["0", "00", " ", "4294967295"]),
                                st.from_regex(LIMIT_PATTERN, fullmatch=True)).map("".join))

    @settings(max_examples=300, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(cidr, max_size=4), st.lists(limit, max_size=3))
    def check(cidrs, limits):
        try:
            c = build_config({"ip": {"deny": cidrs}, "plans": {"p": {"limits": limits}}}, "gw.toml")
        except ConfigError:
            return
        core.CidrSet.compile(c.ip.deny, "ip.deny")
        core.compile_limits(c.plans["p"].limits, "plans.p.limits")
        assert c.ip.deny == [str(__import__("ipaddress").ip_network(x, strict=False)) for x in cidrs]

    check()


def test_parse_limit_stays_the_workers_reader():
    from fastgate import config

    assert config.parse_limit("10/second") == (10, "second")
    assert config.parse_limit(" 10 / second") == (10, "second")  # a key stored before the rule
    assert config.LIMIT_UNITS == ("second", "minute", "hour", "day", "month")


def test_cluster_section():
    cfg = build_config({"cluster": {"store": "postgresql://gw:pw@db:5432/fastgate", "redis": "rediss://r:6380/2",
                                    "node_id": "gw-1:8080"}}, "gw.toml")
    assert (cfg.cluster.store, cfg.cluster.redis, cfg.cluster.ack_timeout) == (
        "postgresql://gw:pw@db:5432/fastgate", "rediss://r:6380/2", 1.0)
    assert build_config({}, "gw.toml").cluster.store is None  # single node by default
    from fastgate.config import node_id

    assert node_id(cfg) == "gw-1:8080"
    import socket

    plain = build_config({"server": {"listen": "0.0.0.0:9000"}, "cluster": {"store": "postgresql://db/x"}}, "gw.toml")
    assert node_id(plain) == f"{socket.gethostname()}:9000"


def test_cluster_problems_are_located_and_hide_passwords():
    problems = dict(problems_of({"cluster": {"store": "mysql://u:hunter2@db/x", "redis": "http://r",
                                             "node_id": "two words", "ack_timeout": 0}}))
    assert problems["$.cluster.store"].startswith("expected a URL postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, "
                                                  "found 'mysql://u:***@db/x'")
    assert "hunter2" not in str(problems)
    assert problems["$.cluster.redis"].startswith("expected a URL redis://")
    assert "node_id" in str(problems) and "$.cluster.ack_timeout" in problems
    assert only_problem({"cluster": {"store": "postgresql://db:70000/x"}})[0] == "$.cluster.store"
    assert only_problem({"cluster": {"store": "postgresql://db/"}})[1].endswith(
        "with a database name, found 'postgresql://db/'")
    assert only_problem({"cluster": {"store": "postgresql://db/x", "redis": "redis://r/db0"}})[0] == "$.cluster.redis"
    assert only_problem({"cluster": {"redis": "redis://r"}}) == (
        "$.cluster.store", "expected a postgresql:// URL: cluster mode (redis is set) needs the shared store")
    assert only_problem({"cluster": {"stor": "x"}})[0] == "$.cluster.stor"
