"""HOT PATH. Bytes-only HTTP/1.1 helpers: status lines, error replies, paths."""

from __future__ import annotations

import http
import re
from urllib.parse import unquote_to_bytes

import msgspec

from ..errors import ERROR_STATUS

_json = msgspec.json.Encoder()

STATUS_LINE: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus
}


def status_line(code: int) -> bytes:
    line = STATUS_LINE.get(code)
    if line is None:
        line = STATUS_LINE[code] = b"HTTP/1.1 %d Unknown\r\n" % code
    return line


# RFC 9110 §7.6.1 connection-specific fields, plus the non-standard ones proxies
# are known to honour. Everything named in a Connection header is added per message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def error_reply(
    code: str,
    message: str,
    request_id: str,
    *,
    close: bool = False,
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A complete JSON error response per DESIGN.md."""
    body = _json.encode({"error": {"code": code, "message": message, "request_id": request_id}})
    head = b"".join(
        (
            status_line(ERROR_STATUS[code]),
            b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
            % (len(body), request_id.encode()),
            b"connection: close\r\n" if close else b"",
            extra,
            b"\r\n",
        )
    )
    return head if head_only else head + body


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Characters whose encoded form could change what a path means to a server behind
# us: they are decoded and then treated as what they are (a separator, a dot), so
# that the path we authorise is the path the upstream acts on.
_DECODE_ALSO = frozenset(b"/\\")
_NEEDS_WORK = re.compile(rb"%|/\.|//|\\|\x00")
# Encoded control characters: no API needs them in a path, and back ends that
# decode them can be led into log, header or path confusion.
_CTL = re.compile(rb"[\x00-\x1f\x7f]")
# A '.' or '..' segment dressed so that we do not resolve it but a back end
# may: a path parameter (Tomcat and Spring resolve '/a/..;/b' to '/b'), an
# encoded ';', or whitespace/controls around it ('..%20', '..%09').
_WS_CTL = bytes(range(0x21)) + b"\x7f"


def _dressed_dot(seg: bytes) -> bool:
    d = unquote_to_bytes(seg)
    core = d.split(b";", 1)[0].strip(_WS_CTL)
    return (core == b"." or core == b"..") and d != core
_DOUBLE = re.compile(rb"%25(?:2[EeFf]|5[Cc])")


def double_encoded(path: bytes) -> bool:
    """A normalised path holds a double-encoded '.', '/' or '\\' (%252e ...)."""
    return b"%25" in path and _DOUBLE.search(path) is not None


def normalise_path(path: bytes) -> bytes | None:
    """Normalise an origin-form path (no query) or return None if it is invalid.

    - percent-escapes of unreserved characters are decoded, others upper-cased;
    - encoded '/' and '\\', and a raw '\\', become '/' (no escape from a scope by
      ``..%2f`` or a backslash the upstream might treat as a separator);
    - repeated slashes collapse; '.' and '..' segments are resolved (never above '/').

    Refused (None), because back ends resolve them differently from us: an
    encoded control character; a decoded path that is not valid UTF-8
    (overlong forms like %C0%AE included); a dot segment with a path parameter,
    an encoded ';', or whitespace around it.
    """
    if not path.startswith(b"/"):
        return None
    if _NEEDS_WORK.search(path) is None:
        return path
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == 0x25:  # '%'
            if i + 2 >= n:
                return None
            h1, h2 = path[i + 1], path[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                return None
            v = int(path[i + 1 : i + 3], 16)
            if v in _UNRESERVED:
                out.append(v)
            elif v in _DECODE_ALSO:
                out.append(0x2F)
            elif v == 0:
                return None
            else:
                out += b"%%%02X" % v
            i += 3
        elif c == 0x5C:  # '\\'
            out.append(0x2F)
            i += 1
        elif c == 0:
            return None
        else:
            out.append(c)
            i += 1
    decoded = unquote_to_bytes(bytes(out))
    if _CTL.search(decoded) is not None:
        return None
    if not decoded.isascii():
        try:
            decoded.decode("utf-8")  # strict: overlong forms and surrogates fail
        except UnicodeDecodeError:
            return None
    segments = bytes(out).split(b"/")
    for seg in segments:
        if b"." in seg and seg != b"." and seg != b".." and _dressed_dot(seg):
            return None
    trailing = segments[-1] in (b"", b".", b"..")
    stack: list[bytes] = []
    for seg in segments:
        if seg == b"" or seg == b".":
            continue
        if seg == b"..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
    result = b"/" + b"/".join(stack)
    if trailing and stack:
        result += b"/"
    return result
