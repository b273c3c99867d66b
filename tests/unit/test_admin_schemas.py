"""The admin API's declarations: the one RFC 3339 parser, the text rules, the body limits,
and the route table that drives routing, 405/Allow and /openapi.json."""

from __future__ import annotations

import datetime as dt
import logging
import random

import jsonschema_rs
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import core
from fastgate.admin import schemas as S
from fastgate.admin.openapi import document
from fastgate.admin.server import _PATHS, ROUTES, ApiError, Incident, _validation

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- RFC 3339


@pytest.mark.parametrize("text, ms", [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:00.001Z", 1),
    ("1970-01-01t00:00:00.9999999z", 999),  # truncated, never rounded up into the next second
    ("1970-01-01T01:00:00+01:00", 0),
    ("1969-12-31T19:00:00.5-05:00", 500),
    ("2026-12-01T21:43:20.93Z", 1_796_161_400_930),
    ("1998-12-31T23:59:60Z", 915_148_799_999),  # a leap second counts as the last millisecond before it
    ("1998-12-31T15:59:60.123-08:00", 915_148_799_999),
    ("2024-02-29T00:00:00Z", 1_709_164_800_000),
    ("0000-01-01T00:00:00Z", -62_167_219_200_000),
    ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
])
def test_rfc3339_ms(text, ms):
    assert S.rfc3339_ms(text) == ms


@pytest.mark.parametrize("text, why", [
    ("2030-01-01", "expected an RFC 3339 timestamp"),
    ("2030-01-01T00:00:00", "has no timezone"),
    ("2030-01-01 00:00:00Z", "expected an RFC 3339"),
    (" 2030-01-01T00:00:00Z", "expected an RFC 3339"),
    ("2030-01-01T00:00:00Z\n", "expected an RFC 3339"),
    ("2030-13-01T00:00:00Z", "month 13"),
    ("2023-02-29T00:00:00Z", "day 29 is not 01..28"),
    ("2030-01-01T24:00:00Z", "out of range"),
    ("2030-01-01T00:00:00+24:00", "offset"),
    ("1998-12-31T23:58:60Z", "leap second"),
    ("9999-12-31T23:59:59-00:01", "outside the years 0000..9999"),
    ("２０３０-01-01T00:00:00Z", "expected an RFC 3339"),
])
def test_rfc3339_refusals(text, why):
    with pytest.raises(ValueError, match=why):
        S.rfc3339_ms(text)


def test_format_ms_round_trips_and_matches_datetime():
    rnd = random.Random(7)
    for _ in range(5000):
        ms = rnd.randrange(-62_135_596_800_000, 253_402_300_799_999)
        text = S.format_ms(ms)
        assert S.rfc3339_ms(text) == ms
        assert text == (EPOCH + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert S.normalize_rfc3339("2026-12-01T23:43:20.930+02:00") == "2026-12-01T21:43:20.930Z"


def test_parse_rfc3339_stays_importable_for_keysync():
    d = S.parse_rfc3339("2026-12-01T21:43:20.930Z")
    assert d == dt.datetime(2026, 12, 1, 21, 43, 20, 930_000, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError):
        S.parse_rfc3339("0000-06-01T00:00:00Z")


def test_rfc3339_agrees_with_json_schema_date_time():
    v = jsonschema_rs.validator_for({"type": "string", "format": "date-time"}, validate_formats=True)

    @settings(max_examples=300, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,4})?"
                         r"([Zz]|[+-][0-9]{2}:[0-9]{2})?\Z"))
    def check(text):
        try:
            S.rfc3339_ms(text)
            ours = True
        except ValueError as exc:
            ours = "outside the years" in str(exc)  # valid RFC 3339, beyond what we store
        assert ours == v.is_valid(text), text

    check()


# ---------------------------------------------------------------- text rules


@pytest.mark.parametrize("value, found", [
    ("a\x00", "U+0000 (a NUL byte) at index 1"), ("\x7f", "U+007F"), ("a\x9b", "U+009B"),
    ("\u202eabc", "U+202E (a right-to-left override) at index 0"), ("a\u2066", "U+2066"),
    ("x\u2029", "U+2029 (a paragraph separator)"), ("\u061c", "U+061C"),
])
def test_control_characters_are_named(value, found):
    assert S.text_problem(value, S.NAME_PATTERN).startswith(f"control characters are not allowed, found {found}")


@settings(max_examples=400, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.text(max_size=20))
def test_patterns_read_the_same_in_python_and_json_schema(text):
    for pattern in (S.NAME_PATTERN, S.TEXT_PATTERN, S.SCOPE_PATTERN, S.LIMIT_PATTERN, S.CIDR_PATTERN,
                    S.KEY_ID_PATTERN):
        rs = jsonschema_rs.validator_for({"type": "string", "pattern": pattern}).is_valid(text)
        assert (S.text_problem(text, pattern) is None) == rs, (pattern, ascii(text))


@settings(max_examples=300, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.from_regex(S.SCOPE_PATTERN, fullmatch=True), st.from_regex(S.CIDR_PATTERN, fullmatch=True),
       st.from_regex(S.LIMIT_PATTERN, fullmatch=True))
def test_what_a_pattern_admits_the_core_compiles(scope, cidr, limit):
    core.compile_scopes([scope])
    core.compile_cidrs([S.canonical_cidr(cidr)])  # the stored (canonical) form, as the core sees it
    core.compile_limits([limit])


# ---------------------------------------------------------------- bodies

dec = msgspec.json.Decoder(S.CreateKey)


def refusal(body: bytes) -> str:
    with pytest.raises(msgspec.ValidationError) as exc:
        dec.decode(body)
    return _validation(exc.value, S.CreateKey).message


def test_body_limits_name_the_path():
    assert refusal(b'{"name": ""}') == "$.name: Expected `str` of length >= 1"
    assert refusal(b'{"name": "x", "scopes": ["GET /a", "x"]}').startswith("$.scopes[1]: Expected `str` of length >= 3")
    assert refusal(b'{"name": "x\\u0000"}').startswith("$.name: control characters are not allowed, found U+0000")
    msg = refusal(b'{"name": "x", "metadata": {"a": {"b": {"c": 1}}}}')
    assert msg.startswith("$.metadata[...][...]: Expected") and S.METADATA_RULE in msg
    msg = refusal(b'{"name": "x", "limits": ["1/second", "1/minute", "9/second"]}')
    assert msg == "$.limits[2]: a second limit is already set at $.limits[0] (at most one limit per window)"
    # several problems at once: all of them, each located
    msg = refusal(b'{"name": "x", "owner": "\\n", "allow_cidrs": ["10.0.0.0/8", "nope"]}')
    assert msg.startswith("$.owner: control characters") and "; $.allow_cidrs[1]: expected an IPv4" in msg


def test_every_metadata_key_follows_the_declared_pattern():
    # The document declares the key pattern for nested objects too; the walk over the declared
    # types checks them (a hand-written check used to look at the top-level keys only).
    assert refusal(b'{"name": "x", "metadata": {"a": {"b\\u0000": 1}}}') == (
        "$.metadata.a: key 'b\\x00': control characters are not allowed, found U+0000 (a NUL byte) at index 1")
    # and a timestamp without its zone says so (no min length to trip over first)
    assert refusal(b'{"name": "x", "expires_at": "2099-01-01T00:00:00"}') == (
        "$.expires_at: '2099-01-01T00:00:00' has no timezone: add Z (UTC) or an offset like +02:00")


def test_bodies_are_normalised():
    k = dec.decode(b'{"name": "x", "allow_cidrs": ["10.9.8.7/8", "::1"], "expires_at": "2099-01-01T01:00:00+01:00",'
                   b' "metadata": {"a": [1, "b", null], "c": {"d": true}, "e": 1.5}}')
    assert k.allow_cidrs == ["10.0.0.0/8", "::1/128"]
    assert k.expires_at == "2099-01-01T00:00:00.000Z"
    u = msgspec.json.decode(b'{"expires_at": null, "plan": null}', type=S.UpdateKey)
    assert u.changes() == {"expires_at": None, "plan": None}
    assert msgspec.json.decode(b'{"grace_seconds": 3600.0}', type=S.RotateKey).grace_seconds == 3600
    assert S.expiry_problem("2000-01-01T00:00:00.000Z", 0) is None
    assert "is not in the future" in S.expiry_problem("2000-01-01T00:00:00.000Z", 10**13)


# ---------------------------------------------------------------- routes and the document


def test_route_table_is_the_document():
    doc = document(ROUTES, ("free",))
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == {(o.method, o.path) for o in ROUTES}
    assert len({(o.method, o.path) for o in ROUTES}) == len(ROUTES)
    assert {o.handler for o in ROUTES} <= set(dir(__import__("fastgate.admin.server").admin.server.AdminApp))
    for p, ops in doc["paths"].items():
        for m, op in ops.items():
            assert op["responses"], (m, p)
            if op.get("security") != []:
                assert "401" in op["responses"], (m, p)
            if "requestBody" in op:
                assert {"400", "413"} <= set(op["responses"]), (m, p)
    # the document's own schemas compile (OpenAPI 3.1 = JSON Schema 2020-12)
    for schema in doc["components"]["schemas"].values():
        jsonschema_rs.validator_for({**schema, "components": doc["components"]})
    assert doc["components"]["schemas"]["CreateKey"]["properties"]["plan"]["anyOf"][0]["enum"] == ["free"]
    assert document(ROUTES, ())["components"]["schemas"]["CreateKey"]["properties"]["plan"]["anyOf"][0] == {"not": {}}


def test_405_allow_lists_exactly_the_declared_methods():
    by_path = {e.template: set(e.ops) for e in _PATHS}
    assert by_path["/keys"] == {"GET", "POST"} and by_path["/keys/{id}"] == {"GET", "PATCH", "DELETE"}
    e = ApiError("method_not_allowed", "x", headers={"allow": "GET"})
    assert e.status == 405 and ApiError("store_unavailable", "x").status == 503


def test_incident_logs_once_until_a_success(caplog):
    inc = Incident("key store")
    with caplog.at_level(logging.WARNING, logger="fastgate.admin"):
        for _ in range(5):
            inc.failed(OSError(28, "No space left on device"))
        inc.ok()
        inc.ok()
        inc.failed(OSError(28, "No space left on device"))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["key store unavailable", "key store available again after 0.0s",
                                                      "key store unavailable"]
