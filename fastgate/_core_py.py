"""Pure-Python twin of fastgate._core: same classes, same return codes.

Two roles:

* the reference implementation every core test also runs against
  (``FASTGATE_PURE=1`` selects it at run time), so the twins cannot drift;
* the home of the cold-path compilers (scope patterns, CIDR lists, limit
  strings, the arena layout) that ``_core.pyx`` imports, so parse rules and
  error messages exist exactly once.

The twin keeps its tables in Python objects: it does NOT share state across
processes. Multi-process behaviour is a property of the Cython core only.
"""

from __future__ import annotations

import bisect
import calendar
import hashlib
import ipaddress
import marshal
import mmap
import os
import re
import secrets
import struct
import zlib

# ---------------------------------------------------------------- constants

LAYOUT_VERSION = 2  # v2: per-key rate region, two address regions, two slot areas, salt, journal
MAGIC = int.from_bytes(b"FGARENA1", "little")
HEADER_SIZE = 4096
RECORD_SIZE = 128
RATE_ENTRY_SIZE = 96
EXT_MIN_BLOCK = 64
EXT_CLASSES = 24

# Return codes. Negative, distinct across tables, so one mapping turns any of
# them into an HTTP error.
NO_SUCH_KEY = -1
KEY_REVOKED = -2
KEY_DISABLED = -3
KEY_EXPIRED = -4
KEY_NOT_YET_VALID = -5
SCOPE_DENIED = -6
KEY_IP_DENIED = -7
KEY_BUSY = -8
KEY_MALFORMED = -9
RATE_LIMITED = -10
RATE_TABLE_FULL = -11

UNLIMITED = 0x7FFFFFFF

FLAG_LIVE = 1
FLAG_DISABLED = 2
FLAG_REVOKED = 4

METHOD_BITS = {
    b"GET": 1 << 0,
    b"HEAD": 1 << 1,
    b"POST": 1 << 2,
    b"PUT": 1 << 3,
    b"DELETE": 1 << 4,
    b"PATCH": 1 << 5,
    b"OPTIONS": 1 << 6,
    b"TRACE": 1 << 7,
    b"CONNECT": 1 << 8,
}
METHOD_OTHER = 1 << 15
METHOD_ALL = 0xFFFF

SCOPE_EXACT = 0
SCOPE_SEGMENT = 1
SCOPE_PREFIX = 2

WINDOWS = ("second", "minute", "hour", "day", "month")
WINDOW_MS = (1_000, 60_000, 3_600_000, 86_400_000, 0)  # 0: calendar month, UTC
N_WINDOWS = 5
MAX_LIMIT = 0xFFFFFFFE

KEY_PREFIX = b"fg_"
KEY_ID_MAX = 32
KEY_SECRET_MIN = 27  # 27 base62 chars >= 160 bits
KEY_SECRET_MAX = 64
KEY_CHECK_LEN = 6
B62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_VAL = {c: i for i, c in enumerate(B62)}

M64 = (1 << 64) - 1


class CoreError(Exception):
    """Cold-path misuse of the core: bad config input, layout mismatch, full table."""


# ---------------------------------------------------------------- crossing counters

# Every way Python enters the core (fastgate._core, or this twin behind the
# same facade): each public method and function, and each property, such as
# the result fields a request reads back. Constructors are not counted. The
# Cython core counts them only when built with FASTGATE_DEBUG (the counter is
# a C macro that is empty otherwise); the twin always counts. The order is
# the compiled core's table order; it looks each name up here at import.
CROSSINGS = (
    "addr_subject",
    "Arena.create", "Arena.attach", "Arena.size", "Arena.key_capacity", "Arena.rate_capacity",
    "Arena.auth_capacity", "Arena.path", "Arena.writer_pid", "Arena.header", "Arena.set_writer",
    "Arena.repair_dead_writer", "Arena.recover", "Arena.unlink", "Arena.export_keys", "Arena.import_keys",
    "KeyTable.capacity", "KeyTable.last_plan", "KeyTable.set_secret", "KeyTable.digest", "KeyTable.check_key",
    "KeyTable.check", "KeyTable.allocate", "KeyTable.put", "KeyTable.rotate", "KeyTable.revoke",
    "KeyTable.set_disabled", "KeyTable.delete", "KeyTable.sweep", "KeyTable.info", "KeyTable.meta",
    "KeyTable.generation", "KeyTable.probes", "KeyTable.__len__", "KeyTable.stats", "KeyTable.indexes_by_meta",
    "RateTable.policy", "RateTable.set_plans", "RateTable.hit", "RateTable.hit_key", "RateTable.admit",
    "RateTable.stats", "RateTable.limit", "RateTable.remaining", "RateTable.reset_ms", "RateTable.retry_after_ms",
    "Admission.index", "Admission.generation", "Admission.plan_id", "Admission.policy", "Admission.rate",
    "Admission.limit", "Admission.remaining", "Admission.reset_ms", "Admission.retry_after_ms",
    "CidrSet.compile", "CidrSet.contains", "CidrSet.__len__", "CidrSet.ranges", "CidrSet.where",
)
COUNTS_CROSSINGS = True
_X = dict.fromkeys(CROSSINGS, 0)


def crossings() -> dict[str, int]:
    """Calls into the core by entry point since the last reset_crossings(), in this
    process (a forked child starts with its parent's counts). Entry points never
    called are left out."""
    return {k: v for k, v in _X.items() if v}


def reset_crossings() -> None:
    for k in _X:
        _X[k] = 0


# ---------------------------------------------------------------- key format


def key_checksum(body: bytes) -> bytes:
    n = zlib.crc32(body)
    out = bytearray(KEY_CHECK_LEN)
    for i in range(KEY_CHECK_LEN - 1, -1, -1):
        n, r = divmod(n, 62)
        out[i] = B62[r]
    return bytes(out)


def make_key(key_id: str) -> str:
    """``fg_<id>_<secret><check>``: 160+ bits of secret, CRC-32 in base62."""
    kid = key_id.encode()
    if not (0 < len(kid) <= KEY_ID_MAX and kid.isalnum() and kid.isascii()):
        raise CoreError(f"key id must be 1..{KEY_ID_MAX} ASCII letters or digits, found {key_id!r}")
    secret = bytes(B62[secrets.randbelow(62)] for _ in range(32))
    body = KEY_PREFIX + kid + b"_" + secret
    return (body + key_checksum(body)).decode()


def key_well_formed(key: bytes) -> bool:
    if not key.startswith(KEY_PREFIX):
        return False
    sep = key.find(b"_", 3)
    if sep < 4 or sep - 3 > KEY_ID_MAX:
        return False
    rest = len(key) - sep - 1 - KEY_CHECK_LEN
    if not KEY_SECRET_MIN <= rest <= KEY_SECRET_MAX:
        return False
    for c in key[3:sep]:
        if c not in _B62_VAL:
            return False
    for c in key[sep + 1 :]:
        if c not in _B62_VAL:
            return False
    return key_checksum(key[:-KEY_CHECK_LEN]) == key[-KEY_CHECK_LEN:]


def key_id_of(key: bytes) -> bytes:
    """Public id part of a well-formed key (for logs and lookups in the store)."""
    return key[3 : key.find(b"_", 3)]


def key_digest(secret: bytes, key: bytes) -> bytes:
    """The keyed digest the tables store: BLAKE2b-256 keyed with the server secret."""
    return hashlib.blake2b(key, key=secret, digest_size=32).digest()


def _check_secret(secret) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= 64:
        found = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise CoreError(f"server secret must be 1..64 bytes, found {found}")
    return bytes(secret)


# ---------------------------------------------------------------- hashing helpers


def mix64(x: int) -> int:
    """splitmix64 finaliser; the Cython core uses the same arithmetic."""
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def entry_key(namespace: int, subject: int) -> int:
    k = mix64(namespace ^ mix64(subject & M64))
    return k or 1


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def plan_id(name: str | None) -> int:
    """The plan id a key record carries (KeyTable.put(plan_id=...)) for a plan name:
    0 for no plan (None or ""), else 1..2**31-1, an unkeyed 31-bit hash of the
    name, so the admin process and every worker derive the same id from the name
    alone. RateTable.set_plans() refuses two configured names with one id."""
    if name is None or name == "":
        return 0
    if not isinstance(name, str):
        raise CoreError(f"plan name must be a string, found {type(name).__name__}")
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4, person=b"fastgate.plan").digest(), "little")
    return (h & 0x7FFFFFFF) or 1


def addr_hash(peer: bytes) -> int:
    """Subject for per-IP limits: a 63-bit hash of the packed address (kept for
    callers that predate addr_subject; it does not aggregate IPv6)."""
    return int.from_bytes(hashlib.blake2b(peer, digest_size=8).digest(), "little") >> 1


# addr_subject values. IPv6 subjects are the top v6_prefix bits of the address
# (at most 64, so they fit the upper word and stay injective); IPv4 subjects
# and the one "unknown address" subject sit in ffff:fffe::/31, which is
# multicast space and so never the source of a TCP connection.
SUBJECT_V4 = 0xFFFF_FFFF_0000_0000
SUBJECT_UNKNOWN = 0xFFFF_FFFE_0000_0000
V6_PREFIX_DEFAULT = 64


def addr_subject(packed: bytes, v6_prefix: int = V6_PREFIX_DEFAULT) -> int:
    _X["addr_subject"] += 1
    return _addr_subject(packed, v6_prefix)


def _addr_subject(packed: bytes, v6_prefix: int = V6_PREFIX_DEFAULT) -> int:
    """Rate subject of a client address (the 4- or 16-byte pack_ip form).

    IPv4 and IPv4-mapped IPv6 count per address; IPv6 counts per /v6_prefix
    (default /64: one host usually owns a whole /64, so finer subjects would
    give it 2**64 of them). Anything else (b"": an unparseable forwarded
    address) is the single subject SUBJECT_UNKNOWN, so unknown clients share
    one limit instead of escaping it. The table salts placement itself.
    """
    if type(v6_prefix) is not int or not 1 <= v6_prefix <= 64:
        raise CoreError(f"v6_prefix must be 1..64, found {v6_prefix!r}")
    n = len(packed)
    if n == 4:
        return SUBJECT_V4 | int.from_bytes(packed, "big")
    if n == 16:
        x = int.from_bytes(packed, "big")
        if x >> 32 == 0xFFFF:
            return SUBJECT_V4 | (x & 0xFFFFFFFF)
        return (x >> 64) & ~((1 << (64 - v6_prefix)) - 1) & M64
    return SUBJECT_UNKNOWN


# ---------------------------------------------------------------- cold-path compilers


def method_bit(method: bytes) -> int:
    return METHOD_BITS.get(method, METHOD_OTHER)


def _methods_mask(text: str, where: str, spec: str) -> int:
    if text == "*":
        return METHOD_ALL
    mask = 0
    for m in text.split(","):
        bit = METHOD_BITS.get(m.strip().upper().encode())
        if bit is None:
            raise CoreError(
                f"cannot parse scope {spec!r} at {where}: unknown method {m.strip()!r}, "
                f"expected one of {', '.join(b.decode() for b in METHOD_BITS)} or '*'"
            )
        mask |= bit
    return mask


def compile_scopes(scopes, where: str = "scopes") -> list[tuple[int, int, bytes]]:
    """``["GET /orders/*", "* /public*", "GET,POST /x"]`` -> [(methods, kind, path)].

    ``/orders``   exact; ``/orders/*`` the segment /orders and everything under it;
    ``/orders*``  raw prefix; ``*`` or ``/*`` every path.
    """
    out = []
    for i, spec in enumerate(scopes or ()):
        at = f"{where}[{i}]"
        if not isinstance(spec, str):
            raise CoreError(f"cannot parse scope at {at}: expected a string, found {type(spec).__name__}")
        parts = spec.split()
        if len(parts) != 2:
            raise CoreError(f"cannot parse scope {spec!r} at {at}: expected 'METHOD[,METHOD] /path', found {len(parts)} words")
        mtext, path = parts
        mask = _methods_mask(mtext, at, spec)
        if path == "*":
            path = "/*"
        if not path.startswith("/"):
            raise CoreError(f"cannot parse scope {spec!r} at {at}: path must start with '/', found {path!r}")
        if path.endswith("/*"):
            kind, p = SCOPE_SEGMENT, path[:-2]
        elif path.endswith("*"):
            kind, p = SCOPE_PREFIX, path[:-1]
        else:
            kind, p = SCOPE_EXACT, path
        if "*" in p:
            raise CoreError(f"cannot parse scope {spec!r} at {at}: '*' is only allowed at the end of the path")
        pb = p.encode()
        if len(pb) > 0xFFFF:
            raise CoreError(f"cannot parse scope at {at}: path longer than 65535 bytes")
        out.append((mask, kind, pb))
    return out


def scope_allows(scopes, mbit: int, path: bytes) -> bool:
    if not scopes:
        return True
    for mask, kind, p in scopes:
        if not mask & mbit:
            continue
        if kind == SCOPE_EXACT:
            if path == p:
                return True
        elif kind == SCOPE_PREFIX:
            if path.startswith(p):
                return True
        elif path.startswith(p) and (len(path) == len(p) or path[len(p)] == 0x2F):
            return True
    return False


_V4_MAPPED = (0xFFFF << 32, (0xFFFF << 32) | 0xFFFFFFFF)


def _merge(ranges):
    ranges.sort()
    out = []
    for lo, hi in ranges:
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def compile_cidrs(cidrs, where: str = "cidrs") -> tuple[list, list]:
    """Parse, then merge into sorted disjoint (lo, hi) ranges: (v4, v6).

    Every v6 network's intersection with ::ffff:0:0/96 also lands in the v4
    list (``::/0`` and ``::/80`` cover all of IPv4, ``::ffff:10.0.0.0/104``
    covers 10/8), because a v4-mapped peer is matched as the IPv4 address it
    carries. Zone ids (``fe80::1%eth0``) are refused: the core never sees a
    peer's zone, so a rule naming one could not mean what it says.
    """
    if isinstance(cidrs, (str, bytes)):
        raise CoreError(f"cannot parse CIDRs at {where}: expected a list of strings, found a single {type(cidrs).__name__}")
    v4, v6 = [], []
    for i, c in enumerate(cidrs or ()):
        if not isinstance(c, str):
            raise CoreError(f"cannot parse CIDR at {where}[{i}]: expected a string, found {type(c).__name__}")
        if "%" in c:
            raise CoreError(f"cannot parse CIDR {c!r} at {where}[{i}]: zone ids ('%...') are not allowed in address rules")
        try:
            net = ipaddress.ip_network(c.strip())
        except ValueError as exc:
            raise CoreError(f"cannot parse CIDR {c!r} at {where}[{i}]: {exc}") from None
        lo, hi = int(net.network_address), int(net.broadcast_address)
        if net.version == 4:
            v4.append((lo, hi))
        else:
            v6.append((lo, hi))
            mlo, mhi = max(lo, _V4_MAPPED[0]), min(hi, _V4_MAPPED[1])
            if mlo <= mhi:
                v4.append((mlo & 0xFFFFFFFF, mhi & 0xFFFFFFFF))
    return _merge(v4), _merge(v6)


def peer_int(peer: bytes) -> tuple[int, int]:
    """(4, v4) or (6, v6) or (0, 0) for anything else; v4-mapped v6 becomes v4."""
    n = len(peer)
    if n == 4:
        return 4, int.from_bytes(peer, "big")
    if n == 16:
        x = int.from_bytes(peer, "big")
        if x >> 32 == 0xFFFF:
            return 4, x & 0xFFFFFFFF
        return 6, x
    return 0, 0


def ranges_contain(los, his, x: int) -> bool:
    i = bisect.bisect_right(los, x) - 1
    return i >= 0 and x <= his[i]


def compile_limits(limits, where: str = "limits") -> list[int]:
    """``["10/second", (1000, "day")]`` -> five limits (0 = none) by window kind."""
    out = [0] * N_WINDOWS
    for i, spec in enumerate(limits or ()):
        at = f"{where}[{i}]"
        if isinstance(spec, str):
            m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*", spec)
            if m is None:
                raise CoreError(f"cannot parse limit {spec!r} at {at}: expected 'N/second|minute|hour|day|month'")
            n, unit = int(m.group(1)), m.group(2)
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], int) and isinstance(spec[1], str):
            n, unit = spec
        else:
            raise CoreError(f"cannot parse limit {spec!r} at {at}: expected 'N/unit' or (N, unit)")
        if unit not in WINDOWS:
            raise CoreError(f"cannot parse limit {spec!r} at {at}: unknown window {unit!r}, expected one of {', '.join(WINDOWS)}")
        if not 1 <= n <= MAX_LIMIT:
            raise CoreError(f"cannot parse limit {spec!r} at {at}: expected 1..{MAX_LIMIT} requests, found {n}")
        w = WINDOWS.index(unit)
        if out[w]:
            raise CoreError(f"cannot parse limit {spec!r} at {at}: a {unit} limit is already set")
        out[w] = n
    return out


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def layout(key_capacity: int, rate_capacity: int, ext_bytes: int | None, auth_capacity: int | None = None) -> dict:
    """Offsets of the regions inside the arena (offsets only, 8-byte aligned).

    header | slot area A | slot area B | key records | per-key rate entries
    (one per key index) | address entries that refuse when full (ip_limits) |
    address entries that evict when full (failed auth) | extension heap.
    Anonymous shared pages are backed only once touched, so the spare slot
    area and unused rate entries cost address space, not memory.
    """
    if not isinstance(key_capacity, int) or not 1 <= key_capacity <= (1 << 30):
        raise CoreError(f"key_capacity must be 1..{1 << 30}, found {key_capacity!r}")
    if not isinstance(rate_capacity, int) or not 1 <= rate_capacity <= (1 << 30):
        raise CoreError(f"rate_capacity must be 1..{1 << 30}, found {rate_capacity!r}")
    if auth_capacity is None:
        auth_capacity = rate_capacity
    if not isinstance(auth_capacity, int) or not 1 <= auth_capacity <= (1 << 30):
        raise CoreError(f"auth_capacity must be 1..{1 << 30}, found {auth_capacity!r}")
    if ext_bytes is None:
        ext_bytes = max(64 * key_capacity, 1 << 16)
    if not isinstance(ext_bytes, int) or not (1 << 12) <= ext_bytes <= (1 << 40):
        raise CoreError(f"ext_bytes must be 4096..2**40, found {ext_bytes!r}")
    ext_bytes = (ext_bytes + 63) & ~63
    key_slots = _pow2(max(4 * key_capacity, 16))
    rate_cap = _pow2(rate_capacity)
    auth_cap = _pow2(auth_capacity)
    off_slots = HEADER_SIZE
    off_slots2 = off_slots + 8 * key_slots
    off_records = off_slots2 + 8 * key_slots
    off_krate = off_records + RECORD_SIZE * key_capacity
    off_rate = off_krate + RATE_ENTRY_SIZE * key_capacity
    off_auth = off_rate + RATE_ENTRY_SIZE * rate_cap
    off_ext = off_auth + RATE_ENTRY_SIZE * auth_cap
    size = off_ext + ext_bytes
    return dict(
        key_capacity=key_capacity, key_slots=key_slots, rate_capacity=rate_cap, ext_bytes=ext_bytes,
        off_slots=off_slots, off_records=off_records, off_rate=off_rate, off_ext=off_ext, size=size,
        auth_capacity=auth_cap, off_slots2=off_slots2, off_krate=off_krate, off_auth=off_auth,
    )


# Header fields: (name, struct format, offset). Shared with _core.pyx, which
# reads the same offsets through a C struct.
HEADER_FIELDS = (
    ("magic", "Q", 0), ("version", "I", 8), ("header_size", "I", 12), ("size", "Q", 16),
    ("key_capacity", "Q", 24), ("key_slots", "Q", 32), ("rate_capacity", "Q", 40), ("ext_bytes", "Q", 48),
    ("off_slots", "Q", 56), ("off_records", "Q", 64), ("off_rate", "Q", 72), ("off_ext", "Q", 80),
    ("writer_pid", "q", 88), ("auth_capacity", "Q", 96), ("off_slots2", "Q", 104), ("off_krate", "Q", 112),
    ("off_auth", "Q", 120),
)
# Offset of the 16-byte placement salt in the header (written at create, read
# by the Cython RateTable, never returned by header()).
SALT_OFFSET = 256


def read_header(buf, what: str) -> dict:
    if len(buf) < HEADER_SIZE:
        raise CoreError(f"arena {what} is {len(buf)} bytes; expected at least the {HEADER_SIZE}-byte header")
    h = {name: struct.unpack_from("=" + fmt, buf, off)[0] for name, fmt, off in HEADER_FIELDS}
    if h["magic"] != MAGIC:
        raise CoreError(f"arena {what} has magic {h['magic']:#x}; expected {MAGIC:#x} (not a fastgate arena)")
    if h["version"] != LAYOUT_VERSION:
        raise CoreError(f"arena {what} has layout v{h['version']}; this build expects v{LAYOUT_VERSION}")
    want = layout(h["key_capacity"], h["rate_capacity"], h["ext_bytes"], h["auth_capacity"])
    for k in ("key_slots", "off_slots", "off_records", "off_rate", "off_ext", "size", "off_slots2", "off_krate",
              "off_auth", "auth_capacity"):
        if h[k] != want[k]:
            raise CoreError(f"arena {what} header field {k} is {h[k]}; expected {want[k]} for its capacities")
    if len(buf) < h["size"]:
        raise CoreError(f"arena {what} is {len(buf)} bytes; its header says {h['size']}")
    return h


def write_header(buf, lay: dict, writer_pid: int, salt: bytes | None = None) -> None:
    vals = dict(lay, magic=MAGIC, version=LAYOUT_VERSION, header_size=HEADER_SIZE, writer_pid=writer_pid)
    for name, fmt, off in HEADER_FIELDS:
        struct.pack_into("=" + fmt, buf, off, vals[name])
    if salt is not None:
        buf[SALT_OFFSET:SALT_OFFSET + 16] = salt


def map_segment(size: int, path: str | None):
    """Anonymous MAP_SHARED memory (inherited across fork), or a /dev/shm file."""
    if path is None:
        return mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CoreError(f"cannot create arena file {path!r}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def open_segment(path: str):
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise CoreError(f"cannot attach arena {path!r}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise CoreError(f"arena {path!r} is {size} bytes; expected at least the {HEADER_SIZE}-byte header")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- extension blob (Cython layout)

EXT_HEADER = 56


def encode_ext(scopes, allow, deny, limits, meta: bytes) -> bytes:
    """Variable-size part of a key record, as the Cython core reads it.

    header (56 B): u32 total, n_scopes, n_allow4, n_allow6, n_deny4, n_deny6,
    meta_len, limit_mask, limits[5], pad; then scopes (u16 methods, u8 kind,
    u8 0, u16 len, u16 off), allow4 and deny4 (u32 lo, hi), allow6 and deny6
    (u64 lo_hi, lo_lo, hi_hi, hi_lo), pattern bytes, meta bytes.
    """
    a4, a6 = allow
    d4, d6 = deny
    n_scope_bytes = 8 * len(scopes)
    fixed = EXT_HEADER + n_scope_bytes + 8 * (len(a4) + len(d4)) + 32 * (len(a6) + len(d6))
    pat = bytearray()
    entries = []
    for mask, kind, p in scopes:
        off = fixed + len(pat)
        if off + len(p) > 0xFFFF:
            raise CoreError("key scopes are too large: patterns must fit in 64 KiB")
        entries.append(struct.pack("=HBBHH", mask, kind, 0, len(p), off))
        pat += p
    total = fixed + len(pat) + len(meta)
    mask = sum(1 << i for i, n in enumerate(limits) if n)
    out = bytearray(struct.pack("=8I5II", total, len(scopes), len(a4), len(a6), len(d4), len(d6), len(meta), mask, *limits, 0))
    for e in entries:
        out += e
    for lst in (a4, d4):
        for lo, hi in lst:
            out += struct.pack("=II", lo, hi)
    for lst in (a6, d6):
        for lo, hi in lst:
            out += struct.pack("=QQQQ", lo >> 64, lo & M64, hi >> 64, hi & M64)
    out += pat
    out += meta
    assert len(out) == total
    return bytes(out)


# ---------------------------------------------------------------- time


def window_bounds(w: int, now_ms: int) -> tuple[int, int, int, int]:
    """(epoch, start_ms, length_ms, next_length_ms) of window kind w at now_ms."""
    if w < 4:
        W = WINDOW_MS[w]
        e = now_ms // W
        return e, e * W, W, W
    days = now_ms // 86_400_000
    y, m = _civil(days)
    start = _days_from_civil(y, m) * 86_400_000
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    nstart = _days_from_civil(ny, nm) * 86_400_000
    nny, nnm = (ny + 1, 1) if nm == 12 else (ny, nm + 1)
    nnstart = _days_from_civil(nny, nnm) * 86_400_000
    return y * 12 + m - 1, start, nstart - start, nnstart - nstart


def _civil(days: int) -> tuple[int, int]:
    import datetime

    d = datetime.date(1970, 1, 1) + datetime.timedelta(days=days)
    return d.year, d.month


def _days_from_civil(y: int, m: int) -> int:
    return calendar.timegm((y, m, 1, 0, 0, 0)) // 86400


def sliding_weight(prev: int, W: int, t: int) -> int:
    """ceil(prev * (W - t) / W): the previous window's share, rounded against the client."""
    return (prev * (W - t) + W - 1) // W


def retry_after(limit: int, cost: int, prev: int, curr: int, W: int, W2: int, t: int) -> int:
    """ms until `cost` more would be admitted, if no one else hits meanwhile."""
    if cost > limit:
        return W - t
    if curr + cost <= limit:
        room = limit - curr - cost
        return W - (room * W) // prev - t
    t2 = W2 - ((limit - cost) * W2) // curr
    return (W - t) + t2


# ---------------------------------------------------------------- classes


class Arena:
    """Process-local stand-in for the shared segment (no sharing across processes)."""

    def __init__(self, lay: dict, mm, path: str | None, owner: bool):
        self._layout = lay
        self._mm = mm
        self._path = path
        self._owner = owner
        self._creator_pid = os.getpid() if owner else -1
        self._writer_pid = os.getpid()
        self._keys = None
        self._rates = {}   # (namespace, subject) -> entry: address subjects that refuse when full
        self._auth = {}    # the same, for subjects that evict the stalest entry when full
        self._krates = {}  # key index -> entry
        self._reclaimed = 0
        self._evicted = 0

    @classmethod
    def create(cls, key_capacity: int = 1_000_000, rate_capacity: int = 1 << 18, ext_bytes: int | None = None,
               path: str | None = None, *, auth_capacity: int | None = None) -> "Arena":
        _X["Arena.create"] += 1
        lay = layout(key_capacity, rate_capacity, ext_bytes, auth_capacity)
        mm = map_segment(HEADER_SIZE, path)
        write_header(mm, lay, os.getpid())
        return cls(lay, mm, path, True)

    @classmethod
    def attach(cls, path: str) -> "Arena":
        _X["Arena.attach"] += 1
        raise CoreError(f"cannot attach arena {path!r}: the pure-Python core keeps tables in process memory")

    @property
    def size(self) -> int:
        _X["Arena.size"] += 1
        return self._layout["size"]

    @property
    def key_capacity(self) -> int:
        _X["Arena.key_capacity"] += 1
        return self._layout["key_capacity"]

    @property
    def rate_capacity(self) -> int:
        _X["Arena.rate_capacity"] += 1
        return self._layout["rate_capacity"]

    @property
    def auth_capacity(self) -> int:
        _X["Arena.auth_capacity"] += 1
        return self._layout["auth_capacity"]

    @property
    def path(self):
        _X["Arena.path"] += 1
        return self._path

    @property
    def writer_pid(self) -> int:
        _X["Arena.writer_pid"] += 1
        return self._writer_pid

    @writer_pid.setter
    def writer_pid(self, pid: int) -> None:
        # the twin only (tests hand a forked child's copy the role); not a crossing
        self._writer_pid = pid

    def header(self) -> dict:
        _X["Arena.header"] += 1
        return dict(self._layout, version=LAYOUT_VERSION, writer_pid=self._writer_pid)

    def set_writer(self, pid: int) -> None:
        _X["Arena.set_writer"] += 1
        if os.getpid() != self._creator_pid:
            _require_writer(self)
        self._writer_pid = pid

    def repair_dead_writer(self) -> int:
        """The twin's records are written whole: there is never one to repair."""
        _X["Arena.repair_dead_writer"] += 1
        if os.getpid() != self._creator_pid:
            raise CoreError("only the process that created the arena may repair it")
        return -1

    def recover(self) -> bool:
        """The twin's records are written whole: there is never one to normalise."""
        _X["Arena.recover"] += 1
        if os.getpid() != self._creator_pid:
            _require_writer(self)
        return False

    def unlink(self) -> None:
        _X["Arena.unlink"] += 1
        if not self._owner:
            raise CoreError("only the process that created the arena may unlink it")
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass


    # ---- key snapshot: the twin's own format (marshal of its records behind a
    # magic that differs from the compiled core's, so neither takes the other's)

    def export_keys(self) -> bytes:
        _X["Arena.export_keys"] += 1
        _require_writer(self)
        recs = {} if self._keys is None else self._keys[1]
        rows = [(k, r.flags, r.plan_id, r.not_before_ms, r.expires_ms, r.grace_until_ms, r.digest, r.digest2,
                 r.scopes, r.allow, r.deny, r.limits, r.meta, r.gen) for k, r in sorted(recs.items())]
        return _TWIN_KS_MAGIC + marshal.dumps((LAYOUT_VERSION, self._layout["key_capacity"], rows))

    def import_keys(self, data) -> int:
        _X["Arena.import_keys"] += 1
        _require_writer(self)
        if self._keys is not None and self._keys[1]:
            raise CoreError("import_keys needs an arena that has held no key yet")
        data = bytes(data)
        if not data.startswith(_TWIN_KS_MAGIC):
            raise CoreError("key snapshot has the wrong magic (not made by this core's export_keys)")
        try:
            version, cap, rows = marshal.loads(data[len(_TWIN_KS_MAGIC):])
        except (EOFError, ValueError, TypeError):
            raise CoreError("key snapshot is truncated or corrupt") from None
        if version != LAYOUT_VERSION:
            raise CoreError(f"key snapshot is of arena layout v{version}; this build has v{LAYOUT_VERSION}")
        if cap != self._layout["key_capacity"]:
            raise CoreError(f"key snapshot is of an arena with key_capacity {cap}; "
                            f"this one has {self._layout['key_capacity']}")
        index, recs = {}, {}
        for row in rows:
            r = _Rec()
            (k, r.flags, r.plan_id, r.not_before_ms, r.expires_ms, r.grace_until_ms, r.digest, r.digest2,
             r.scopes, r.allow, r.deny, r.limits, r.meta, r.gen) = row
            if not 0 <= k < cap:
                raise CoreError(f"key snapshot record {k} is outside the key capacity")
            recs[k] = r
            index[r.digest] = k
            if r.digest2 is not None:
                index[r.digest2] = k
        if self._keys is None:
            self._keys = ({}, {})
        self._keys[0].update(index)
        self._keys[1].update(recs)
        return len(recs)


def _require_writer(arena) -> None:
    me = os.getpid()
    if arena._writer_pid != me:
        raise CoreError(f"only the writer process (pid {arena._writer_pid}) may write the arena; this is pid {me}")


_crash_hook = 0
_TWIN_KS_MAGIC = b"FGKEYSPY"


def _set_crash_hook(point: int) -> None:
    """TEST ONLY: with point 1, the next put() in this process exits (os._exit(70))
    half way through writing its record, as a writer killed mid-write would.
    0 turns it off. In the Cython core the check is one C int compare on the
    writer's cold path; the twin mirrors it so the same test runs on both."""
    global _crash_hook
    _crash_hook = int(point)


I64_MAX = (1 << 63) - 1


def _check_i64(name: str, v, lo: int = -(1 << 63)) -> int:
    if not isinstance(v, int):
        raise CoreError(f"{name} must be an integer, found {type(v).__name__}")
    if not lo <= v <= I64_MAX:
        raise CoreError(f"{name} must be {lo}..{I64_MAX}, found {v}")
    return int(v)


def _check_times(not_before_ms, expires_ms, grace_until_ms) -> tuple[int, int, int]:
    """put()'s time arguments, checked before anything is written: expires_ms 0
    means never, 1.. an instant (keysync clamps instants at or before the epoch
    to 1, i.e. expired); negative values and values past int64 are refused."""
    nb = _check_i64("not_before_ms", not_before_ms)
    ex = _check_i64("expires_ms (0 = never)", expires_ms, 0)
    gr = _check_i64("grace_until_ms", grace_until_ms)
    return nb, ex, gr


def _check_digest(d) -> bytes:
    if not isinstance(d, bytes) or len(d) != 32:
        raise CoreError(f"expected a 32-byte digest, found {type(d).__name__} of length {len(d) if isinstance(d, bytes) else '?'}")
    return d


class _Rec:
    __slots__ = ("flags", "plan_id", "not_before_ms", "expires_ms", "grace_until_ms", "digest", "digest2",
                 "scopes", "allow", "deny", "limits", "meta", "gen")


class KeyTable:
    """Key records by keyed digest. Readers: any worker; writer: arena.writer_pid."""

    def __init__(self, arena: Arena, secret: bytes | None = None):
        self._arena = arena
        if arena._keys is None:
            arena._keys = ({}, {})  # digest -> index, index -> _Rec
        self._index, self._recs = arena._keys
        self._cap = arena._layout["key_capacity"]
        self._secret = None if secret is None else _check_secret(secret)
        self._last_plan = 0
        self._last_index = -1
        self._last_limits = [0] * N_WINDOWS
        self._last_gen = 0

    @property
    def capacity(self) -> int:
        _X["KeyTable.capacity"] += 1
        return self._cap

    @property
    def last_plan(self) -> int:
        """plan_id of the key of the last successful check in this process."""
        _X["KeyTable.last_plan"] += 1
        return self._last_plan

    def set_secret(self, secret: bytes) -> None:
        _X["KeyTable.set_secret"] += 1
        self._secret = _check_secret(secret)

    def digest(self, key: bytes) -> bytes:
        _X["KeyTable.digest"] += 1
        if self._secret is None:
            raise CoreError("no server secret set: pass secret= to KeyTable or call set_secret()")
        return key_digest(self._secret, key)

    # ---- hot path

    def check_key(self, key: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        _X["KeyTable.check_key"] += 1
        return self._check_key(key, method_bit, path, peer, now_ms)

    def _check_key(self, key: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        if self._secret is None or not key_well_formed(key):
            return KEY_MALFORMED
        return self._check(key_digest(self._secret, key), method_bit, path, peer, now_ms)

    def check(self, digest: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        _X["KeyTable.check"] += 1
        return self._check(digest, method_bit, path, peer, now_ms)

    def _check(self, digest: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        k = self._index.get(digest)
        if k is None:
            return NO_SUCH_KEY
        r = self._recs.get(k)
        if r is None:
            return NO_SUCH_KEY
        if digest != r.digest and not (digest == r.digest2 and now_ms < r.grace_until_ms):
            return NO_SUCH_KEY
        if r.flags & FLAG_REVOKED:
            return KEY_REVOKED
        if r.flags & FLAG_DISABLED:
            return KEY_DISABLED
        if now_ms < r.not_before_ms:
            return KEY_NOT_YET_VALID
        if r.expires_ms and now_ms >= r.expires_ms:
            return KEY_EXPIRED
        if not scope_allows(r.scopes, method_bit, path):
            return SCOPE_DENIED
        if r.allow[0] or r.allow[1] or r.deny[0] or r.deny[1]:
            v, x = peer_int(peer)
            if not v:
                return KEY_IP_DENIED  # any per-key rule and an unknown address: never admit
            i = 0 if v == 4 else 1
            if _in(r.deny[i], x):
                return KEY_IP_DENIED
            if (r.allow[0] or r.allow[1]) and not _in(r.allow[i], x):
                return KEY_IP_DENIED
        self._last_plan = r.plan_id
        self._last_index = k
        self._last_limits = r.limits
        self._last_gen = r.gen
        return k

    # ---- writer

    def allocate(self) -> int:
        _X["KeyTable.allocate"] += 1
        _require_writer(self._arena)
        for i in range(self._cap):
            if i not in self._recs:
                return i
        raise CoreError(f"key table full: all {self._cap} records are in use (raise key_capacity)")

    def _k(self, key_index) -> int:
        if not isinstance(key_index, int) or not 0 <= key_index < self._cap:
            raise CoreError(f"key index must be 0..{self._cap - 1}, found {key_index!r}")
        return key_index

    def put(self, key_index: int, digest: bytes, *, plan_id: int = 0, flags: int = 0, not_before_ms: int = 0,
            expires_ms: int = 0, scopes=None, allow_cidrs=None, deny_cidrs=None, limits=None, meta: bytes = b"",
            where: str = "key", prev_digest: bytes | None = None, grace_until_ms: int = 0) -> None:
        _X["KeyTable.put"] += 1
        _require_writer(self._arena)
        k = self._k(key_index)
        _check_digest(digest)
        not_before_ms, expires_ms, grace_until_ms = _check_times(not_before_ms, expires_ms, grace_until_ms)
        if grace_until_ms <= 0:
            prev_digest = None
        if prev_digest is not None:
            _check_digest(prev_digest)
            other2 = self._index.get(prev_digest)
            if other2 is not None and other2 != k:
                raise CoreError(f"digest already belongs to key index {other2}")
        r = _Rec()
        r.scopes = compile_scopes(scopes, f"{where}.scopes")
        r.allow = compile_cidrs(allow_cidrs, f"{where}.allow_cidrs")
        r.deny = compile_cidrs(deny_cidrs, f"{where}.deny_cidrs")
        r.limits = compile_limits(limits, f"{where}.limits")
        if not 0 <= plan_id < (1 << 31):
            raise CoreError(f"plan_id must be 0..2**31-1, found {plan_id}")
        if flags & ~(FLAG_DISABLED | FLAG_REVOKED):
            raise CoreError(f"flags may only combine FLAG_DISABLED and FLAG_REVOKED, found {flags:#x}")
        other = self._index.get(digest)
        if other is not None and other != k:
            raise CoreError(f"digest already belongs to key index {other}")
        r.meta = bytes(meta)
        r.flags, r.plan_id = flags | FLAG_LIVE, plan_id
        r.not_before_ms, r.expires_ms = not_before_ms, expires_ms
        old = self._recs.get(k)
        if _crash_hook == 1:
            os._exit(70)
        if old is None:
            # a new key in this index: it must not inherit the counts of the
            # key that held the index before
            self._arena._krates.pop(k, None)
        r.digest2, r.grace_until_ms = (prev_digest, grace_until_ms) if prev_digest is not None else (None, 0)
        if old is not None:
            if old.digest != digest and old.digest != prev_digest:
                self._index.pop(old.digest, None)
            if old.digest2 is not None and old.digest2 != digest and old.digest2 != prev_digest:
                self._index.pop(old.digest2, None)
        r.digest = digest
        r.gen = (old.gen + 1) if old is not None else 1
        self._recs[k] = r
        self._index[digest] = k
        if prev_digest is not None:
            self._index[prev_digest] = k

    def rotate(self, key_index: int, new_digest: bytes, grace_until_ms: int) -> None:
        _X["KeyTable.rotate"] += 1
        _require_writer(self._arena)
        r = self._live(key_index)
        _check_digest(new_digest)
        grace_until_ms = _check_i64("grace_until_ms", grace_until_ms)
        other = self._index.get(new_digest)
        if other is not None:
            raise CoreError(f"digest already belongs to key index {other}")
        if r.digest2 is not None:
            self._index.pop(r.digest2, None)
        self._index[new_digest] = key_index
        if grace_until_ms > 0:
            r.digest2, r.grace_until_ms = r.digest, grace_until_ms
        else:
            self._index.pop(r.digest, None)
            r.digest2, r.grace_until_ms = None, 0
        r.digest = new_digest
        r.gen += 1

    def _live(self, key_index):
        r = self._recs.get(self._k(key_index))
        if r is None:
            raise CoreError(f"key index {key_index} is not in use")
        return r

    def revoke(self, key_index: int) -> bool:
        _X["KeyTable.revoke"] += 1
        _require_writer(self._arena)
        r = self._recs.get(self._k(key_index))
        if r is None:
            return False
        r.flags |= FLAG_REVOKED
        r.gen += 1
        return True

    def set_disabled(self, key_index: int, disabled: bool) -> bool:
        _X["KeyTable.set_disabled"] += 1
        _require_writer(self._arena)
        r = self._recs.get(self._k(key_index))
        if r is None:
            return False
        r.flags = (r.flags | FLAG_DISABLED) if disabled else (r.flags & ~FLAG_DISABLED)
        r.gen += 1
        return True

    def delete(self, key_index: int) -> bool:
        _X["KeyTable.delete"] += 1
        _require_writer(self._arena)
        r = self._recs.pop(self._k(key_index), None)
        if r is None:
            return False
        self._index.pop(r.digest, None)
        if r.digest2 is not None:
            self._index.pop(r.digest2, None)
        return True

    def sweep(self, now_ms: int) -> int:
        _X["KeyTable.sweep"] += 1
        _require_writer(self._arena)
        n = 0
        for r in self._recs.values():
            if r.digest2 is not None and now_ms >= r.grace_until_ms:
                self._index.pop(r.digest2, None)
                r.digest2, r.grace_until_ms = None, 0
                r.gen += 1
                n += 1
        return n

    # ---- cold readers

    def info(self, key_index: int):
        _X["KeyTable.info"] += 1
        r = self._recs.get(self._k(key_index))
        if r is None:
            return None
        return dict(
            index=key_index, flags=r.flags & ~FLAG_LIVE, plan_id=r.plan_id, not_before_ms=r.not_before_ms,
            expires_ms=r.expires_ms, grace_until_ms=r.grace_until_ms, has_old_digest=r.digest2 is not None,
            n_scopes=len(r.scopes), limits=list(r.limits), generation=r.gen,
        )

    def meta(self, key_index: int) -> bytes:
        _X["KeyTable.meta"] += 1
        r = self._recs.get(self._k(key_index))
        return b"" if r is None else r.meta

    def generation(self, key_index: int) -> int:
        _X["KeyTable.generation"] += 1
        r = self._recs.get(self._k(key_index))
        return 0 if r is None else r.gen

    def __len__(self) -> int:
        _X["KeyTable.__len__"] += 1
        return len(self._recs)

    def probes(self, digest: bytes) -> int:
        """Slots a lookup of digest visits (the twin's dict: always 1)."""
        _X["KeyTable.probes"] += 1
        return 1

    def stats(self) -> dict:
        _X["KeyTable.stats"] += 1
        # the twin's index is a dict: no slots to tombstone, nothing to rebuild
        return dict(capacity=self._cap, live=len(self._recs), digests=len(self._index),
                    slots=self._arena._layout["key_slots"], tombstones=0, rebuilds=0)

    def indexes_by_meta(self, prefixes) -> dict:
        _X["KeyTable.indexes_by_meta"] += 1
        _require_writer(self._arena)
        want = set()
        for x in prefixes:
            if not isinstance(x, bytes) or not x:
                raise CoreError(f"meta prefixes must be non-empty bytes, found {x!r}")
            want.add(x)
        lens = sorted({len(x) for x in want})
        out = {}
        for k, r in self._recs.items():
            for n in lens:
                if n > len(r.meta):
                    break
                if r.meta[:n] in want:
                    out[r.meta[:n]] = k
        return out


def _in(ranges, x: int) -> bool:
    if not ranges:
        return False
    i = bisect.bisect_right(ranges, (x, 1 << 129)) - 1
    return i >= 0 and x <= ranges[i][1]


class CidrSet:
    """Sorted merged ranges; contains() takes the 4- or 16-byte packed peer."""

    __slots__ = ("_v4lo", "_v4hi", "_v6lo", "_v6hi", "_where")

    def __init__(self, v4, v6, where: str):
        self._v4lo = [lo for lo, _ in v4]
        self._v4hi = [hi for _, hi in v4]
        self._v6lo = [lo for lo, _ in v6]
        self._v6hi = [hi for _, hi in v6]
        self._where = where

    @classmethod
    def compile(cls, cidrs, where: str = "cidrs") -> "CidrSet":
        _X["CidrSet.compile"] += 1
        v4, v6 = compile_cidrs(cidrs, where)
        return cls(v4, v6, where)

    @property
    def where(self) -> str:
        _X["CidrSet.where"] += 1
        return self._where

    def contains(self, peer: bytes) -> bool:
        _X["CidrSet.contains"] += 1
        v, x = peer_int(peer)
        if v == 4:
            return ranges_contain(self._v4lo, self._v4hi, x)
        if v == 6:
            return ranges_contain(self._v6lo, self._v6hi, x)
        return False

    def __len__(self) -> int:
        _X["CidrSet.__len__"] += 1
        return len(self._v4lo) + len(self._v6lo)

    @property
    def ranges(self) -> tuple[int, int]:
        _X["CidrSet.ranges"] += 1
        return len(self._v4lo), len(self._v6lo)


ON_FULL = ("refuse", "evict")
_M32 = 0xFFFFFFFF


def entry_expired(b, now_ms: int) -> bool:
    """True when none of an entry's ten buckets can count any more: each is
    empty, or at least two windows old for its window kind (a bucket counts
    while it is the current or the previous window). Such an entry is free
    for another subject; its stale buckets read as zero to the new owner."""
    for w in range(N_WINDOWS):
        e = window_bounds(w, now_ms)[0] & _M32
        for j in (0, 1):
            v = b[2 * w + j]
            if v & _M32 and not 2 <= ((e - (v >> 32)) & _M32) < 0x80000000:
                return False
    return True


def compile_plans(plans, n_policies: int, where: str = "plans") -> tuple[dict[int, int], int]:
    """RateTable.set_plans() input -> ({plan_id: policy id}, fallback policy id or -1).

    plans maps plan names to policy ids of the same RateTable; the name ""
    names the fallback (keys without a plan, or with a plan this table does not
    know); without it such keys get their own limits only (fallback -1)."""
    if not hasattr(plans, "items"):
        raise CoreError(f"cannot install plans at {where}: expected a mapping of plan name -> policy id, "
                        f"found {type(plans).__name__}")
    table: dict[int, int] = {}
    names: dict[int, str] = {}
    fallback = -1
    for name, pid in plans.items():
        if not isinstance(name, str):
            raise CoreError(f"cannot install plans at {where}: plan names must be strings, found {name!r}")
        if type(pid) is not int or not 0 <= pid < n_policies:
            raise CoreError(f"cannot install plan {name!r} at {where}: {pid!r} is not a policy id of this "
                            f"rate table (0..{n_policies - 1})")
        if name == "":
            fallback = pid
            continue
        pl = plan_id(name)
        if pl in names:
            raise CoreError(f"cannot install plan {name!r} at {where}: plans {names[pl]!r} and {name!r} "
                            f"have the same plan id {pl}; rename one")
        names[pl] = name
        table[pl] = pid
    return table, fallback


class Admission:
    """What RateTable.admit() decided, filled in place (one per worker, reused).

    index           key index >= 0 if the key passed steps 5-6 (even if then
                    rate-limited), else its negative code (== the status)
    generation      the record's generation in the same snapshot as the checks
                    (what generation(index) returns); 0 when the key failed
    plan_id         the record's plan_id; 0 when the key failed
    policy          the policy whose windows the key's own limits replaced
                    (RateTable.set_plans); -1: none, or the key failed
    rate            the rate step as hit_key() answers it: remaining >= 0,
                    RATE_LIMITED or UNLIMITED; the key's code when it failed
    limit, remaining, reset_ms, retry_after_ms
                    as RateTable's fields after hit_key(); 0 when the key failed
    """

    __slots__ = ("_index", "_generation", "_plan_id", "_policy", "_rate", "_limit", "_remaining", "_reset_ms",
                 "_retry_after_ms")

    def __init__(self):
        self._failed(NO_SUCH_KEY)  # nothing decided yet: never reads as key 0

    def _failed(self, code: int) -> None:
        self._index = self._rate = code
        self._generation = self._plan_id = 0
        self._policy = -1
        self._limit = self._remaining = self._reset_ms = self._retry_after_ms = 0

    @property
    def index(self) -> int:
        _X["Admission.index"] += 1
        return self._index

    @property
    def generation(self) -> int:
        _X["Admission.generation"] += 1
        return self._generation

    @property
    def plan_id(self) -> int:
        _X["Admission.plan_id"] += 1
        return self._plan_id

    @property
    def policy(self) -> int:
        _X["Admission.policy"] += 1
        return self._policy

    @property
    def rate(self) -> int:
        _X["Admission.rate"] += 1
        return self._rate

    @property
    def limit(self) -> int:
        _X["Admission.limit"] += 1
        return self._limit

    @property
    def remaining(self) -> int:
        _X["Admission.remaining"] += 1
        return self._remaining

    @property
    def reset_ms(self) -> int:
        _X["Admission.reset_ms"] += 1
        return self._reset_ms

    @property
    def retry_after_ms(self) -> int:
        _X["Admission.retry_after_ms"] += 1
        return self._retry_after_ms

    def __repr__(self) -> str:
        return (f"Admission(index={self._index}, generation={self._generation}, plan_id={self._plan_id}, "
                f"policy={self._policy}, rate={self._rate}, limit={self._limit}, remaining={self._remaining}, "
                f"reset_ms={self._reset_ms}, retry_after_ms={self._retry_after_ms})")


class RateTable:
    """Sliding-window counters, five window kinds, in three regions:

    * keys (hit_key, admit): one entry per key index, never full, never shared;
    * address subjects of "refuse" policies (ip_limits): a salted hashed
      region of rate_capacity entries; expired entries are reused, and when a
      probe window holds none, hit() fails closed with RATE_TABLE_FULL;
    * address subjects of "evict" policies (failed-auth throttling): the same
      in a region of its own (auth_capacity), where a full probe window
      evicts its stalest entry instead, so no flood can fill it, and no flood
      of bad keys can make an ip_limits route fail closed.
    """

    def __init__(self, arena: Arena):
        self._arena = arena
        self._policies: list[tuple[int, list[int], int]] = []
        self._plans: dict[int, int] = {}
        self._fallback = -1
        self._limit = 0
        self._remaining = 0
        self._reset_ms = 0
        self._retry_after_ms = 0

    @property
    def limit(self) -> int:
        _X["RateTable.limit"] += 1
        return self._limit

    @property
    def remaining(self) -> int:
        _X["RateTable.remaining"] += 1
        return self._remaining

    @property
    def reset_ms(self) -> int:
        _X["RateTable.reset_ms"] += 1
        return self._reset_ms

    @property
    def retry_after_ms(self) -> int:
        _X["RateTable.retry_after_ms"] += 1
        return self._retry_after_ms

    def policy(self, name: str, limits, where: str = "limits", *, on_full: str = "refuse") -> int:
        _X["RateTable.policy"] += 1
        if not isinstance(name, str) or not name:
            raise CoreError(f"policy name must be a non-empty string, found {name!r}")
        if on_full not in ON_FULL:
            raise CoreError(f"on_full must be 'refuse' or 'evict', found {on_full!r}")
        self._policies.append((name_hash(name), compile_limits(limits, where), ON_FULL.index(on_full)))
        return len(self._policies) - 1

    def set_plans(self, plans, where: str = "plans") -> None:
        _X["RateTable.set_plans"] += 1
        self._plans, self._fallback = compile_plans(plans, len(self._policies), where)

    def _policy(self, policy_id):
        if not isinstance(policy_id, int) or not 0 <= policy_id < len(self._policies):
            raise CoreError(f"unknown rate policy id {policy_id!r}")
        return self._policies[policy_id]

    def hit(self, policy_id: int, subject: int, now_ms: int, cost: int = 1) -> int:
        _X["RateTable.hit"] += 1
        ns, limits, mode = self._policy(policy_id)
        if not any(limits):
            return self._unlimited()
        a = self._arena
        entries, cap = (a._rates, a._layout["rate_capacity"]) if mode == 0 else (a._auth, a._layout["auth_capacity"])
        key = (ns, subject & M64)
        b = entries.get(key)
        if b is None:
            if len(entries) >= cap:
                victim = next((k for k, e in entries.items() if entry_expired(e, now_ms)), None)
                if victim is not None:
                    a._reclaimed += 1
                elif mode == 0:
                    self._limit = self._remaining = self._reset_ms = 0
                    self._retry_after_ms = 1000
                    return RATE_TABLE_FULL
                else:
                    victim = min(entries, key=lambda k: entries[k][2 * N_WINDOWS])
                    a._evicted += 1
                del entries[victim]
            b = entries[key] = [0] * (2 * N_WINDOWS + 1)
        b[2 * N_WINDOWS] = now_ms
        return self._count(b, limits, now_ms, cost)

    def hit_key(self, policy_id: int, keys: KeyTable, key_index: int, now_ms: int, cost: int = 1) -> int:
        _X["RateTable.hit_key"] += 1
        _, limits, _ = self._policy(policy_id)
        cap = self._arena._layout["key_capacity"]
        if not isinstance(key_index, int) or not 0 <= key_index < cap:
            raise CoreError(f"key index must be 0..{cap - 1}, found {key_index!r}")
        own = keys._last_limits if keys._last_index == key_index else self._key_limits(keys, key_index)
        return self._hit_key(limits, own, key_index, now_ms, cost)

    def admit(self, keys: KeyTable, key: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int,
              out: Admission, cost: int = 1) -> int:
        _X["RateTable.admit"] += 1
        if not isinstance(keys, KeyTable) or not isinstance(out, Admission):
            raise TypeError("admit() needs a KeyTable and an Admission")
        k = keys._check_key(key, method_bit, path, peer, now_ms)
        if k < 0:
            out._failed(k)
            return k
        plan = keys._last_plan
        pid = self._plans.get(plan, self._fallback) if plan else self._fallback
        limits = self._policies[pid][1] if pid >= 0 else _NO_LIMITS
        r = self._hit_key(limits, keys._last_limits, k, now_ms, cost)
        out._index, out._generation, out._plan_id, out._policy, out._rate = k, keys._last_gen, plan, pid, r
        out._limit, out._remaining = self._limit, self._remaining
        out._reset_ms, out._retry_after_ms = self._reset_ms, self._retry_after_ms
        return RATE_LIMITED if r == RATE_LIMITED else k

    def _hit_key(self, limits, own, key_index: int, now_ms: int, cost: int) -> int:
        merged = [o or p for o, p in zip(own, limits)]
        if not any(merged):
            return self._unlimited()
        b = self._arena._krates.get(key_index)
        if b is None:
            b = self._arena._krates[key_index] = [0] * (2 * N_WINDOWS + 1)
        b[2 * N_WINDOWS] = now_ms
        return self._count(b, merged, now_ms, cost)

    @staticmethod
    def _key_limits(keys, key_index):
        r = keys._recs.get(key_index)
        return r.limits if r is not None else [0] * N_WINDOWS

    def _unlimited(self) -> int:
        self._limit = self._remaining = UNLIMITED
        self._reset_ms = self._retry_after_ms = 0
        return UNLIMITED

    def _count(self, b, limits, now_ms: int, cost: int) -> int:
        best = None
        undo = []
        for w in range(N_WINDOWS):
            L = limits[w]
            if not L:
                continue
            e, start, W, W2 = window_bounds(w, now_ms)
            e &= 0xFFFFFFFF
            t = now_ms - start
            ci, pi = 2 * w + (e & 1), 2 * w + (e & 1 ^ 1)
            pv = b[pi]
            prev = pv & 0xFFFFFFFF if pv >> 32 == (e - 1) & 0xFFFFFFFF else 0
            pw = sliding_weight(prev, W, t)
            cv = b[ci]
            ce = cv >> 32
            if ((ce - e) & 0xFFFFFFFF) < 0x80000000:
                curr, we = cv & 0xFFFFFFFF, ce
            else:
                curr, we = 0, e
            if curr + cost + pw > L:
                for i, c in undo:
                    if b[i] >> 32 == c >> 32 and b[i] & 0xFFFFFFFF >= cost:
                        b[i] -= cost
                self._limit, self._remaining = L, 0
                self._reset_ms = W - t
                self._retry_after_ms = retry_after(L, cost, prev, curr, W, W2, t)
                return RATE_LIMITED
            b[ci] = (we << 32) | (curr + cost)
            undo.append((ci, b[ci]))
            rem = L - (curr + cost + pw)
            if best is None or rem < best[0]:
                best = (rem, L, W - t)
        self._remaining, self._limit, self._reset_ms = best
        self._retry_after_ms = 0
        return best[0]

    def stats(self) -> dict:
        _X["RateTable.stats"] += 1
        a = self._arena
        lay = a._layout
        return dict(capacity=lay["rate_capacity"], used=len(a._rates), auth_capacity=lay["auth_capacity"],
                    auth_used=len(a._auth), key_capacity=lay["key_capacity"], reclaimed=a._reclaimed,
                    evicted=a._evicted)


_NO_LIMITS = (0,) * N_WINDOWS
