"""fastgate.types: the value types the config, the admin API bodies and the key store share.
Each Rule's admissions, refusals and stored form; the located messages; and that checking a
decoded Struct, a plain value, or several named values applies the same rules."""

from __future__ import annotations

import msgspec
import pytest

from fastgate import core
from fastgate import types as T


@pytest.mark.parametrize("rule, good, stored", [
    (T.CIDR, "10.1.2.3/8", "10.0.0.0/8"),
    (T.CIDR, "192.0.2.7", "192.0.2.7/32"),
    (T.CIDR, "2001:DB8::1/32", "2001:db8::/32"),
    (T.CIDR, "::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
    (T.LIMIT, "999999999/month", "999999999/month"),
    (T.SCOPE, "GET,POST /orders/*", "GET,POST /orders/*"),
    (T.SCOPE, "* *", "* *"),
    (T.TIMESTAMP, "2099-12-01t23:43:20.9309+02:00", "2099-12-01T21:43:20.930Z"),
    (T.NAME, "ci key", "ci key"),
    (T.KEY_ID, "AbC123", "AbC123"),
])
def test_rules_return_the_stored_form(rule, good, stored):
    assert rule(good) == stored


@pytest.mark.parametrize("rule, bad, why", [
    (T.CIDR, "10.0.0.0/33", "expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, "
                            "found '10.0.0.0/33'"),
    (T.CIDR, "fe80::1%eth0", "found 'fe80::1%eth0'"),  # a zone id: the core never sees a peer's zone
    (T.CIDR, " 10.0.0.1", "found ' 10.0.0.1'"),
    (T.CIDR, "10.0.0.0/255.0.0.0", "found '10.0.0.0/255.0.0.0'"),
    (T.CIDR, "01.2.3.4", "found '01.2.3.4'"),
    (T.CIDR, "10.0.0.0/8\n", "found U+000A (a newline) at index 10"),
    (T.LIMIT, "0/second", "expected N/second|minute|hour|day|month with N 1..999999999, found '0/second'"),
    (T.LIMIT, "1000000000/month", "found '1000000000/month'"),
    (T.LIMIT, "10 / second", "found '10 / second'"),
    (T.LIMIT, "010/second", "found '010/second'"),
    (T.LIMIT, "10/Second", "found '10/Second'"),
    (T.SCOPE, "get /x", "expected 'METHOD[,METHOD] /path' (methods in capitals"),
    (T.SCOPE, "GET /a*b", "found 'GET /a*b'"),
    (T.TIMESTAMP, "2030-01-01T00:00:00", "'2030-01-01T00:00:00' has no timezone"),
    (T.TIMESTAMP, "2030-02-30T00:00:00Z", "day 30 is not 01..28"),
    (T.NAME, " x", "expected a name that is not blank and does not start with a space, found ' x'"),
    (T.NAME, "a\u202eb", "control characters are not allowed, found U+202E (a right-to-left override) at index 1"),
    (T.KEY_ID, "has_under", "expected a key id (1..32 ASCII letters and digits), found 'has_under'"),
])
def test_rules_say_what_was_expected_and_found(rule, bad, why):
    with pytest.raises(ValueError) as exc:
        rule(bad)
    assert why in str(exc.value)


def test_a_rule_refuses_what_is_not_a_string():
    for rule in (T.CIDR, T.TIMESTAMP, T.LIMIT):
        for bad in (5, None, ["10.0.0.0/8"]):
            with pytest.raises(ValueError, match=f"found {bad!r}".replace("[", r"\[")):
                rule(bad)


def test_text_problem_is_the_rule_of_its_pattern():
    for rule in (T.TEXT, T.NAME, T.KEY_ID, T.SCOPE, T.LIMIT, T.CIDR):
        assert T.text_problem("x\n", rule.pattern) == rule.problem("x\n")
    assert T.text_problem("b", "^a$") == "expected text matching ^a$, found 'b'"


def test_each_type_carries_its_rule_and_the_same_pattern_in_its_schema():
    for tp, rule in ((T.Scope, T.SCOPE), (T.Cidr, T.CIDR), (T.Limit, T.LIMIT), (T.KeyName, T.NAME),
                     (T.KeyId, T.KEY_ID), (T.Timestamp, T.TIMESTAMP)):
        assert T.rule_of(tp) is rule
        schema = msgspec.json.schema(tp)
        assert schema.get("pattern") == rule.pattern, tp
    assert msgspec.json.schema(T.Timestamp)["format"] == "date-time"


def test_a_limit_and_a_cidr_the_types_admit_the_core_compiles():
    core.compile_limits(["999999999/month", "1/second"])
    core.compile_cidrs([T.CIDR("10.1.2.3/8"), T.CIDR("::1")])


def test_parse_limit_reads_what_records_stored_before_the_rule_hold():
    assert T.parse_limit("10/second") == (10, "second")
    assert T.parse_limit(" 10 / second ") == (10, "second")  # the core compiled these; workers must read them
    assert T.parse_limit("010/day") == (10, "day")
    for bad in ("0/second", "5/fortnight", 5, "ten/second"):
        with pytest.raises(ValueError, match="expected N/second|minute|hour|day|month"):
            T.parse_limit(bad)


# ---------------------------------------------------------------- checking


class Body(msgspec.Struct):
    name: T.KeyName
    limits: T.Limits = []
    allow: list[T.Cidr] = []
    meta: T.Metadata = {}
    when: T.Timestamp | None = None

    def __post_init__(self):
        T.check_fields(self, "$.")


def test_check_fields_normalises_and_reports_every_problem_located():
    b = msgspec.convert({"name": "x", "allow": ["10.9.8.7/8"], "when": "2099-01-01T01:00:00+01:00"}, Body)
    assert (b.allow, b.when) == (["10.0.0.0/8"], "2099-01-01T00:00:00.000Z")
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.convert({"name": " x", "limits": ["1/second", "nope", "2/second"], "allow": ["1.2.3.4", "x.y"],
                         "meta": {"ok": {"a\tb": 1}, "c\x00": 2}, "when": "yesterday"}, Body)
    assert str(exc.value).split("\n") == [
        "$.name: expected a name that is not blank and does not start with a space, found ' x'",
        "$.limits[1]: expected N/second|minute|hour|day|month with N 1..999999999, found 'nope'",
        "$.limits[2]: a second limit is already set at $.limits[0] (at most one limit per window)",
        "$.allow[1]: expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, found 'x.y'",
        "$.meta.ok: key 'a\\tb': control characters are not allowed, found U+0009 (a tab) at index 1",
        "$.meta: key 'c\\x00': control characters are not allowed, found U+0000 (a NUL byte) at index 1",
        f"$.when: expected an RFC 3339 timestamp like {T.TIMESTAMP_EXAMPLE} (date, 'T', time, then 'Z' or an "
        "offset like +02:00), found 'yesterday'",
    ]


def test_validate_checks_a_plain_value_as_if_decoded():
    assert T.validate(T.Cidrs, ("10.1.0.0/16",), "deny") == ["10.1.0.0/16"]
    cases = [
        (T.Cidrs, "10.0.0.0/8", "deny: Expected `array`, got `str`"),
        (T.Cidrs, ["10.0.0.0/8"] * 257, "deny: Expected `array` of length <= 256"),
        (T.Cidrs, ["10.0.0.0/8", 5], "deny[1]: Expected `str`, got `int`"),
        (T.KeyName | None, "a\nb", "deny: control characters are not allowed, found U+000A (a newline) at index 1"),
        (T.Metadata, {"k": "v" * 257}, "deny[...]: Expected `str` of length <= 256"),
        (T.Metadata, {"k": object()}, "deny[...]: Expected `bool | int | float | str | object | array | null`"),
    ]
    for tp, value, msg in cases:
        with pytest.raises(T.Problems) as exc:
            T.validate(tp, value, "deny")
        assert exc.value.problems[0].startswith(msg), (value, exc.value.problems)


def test_fields_validator_checks_named_values_in_one_pass():
    check = T.fields_validator({"scopes": T.Scopes, "expires_at": T.Timestamp | None})
    assert check({"scopes": ["GET /x"], "expires_at": None}) == {"scopes": ["GET /x"], "expires_at": None}
    assert check({"scopes": [], "expires_at": "2030-01-01T00:00:00+01:00"})["expires_at"] == "2029-12-31T23:00:00.000Z"
    with pytest.raises(T.Problems) as exc:
        check({"scopes": ["GET /x", "x"], "expires_at": None}, "rec.")
    assert exc.value.problems == ["rec.scopes[1]: Expected `str` of length >= 3"]
    with pytest.raises(T.Problems) as exc:
        check({"scopes": ["get /x", "GET /y"], "expires_at": "2030-01-01"}, "rec.")
    assert [p.split(":")[0] for p in exc.value.problems] == ["rec.scopes[0]", "rec.expires_at"]


# ---------------------------------------------------------------- one definition, three surfaces


@pytest.mark.parametrize("field, value", [
    ("allow_cidrs", ["10.0.0.0/8", "10.0.0.0/33"]),
    ("deny_cidrs", ["10.0.0.0/8", "fe80::1%eth0"]),
    ("limits", ["5/second", "10 / minute"]),
    ("limits", ["5/second", "6/second"]),
])
def test_config_admin_and_store_refuse_alike(tmp_path, field, value):
    """The same value, the same message after the path, from the config loader, an admin
    API body and the key store."""
    from fastgate.admin.schemas import CreateKey
    from fastgate.admin.server import _validation
    from fastgate.config import build_config
    from fastgate.errors import ConfigError
    from fastgate.keys import InvalidValue, KeyRecord, KeyStore

    raw = {"ip": {"allow" if field == "allow_cidrs" else "deny": value}} if "cidrs" in field else \
        {"plans": {"p": {"limits": value}}}
    with pytest.raises(ConfigError) as cexc:
        build_config(raw, "gw.toml")
    (cpath, cmsg), = cexc.value.problems
    with pytest.raises(msgspec.ValidationError) as aexc:
        msgspec.json.decode(msgspec.json.encode({"name": "x", field: value}), type=CreateKey)
    amsg = _validation(aexc.value, CreateKey).message
    with KeyStore(str(tmp_path / "keys.db")) as store:
        with pytest.raises(InvalidValue) as sexc:
            store.create(KeyRecord(id="abc", name="x", digest=b"d" * 32, **{field: value}), "admin")
    spath, smsg = str(sexc.value).split(": ", 1)
    apath, amsg = amsg.split(": ", 1)
    assert (apath, spath) == (f"$.{field}[1]", f"{field}[1]") and cpath.endswith("[1]")
    # one message; a reference to another item is located the way each surface locates
    assert cmsg == smsg == amsg.replace("$.", "")


def test_the_key_fields_have_one_declaration():
    """KeyRecord (the store), CreateKey/UpdateKey (the admin API) and the config's lists use
    the same type objects, so a change to one is a change to all."""
    import typing

    from fastgate.admin.schemas import CreateKey, UpdateKey
    from fastgate.config import IpConfig, PlanConfig, RouteConfig
    from fastgate.keys import EDITABLE, KeyRecord

    record = {f.name: f.type for f in msgspec.structs.fields(KeyRecord) if f.name in EDITABLE}
    create = {f.name: f.type for f in msgspec.structs.fields(CreateKey)}
    update = {f.name: f.type for f in msgspec.structs.fields(UpdateKey)}
    assert set(record) == set(create) == set(update) == set(EDITABLE)
    for name in EDITABLE:
        assert create[name] == record[name], name
        assert typing.get_args(update[name])[-1] is msgspec.UnsetType
        assert typing.Union[typing.get_args(update[name])[:-1]] == record[name], name
    config = {f.name: f.type for c in (IpConfig, PlanConfig, RouteConfig) for f in msgspec.structs.fields(c)}
    assert config["limits"] is T.Limits and config["ip_limits"] is T.Limits
    assert config["allow"] == list[T.Cidr] == config["deny"] == config["trusted_proxies"]
