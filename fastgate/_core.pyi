"""Typing stub for fastgate._core (and its twin fastgate._core_py).

Per request the Python side makes one call for a keyed request, ints/bytes
in, one int out: RateTable.admit (key checks + the key's rate limits, result
in a reused Admission), plus CidrSet.contains / RateTable.hit for the global
IP rules and per-IP limits. check_key + hit_key remain for other callers.
Expected outcomes are the negative return codes; CoreError is raised only on
the cold path (bad config input, layout mismatch, full table, wrong process).
"""

from typing import Iterable, Mapping, Sequence

LAYOUT_VERSION: int
NO_SUCH_KEY: int  # -1  unknown digest (or a rotated-out digest past its grace)
KEY_REVOKED: int  # -2
KEY_DISABLED: int  # -3
KEY_EXPIRED: int  # -4  now_ms >= expires_ms
KEY_NOT_YET_VALID: int  # -5  now_ms < not_before_ms
SCOPE_DENIED: int  # -6  no scope matches (method bit, normalised path)
KEY_IP_DENIED: int  # -7  per-key deny matched, or per-key allow did not
KEY_BUSY: int  # -8  record stayed mid-write for ~200 us (writer stalled, or died before a takeover): fail closed
KEY_MALFORMED: int  # -9  not fg_<id>_<secret><crc>, bad checksum, or no secret set
RATE_LIMITED: int  # -10 see RateTable.retry_after_ms / reset_ms / limit
RATE_TABLE_FULL: int  # -11 hit() of an on_full="refuse" policy: no free or expired entry in the probe window
UNLIMITED: int  # 2**31-1: hit() on a policy without any window
SUBJECT_V4: int  # addr_subject(a.b.c.d) == SUBJECT_V4 | the 32-bit address
SUBJECT_UNKNOWN: int  # addr_subject of anything but 4 or 16 bytes: all unknown clients share it
V6_PREFIX_DEFAULT: int  # 64

def addr_subject(packed: bytes, v6_prefix: int = 64) -> int:
    """Rate subject of a client address (pack_ip form): IPv4 and ::ffff:a.b.c.d per address,
    IPv6 per /v6_prefix (1..64; finer would give one host 2**64 subjects), else SUBJECT_UNKNOWN.
    Injective per family and prefix; placement is salted inside the table."""

CROSSINGS: tuple[str, ...]  # every entry point: "KeyTable.check_key", "Admission.rate", ... (not constructors)
COUNTS_CROSSINGS: bool  # the twin: True; the compiled core: only when built with FASTGATE_DEBUG=1

def crossings() -> dict[str, int]:
    """Calls into the core per entry point since reset_crossings(), in this process (a forked
    child starts with its parent's counts); zero counts left out; {} if not COUNTS_CROSSINGS."""
def reset_crossings() -> None: ...

def _set_crash_hook(point: int) -> None:
    """TEST ONLY: 1 = the next put() in this process _exit(70)s inside its write section."""

class CoreError(Exception): ...

class Arena:
    """One shared segment: header (magic, layout version, capacities, writer pid), key slots,
    key records, rate entries, key extension heap. Offsets only, never pointers."""

    @staticmethod
    def create(
        key_capacity: int = 1_000_000, rate_capacity: int = 1 << 18, ext_bytes: int | None = None,
        path: str | None = None, *, auth_capacity: int | None = None,
    ) -> Arena:
        """Master, before forking. path=None: anonymous MAP_SHARED memory, inherited by fork,
        nothing to unlink. path="/dev/shm/NAME": a 0600 file (O_EXCL) that attach() can open.
        key_capacity: keys, each with its own rate entry; rate_capacity: address subjects of
        on_full="refuse" policies (ip_limits); auth_capacity (default rate_capacity): address
        subjects of on_full="evict" policies (failed-auth). A random placement salt is drawn
        here and kept in the header (never returned by header())."""
    @staticmethod
    def attach(path: str) -> Arena:
        """Map an existing file arena; CoreError on bad magic, layout version or size."""
    @property
    def size(self) -> int: ...
    @property
    def key_capacity(self) -> int: ...
    @property
    def rate_capacity(self) -> int: ...
    @property
    def auth_capacity(self) -> int: ...
    @property
    def path(self) -> str | None: ...
    @property
    def writer_pid(self) -> int: ...
    def header(self) -> dict[str, int]: ...
    def set_writer(self, pid: int) -> None:
        """Hand the single-writer role (key table writes) to pid; callable by the current writer
        and by the creator. A record that a dead writer left mid-write is restored to its state
        before that write here (unless that writer still runs), else at the next write."""
    def repair_dead_writer(self) -> int: ...
    def recover(self) -> bool:
        """Restore a record a dead writer left mid-write now; True if there was one."""
    def unlink(self) -> None:
        """Creator only; removes the /dev/shm file (no-op for anonymous arenas)."""
    def export_keys(self) -> bytes:
        """Writer only: the key part (records up to the highest index used, extension heap up
        to its bump pointer) behind a header with layout version and capacities. No digest
        index, no rate counters. Consistent: only the writer changes keys."""
    def import_keys(self, data: bytes | memoryview) -> int:
        """Writer only, into an arena that has held no key: export_keys() output back in, digest
        index rebuilt; returns the live keys. CoreError (arena unchanged) on another layout
        version or key capacity, a larger heap, or a payload that does not add up."""

class KeyTable:
    """Keyed-digest -> key record. Any process reads; only arena.writer_pid writes."""

    @property
    def last_plan(self) -> int:
        """plan_id of the key of the last successful check in this process."""

    def __init__(self, arena: Arena, secret: bytes | None = None) -> None:
        """secret: the server secret (1..64 bytes) of the keyed BLAKE2b-256 digest."""
    @property
    def capacity(self) -> int: ...
    def set_secret(self, secret: bytes) -> None: ...
    def digest(self, key: bytes) -> bytes:
        """BLAKE2b-256(key, key=secret): what the store keeps and put() takes."""
    # ---- hot path
    def check_key(self, key: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        """Shape + checksum, digest, then check(). Key index >= 0, or a negative code."""
    def check(self, digest: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int) -> int:
        """Lookup by digest (current, or previous until its grace ends), then in this order:
        revoked, disabled, not yet valid, expired, scopes (method bit + normalised path),
        per-key CIDRs (peer: 4/16 packed bytes, b"" if unknown). Key index >= 0 or a code."""
    # ---- writer (cold)
    def allocate(self) -> int:
        """A free key index; CoreError 'key table full' when none is left."""
    def put(
        self, key_index: int, digest: bytes, *, plan_id: int = 0, flags: int = 0, not_before_ms: int = 0,
        expires_ms: int = 0, scopes: Sequence[str] | None = None, allow_cidrs: Sequence[str] | None = None,
        deny_cidrs: Sequence[str] | None = None, limits: Sequence[str | tuple[int, str]] | None = None,
        meta: bytes = b"", where: str = "key", prev_digest: bytes | None = None, grace_until_ms: int = 0,
    ) -> None:
        """Insert or replace key_index. scopes: "GET /orders/*" (segment), "GET /orders" (exact),
        "GET /orders*" (prefix), "* /x", "GET,POST /x". limits: "5/second".. "N/month".
        plan_id: plan_id(plan name) (0 = no plan), which admit() maps to a policy (set_plans).
        expires_ms 0 = never, else 1..2**63-1 (an instant at or before the epoch: pass 1);
        anything else is a CoreError raised before the record is touched.
        flags: FLAG_DISABLED | FLAG_REVOKED. `where` prefixes error paths. Putting a key into an
        index that held another key resets the index's rate counters; updating a key keeps them.
        prev_digest + grace_until_ms > 0: a rotated-out digest stays valid across the replace
        (an update during a rotation's grace period must not end the grace)."""
    def rotate(self, key_index: int, new_digest: bytes, grace_until_ms: int) -> None:
        """The old digest keeps working while now_ms < grace_until_ms (0: stops at once)."""
    def revoke(self, key_index: int) -> bool: ...
    def set_disabled(self, key_index: int, disabled: bool) -> bool: ...
    def delete(self, key_index: int) -> bool: ...
    def sweep(self, now_ms: int) -> int:
        """Drop rotated-out digests whose grace has ended; returns how many."""
    # ---- readers (cold)
    def info(self, key_index: int) -> dict | None: ...
    def meta(self, key_index: int) -> bytes:
        """The opaque bytes given to put(meta=...): e.g. the public id and owner for identity headers."""
    def generation(self, key_index: int) -> int:
        """Changes on every write to the record: cache meta() per (index, generation)."""
    def probes(self, digest: bytes) -> int:
        """Slots a lookup of digest visits (1 in the twin); for tests and tools."""
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, int]:
        """capacity, live, digests, slots, tombstones (rebuilt past slots/8), rebuilds, ..."""
    def indexes_by_meta(self, prefixes: Iterable[bytes]) -> dict[bytes, int]:
        """Writer only: {prefix: key index} for live records whose meta begins with a prefix."""

class Admission:
    """What RateTable.admit() decided, filled in place: one per worker, reused per request.
    Read-only fields (each read is one crossing):"""

    def __init__(self) -> None: ...
    @property
    def index(self) -> int:
        """Key index >= 0 if the key passed its checks (also when then rate-limited), else its code."""
    @property
    def generation(self) -> int:
        """The record's generation from the same snapshot as the checks; 0 if the key failed."""
    @property
    def plan_id(self) -> int:
        """The record's plan_id; 0 if the key failed."""
    @property
    def policy(self) -> int:
        """Policy id whose windows the key's own limits replaced; -1: none, or the key failed."""
    @property
    def rate(self) -> int:
        """hit_key()'s answer: remaining >= 0, RATE_LIMITED or UNLIMITED; the key's code if it failed."""
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_ms(self) -> int: ...
    @property
    def retry_after_ms(self) -> int:
        """limit .. retry_after_ms: as RateTable's after hit_key(); all 0 if the key failed."""

class RateTable:
    """Sliding-window counters shared by every process (exact admission via CAS)."""

    @property
    def limit(self) -> int:
        """Of the last hit: the binding window's limit."""
    @property
    def remaining(self) -> int:
        """Requests left in that window after this hit (0 when refused)."""
    @property
    def reset_ms(self) -> int:
        """ms until that window ends."""
    @property
    def retry_after_ms(self) -> int:
        """When refused: ms until this request would be admitted; else 0."""

    def __init__(self, arena: Arena) -> None: ...
    def policy(self, name: str, limits: Sequence[str | tuple[int, str]], where: str = "limits", *,
               on_full: str = "refuse") -> int:
        """Worker-local policy id. Counters are keyed by (name, subject): use one name for all
        key plans (a plan change keeps the key's counts) and e.g. "ip:<route>" for per-IP limits.
        on_full (for hit()): "refuse" -- ip_limits: a full probe window answers RATE_TABLE_FULL
        (fail closed); "evict" -- failed-auth throttling, in its own region: the stalest entry
        of the probe window is taken over, so it never fills."""
    def hit(self, policy_id: int, subject: int, now_ms: int, cost: int = 1) -> int:
        """subject: addr_subject(packed). All windows or none are charged. Expired entries
        are reused. Returns remaining >= 0, RATE_LIMITED, RATE_TABLE_FULL ("refuse" only;
        retry_after_ms = 1000 then), or UNLIMITED."""
    def hit_key(self, policy_id: int, keys: KeyTable, key_index: int, now_ms: int, cost: int = 1) -> int:
        """The key's own entry (by index: never full), its own limits replacing the policy's
        window by window. Returns remaining >= 0, RATE_LIMITED or UNLIMITED."""
    def set_plans(self, plans: Mapping[str, int], where: str = "plans") -> None:
        """Which policy admit() applies, by the record's plan_id: {plan name: policy id of this
        table}; "" names the fallback for no plan / a plan not listed (absent: the key's own
        limits only). Replaces the previous table (once per config). CoreError on an unknown
        policy id or two names with one plan_id (located at `where`)."""
    def admit(self, keys: KeyTable, key: bytes, method_bit: int, path: bytes, peer: bytes, now_ms: int,
              out: Admission, cost: int = 1) -> int:
        """Steps 5-7 in one call: exactly check_key(key, method_bit, path, peer, now_ms), then, if
        that passed, hit_key(<policy of the record's plan_id>, keys, index, now_ms, cost) from the
        same record snapshot. Fills out; leaves this table's limit/remaining/reset_ms/
        retry_after_ms as hit_key() would (untouched if the key failed). Returns the key index
        >= 0 if admitted, else the key's negative code (KEY_*, NO_SUCH_KEY, SCOPE_DENIED, ...)
        or RATE_LIMITED (then out.index is the key index)."""
    def stats(self) -> dict[str, int]:
        """capacity/used (refuse region), auth_capacity/auth_used, key_capacity, reclaimed, evicted."""

class CidrSet:
    """Worker-local sorted merged ranges; O(log n) per lookup."""

    @property
    def where(self) -> str: ...

    @staticmethod
    def compile(cidrs: Sequence[str], where: str = "cidrs") -> CidrSet:
        """CoreError "cannot parse CIDR 'x' at ip.deny[3]: ..." on bad input."""
    def contains(self, peer: bytes) -> bool:
        """peer: 4 or 16 packed bytes (::ffff:a.b.c.d is matched as a.b.c.d); else False."""
    def __len__(self) -> int: ...
    @property
    def ranges(self) -> tuple[int, int]: ...
