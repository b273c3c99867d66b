"""Bytes-level HTTP/1 helpers: path normalisation (the path we authorise is the
path the upstream acts on), the JSON error reply, status lines."""

from __future__ import annotations

import http

import msgspec
import pytest

from fastgate.errors import ERROR_STATUS
from fastgate.server.http1 import error_reply, normalise_path, status_line

NORMALISE = [
    # already normal: unchanged
    (b"/", b"/"),
    (b"/a/b", b"/a/b"),
    (b"/a/b/", b"/a/b/"),
    (b"/a/.b", b"/a/.b"),
    (b"/a/...", b"/a/..."),
    (b"/a;b=c", b"/a;b=c"),
    # dot segments
    (b"/a/./b", b"/a/b"),
    (b"/a/../b", b"/b"),
    (b"/a/b/../../c", b"/c"),
    (b"/a/..", b"/"),
    (b"/a/.", b"/a/"),
    (b"/a/b/..", b"/a/"),
    (b"/..", b"/"),
    (b"/../../etc/passwd", b"/etc/passwd"),
    # repeated slashes
    (b"//", b"/"),
    (b"/a//b", b"/a/b"),
    (b"///a///b//", b"/a/b/"),
    # encoded dots are dots
    (b"/%2e%2e/x", b"/x"),
    (b"/a/%2E%2e/b", b"/b"),
    (b"/a/%2e/b", b"/a/b"),
    (b"/a/.%2E/b", b"/b"),
    (b"/a%2e%2e", b"/a.."),
    # encoded slash / backslash and raw backslash are separators
    (b"/public/..%2Fadmin", b"/admin"),
    (b"/public/..%2fadmin", b"/admin"),
    (b"/public/..%5Cadmin", b"/admin"),
    (b"/public/..%5cadmin", b"/admin"),
    (b"/public\\..\\admin", b"/admin"),
    (b"/a%2Fb", b"/a/b"),
    (b"/a\\b", b"/a/b"),
    # unreserved characters are decoded
    (b"/%7euser", b"/~user"),
    (b"/%7Euser", b"/~user"),
    (b"/%41%5a%61%7A%30%39", b"/AZaz09"),
    (b"/%2D%5F", b"/-_"),
    # other escapes stay escaped, with upper-case hex
    (b"/a%20b", b"/a%20b"),
    (b"/a%3f", b"/a%3F"),
    (b"/a%3F", b"/a%3F"),
    (b"/a%25b", b"/a%25b"),
    (b"/a%c3%a9", b"/a%C3%A9"),
    (b"/a%252e%252e/b", b"/a%252e%252e/b"),  # double-encoded stays one level
    # invalid: None
    (b"", None),
    (b"a/b", None),
    (b"*", None),
    (b"/a%", None),
    (b"/a%2", None),
    (b"/a%zz", None),
    (b"/a%g0", None),
    (b"/a%0", None),
    (b"/a%00b", None),
    (b"/a\x00b", None),
]


@pytest.mark.parametrize("raw, expected", NORMALISE, ids=[repr(r)[2:-1] or "empty" for r, _ in NORMALISE])
def test_normalise_path(raw, expected):
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw, expected", [(r, e) for r, e in NORMALISE if e is not None])
def test_normalise_path_is_idempotent(raw, expected):
    assert normalise_path(expected) == expected


def test_normalise_never_escapes_root():
    for depth in range(1, 6):
        assert normalise_path(b"/x" + b"/.." * depth + b"/secret") == b"/secret"


def _decode(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        assert name == name.strip() and name == name.lower(), line
        assert name not in headers, f"duplicate header {name!r}"
        headers[name] = value.strip()
    return lines[0], headers, body


@pytest.mark.parametrize("code", sorted(ERROR_STATUS))
def test_error_reply_shape(code):
    reply = error_reply(code, "something went wrong", "rid-123")
    first, headers, body = _decode(reply)
    status = ERROR_STATUS[code]
    assert first == status_line(status)[:-2]
    assert first.startswith(b"HTTP/1.1 %d " % status)
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert headers[b"x-request-id"] == b"rid-123"
    assert b"connection" not in headers
    assert msgspec.json.decode(body) == {
        "error": {"code": code, "message": "something went wrong", "request_id": "rid-123"}
    }


def test_error_reply_close_and_extra_headers():
    reply = error_reply("method_not_allowed", "nope", "r1", close=True, extra=b"allow: GET, POST\r\n")
    first, headers, body = _decode(reply)
    assert first == b"HTTP/1.1 405 Method Not Allowed"
    assert headers[b"connection"] == b"close"
    assert headers[b"allow"] == b"GET, POST"
    assert msgspec.json.decode(body)["error"]["code"] == "method_not_allowed"


def test_error_reply_head_only_keeps_length():
    full = error_reply("no_route", "m", "r")
    head = error_reply("no_route", "m", "r", head_only=True)
    assert full.startswith(head)
    assert head.endswith(b"\r\n\r\n")
    _, headers, body = _decode(head)
    assert body == b""
    assert int(headers[b"content-length"]) == len(full) - len(head)


def test_error_reply_escapes_message():
    reply = error_reply("bad_request", 'quote " and \\ and \n newline', "r")
    _, _, body = _decode(reply)
    assert msgspec.json.decode(body)["error"]["message"] == 'quote " and \\ and \n newline'


def test_error_reply_unknown_code_is_a_bug():
    with pytest.raises(KeyError):
        error_reply("no_such_code", "m", "r")


def test_error_status_table_matches_design():
    design_codes = {
        "bad_request", "headers_too_large", "body_too_large", "no_route", "method_not_allowed", "ip_denied",
        "key_missing", "key_invalid", "key_expired", "scope_denied", "rate_limited", "upstream_unavailable",
        "upstream_timeout",
    }
    assert design_codes <= set(ERROR_STATUS)
    for code, status in ERROR_STATUS.items():
        assert 400 <= status < 600, code


@pytest.mark.parametrize("status", [s.value for s in http.HTTPStatus])
def test_status_line_known(status):
    assert status_line(status) == b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())


def test_status_line_unknown_code():
    assert status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    assert status_line(599) is status_line(599)
