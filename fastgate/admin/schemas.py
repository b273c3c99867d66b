"""Admin API request/response bodies, their limits, and the one RFC 3339 parser.

One Struct per body, one Decoder each. The OpenAPI document is derived from
these same Structs, so the docs cannot drift from what the API accepts: every
limit (lengths, item counts, ranges) is a msgspec ``Meta`` that msgspec checks
while decoding, and every string rule is one regular expression here that both
the document (``pattern``) and ``__post_init__`` (``fullmatch``) use.

Why ``fullmatch`` in ``__post_init__`` and not ``Meta(pattern=...)``: msgspec
applies a pattern with ``re.search``, where ``$`` also matches before a final
newline, so ``"name\\n"`` would pass ``^[^\\n]*$``; JSON Schema validators
(ECMA-262 regexes) do not let it pass. A full match agrees with them, and lets
the error say what was found and where instead of quoting the regex.

The patterns are written in the common subset of Python ``re``, ECMA-262 and
the Rust ``regex`` crate (what schemathesis validates with): ``\\xNN`` and
``\\uNNNN`` escapes, character classes, groups, bounded repeats. No ``\\s`` or
``\\d`` (their meaning differs between the three).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

# ---------------------------------------------------------------- text rules

# Characters refused in names, owners, plans and metadata keys: they garble a
# terminal table (`fastgate keys list`) or reorder what it shows. Unicode
# category Cc (C0, DEL, C1), the bidirectional controls (ALM, LRM, RLM,
# LRE..RLO, LRI..PDI) and the line/paragraph separators.
CONTROL_CLASS = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
# Characters that count as blank (what str.split() splits on, less the controls above).
SPACE_CLASS = r" \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\ufeff"
CONTROL_RE = re.compile(f"[{CONTROL_CLASS}]")

TEXT_PATTERN = f"^[^{CONTROL_CLASS}]*$"
# Names: not blank (and so not starting with a space), no control characters.
NAME_PATTERN = f"^[^{CONTROL_CLASS}{SPACE_CLASS}][^{CONTROL_CLASS}]*$"
KEY_ID_PATTERN = r"^[0-9A-Za-z]{1,32}$"

_METHOD = "(?:GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|TRACE|CONNECT)"
# "METHOD[,METHOD] /path" with '*' only at the end of the path ("/x/*" the segment
# and below, "/x*" a raw prefix, "*" or "/*" everything); "*" for every method.
SCOPE_PATTERN = f"^(?:\\*|{_METHOD}(?:,{_METHOD})*) (?:\\*|/[^{CONTROL_CLASS}{SPACE_CLASS}*]*\\*?)$"
LIMIT_PATTERN = r"^[1-9][0-9]{0,8}/(?:second|minute|hour|day|month)$"
LIMIT_UNITS = ("second", "minute", "hour", "day", "month")

_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "(?:" + "|".join([
    f"(?:{_H16}:){{7}}{_H16}",
    f"(?:{_H16}:){{1,7}}:",
    f"(?:{_H16}:){{1,6}}:{_H16}",
    f"(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}",
    f"(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}",
    f"(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}",
    f"(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}",
    f"{_H16}:(?::{_H16}){{1,6}}",
    f":(?::{_H16}){{1,7}}",
    "::",
    f"::(?:[Ff]{{4}}:)?{_IPV4}",
]) + ")"
# An address or a network; host bits may be set (they are cleared: "10.0.0.1/8"
# is stored as "10.0.0.0/8", the network it means), as in the config's [ip] lists.
CIDR_PATTERN = f"^(?:{_IPV4}(?:/(?:3[0-2]|[12]?[0-9]))?|{_IPV6}(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"

# Limits of the request bodies (also in the OpenAPI document).
MAX_NAME = 200
MAX_SCOPES = 256
MAX_SCOPE = 1024
MAX_CIDRS = 256
MAX_META_KEYS = 32
MAX_META_KEY = 64
MAX_META_STR = 256
MAX_META_ITEMS = 16
MAX_GRACE_SECONDS = 365 * 86_400
METADATA_RULE = (f"metadata: at most {MAX_META_KEYS} keys of 1..{MAX_META_KEY} characters; a value is a string "
                 f"of at most {MAX_META_STR} characters, a number, true/false or null, or a list or object of "
                 f"at most {MAX_META_ITEMS} such values (so at most 2 levels deep)")

_COMPILED: dict[str, re.Pattern] = {}


def _rx(pattern: str) -> re.Pattern:
    c = _COMPILED.get(pattern)
    if c is None:
        c = _COMPILED[pattern] = re.compile(pattern)
    return c


def describe_char(ch: str) -> str:
    name = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte",
            "\u202e": "a right-to-left override", "\u202d": "a left-to-right override",
            "\u2028": "a line separator", "\u2029": "a paragraph separator"}.get(ch)
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def control_problem(value: str) -> str | None:
    """What is wrong with a display string, or None: the first control character found."""
    m = CONTROL_RE.search(value)
    if m is None:
        return None
    return f"control characters are not allowed, found {describe_char(m.group())} at index {m.start()}"


def text_problem(value: str, pattern: str = TEXT_PATTERN) -> str | None:
    """Why ``value`` does not fully match one of the text patterns above, or None."""
    if _rx(pattern).fullmatch(value):
        return None
    bad = control_problem(value)
    if bad:
        return bad
    if pattern == NAME_PATTERN:
        return f"expected a name that is not blank and does not start with a space, found {value!r}"
    if pattern == SCOPE_PATTERN:
        return ("expected 'METHOD[,METHOD] /path' (methods in capitals, or '*'; one space; the path starts "
                f"with '/', has no spaces, and '*' only at its end), found {value!r}")
    if pattern == LIMIT_PATTERN:
        return f"expected N/second|minute|hour|day|month with N 1..999999999, found {value!r}"
    if pattern == CIDR_PATTERN:
        return f"expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32, found {value!r}"
    if pattern == KEY_ID_PATTERN:
        return f"expected a key id (1..32 ASCII letters and digits), found {value!r}"
    return f"expected text matching {pattern}, found {value!r}"


def canonical_cidr(value: str) -> str:
    """'10.0.0.1/8' -> '10.0.0.0/8', '::1' -> '::1/128' (value already matched CIDR_PATTERN)."""
    return str(ipaddress.ip_network(value, strict=False))


# ---------------------------------------------------------------- RFC 3339

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_RFC3339_LOCAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?")
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MIN_MS = -62_167_219_200_000  # 0000-01-01T00:00:00Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
TIMESTAMP_EXAMPLE = "2099-01-01T00:00:00.000Z"


def _leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def rfc3339_ms(value: str) -> int:
    """Epoch milliseconds of an RFC 3339 ``date-time`` (section 5.6: 'T' or 't', fraction of
    any length, 'Z', 'z' or +hh:mm/-hh:mm). The fraction is truncated to milliseconds; a
    leap second (23:59:60 UTC) counts as 23:59:59.999. ValueError says what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 timestamp like {TIMESTAMP_EXAMPLE}, found {value!r}")
    m = _RFC3339.fullmatch(value)
    if m is None:
        if _RFC3339_LOCAL.fullmatch(value):
            raise ValueError(f"{value!r} has no timezone: add Z (UTC) or an offset like +02:00")
        raise ValueError(f"expected an RFC 3339 timestamp like {TIMESTAMP_EXAMPLE} (date, 'T', time, then 'Z' or "
                         f"an offset like +02:00), found {value!r}")
    y, mo, d, h, mi, s = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not 1 <= mo <= 12:
        raise ValueError(f"month {mo:02d} is not 01..12 in {value!r}")
    dim = 29 if mo == 2 and _leap(y) else _DAYS[mo - 1]
    if not 1 <= d <= dim:
        raise ValueError(f"day {d:02d} is not 01..{dim} for {y:04d}-{mo:02d} in {value!r}")
    if h > 23 or mi > 59 or s > 60:
        raise ValueError(f"time {h:02d}:{mi:02d}:{s:02d} is out of range in {value!r}")
    off = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError(f"offset {m.group(8)} is out of range in {value!r}")
        off = (oh * 60 + om) * (1 if m.group(9) == "+" else -1)
    frac = m.group(7)
    ms = int((frac[1:] + "00")[:3]) if frac else 0
    if s == 60:  # a leap second: only at 23:59:60 UTC
        if (h * 60 + mi - off) % 1440 != 1439:
            raise ValueError(f"second 60 (a leap second) is only valid at 23:59:60 UTC, found {value!r}")
        s, ms = 59, 999
    total = (_days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - off * 60) * 1000 + ms
    if not _MIN_MS <= total <= _MAX_MS:
        raise ValueError(f"{value!r} is outside the years 0000..9999 once converted to UTC")
    return total


def format_ms(ms: int) -> str:
    """Epoch milliseconds -> '2026-12-01T21:43:20.930Z' (UTC, always 3 fraction digits)."""
    secs, frac = divmod(int(ms), 1000)
    days, rem = divmod(secs, 86_400)
    y, mo, d = _civil_from_days(days)
    h, rem = divmod(rem, 3600)
    mi, s = divmod(rem, 60)
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}.{frac:03d}Z"


def normalize_rfc3339(value: str) -> str:
    """Any RFC 3339 timestamp -> the stored form (UTC, milliseconds, 'Z')."""
    return format_ms(rfc3339_ms(value))


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def parse_rfc3339(value: str) -> _dt.datetime:
    """The same parser, as an aware UTC datetime (millisecond precision). For exact
    milliseconds use rfc3339_ms: ``datetime.timestamp() * 1000`` is a float product that
    lands 1 ms low for about 1 value in 200."""
    ms = rfc3339_ms(value)
    try:
        return _EPOCH + _dt.timedelta(milliseconds=ms)
    except OverflowError:
        raise ValueError(f"{value!r} is before the year 0001") from None


# ---------------------------------------------------------------- field types

KeyName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, extra_json_schema={"pattern": NAME_PATTERN},
                              description="not blank, no control or bidirectional-control characters")]
Owner = KeyName
PlanName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, extra_json_schema={"pattern": NAME_PATTERN},
                               description="one of the [plans.NAME] of the gateway's config")]
Scope = Annotated[str, Meta(min_length=3, max_length=MAX_SCOPE, examples=["GET /orders/*"],
                            extra_json_schema={"pattern": SCOPE_PATTERN})]
Cidr = Annotated[str, Meta(min_length=2, max_length=64, examples=["10.0.0.0/8"],
                           extra_json_schema={"pattern": CIDR_PATTERN})]
Limit = Annotated[str, Meta(min_length=5, max_length=16, examples=["5/second"],
                            extra_json_schema={"pattern": LIMIT_PATTERN})]
# JSON Schema cannot say "after now": the API refuses a past expires_at with a 400.
Timestamp = Annotated[str, Meta(min_length=20, max_length=64, examples=[TIMESTAMP_EXAMPLE],
                                extra_json_schema={"format": "date-time"},
                                description="RFC 3339 (fraction and offset optional), kept to the millisecond; "
                                            "must be in the future")]
KeyId = Annotated[str, Meta(min_length=1, max_length=32, extra_json_schema={"pattern": KEY_ID_PATTERN},
                            description="a key id: 1..32 ASCII letters and digits")]
SeqNo = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]

Scopes = Annotated[list[Scope], Meta(max_length=MAX_SCOPES, description="none = every call")]
Cidrs = Annotated[list[Cidr], Meta(max_length=MAX_CIDRS)]
# At most one limit per window: "contains ... maxContains 1" for each unit.
Limits = Annotated[list[Limit], Meta(max_length=len(LIMIT_UNITS), extra_json_schema={"allOf": [
    {"contains": {"pattern": f"/{u}$"}, "minContains": 0, "maxContains": 1} for u in LIMIT_UNITS
]}, description="at most one limit per window")]

_MetaKey = Annotated[str, Meta(min_length=1, max_length=MAX_META_KEY, extra_json_schema={"pattern": TEXT_PATTERN})]
_MetaStr = Annotated[str, Meta(max_length=MAX_META_STR)]
_MetaInt = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
_MetaScalar = Union[_MetaStr, _MetaInt, float, bool, None]
_MetaValue = Union[_MetaStr, _MetaInt, float, bool, None,
                   Annotated[list[_MetaScalar], Meta(max_length=MAX_META_ITEMS)],
                   Annotated[dict[_MetaKey, _MetaScalar], Meta(max_length=MAX_META_ITEMS)]]
Metadata = Annotated[dict[_MetaKey, _MetaValue], Meta(max_length=MAX_META_KEYS, description=METADATA_RULE)]

UsagePeriod = Literal["minute", "hour", "day"]


# ---------------------------------------------------------------- checks


class Problems(ValueError):
    """Several located problems ('$.field[i]: message'), one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _text(problems: list[str], path: str, value: str | None, pattern: str) -> None:
    if value is not None:
        why = text_problem(value, pattern)
        if why:
            problems.append(f"{path}: {why}")


def _check_body(obj) -> None:
    """Full-match every patterned field of a CreateKey/UpdateKey; canonicalise CIDRs."""
    problems: list[str] = []

    def given(field):
        v = getattr(obj, field)
        return None if v is msgspec.UNSET else v

    _text(problems, "$.name", given("name"), NAME_PATTERN)
    _text(problems, "$.owner", given("owner"), NAME_PATTERN)
    _text(problems, "$.plan", given("plan"), NAME_PATTERN)
    for i, s in enumerate(given("scopes") or ()):
        _text(problems, f"$.scopes[{i}]", s, SCOPE_PATTERN)
    for field in ("allow_cidrs", "deny_cidrs"):
        cidrs = given(field)
        if not cidrs:
            continue
        out = []
        for i, c in enumerate(cidrs):
            why = text_problem(c, CIDR_PATTERN)
            if why:
                problems.append(f"$.{field}[{i}]: {why}")
                continue
            try:
                out.append(canonical_cidr(c))
            except ValueError as exc:  # the pattern should make this unreachable
                problems.append(f"$.{field}[{i}]: {exc}")
        if len(out) == len(cidrs):
            setattr(obj, field, out)
    seen: dict[str, int] = {}
    for i, lim in enumerate(given("limits") or ()):
        why = text_problem(lim, LIMIT_PATTERN)
        if why:
            problems.append(f"$.limits[{i}]: {why}")
            continue
        unit = lim.rsplit("/", 1)[1]
        if unit in seen:
            problems.append(f"$.limits[{i}]: a {unit} limit is already set at $.limits[{seen[unit]}] "
                            "(at most one limit per window)")
        seen[unit] = i
    exp = given("expires_at")
    if exp is not None:
        try:
            obj.expires_at = normalize_rfc3339(exp)
        except ValueError as exc:
            problems.append(f"$.expires_at: {exc}")
    meta = given("metadata")
    for k in meta or ():
        why = text_problem(k, TEXT_PATTERN)
        if why:
            problems.append(f"$.metadata: key {k!r}: {why}")
    if problems:
        raise Problems(problems)


def expiry_problem(expires_at: str | None, now_ms: int) -> str | None:
    """A past (or present) expires_at is refused on create and update."""
    if expires_at is None:
        return None
    if rfc3339_ms(expires_at) <= now_ms:
        return (f"$.expires_at: {expires_at} is not in the future (now is {format_ms(now_ms)}); "
                "omit it for a key that never expires")
    return None


# ---------------------------------------------------------------- request bodies


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """POST /keys"""

    name: KeyName
    owner: Owner | None = None
    plan: PlanName | None = None
    scopes: Scopes = []
    allow_cidrs: Cidrs = []
    deny_cidrs: Cidrs = []
    limits: Limits = []
    expires_at: Timestamp | None = None
    metadata: Metadata = {}

    def __post_init__(self):
        _check_body(self)


class UpdateKey(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """PATCH /keys/{id}: only the fields given change; null clears owner/plan/expires_at."""

    name: KeyName | msgspec.UnsetType = msgspec.UNSET
    owner: Owner | None | msgspec.UnsetType = msgspec.UNSET
    plan: PlanName | None | msgspec.UnsetType = msgspec.UNSET
    scopes: Scopes | msgspec.UnsetType = msgspec.UNSET
    allow_cidrs: Cidrs | msgspec.UnsetType = msgspec.UNSET
    deny_cidrs: Cidrs | msgspec.UnsetType = msgspec.UNSET
    limits: Limits | msgspec.UnsetType = msgspec.UNSET
    expires_at: Timestamp | None | msgspec.UnsetType = msgspec.UNSET
    metadata: Metadata | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self):
        _check_body(self)

    def changes(self) -> dict[str, Any]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not msgspec.UNSET}


class RotateKey(msgspec.Struct, forbid_unknown_fields=True):
    """POST /keys/{id}/rotate (the body may be empty: no grace)"""

    # A float with multiple_of=1 so that 3600.0 (a JSON Schema integer too) is accepted;
    # the document declares it as an integer.
    grace_seconds: Annotated[float, Meta(ge=0, le=MAX_GRACE_SECONDS, multiple_of=1,
                                         description="how long the previous secret keeps working")] = 0


# ---------------------------------------------------------------- responses

OutTimestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"}, examples=[TIMESTAMP_EXAMPLE])]


class KeyOut(msgspec.Struct):
    """A key record as the API shows it (never the secret, never a digest)."""

    id: str
    name: str
    owner: str | None = None
    plan: str | None = None
    scopes: list[str] = []
    allow_cidrs: list[str] = []
    deny_cidrs: list[str] = []
    limits: list[str] = []
    expires_at: OutTimestamp | None = None
    metadata: dict[str, Any] = {}
    created_at: OutTimestamp | None = None
    updated_at: OutTimestamp | None = None
    revoked_at: OutTimestamp | None = None
    grace_until: OutTimestamp | None = None  # while the previous secret still works (after a rotation)
    status: Literal["active", "expired", "revoked"] = "active"


class KeyCreated(KeyOut):
    """201 from POST /keys and 200 from rotate: `key` is shown here only, once."""

    key: str = ""


class KeyList(msgspec.Struct):
    keys: list[KeyOut]
    next_after: str | None = None


class AuditEventOut(msgspec.Struct):
    seq: int
    ts: OutTimestamp
    actor: str
    event: str
    key_id: str
    changes: dict[str, Any]
    hash: str


class AuditList(msgspec.Struct):
    events: list[AuditEventOut]


class UsageRow(msgspec.Struct, rename={"c1xx": "1xx", "c2xx": "2xx", "c3xx": "3xx", "c4xx": "4xx", "c5xx": "5xx"}):
    ts: OutTimestamp
    requests: int
    c1xx: int
    c2xx: int
    c3xx: int
    c4xx: int
    c5xx: int
    bytes_in: int
    bytes_out: int


class UsageTotals(msgspec.Struct, rename={"c1xx": "1xx", "c2xx": "2xx", "c3xx": "3xx", "c4xx": "4xx", "c5xx": "5xx"}):
    requests: int
    c1xx: int
    c2xx: int
    c3xx: int
    c4xx: int
    c5xx: int
    bytes_in: int
    bytes_out: int


class KeyUsage(msgspec.Struct):
    """GET /keys/{id}/usage: counts per bucket, oldest first, and their totals."""

    key_id: str
    by: UsagePeriod
    rows: list[UsageRow]
    totals: UsageTotals


class TopRow(msgspec.Struct, rename={"c1xx": "1xx", "c2xx": "2xx", "c3xx": "3xx", "c4xx": "4xx", "c5xx": "5xx"}):
    key_id: str
    requests: int
    since: OutTimestamp
    c1xx: int
    c2xx: int
    c3xx: int
    c4xx: int
    c5xx: int
    bytes_in: int
    bytes_out: int


class TopUsage(msgspec.Struct):
    """GET /usage/top: the biggest consumers of the current bucket."""

    by: UsagePeriod
    top: list[TopRow]


class Health(msgspec.Struct):
    status: Literal["ok"]
    admin_pid: int
    master_pid: int


class Ready(msgspec.Struct, omit_defaults=True):
    status: Literal["ready", "draining", "starting"]
    workers_ready: int | None = None
    workers: int | None = None


class ReloadAccepted(msgspec.Struct):
    status: Literal["reload requested"]
    config: str


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    request_id: str


class Error(msgspec.Struct):
    error: ErrorBody
