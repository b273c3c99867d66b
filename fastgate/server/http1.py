"""HOT PATH. Bytes-only HTTP/1.1 helpers: status lines, error replies, paths."""

from __future__ import annotations

import http
import re

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


def normalise_path(path: bytes) -> bytes | None:
    """Normalise an origin-form path (no query) or return None if it is invalid.

    - percent-escapes of unreserved characters are decoded, others upper-cased;
    - encoded '/' and '\\', and a raw '\\', become '/' (no escape from a scope by
      ``..%2f`` or a backslash the upstream might treat as a separator);
    - repeated slashes collapse; '.' and '..' segments are resolved (never above '/').
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
    segments = bytes(out).split(b"/")
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
