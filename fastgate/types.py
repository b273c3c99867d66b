"""The value types that the config, the admin API bodies and the key store share.

One definition per kind of value (``Cidr``, ``Limit``, ``Timestamp``, ``Scope``, names,
key ids, metadata): an ``Annotated[str, Meta(...), Rule]``. The ``Meta`` carries what
msgspec checks while decoding and what the OpenAPI document shows (lengths, item counts,
the ``pattern``); the :class:`Rule` carries what msgspec cannot say: a full match of the
same pattern, a canonical form ("10.1.2.3/8" is stored as "10.0.0.0/8"), or a parser (RFC
3339). :func:`check_fields` runs the rules of a decoded Struct (config sections, admin
bodies); :func:`validate` runs msgspec's checks and the rules on a plain value (the store,
whose records are built in Python and never decoded). Every problem is located:
``PATH: expected ..., found ...``.

Why a full match in a rule and not ``Meta(pattern=...)``: msgspec applies a pattern with
``re.search``, where ``$`` also matches before a final newline, so ``"name\\n"`` would pass
``^[^\\n]*$``; JSON Schema validators (ECMA-262 regexes) do not let it pass. A full match
agrees with them, and lets the error say what was found instead of quoting the regex.

The patterns are written in the common subset of Python ``re``, ECMA-262 and the Rust
``regex`` crate (what schemathesis validates with): ``\\xNN`` and ``\\uNNNN`` escapes,
character classes, groups, bounded repeats. No ``\\s`` or ``\\d`` (their meaning differs
between the three).

This module imports only the standard library and msgspec, so every layer can use it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import re
import types as _types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Union

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
LIMIT_UNITS = ("second", "minute", "hour", "day", "month")
LIMIT_PATTERN = r"^[1-9][0-9]{0,8}/(?:second|minute|hour|day|month)$"
MAX_LIMIT = 999_999_999  # what LIMIT_PATTERN admits (the core counts up to 2**32 - 2)

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
# An address or a network; host bits may be set (they are cleared: "10.0.0.1/8" is
# stored as "10.0.0.0/8", the network it means, as nginx reads it). No zone ids
# ("fe80::1%eth0"): the core never sees a peer's zone.
CIDR_PATTERN = f"^(?:{_IPV4}(?:/(?:3[0-2]|[12]?[0-9]))?|{_IPV6}(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"

# Limits of the key fields (also in the OpenAPI document).
MAX_NAME = 200
MAX_SCOPES = 256
MAX_SCOPE = 1024
MAX_CIDRS = 256
MAX_META_KEYS = 32
MAX_META_KEY = 64
MAX_META_STR = 256
MAX_META_ITEMS = 16
METADATA_RULE = (f"metadata: at most {MAX_META_KEYS} keys of 1..{MAX_META_KEY} characters; a value is a string "
                 f"of at most {MAX_META_STR} characters, a number, true/false or null, or a list or object of "
                 f"at most {MAX_META_ITEMS} such values (so at most 2 levels deep)")


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


# ---------------------------------------------------------------- rules


class Rule:
    """What a string type requires beyond its ``Meta``: a full match of ``pattern``
    (the same one the type's JSON Schema shows) and/or a conversion to the stored form.

    ``rule(value)`` returns the stored form or raises ValueError saying what was expected
    and what was found (the first control character, if that is the reason)."""

    __slots__ = ("expected", "pattern", "convert", "_fullmatch")

    def __init__(self, expected: str, pattern: str | None = None, convert: Callable[[str], str] | None = None):
        self.expected = expected
        self.pattern = pattern
        self.convert = convert
        self._fullmatch = re.compile(pattern).fullmatch if pattern is not None else None

    def problem(self, value: str) -> str | None:
        """Why ``value`` does not fully match the pattern, or None."""
        if self._fullmatch is None or self._fullmatch(value):
            return None
        return control_problem(value) or f"{self.expected}, found {value!r}"

    def __call__(self, value: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{self.expected}, found {value!r}")
        why = self.problem(value)
        if why:
            raise ValueError(why)
        return value if self.convert is None else self.convert(value)

    def __repr__(self) -> str:
        return f"Rule({self.expected!r})"


class ListRule:
    """A rule over a whole list, after its items passed their own: ``rule(values, path)``
    returns the located problems ('PATH[i]: ...')."""

    __slots__ = ("check",)

    def __init__(self, check: Callable[[list, str], list[str]]):
        self.check = check

    def __call__(self, values: list, path: str) -> list[str]:
        return self.check(values, path)


TEXT = Rule("expected text without control characters", TEXT_PATTERN)
NAME = Rule("expected a name that is not blank and does not start with a space", NAME_PATTERN)
KEY_ID = Rule("expected a key id (1..32 ASCII letters and digits)", KEY_ID_PATTERN)
SCOPE = Rule("expected 'METHOD[,METHOD] /path' (methods in capitals, or '*'; one space; the path starts "
             "with '/', has no spaces, and '*' only at its end)", SCOPE_PATTERN)
LIMIT = Rule(f"expected N/second|minute|hour|day|month with N 1..{MAX_LIMIT}", LIMIT_PATTERN)
# Cached conversions: an import of a million records repeats a few CIDRs and timestamps
# (every record's created_at, say), and ipaddress and the RFC 3339 parser cost 3..5 us each.
CIDR = Rule("expected an IPv4 or IPv6 address or CIDR like 10.0.0.0/8 or 2001:db8::/32", CIDR_PATTERN,
            functools.lru_cache(maxsize=4096)(canonical_cidr))
TIMESTAMP = Rule(f"expected an RFC 3339 timestamp like {TIMESTAMP_EXAMPLE}",
                 convert=functools.lru_cache(maxsize=4096)(normalize_rfc3339))

_BY_PATTERN = {r.pattern: r for r in (TEXT, NAME, KEY_ID, SCOPE, LIMIT, CIDR)}


def text_problem(value: str, pattern: str = TEXT_PATTERN) -> str | None:
    """Why ``value`` does not fully match one of the patterns above, or None."""
    rule = _BY_PATTERN.get(pattern) or Rule(f"expected text matching {pattern}", pattern)
    return rule.problem(value)


def _one_limit_per_window(values: list, path: str) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or LIMIT.problem(v):
            continue  # reported by the item's own rule
        unit = v.rsplit("/", 1)[1]
        if unit in seen:
            out.append(f"{path}[{i}]: a {unit} limit is already set at {path}[{seen[unit]}] "
                       "(at most one limit per window)")
        else:
            seen[unit] = i
    return out


ONE_LIMIT_PER_WINDOW = ListRule(_one_limit_per_window)


# The grammar the core's compile_limits reads, and so what a key record stored before the
# Limit rule (an admin API that checked limits with the core only) may hold.
_STORED_LIMIT = re.compile(r"\s*(\d+)\s*/\s*(second|minute|hour|day|month)\s*")


def parse_limit(value: str) -> tuple[int, str]:
    """'10/second' -> (10, 'second'), for a limit already accepted: the Limit grammar, and
    also the spacing and leading zeros of records stored before it (the core compiled them
    too, so the workers must read them). New input is checked with LIMIT, which refuses
    both. ValueError in LIMIT's words for anything else."""
    m = _STORED_LIMIT.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) == 0:
        raise ValueError((isinstance(value, str) and LIMIT.problem(value)) or f"{LIMIT.expected}, found {value!r}")
    return int(m.group(1)), m.group(2)


# ---------------------------------------------------------------- the types

Scope = Annotated[str, Meta(min_length=3, max_length=MAX_SCOPE, examples=["GET /orders/*"],
                            extra_json_schema={"pattern": SCOPE_PATTERN}), SCOPE]
Cidr = Annotated[str, Meta(min_length=2, max_length=64, examples=["10.0.0.0/8"],
                           extra_json_schema={"pattern": CIDR_PATTERN}), CIDR]
# No min_length on Limit and Timestamp: the rule implies one, and says what was found
# ("... has no timezone") where msgspec would only say "Expected `str` of length >= 20".
Limit = Annotated[str, Meta(max_length=16, examples=["5/second"],
                            extra_json_schema={"pattern": LIMIT_PATTERN}), LIMIT]
# JSON Schema cannot say "after now": the admin API refuses a past expires_at with a 400.
Timestamp = Annotated[str, Meta(max_length=64, examples=[TIMESTAMP_EXAMPLE],
                                extra_json_schema={"format": "date-time"},
                                description="RFC 3339 (fraction and offset optional), kept to the millisecond; "
                                            "must be in the future"), TIMESTAMP]
KeyName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, extra_json_schema={"pattern": NAME_PATTERN},
                              description="not blank, no control or bidirectional-control characters"), NAME]
Owner = KeyName
PlanName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, extra_json_schema={"pattern": NAME_PATTERN},
                               description="one of the [plans.NAME] of the gateway's config"), NAME]
KeyId = Annotated[str, Meta(min_length=1, max_length=32, extra_json_schema={"pattern": KEY_ID_PATTERN},
                            description="a key id: 1..32 ASCII letters and digits"), KEY_ID]
SeqNo = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]

Scopes = Annotated[list[Scope], Meta(max_length=MAX_SCOPES, description="none = every call")]
Cidrs = Annotated[list[Cidr], Meta(max_length=MAX_CIDRS)]
# At most one limit per window: "contains ... maxContains 1" for each unit.
Limits = Annotated[list[Limit], Meta(max_length=len(LIMIT_UNITS), extra_json_schema={"allOf": [
    {"contains": {"pattern": f"/{u}$"}, "minContains": 0, "maxContains": 1} for u in LIMIT_UNITS
]}, description="at most one limit per window"), ONE_LIMIT_PER_WINDOW]

MetaKey = Annotated[str, Meta(min_length=1, max_length=MAX_META_KEY, extra_json_schema={"pattern": TEXT_PATTERN}),
                    TEXT]
_MetaStr = Annotated[str, Meta(max_length=MAX_META_STR)]
_MetaInt = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
_MetaScalar = Union[_MetaStr, _MetaInt, float, bool, None]
_MetaValue = Union[_MetaStr, _MetaInt, float, bool, None,
                   Annotated[list[_MetaScalar], Meta(max_length=MAX_META_ITEMS)],
                   Annotated[dict[MetaKey, _MetaScalar], Meta(max_length=MAX_META_ITEMS)]]
Metadata = Annotated[dict[MetaKey, _MetaValue], Meta(max_length=MAX_META_KEYS, description=METADATA_RULE)]


# ---------------------------------------------------------------- checking

Checker = Callable[[Any, str, list], Any]


class Problems(ValueError):
    """Several located problems ('PATH: message'), one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def rule_of(tp: Any) -> Rule | None:
    """The Rule an Annotated string type carries, if any."""
    for m in getattr(tp, "__metadata__", ()):
        if isinstance(m, Rule):
            return m
    return None


_CHECKERS: dict[Any, Checker | None] = {}


def checker(tp: Any) -> Checker | None:
    """``run(value, path, problems) -> value`` applying every Rule inside ``tp`` (through
    Annotated, list, dict keys and values, unions), or None when ``tp`` holds none. ``run``
    appends located problems and returns the value in its stored form (a new list or dict
    only where something changed). Compiled once per type."""
    try:
        return _CHECKERS[tp]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation: compile each time (never on a hot path)
        return _compile(tp)
    run = _CHECKERS[tp] = _compile(tp)
    return run


def _compile(tp: Any) -> Checker | None:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        inner = checker(base)
        rules = [e for e in extras if isinstance(e, (Rule, ListRule))]
        if not rules:
            return inner
        return _annotated(inner, rules)
    if origin is list:
        item = checker(typing.get_args(tp)[0])
        return None if item is None else _list(item)
    if origin is dict:
        k, v = (checker(a) for a in typing.get_args(tp))
        return None if k is None and v is None else _dict(k, v)
    if origin is Union or origin is _types.UnionType:
        members = [(_runtime_type(a), checker(a)) for a in typing.get_args(tp)]
        members = [(t, c) for t, c in members if c is not None]
        return _union(members) if members else None
    return None


def _runtime_type(tp: Any) -> type:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    return origin if isinstance(origin, type) else tp


def _annotated(inner: Checker | None, rules: list) -> Checker:
    def run(value, path, problems):
        if inner is not None:
            value = inner(value, path, problems)
        for rule in rules:
            if isinstance(rule, ListRule):
                problems.extend(rule(value, path))
            elif isinstance(value, str):
                try:
                    value = rule(value)
                except ValueError as exc:
                    problems.append(f"{path}: {exc}")
        return value
    return run


def _list(item: Checker) -> Checker:
    def run(values, path, problems):
        if not values:
            return values
        out = [item(v, f"{path}[{i}]", problems) for i, v in enumerate(values)]
        return values if all(a is b for a, b in zip(out, values)) else out
    return run


def _dict(key: Checker | None, val: Checker | None) -> Checker:
    def run(mapping, path, problems):
        if not mapping:
            return mapping
        changed = False
        out = {}
        for k, v in mapping.items():
            if key is not None:
                found: list[str] = []
                k2 = key(k, path, found)
                problems.extend(f"{path}: key {k!r}: {p[len(path) + 2:]}" for p in found)
                changed |= k2 is not k
                k = k2
            if val is not None:
                v2 = val(v, f"{path}.{k}", problems)
                changed |= v2 is not v
                v = v2
            out[k] = v
        return out if changed else mapping
    return run


def _union(members: list[tuple[type, Checker]]) -> Checker:
    def run(value, path, problems):
        for t, c in members:
            if isinstance(value, t):
                return c(value, path, problems)
        return value
    return run


_STRUCT_PLANS: dict[type, list[tuple[str, str, Checker]]] = {}


def check_fields(obj: msgspec.Struct, prefix: str = "") -> None:
    """Run the Rules of every field of a decoded Struct (call it from ``__post_init__``):
    values are replaced by their stored form; every problem is collected and raised as one
    Problems located ``PREFIX + field[index]: ...`` (prefix "$." for an API body; "" for a
    config section, whose loader adds the section's path). None and UNSET are skipped."""
    cls = type(obj)
    plan = _STRUCT_PLANS.get(cls)
    if plan is None:
        plan = []
        for f in msgspec.structs.fields(cls):
            run = checker(f.type)
            if run is not None:
                plan.append((f.name, f.encode_name, run))
        _STRUCT_PLANS[cls] = plan
    problems: list[str] = []
    for name, shown, run in plan:
        v = getattr(obj, name)
        if v is None or v is msgspec.UNSET:
            continue
        new = run(v, prefix + shown, problems)
        if new is not v:
            setattr(obj, name, new)
    if problems:
        raise Problems(problems)


_BOXES: dict[Any, type] = {}


def _box(tp: Any) -> type:
    """A one-field Struct holding ``tp``: msgspec caches a Struct's compiled type info, but
    rebuilds it on every ``convert(value, tp)`` of a bare union or Annotated type (3..14 us
    for the key fields against 0.2..1 us boxed)."""
    box = _BOXES.get(tp)
    if box is None:
        box = _BOXES[tp] = msgspec.defstruct("Box", [("v", tp)])
    return box


def validator(tp: Any) -> Callable[[Any, str], Any]:
    """``check(value, path)``: ``value`` checked against ``tp`` as if decoded (msgspec's types
    and Meta, then the Rules), returned in its stored form; Problems with every problem
    located at ``path``. For values built in Python rather than decoded (key store records).
    Compile it once per type: looking a typing object up costs more than checking a value."""
    box = _box(tp)
    run = checker(tp)
    convert = msgspec.convert

    def check(value: Any, path: str) -> Any:
        try:
            value = convert({"v": value}, box).v
        except msgspec.ValidationError as exc:
            raise Problems([_located(exc, path)]) from None
        if run is not None:
            problems: list[str] = []
            value = run(value, path, problems)
            if problems:
                raise Problems(problems)
        return value
    return check


def fields_validator(fields: dict[str, Any]) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """``check(values, prefix)`` for several named values at once (one msgspec call for all
    of them, which is what makes a million-record import affordable): ``values`` must hold
    every name of ``fields``; returns them in their stored form, or raises Problems located
    ``PREFIX + name[...]``. msgspec stops at the first type or Meta problem; the Rules
    report every problem."""
    box = msgspec.defstruct("Fields", list(fields.items()))
    runs = [(name, checker(tp)) for name, tp in fields.items()]
    convert = msgspec.convert

    def check(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        try:
            obj = convert(values, box)
        except msgspec.ValidationError as exc:
            raise Problems([_located(exc, prefix, "$.")]) from None
        problems: list[str] = []
        out = {}
        for name, run in runs:
            v = getattr(obj, name)
            if run is not None and v is not None:
                v = run(v, prefix + name, problems)
            out[name] = v
        if problems:
            raise Problems(problems)
        return out
    return check


def validate(tp: Any, value: Any, path: str) -> Any:
    """``validator(tp)(value, path)``, for a one-off check."""
    return validator(tp)(value, path)


def _located(exc: msgspec.ValidationError, path: str, root: str = "$.v") -> str:
    """msgspec's 'Expected `str`, got `int` - at `$.v[2]`' re-rooted: 'PATH[2]: Expected ...'
    (``root``: the part of msgspec's path that is the box, not the value)."""
    msg, sep, at = str(exc).rpartition(" - at `")
    if sep and at.startswith(root):
        return f"{path}{at[len(root):].rstrip('`')}: {msg}"
    return f"{path}: {exc}"
