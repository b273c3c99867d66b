# cython: language_level=3
"""HOT PATH: the shared-memory core -- Arena, KeyTable, RateTable, CidrSet.

One segment, created by the master before it forks, holds a header, two key
index areas (digest slot -> key index; one live, one spare for rebuilds), the
key records, the rate entries (one per key index, then two hashed regions for
address subjects) and the key extension heap (scopes, per-key CIDRs, per-key
limits, metadata). Only offsets are stored in it, never pointers. Exactly one
process (the header's writer_pid) writes keys; every process reads keys and
updates counters.

Per request: ints and bytes in, one int out. Expected outcomes are the
negative return codes below; exceptions are for cold-path misuse only.
Cold-path parsing and its error messages live in _core_py (shared with the
pure-Python twin), so the two cannot disagree on what a config means.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, calloc, realloc, free
from posix.unistd cimport getpid, _exit
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize

import mmap
import os
import secrets

from fastgate import _core_py as _py
from fastgate._core_py import CoreError

cdef extern from "atomics.h" nogil:
    uint32_t fg_load32_acq(const uint32_t *p)
    uint32_t fg_load32_rlx(const uint32_t *p)
    void fg_store32_rel(uint32_t *p, uint32_t v)
    void fg_store32_rlx(uint32_t *p, uint32_t v)
    uint64_t fg_load64_acq(const uint64_t *p)
    uint64_t fg_load64_rlx(const uint64_t *p)
    void fg_store64_rel(uint64_t *p, uint64_t v)
    void fg_store64_rlx(uint64_t *p, uint64_t v)
    uint64_t fg_add64(uint64_t *p, uint64_t v)
    int fg_cas64(uint64_t *p, uint64_t *expected, uint64_t desired)
    void fg_fence_acq()
    void fg_fence_rel()
    void fg_cpu_relax()
    int64_t fg_mono_ns()

cdef extern from "fg_hash.h" nogil:
    ctypedef struct fg_b2_state:
        uint64_t h[8]
    void fg_b2_init_keyed(fg_b2_state *st, const uint8_t *key, size_t keylen)
    void fg_b2_digest(const fg_b2_state *st, const uint8_t *msg, size_t len, uint8_t *out)
    void fg_crc32_init()
    uint32_t fg_crc32(const uint8_t *p, size_t n)
    uint64_t fg_sip24_2w(uint64_t k0, uint64_t k1, uint64_t m0, uint64_t m1)

cdef extern from "fg_debug.h" nogil:
    const int FG_NCROSS
    const int FG_COUNTS_CROSSINGS
    void FG_CROSS(int i)
    uint64_t fg_cross_get(int i)
    void fg_cross_reset()

fg_crc32_init()

# ------------------------------------------------------------------ crossing counters
#
# Each entry point below starts with FG_CROSS(X_...): a per-process count in a
# FASTGATE_DEBUG build, nothing at all (not even a load of the index) in the
# normal one. The names and their order are _core_py.CROSSINGS.

CROSSINGS = _py.CROSSINGS
COUNTS_CROSSINGS = bool(FG_COUNTS_CROSSINGS)
if len(CROSSINGS) > FG_NCROSS:
    raise ImportError(f"fastgate._core: {len(CROSSINGS)} crossing names, room for {FG_NCROSS} (fg_debug.h)")


def crossings():
    """Calls into the core by entry point since the last reset_crossings(), in this
    process, left out when 0; always {} unless built with FASTGATE_DEBUG."""
    cdef int i
    cdef uint64_t n
    out = {}
    if FG_COUNTS_CROSSINGS:
        for i in range(len(CROSSINGS)):
            n = fg_cross_get(i)
            if n:
                out[CROSSINGS[i]] = n
    return out


def reset_crossings():
    fg_cross_reset()


cdef int X_ADDR_SUBJECT = CROSSINGS.index("addr_subject")
cdef int X_ARENA_CREATE = CROSSINGS.index("Arena.create")
cdef int X_ARENA_ATTACH = CROSSINGS.index("Arena.attach")
cdef int X_ARENA_SIZE = CROSSINGS.index("Arena.size")
cdef int X_ARENA_KEY_CAPACITY = CROSSINGS.index("Arena.key_capacity")
cdef int X_ARENA_RATE_CAPACITY = CROSSINGS.index("Arena.rate_capacity")
cdef int X_ARENA_AUTH_CAPACITY = CROSSINGS.index("Arena.auth_capacity")
cdef int X_ARENA_PATH = CROSSINGS.index("Arena.path")
cdef int X_ARENA_WRITER_PID = CROSSINGS.index("Arena.writer_pid")
cdef int X_ARENA_HEADER = CROSSINGS.index("Arena.header")
cdef int X_ARENA_SET_WRITER = CROSSINGS.index("Arena.set_writer")
cdef int X_ARENA_REPAIR_DEAD_WRITER = CROSSINGS.index("Arena.repair_dead_writer")
cdef int X_ARENA_RECOVER = CROSSINGS.index("Arena.recover")
cdef int X_ARENA_UNLINK = CROSSINGS.index("Arena.unlink")
cdef int X_ARENA_EXPORT_KEYS = CROSSINGS.index("Arena.export_keys")
cdef int X_ARENA_IMPORT_KEYS = CROSSINGS.index("Arena.import_keys")
cdef int X_KEYTABLE_CAPACITY = CROSSINGS.index("KeyTable.capacity")
cdef int X_KEYTABLE_LAST_PLAN = CROSSINGS.index("KeyTable.last_plan")
cdef int X_KEYTABLE_SET_SECRET = CROSSINGS.index("KeyTable.set_secret")
cdef int X_KEYTABLE_DIGEST = CROSSINGS.index("KeyTable.digest")
cdef int X_KEYTABLE_CHECK_KEY = CROSSINGS.index("KeyTable.check_key")
cdef int X_KEYTABLE_CHECK = CROSSINGS.index("KeyTable.check")
cdef int X_KEYTABLE_ALLOCATE = CROSSINGS.index("KeyTable.allocate")
cdef int X_KEYTABLE_PUT = CROSSINGS.index("KeyTable.put")
cdef int X_KEYTABLE_ROTATE = CROSSINGS.index("KeyTable.rotate")
cdef int X_KEYTABLE_REVOKE = CROSSINGS.index("KeyTable.revoke")
cdef int X_KEYTABLE_SET_DISABLED = CROSSINGS.index("KeyTable.set_disabled")
cdef int X_KEYTABLE_DELETE = CROSSINGS.index("KeyTable.delete")
cdef int X_KEYTABLE_SWEEP = CROSSINGS.index("KeyTable.sweep")
cdef int X_KEYTABLE_INFO = CROSSINGS.index("KeyTable.info")
cdef int X_KEYTABLE_META = CROSSINGS.index("KeyTable.meta")
cdef int X_KEYTABLE_GENERATION = CROSSINGS.index("KeyTable.generation")
cdef int X_KEYTABLE_PROBES = CROSSINGS.index("KeyTable.probes")
cdef int X_KEYTABLE_LEN = CROSSINGS.index("KeyTable.__len__")
cdef int X_KEYTABLE_STATS = CROSSINGS.index("KeyTable.stats")
cdef int X_KEYTABLE_INDEXES_BY_META = CROSSINGS.index("KeyTable.indexes_by_meta")
cdef int X_RATETABLE_POLICY = CROSSINGS.index("RateTable.policy")
cdef int X_RATETABLE_SET_PLANS = CROSSINGS.index("RateTable.set_plans")
cdef int X_RATETABLE_HIT = CROSSINGS.index("RateTable.hit")
cdef int X_RATETABLE_HIT_KEY = CROSSINGS.index("RateTable.hit_key")
cdef int X_RATETABLE_ADMIT = CROSSINGS.index("RateTable.admit")
cdef int X_RATETABLE_STATS = CROSSINGS.index("RateTable.stats")
cdef int X_RATETABLE_LIMIT = CROSSINGS.index("RateTable.limit")
cdef int X_RATETABLE_REMAINING = CROSSINGS.index("RateTable.remaining")
cdef int X_RATETABLE_RESET_MS = CROSSINGS.index("RateTable.reset_ms")
cdef int X_RATETABLE_RETRY_AFTER_MS = CROSSINGS.index("RateTable.retry_after_ms")
cdef int X_ADMISSION_INDEX = CROSSINGS.index("Admission.index")
cdef int X_ADMISSION_GENERATION = CROSSINGS.index("Admission.generation")
cdef int X_ADMISSION_PLAN_ID = CROSSINGS.index("Admission.plan_id")
cdef int X_ADMISSION_POLICY = CROSSINGS.index("Admission.policy")
cdef int X_ADMISSION_RATE = CROSSINGS.index("Admission.rate")
cdef int X_ADMISSION_LIMIT = CROSSINGS.index("Admission.limit")
cdef int X_ADMISSION_REMAINING = CROSSINGS.index("Admission.remaining")
cdef int X_ADMISSION_RESET_MS = CROSSINGS.index("Admission.reset_ms")
cdef int X_ADMISSION_RETRY_AFTER_MS = CROSSINGS.index("Admission.retry_after_ms")
cdef int X_CIDRSET_COMPILE = CROSSINGS.index("CidrSet.compile")
cdef int X_CIDRSET_CONTAINS = CROSSINGS.index("CidrSet.contains")
cdef int X_CIDRSET_LEN = CROSSINGS.index("CidrSet.__len__")
cdef int X_CIDRSET_RANGES = CROSSINGS.index("CidrSet.ranges")
cdef int X_CIDRSET_WHERE = CROSSINGS.index("CidrSet.where")

# ------------------------------------------------------------------ constants

LAYOUT_VERSION = _py.LAYOUT_VERSION
NO_SUCH_KEY = _py.NO_SUCH_KEY
KEY_REVOKED = _py.KEY_REVOKED
KEY_DISABLED = _py.KEY_DISABLED
KEY_EXPIRED = _py.KEY_EXPIRED
KEY_NOT_YET_VALID = _py.KEY_NOT_YET_VALID
SCOPE_DENIED = _py.SCOPE_DENIED
KEY_IP_DENIED = _py.KEY_IP_DENIED
KEY_BUSY = _py.KEY_BUSY
KEY_MALFORMED = _py.KEY_MALFORMED
RATE_LIMITED = _py.RATE_LIMITED
RATE_TABLE_FULL = _py.RATE_TABLE_FULL
UNLIMITED = _py.UNLIMITED
SUBJECT_V4 = _py.SUBJECT_V4
SUBJECT_UNKNOWN = _py.SUBJECT_UNKNOWN
V6_PREFIX_DEFAULT = _py.V6_PREFIX_DEFAULT

cdef enum:
    C_NO_SUCH_KEY = -1
    C_KEY_REVOKED = -2
    C_KEY_DISABLED = -3
    C_KEY_EXPIRED = -4
    C_KEY_NOT_YET_VALID = -5
    C_SCOPE_DENIED = -6
    C_KEY_IP_DENIED = -7
    C_KEY_BUSY = -8
    C_KEY_MALFORMED = -9
    C_RATE_LIMITED = -10
    C_RATE_TABLE_FULL = -11
    C_UNLIMITED = 0x7FFFFFFF
    NOT_THIS = -100          # internal: the slot's record is not this digest's
    RETRY = -101             # internal: the entry changed owner under a hit
    F_LIVE = 1
    F_DISABLED = 2
    F_REVOKED = 4
    SLOT_EMPTY = 0
    RATE_PROBES = 256
    EXT_HEADER = 56
    EXT_CLASSES = 24
    N_WIN = 5
    MISS_RETRIES = 4         # lookups that raced a slot-area swap
    OWNER_RETRIES = 3        # address hits whose entry was reclaimed under them
    MODE_REFUSE = 0
    MODE_EVICT = 1
    KS_HDR = 512             # key snapshot header (export_keys / import_keys)
    KS_WORDS = 64

cdef extern from *:
    """
    #define FG_SLOT_TOMB 0xFFFFFFFFULL
    #define FG_LO32 0xFFFFFFFFULL
    #define FG_ALL64 0xFFFFFFFFFFFFFFFFULL
    #define FG_BUSY_WAIT_NS 200000LL
    #define FG_SNAP_WAIT_NS 2000000LL
    """
    const uint64_t SLOT_TOMB "FG_SLOT_TOMB"
    const uint64_t LO32 "FG_LO32"
    const uint64_t ALL64 "FG_ALL64"
    # A reader that meets a record mid-write waits this long (monotonic clock)
    # before it answers KEY_BUSY; cold readers (info/meta) wait longer, then raise.
    const int64_t BUSY_WAIT_NS "FG_BUSY_WAIT_NS"
    const int64_t SNAP_WAIT_NS "FG_SNAP_WAIT_NS"

cdef uint64_t KS_MAGIC = int.from_bytes(b"FGKEYS01", "little")

cdef struct Record:          # 128 bytes, guarded by seq (seqlock, single writer)
    uint32_t seq
    uint32_t flags
    uint32_t plan_id
    uint32_t ext_len
    uint64_t ext_off
    int64_t not_before_ms
    int64_t expires_ms
    int64_t grace_until_ms
    uint64_t gen             # 0 only for a record never used since the arena was made
    uint8_t digest[32]
    uint8_t digest2[32]
    uint8_t pad[8]

cdef struct Header:          # the first 128 bytes must match _core_py.HEADER_FIELDS
    uint64_t magic
    uint32_t version
    uint32_t header_size
    uint64_t size
    uint64_t key_capacity
    uint64_t key_slots
    uint64_t rate_capacity
    uint64_t ext_bytes
    uint64_t off_slots       # slot area A
    uint64_t off_records
    uint64_t off_rate        # address entries, refuse when full
    uint64_t off_ext
    int64_t writer_pid
    uint64_t auth_capacity
    uint64_t off_slots2      # slot area B
    uint64_t off_krate       # one entry per key index
    uint64_t off_auth        # address entries, evict when full
    uint64_t slot_cur        # offset of the live slot area (atomic: readers load it once per lookup)
    uint64_t slot_gen        # +1 at every slot-area swap (atomic)
    uint64_t ext_bump        # writer only
    uint64_t live_keys       # writer only
    uint64_t tombstones      # writer only
    uint64_t digests         # writer only
    uint64_t rate_used       # atomic add, any process
    uint64_t auth_used       # atomic add, any process
    uint64_t alloc_hint      # writer only
    uint64_t rebuilds        # writer only
    uint64_t reclaimed       # atomic add, any process
    uint64_t evicted         # atomic add, any process
    int64_t jpid             # journal: pid of the writer that armed it
    uint64_t jarmed          # journal: index + 1 of the record inside a write section, 0 = none
    uint64_t hpad[2]
    uint64_t salt[2]         # offset 256 (_core_py.SALT_OFFSET): placement secret, never exposed
    uint64_t free_heads[EXT_CLASSES]   # writer only
    uint64_t hpad2[6]
    Record jrec              # journal: the record as it was when the section began

cdef struct RateEntry:       # 96 bytes
    uint64_t key             # owner (hashed regions; 0 = never used) -- unused in the key region
    uint64_t b[10]           # per window kind: two buckets (epoch parity), each (epoch << 32) | count
    uint64_t touched         # now_ms of the last hit (relaxed): picks the stalest entry to evict

cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v

cdef inline bint _eq32(const uint8_t *a, const uint8_t *b) noexcept nogil:
    # constant time: no early exit on the first differing word
    cdef uint64_t x = (_le64(a) ^ _le64(b)) | (_le64(a + 8) ^ _le64(b + 8))
    x |= (_le64(a + 16) ^ _le64(b + 16)) | (_le64(a + 24) ^ _le64(b + 24))
    return x == 0

cdef inline bint _eq32_shared(const uint8_t *a, const uint8_t *shared) noexcept nogil:
    # as _eq32, for a digest inside a record the writer may be rewriting: one
    # relaxed atomic load per word (the seq re-check discards a torn compare)
    cdef const uint64_t *s = <const uint64_t *>shared
    cdef uint64_t x = (_le64(a) ^ fg_load64_rlx(s)) | (_le64(a + 8) ^ fg_load64_rlx(s + 1))
    x |= (_le64(a + 16) ^ fg_load64_rlx(s + 2)) | (_le64(a + 24) ^ fg_load64_rlx(s + 3))
    return x == 0

cdef inline int64_t _ld_i64(const int64_t *p) noexcept nogil:
    return <int64_t>fg_load64_rlx(<const uint64_t *>p)

cdef int _crash_hook = 0


def _set_crash_hook(int point):
    """TEST ONLY: with point 1, the next put() in this process calls _exit(70)
    half way through writing its record (inside the seqlock write section), as
    a writer killed mid-write would. 0 turns it off. Costs one int compare on
    the writer's cold path when unused."""
    global _crash_hook
    _crash_hook = point


cdef bint _pid_running(int64_t pid):
    """Cold: is pid a live process (not gone, not a zombie)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2:st.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return True

# ------------------------------------------------------------------ Arena
#
# Every cdef class here is final: their cdef methods are then called
# directly (and inlined where declared so), not through a vtable.


@cython.final
cdef class Arena:
    """The shared segment. Create in the master before forking workers."""

    cdef object _mm
    cdef uint8_t[::1] _view
    cdef uint8_t *base
    cdef Header *hdr
    cdef Record *records
    cdef RateEntry *krates
    cdef RateEntry *rates
    cdef RateEntry *auths
    cdef uint8_t *ext
    cdef uint64_t slot_mask
    cdef uint64_t rate_mask
    cdef uint64_t auth_mask
    cdef uint64_t key_cap
    cdef uint64_t rate_cap
    cdef uint64_t auth_cap
    cdef uint64_t ext_bytes
    cdef object _path
    cdef bint _owner
    cdef int64_t _creator_pid

    def __init__(self):
        raise TypeError("use Arena.create(...) or Arena.attach(path)")

    @staticmethod
    cdef Arena _wrap(object mm, object path, bint owner):
        cdef Arena a = Arena.__new__(Arena)
        a._mm = mm
        a._view = mm
        a.base = <uint8_t *>&a._view[0]
        a.hdr = <Header *>a.base
        a.records = <Record *>(a.base + a.hdr.off_records)
        a.krates = <RateEntry *>(a.base + a.hdr.off_krate)
        a.rates = <RateEntry *>(a.base + a.hdr.off_rate)
        a.auths = <RateEntry *>(a.base + a.hdr.off_auth)
        a.ext = a.base + a.hdr.off_ext
        a.slot_mask = a.hdr.key_slots - 1
        a.rate_mask = a.hdr.rate_capacity - 1
        a.auth_mask = a.hdr.auth_capacity - 1
        a.key_cap = a.hdr.key_capacity
        a.rate_cap = a.hdr.rate_capacity
        a.auth_cap = a.hdr.auth_capacity
        a.ext_bytes = a.hdr.ext_bytes
        a._path = path
        a._owner = owner
        a._creator_pid = getpid() if owner else -1
        return a

    @staticmethod
    def create(key_capacity=1_000_000, rate_capacity=1 << 18, ext_bytes=None, path=None, *, auth_capacity=None):
        """Map a zeroed segment: anonymous MAP_SHARED (inherited by fork) or a /dev/shm file.

        key_capacity: keys (each gets its own rate entry); rate_capacity: address
        subjects of "refuse" policies (ip_limits); auth_capacity (default
        rate_capacity): address subjects of "evict" policies (failed auth)."""
        FG_CROSS(X_ARENA_CREATE)
        lay = _py.layout(key_capacity, rate_capacity, ext_bytes, auth_capacity)
        mm = _py.map_segment(lay["size"], path)
        _py.write_header(mm, lay, os.getpid(), secrets.token_bytes(16))
        cdef Arena a = Arena._wrap(mm, path, True)
        a.hdr.ext_bump = 64          # offset 0 means "no extension"
        a.hdr.slot_cur = a.hdr.off_slots
        return a

    @staticmethod
    def attach(path):
        """Map an existing /dev/shm arena by path; validates magic, version and layout."""
        FG_CROSS(X_ARENA_ATTACH)
        mm = _py.open_segment(path)
        h = _py.read_header(mm, repr(path))
        cdef Arena a = Arena._wrap(mm, path, False)
        cur = fg_load64_acq(&a.hdr.slot_cur)
        if cur != h["off_slots"] and cur != h["off_slots2"]:
            raise CoreError(f"arena {path!r} header field slot_cur is {cur}; expected one of the two slot areas")
        return a

    @property
    def size(self):
        FG_CROSS(X_ARENA_SIZE)
        return self.hdr.size

    @property
    def key_capacity(self):
        FG_CROSS(X_ARENA_KEY_CAPACITY)
        return self.key_cap

    @property
    def rate_capacity(self):
        FG_CROSS(X_ARENA_RATE_CAPACITY)
        return self.rate_cap

    @property
    def auth_capacity(self):
        FG_CROSS(X_ARENA_AUTH_CAPACITY)
        return self.auth_cap

    @property
    def path(self):
        FG_CROSS(X_ARENA_PATH)
        return self._path

    @property
    def writer_pid(self):
        FG_CROSS(X_ARENA_WRITER_PID)
        return self.hdr.writer_pid

    def header(self):
        FG_CROSS(X_ARENA_HEADER)
        h = _py.read_header(self._mm, "in memory")
        return h

    def set_writer(self, int pid):
        """Hand the single-writer role to another process. Callable by the current
        writer, and by the creating process itself (the master), which must be
        able to hand the role to a replacement when the writer died.

        A writer that died inside a record's write section left that record's
        journal armed: unless that writer is still running, the record is put
        back as it was before the section (normalised) right here, so readers
        stop answering KEY_BUSY for it now, not at the new writer's first write."""
        FG_CROSS(X_ARENA_SET_WRITER)
        if getpid() != self._creator_pid:
            self._require_writer()
        cdef int64_t jpid = self.hdr.jpid
        if self.hdr.jarmed and (jpid == getpid() or not _pid_running(jpid)):
            self._normalise()
        self.hdr.writer_pid = pid

    def repair_dead_writer(self):
        """Before a replacement writer is started: if the last writer died inside
        a write section, put that record back as it was before it (as set_writer
        would) and return its key index, so the new writer can re-apply the
        store's state for it (the store may have committed the change that was
        being written); -1 if there was none. Creator only."""
        FG_CROSS(X_ARENA_REPAIR_DEAD_WRITER)
        if getpid() != self._creator_pid:
            raise CoreError("only the process that created the arena may repair it")
        cdef int64_t jpid = self.hdr.jpid
        cdef int64_t k
        if self.hdr.jarmed and not _pid_running(jpid):
            k = <int64_t>self.hdr.jarmed - 1
            self._normalise()
            return k if k < <int64_t>self.key_cap else -1
        return -1

    def recover(self):
        """Normalise a record a dead writer left mid-write (what set_writer and every
        writer operation do first); True if there was one. Writer or creator only."""
        FG_CROSS(X_ARENA_RECOVER)
        if getpid() != self._creator_pid:
            self._require_writer()
        if not self.hdr.jarmed:
            return False
        self._normalise()
        return True

    cdef _require_writer(self):
        cdef int64_t me = getpid()
        if self.hdr.writer_pid != me:
            raise CoreError(f"only the writer process (pid {self.hdr.writer_pid}) may write the arena; this is pid {me}")
        if self.hdr.jarmed:
            # nothing inside a write section can raise or return early, so an
            # armed journal here is a previous writer's that died mid-write
            self._normalise()

    cdef void _normalise(self) noexcept:
        """Put the journalled record back as it was before its interrupted section.

        Only its old field values are restored: they are what readers accepted
        last, and everything they reference (ext block, digest slots) is still
        in place, because a writer frees or unlinks those only after the
        section ends. Readers never see the torn state: the record stays odd
        until the final release store makes it even, with a seq above any they
        have sampled."""
        cdef uint64_t k = self.hdr.jarmed - 1
        cdef Record *r
        cdef uint32_t s
        if k < self.key_cap:
            r = &self.records[k]
            s = fg_load32_rlx(&r.seq) | 1
            fg_store32_rlx(&r.seq, s)
            fg_fence_rel()
            memcpy(<uint8_t *>r + 4, <uint8_t *>&self.hdr.jrec + 4, sizeof(Record) - 4)
            fg_store32_rel(&r.seq, s + 1)
        self.hdr.jarmed = 0
        self.hdr.jpid = 0

    cdef inline uint64_t *_slots(self) noexcept:
        # acquire: pairs with the release store of slot_cur at a swap, so the
        # area's contents as built before the swap are visible
        return <uint64_t *>(self.base + fg_load64_acq(&self.hdr.slot_cur))

    def unlink(self):
        FG_CROSS(X_ARENA_UNLINK)
        if not self._owner:
            raise CoreError("only the process that created the arena may unlink it")
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    # ---- key snapshot (fast start): the key part of the arena out and back in.
    # Format (native byte order, this build only): KS_HDR bytes of u64 words --
    # magic, layout version, key_capacity, key_slots, ext_bytes, records n,
    # extension bytes used, live keys, alloc_hint, record size, then the
    # extension free-list heads -- then records [0, n), then the extension heap
    # [0, used). Not the digest index (import rebuilds it) and no rate counter.

    def export_keys(self):
        """The key part of the arena as one bytes object (a snapshot payload): the
        records up to the highest index ever used and the extension heap up to its
        bump pointer, behind a header naming the layout and capacities.

        Writer only. Only the writer changes keys, and this copy is taken between
        two of its writes, so it is consistent without stopping any reader."""
        FG_CROSS(X_ARENA_EXPORT_KEYS)
        self._require_writer()
        cdef uint64_t n = self.key_cap, used = self.hdr.ext_bump
        cdef int c
        while n > 0 and self.records[n - 1].gen == 0 and not (self.records[n - 1].flags & F_LIVE):
            n -= 1
        cdef uint64_t rbytes = sizeof(Record) * n
        cdef bytes out = PyBytes_FromStringAndSize(NULL, KS_HDR + rbytes + used)
        cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
        cdef uint64_t w[KS_WORDS]
        memset(w, 0, sizeof(w))
        w[0] = KS_MAGIC
        w[1] = LAYOUT_VERSION
        w[2] = self.key_cap
        w[3] = self.hdr.key_slots
        w[4] = self.ext_bytes
        w[5] = n
        w[6] = used
        w[7] = self.hdr.live_keys
        w[8] = self.hdr.alloc_hint
        w[9] = sizeof(Record)
        for c in range(EXT_CLASSES):
            w[10 + c] = self.hdr.free_heads[c]
        memcpy(o, w, KS_HDR)
        with nogil:
            memcpy(o + KS_HDR, self.records, rbytes)
            memcpy(o + KS_HDR + rbytes, self.ext, used)
        return out

    def import_keys(self, const uint8_t[::1] data not None):
        """Fill this arena's key part from export_keys() output (bytes, or a read-only
        mmap of a snapshot file) and rebuild the digest index; returns the number of
        live keys. Writer only, into an arena that has held no key yet.

        Everything is checked before anything is written: CoreError, and the arena
        left as it was, for another layout version or key capacity, an extension heap
        larger than this arena's, a short or long payload, a record or free list that
        points outside the copied heap, a live count that does not add up."""
        FG_CROSS(X_ARENA_IMPORT_KEYS)
        self._require_writer()
        if self.hdr.live_keys or self.hdr.digests or self.hdr.tombstones or self.hdr.ext_bump != 64:
            raise CoreError("import_keys needs an arena that has held no key yet")
        cdef Py_ssize_t size = data.shape[0]
        if size < KS_HDR:
            raise CoreError(f"key snapshot is {size} bytes; expected at least its {KS_HDR}-byte header")
        cdef const uint8_t *p = &data[0]
        cdef uint64_t w[KS_WORDS]
        memcpy(w, p, KS_HDR)
        if w[0] != KS_MAGIC:
            raise CoreError("key snapshot has the wrong magic (not made by this core's export_keys)")
        if w[1] != LAYOUT_VERSION or w[9] != sizeof(Record):
            raise CoreError(f"key snapshot is of arena layout v{w[1]}; this build has v{LAYOUT_VERSION}")
        if w[2] != self.key_cap or w[3] != self.hdr.key_slots:
            raise CoreError(f"key snapshot is of an arena with key_capacity {w[2]}; this one has {self.key_cap}")
        cdef uint64_t n = w[5], used = w[6], live = 0, k, off, size_c, steps
        if used < 64 or used > self.ext_bytes or used & 63:
            raise CoreError(f"key snapshot uses {used} extension bytes; this arena has {self.ext_bytes}")
        if n > self.key_cap or <uint64_t>size != KS_HDR + sizeof(Record) * n + used:
            raise CoreError(f"key snapshot is {size} bytes; its header says {KS_HDR + sizeof(Record) * n + used}")
        cdef const uint8_t *recs = p + KS_HDR
        cdef const uint8_t *ext = recs + sizeof(Record) * n
        cdef Record r
        cdef int c
        for k in range(n):
            memcpy(&r, recs + sizeof(Record) * k, sizeof(Record))
            if r.seq & 1:
                raise CoreError(f"key snapshot record {k} was copied mid-write")
            if not (r.flags & F_LIVE):
                continue
            if r.flags & ~(F_LIVE | F_DISABLED | F_REVOKED):
                raise CoreError(f"key snapshot record {k} has unknown flags {r.flags:#x}")
            if r.ext_off != 0 and (r.ext_off < 64 or r.ext_len < EXT_HEADER or r.ext_off > used
                                   or r.ext_len > used - r.ext_off):
                raise CoreError(f"key snapshot record {k} points outside the copied extension heap")
            live += 1
        if live != w[7]:
            raise CoreError(f"key snapshot holds {live} live records; its header says {w[7]}")
        for c in range(EXT_CLASSES):
            # every free block must lie inside the copied heap, aligned to its size:
            # the allocator hands them out again without looking
            size_c = (<uint64_t>64) << c
            off = w[10 + c]
            steps = 0
            while off:
                if off < 64 or off & 63 or off > used or size_c > used - off or steps > used // 64:
                    raise CoreError(f"key snapshot free list {c} leaves the copied extension heap")
                off = _le64(ext + off)
                steps += 1
        with nogil:
            memcpy(self.records, recs, sizeof(Record) * n)
            memcpy(self.ext, ext, used)
        self.hdr.ext_bump = used
        for c in range(EXT_CLASSES):
            self.hdr.free_heads[c] = w[10 + c]
        self.hdr.alloc_hint = w[8] % self.key_cap
        self.hdr.live_keys = live
        self.hdr.digests = self._index_all(n)
        # the master imports before it forks: the fork orders this for the workers;
        # the fence is for any process already attached
        fg_fence_rel()
        return live

    cdef uint64_t _index_all(self, uint64_t n) noexcept:
        """Insert the digests of records [0, n) into the live (empty) slot area."""
        cdef uint64_t *slots = self._slots()
        cdef uint64_t k, h, val, pos, v, placed = 0, probes
        cdef Record *r
        cdef const uint8_t *dg
        cdef int j
        for k in range(n):
            r = &self.records[k]
            if not (r.flags & F_LIVE):
                continue
            for j in range(2):
                if j == 0:
                    dg = &r.digest[0]
                elif r.grace_until_ms == 0:
                    break
                else:
                    dg = &r.digest2[0]
                h = _le64(dg)
                val = ((h >> 32) << 32) | (k + 1)
                pos = h & self.slot_mask
                for probes in range(self.slot_mask + 1):
                    v = slots[pos]
                    if v == SLOT_EMPTY:
                        fg_store64_rlx(&slots[pos], val)
                        placed += 1
                        break
                    if v == val:     # both digests of a key share a tag: one slot serves both
                        break
                    pos = (pos + 1) & self.slot_mask
        return placed

    cdef void _release_pages(self, uint64_t off, uint64_t n) noexcept:
        # best effort: give a retired slot area's pages back (shmem/tmpfs); any
        # reader still in it reads zeros = EMPTY, and its miss re-check of
        # slot_gen sends it to the live area
        cdef uint64_t lo = (off + 4095) & ~(<uint64_t>4095), hi = (off + n) & ~(<uint64_t>4095)
        if hi <= lo:
            return
        try:
            self._mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)
        except BaseException:
            pass

    # ---- extension heap: power-of-two blocks, writer only; readers reach a
    # block only through a record, under that record's seqlock.

    cdef uint64_t _ext_alloc(self, uint64_t n) except? 0:
        cdef int c = 0
        cdef uint64_t size = 64, off
        while size < n:
            size <<= 1
            c += 1
        if c >= EXT_CLASSES:
            raise CoreError(f"key extension of {n} bytes is larger than the largest block ({64 << (EXT_CLASSES - 1)})")
        off = self.hdr.free_heads[c]
        if off:
            self.hdr.free_heads[c] = _le64(self.ext + off)
            return off
        off = self.hdr.ext_bump
        if off + size > self.ext_bytes:
            raise CoreError(
                f"key extension area full: {self.ext_bytes} bytes, {off} in use, needed {size} more (raise ext_bytes)")
        self.hdr.ext_bump = off + size
        return off

    cdef void _ext_free(self, uint64_t off, uint64_t n) noexcept:
        cdef int c = 0
        cdef uint64_t size = 64
        if off == 0:
            return
        while size < n:
            size <<= 1
            c += 1
        memcpy(self.ext + off, &self.hdr.free_heads[c], 8)
        self.hdr.free_heads[c] = off


cdef Header _hdr_probe
if (<size_t>&_hdr_probe.salt - <size_t>&_hdr_probe) != _py.SALT_OFFSET or \
        (<size_t>&_hdr_probe.slot_cur - <size_t>&_hdr_probe) != 128 or sizeof(Header) > _py.HEADER_SIZE:
    raise ImportError("fastgate._core: Header layout does not match _core_py (salt/slot_cur offsets or size)")


# ------------------------------------------------------------------ ranges (CIDR search)

cdef inline bint _in4(const uint32_t *p, uint32_t n, uint32_t x) noexcept nogil:
    # p: n sorted disjoint (lo, hi) pairs
    cdef uint32_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if p[2 * mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and x <= p[2 * (lo - 1) + 1]

cdef inline bint _le128(uint64_t ah, uint64_t al, uint64_t bh, uint64_t bl) noexcept nogil:
    return ah < bh or (ah == bh and al <= bl)

cdef inline bint _in6(const uint64_t *p, uint32_t n, uint64_t xh, uint64_t xl) noexcept nogil:
    # p: n sorted disjoint (lo_hi, lo_lo, hi_hi, hi_lo) quads
    cdef uint32_t lo = 0, hi = n, mid
    cdef const uint64_t *q
    while lo < hi:
        mid = (lo + hi) >> 1
        q = p + 4 * mid
        if _le128(q[0], q[1], xh, xl):
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return False
    q = p + 4 * (lo - 1)
    return _le128(xh, xl, q[2], q[3])

cdef inline int _peer(const uint8_t *p, Py_ssize_t n, uint32_t *v4, uint64_t *hi, uint64_t *lo) noexcept nogil:
    cdef int i
    cdef uint64_t h = 0, l = 0
    if n == 4:
        v4[0] = (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]
        return 4
    if n != 16:
        return 0
    for i in range(8):
        h = (h << 8) | p[i]
        l = (l << 8) | p[8 + i]
    if h == 0 and (l >> 32) == 0xFFFF:
        v4[0] = <uint32_t>l
        return 4
    hi[0] = h
    lo[0] = l
    return 6


@cython.final
cdef class CidrSet:
    """IPv4/IPv6 ranges, sorted and merged, in worker-local C arrays."""

    cdef uint32_t *v4
    cdef uint64_t *v6
    cdef uint32_t n4
    cdef uint32_t n6
    cdef object _where

    def __cinit__(self):
        self.v4 = NULL
        self.v6 = NULL

    def __dealloc__(self):
        free(self.v4)
        free(self.v6)

    def __init__(self):
        raise TypeError("use CidrSet.compile(cidrs, where=...)")

    @staticmethod
    def compile(cidrs, where="cidrs"):
        FG_CROSS(X_CIDRSET_COMPILE)
        r4, r6 = _py.compile_cidrs(cidrs, where)
        cdef CidrSet s = CidrSet.__new__(CidrSet)
        cdef Py_ssize_t i
        s._where = where
        s.n4 = len(r4)
        s.n6 = len(r6)
        s.v4 = <uint32_t *>malloc(8 * s.n4 + 8)
        s.v6 = <uint64_t *>malloc(32 * s.n6 + 32)
        if s.v4 == NULL or s.v6 == NULL:
            raise MemoryError()
        for i in range(s.n4):
            s.v4[2 * i] = r4[i][0]
            s.v4[2 * i + 1] = r4[i][1]
        for i in range(s.n6):
            s.v6[4 * i] = r6[i][0] >> 64
            s.v6[4 * i + 1] = r6[i][0] & 0xFFFFFFFFFFFFFFFF
            s.v6[4 * i + 2] = r6[i][1] >> 64
            s.v6[4 * i + 3] = r6[i][1] & 0xFFFFFFFFFFFFFFFF
        return s

    def contains(self, bytes peer not None):
        """peer: 4 or 16 packed bytes; ::ffff:a.b.c.d is matched as a.b.c.d."""
        FG_CROSS(X_CIDRSET_CONTAINS)
        cdef uint32_t x4 = 0
        cdef uint64_t xh = 0, xl = 0
        cdef int v = _peer(<const uint8_t *>PyBytes_AS_STRING(peer), PyBytes_GET_SIZE(peer), &x4, &xh, &xl)
        if v == 4:
            return _in4(self.v4, self.n4, x4)
        if v == 6:
            return _in6(self.v6, self.n6, xh, xl)
        return False

    @property
    def where(self):
        FG_CROSS(X_CIDRSET_WHERE)
        return self._where

    def __len__(self):
        FG_CROSS(X_CIDRSET_LEN)
        return self.n4 + self.n6

    @property
    def ranges(self):
        FG_CROSS(X_CIDRSET_RANGES)
        return (self.n4, self.n6)


# ------------------------------------------------------------------ key table

cdef uint8_t _B62[256]
memset(_B62, 0xFF, 256)
for _i, _c in enumerate(_py.B62):
    _B62[_c] = _i

cdef bint _well_formed(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    # mirrors _core_py.key_well_formed: fg_<id>_<secret><6 base62 CRC-32>
    cdef Py_ssize_t sep = -1, i
    cdef uint64_t chk = 0
    if n < 3 + 1 + 1 + 27 + 6 or n > 3 + 32 + 1 + 64 + 6:
        return False
    if p[0] != 0x66 or p[1] != 0x67 or p[2] != 0x5F:
        return False
    for i in range(3, n):
        if p[i] == 0x5F:
            sep = i
            break
        if _B62[p[i]] == 0xFF:
            return False
    if sep < 4 or sep - 3 > 32:
        return False
    i = n - sep - 1 - 6
    if i < 27 or i > 64:
        return False
    for i in range(sep + 1, n):
        if _B62[p[i]] == 0xFF:
            return False
    for i in range(n - 6, n):
        chk = chk * 62 + _B62[p[i]]
    return chk == fg_crc32(p, n - 6)




cdef inline void _w_begin(Record *r) noexcept nogil:
    # seqlock write side (single writer): force seq odd -- a dead writer may
    # have left it odd already, and +1 would then make it even mid-write --
    # then a release fence so the odd value is visible before any of the
    # field stores that follow
    fg_store32_rlx(&r.seq, fg_load32_rlx(&r.seq) | 1)
    fg_fence_rel()

cdef inline void _w_end(Record *r) noexcept nogil:
    # release: every field store above is visible before the even seq, which
    # is above every value a reader can have sampled before
    fg_store32_rel(&r.seq, (fg_load32_rlx(&r.seq) | 1) + 1)


@cython.final
cdef class KeyTable:
    """Digest -> key record. Readers: every process; writer: the arena's writer_pid."""

    cdef Arena arena
    cdef Header *hdr
    cdef Record *records
    cdef uint8_t *ext
    cdef uint64_t slot_mask
    cdef uint64_t nslots
    cdef uint64_t cap
    cdef uint64_t ext_bytes
    cdef fg_b2_state b2
    cdef bint has_secret
    cdef bytes _secret
    # the last successful check in this process, from one snapshot of its record
    cdef int64_t _last_plan
    cdef int64_t last_index
    cdef uint64_t last_gen
    cdef uint32_t last_limits[N_WIN]

    def __init__(self, Arena arena not None, secret=None):
        self.arena = arena
        self.hdr = arena.hdr
        self.records = arena.records
        self.ext = arena.ext
        self.slot_mask = arena.slot_mask
        self.nslots = arena.slot_mask + 1
        self.cap = arena.key_cap
        self.ext_bytes = arena.ext_bytes
        self.has_secret = False
        self._last_plan = 0
        self.last_index = -1
        self.last_gen = 0
        memset(self.last_limits, 0, sizeof(self.last_limits))
        if secret is not None:
            self._set_secret(secret)

    @property
    def capacity(self):
        FG_CROSS(X_KEYTABLE_CAPACITY)
        return self.cap

    @property
    def last_plan(self):
        """plan_id of the key of the last successful check in this process."""
        FG_CROSS(X_KEYTABLE_LAST_PLAN)
        return self._last_plan

    def set_secret(self, secret):
        FG_CROSS(X_KEYTABLE_SET_SECRET)
        self._set_secret(secret)

    cdef _set_secret(self, secret):
        cdef bytes s = _py._check_secret(secret)
        fg_b2_init_keyed(&self.b2, <const uint8_t *>PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))
        self._secret = s
        self.has_secret = True

    def digest(self, bytes key not None):
        """Keyed BLAKE2b-256 of key: equals _core_py.key_digest(secret, key)."""
        FG_CROSS(X_KEYTABLE_DIGEST)
        cdef uint8_t out[32]
        if not self.has_secret:
            raise CoreError("no server secret set: pass secret= to KeyTable or call set_secret()")
        if PyBytes_GET_SIZE(key) == 0:
            return _py.key_digest(self._secret, key)
        fg_b2_digest(&self.b2, <const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), out)
        return PyBytes_FromStringAndSize(<char *>out, 32)

    # ---------------------------------------------------------- hot path

    def check_key(self, bytes key not None, int method_bit, bytes path not None, bytes peer not None, int64_t now_ms):
        """Format + checksum, keyed digest, then check(): key index >= 0 or a negative code."""
        FG_CROSS(X_KEYTABLE_CHECK_KEY)
        return self._check_key(key, method_bit, path, peer, now_ms)

    cdef inline int64_t _check_key(self, bytes key, int mbit, bytes path, bytes peer, int64_t now) noexcept:
        cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef uint8_t d[32]
        if not self.has_secret or not _well_formed(k, n):
            return C_KEY_MALFORMED
        fg_b2_digest(&self.b2, k, n, d)
        return self._check(d, mbit, path, peer, now)

    def check(self, bytes digest not None, int method_bit, bytes path not None, bytes peer not None, int64_t now_ms):
        """Lookup + revoked/disabled + validity window + scope + per-key CIDRs."""
        FG_CROSS(X_KEYTABLE_CHECK)
        if PyBytes_GET_SIZE(digest) != 32:
            return C_NO_SUCH_KEY
        return self._check(<const uint8_t *>PyBytes_AS_STRING(digest), method_bit, path, peer, now_ms)

    cdef int64_t _check(self, const uint8_t *d, int mbit, bytes path, bytes peer, int64_t now) noexcept:
        cdef uint32_t p4 = 0
        cdef uint64_t ph = 0, pl = 0
        cdef int pv = _peer(<const uint8_t *>PyBytes_AS_STRING(peer), PyBytes_GET_SIZE(peer), &p4, &ph, &pl)
        cdef const uint8_t *pp = <const uint8_t *>PyBytes_AS_STRING(path)
        cdef Py_ssize_t pn = PyBytes_GET_SIZE(path)
        # the digest is a keyed cryptographic hash, so its first 8 bytes are
        # already uniform: they pick the slot (low bits) and the tag (high bits)
        cdef uint64_t h = _le64(d), v, ref, gen
        cdef uint64_t i, n
        cdef uint64_t tag = h >> 32
        cdef uint64_t *slots
        cdef int64_t r
        cdef int tries
        for tries in range(MISS_RETRIES):
            # acquire: slot_gen before slot_cur, so that a reader that sees a
            # new generation also sees the area it published
            gen = fg_load64_acq(&self.hdr.slot_gen)
            slots = self.arena._slots()
            i = h & self.slot_mask
            for n in range(self.nslots):
                # acquire: pairs with the writer's release store of the slot, so
                # the record it points to is at least as new as the slot
                v = fg_load64_acq(&slots[i])
                if v == SLOT_EMPTY:
                    break
                ref = v & LO32
                if ref != SLOT_TOMB and (v >> 32) == tag and ref - 1 < self.cap:
                    # a hit is decided by the record (full digest compare under
                    # its seqlock), never by the slot, so a stale area can only
                    # cost a miss, never admit a wrong key
                    r = self._eval(ref - 1, d, mbit, pp, pn, pv, p4, ph, pl, now)
                    if r != NOT_THIS:
                        return r
                i = (i + 1) & self.slot_mask
            # a miss is only trusted if no swap happened meanwhile: the writer
            # bumps slot_gen, then fences, before it touches a retired area, so
            # a reader that read any such store sees the new generation here
            fg_fence_acq()
            if fg_load64_rlx(&self.hdr.slot_gen) == gen:
                return C_NO_SUCH_KEY
        return C_NO_SUCH_KEY

    cdef int64_t _eval(self, uint64_t k, const uint8_t *d, int mbit, const uint8_t *pp, Py_ssize_t pn,
                       int pv, uint32_t p4, uint64_t ph, uint64_t pl, int64_t now) noexcept:
        cdef Record *rec = &self.records[k]
        cdef uint32_t s1, s2, flags, plan = 0
        cdef uint32_t lim[N_WIN]
        cdef int64_t res, expires, deadline = 0, t
        cdef uint64_t spins = 0, eoff, elen, gen = 0
        while True:
            # seqlock read side: acquire load of seq, relaxed atomic loads of
            # the fields (possibly torn, each read exactly once), acquire
            # fence, then re-load seq; an odd or changed seq means a write
            # overlapped and the result is discarded
            s1 = fg_load32_acq(&rec.seq)
            if not (s1 & 1):
                memset(lim, 0, sizeof(lim))
                flags = fg_load32_rlx(&rec.flags)
                if not (flags & F_LIVE):
                    res = NOT_THIS
                elif not (_eq32_shared(d, rec.digest) or
                          (now < _ld_i64(&rec.grace_until_ms) and _eq32_shared(d, rec.digest2))):
                    res = NOT_THIS
                elif flags & F_REVOKED:
                    res = C_KEY_REVOKED
                elif flags & F_DISABLED:
                    res = C_KEY_DISABLED
                elif now < _ld_i64(&rec.not_before_ms):
                    res = C_KEY_NOT_YET_VALID
                else:
                    expires = _ld_i64(&rec.expires_ms)
                    if expires != 0 and now >= expires:
                        res = C_KEY_EXPIRED
                    else:
                        plan = fg_load32_rlx(&rec.plan_id)
                        gen = fg_load64_rlx(&rec.gen)
                        eoff = fg_load64_rlx(&rec.ext_off)
                        elen = fg_load32_rlx(&rec.ext_len)
                        if eoff == 0:
                            res = <int64_t>k
                        elif eoff > self.ext_bytes or elen > self.ext_bytes - eoff or elen < EXT_HEADER:
                            res = C_KEY_BUSY     # torn (written so it cannot wrap): the seq check decides
                        else:
                            res = _ext_eval(self.ext + eoff, elen, mbit, pp, pn, pv, p4, ph, pl, lim)
                            if res == 0:
                                res = <int64_t>k
                fg_fence_acq()
                s2 = fg_load32_rlx(&rec.seq)
                if s1 == s2:
                    if res >= 0:
                        self._last_plan = plan
                        self.last_index = <int64_t>k
                        self.last_gen = gen
                        memcpy(self.last_limits, lim, sizeof(lim))
                    return res
            # mid-write: wait by time, not by a spin count (a few hundred us at
            # most, with the clock read every 64 spins), then fail closed
            spins += 1
            if (spins & 63) == 0:
                t = fg_mono_ns()
                if deadline == 0:
                    deadline = t + BUSY_WAIT_NS
                elif t > deadline:
                    return C_KEY_BUSY
            fg_cpu_relax()

    # ---------------------------------------------------------- writer (cold)

    cdef uint64_t _k(self, key_index) except? ALL64:
        if not isinstance(key_index, int) or not 0 <= key_index < self.cap:
            raise CoreError(f"key index must be 0..{self.cap - 1}, found {key_index!r}")
        return key_index

    cdef void _begin(self, uint64_t k) noexcept:
        # journal first: a writer that dies inside the section leaves enough
        # for its successor to put the record back (Arena._normalise). Only a
        # later writer reads the journal, after this process is gone, so
        # program order is all the ordering it needs.
        cdef Record *r = &self.records[k]
        memcpy(&self.hdr.jrec, r, sizeof(Record))
        self.hdr.jpid = getpid()
        self.hdr.jarmed = k + 1
        _w_begin(r)

    cdef void _end(self, uint64_t k) noexcept:
        _w_end(&self.records[k])
        self.hdr.jarmed = 0

    cdef int64_t _find(self, const uint8_t *d, int64_t *slot_out) noexcept:
        """Writer: key index owning digest d (either of its digests), or -1."""
        cdef uint64_t *slots = self.arena._slots()
        cdef uint64_t h = _le64(d), i = h & self.slot_mask, v, ref, n
        cdef Record *r
        for n in range(self.nslots):
            v = slots[i]
            if v == SLOT_EMPTY:
                return -1
            ref = v & LO32
            if ref != SLOT_TOMB and (v >> 32) == (h >> 32) and ref - 1 < self.cap:
                r = &self.records[ref - 1]
                if (r.flags & F_LIVE) and (_eq32(d, r.digest) or (r.grace_until_ms != 0 and _eq32(d, r.digest2))):
                    if slot_out != NULL:
                        slot_out[0] = <int64_t>i
                    return <int64_t>(ref - 1)
            i = (i + 1) & self.slot_mask
        return -1

    cdef int _insert(self, const uint8_t *d, uint64_t k) except -1:
        cdef uint64_t *slots = self.arena._slots()
        cdef uint64_t h = _le64(d), i = h & self.slot_mask, v, n
        cdef int64_t tomb = -1
        for n in range(self.nslots):
            v = slots[i]
            if v == SLOT_EMPTY:
                break
            if (v & LO32) == SLOT_TOMB and tomb < 0:
                tomb = <int64_t>i
            i = (i + 1) & self.slot_mask
        else:
            if tomb < 0:
                raise CoreError("key index slots exhausted")
        if tomb >= 0:
            i = <uint64_t>tomb
            self.hdr.tombstones -= 1
        # release: the record (written before this call) is visible to any
        # reader that sees this slot
        fg_store64_rel(&slots[i], ((h >> 32) << 32) | (k + 1))
        self.hdr.digests += 1
        return 0

    cdef void _remove(self, const uint8_t *d, uint64_t k) noexcept:
        cdef uint64_t *slots = self.arena._slots()
        cdef uint64_t h = _le64(d), i = h & self.slot_mask, v, n
        for n in range(self.nslots):
            v = slots[i]
            if v == SLOT_EMPTY:
                return
            if v == (((h >> 32) << 32) | (k + 1)):
                # tombstone, not empty: later slots of this probe chain stay reachable
                fg_store64_rel(&slots[i], ((h >> 32) << 32) | SLOT_TOMB)
                self.hdr.tombstones += 1
                self.hdr.digests -= 1
                return
            i = (i + 1) & self.slot_mask

    cdef int _maybe_rebuild(self) except -1:
        # tombstones only lengthen probe chains (a miss walks to the first
        # empty slot), so past 1/8 of the slots the index is rebuilt
        if self.hdr.tombstones * 8 > self.nslots:
            self._rebuild()
        return 0

    cdef int _rebuild(self) except -1:
        """Writer: copy the live digests into the spare slot area, then swap.

        The live area is not modified while this runs; readers keep using it
        until the one release store of slot_cur points them at the new one."""
        cdef Arena a = self.arena
        cdef Header *hdr = self.hdr
        cdef uint64_t cur_off = hdr.slot_cur
        cdef uint64_t new_off = hdr.off_slots2 if cur_off == hdr.off_slots else hdr.off_slots
        cdef uint64_t *src = <uint64_t *>(a.base + cur_off)
        cdef uint64_t *dst = <uint64_t *>(a.base + new_off)
        cdef uint64_t i, j, v, ref, tag, h, val, pos, placed = 0
        cdef Record *r
        cdef const uint8_t *dg
        # The spare area may still hold the slots of two swaps ago, and a reader
        # stalled since then may still walk it. Clearing it with relaxed atomic
        # stores is safe: slot_gen has changed since that reader began (the
        # swap that retired this area bumped it, then fenced), so its miss
        # re-check sends it to the live area; a hit through a cleared or new
        # slot is still decided by the record.
        for i in range(self.nslots):
            fg_store64_rlx(&dst[i], SLOT_EMPTY)
        for i in range(self.nslots):
            v = src[i]
            ref = v & LO32
            if v == SLOT_EMPTY or ref == SLOT_TOMB or ref - 1 >= self.cap:
                continue
            r = &self.records[ref - 1]
            if not (r.flags & F_LIVE):
                continue
            tag = v >> 32
            for j in range(2):
                if j == 0:
                    dg = &r.digest[0]
                elif r.grace_until_ms == 0:
                    break
                else:
                    dg = &r.digest2[0]
                h = _le64(dg)
                if (h >> 32) != tag:
                    continue
                val = ((h >> 32) << 32) | ref
                pos = h & self.slot_mask
                while True:
                    v = dst[pos]
                    if v == SLOT_EMPTY:
                        fg_store64_rlx(&dst[pos], val)
                        placed += 1
                        break
                    if v == val:     # both digests of a key share a tag: one slot serves both
                        break
                    pos = (pos + 1) & self.slot_mask
        # publish: release store of the new offset (the area's stores above are
        # visible to whoever loads it), then the generation, then a release
        # fence so that no later store to the retired area can be seen by a
        # reader that does not also see the new generation
        fg_store64_rel(&hdr.slot_cur, new_off)
        fg_store64_rel(&hdr.slot_gen, hdr.slot_gen + 1)
        fg_fence_rel()
        hdr.tombstones = 0
        hdr.digests = placed
        hdr.rebuilds += 1
        a._release_pages(cur_off, 8 * self.nslots)
        return 0

    cdef int _ensure_findable(self, uint64_t k) except -1:
        # the only digest-slot ambiguity is two digests of one key sharing a
        # 32-bit tag; re-insert whichever one a removal made unreachable
        cdef Record *r = &self.records[k]
        if not (r.flags & F_LIVE):
            return 0
        if self._find(r.digest, NULL) != <int64_t>k:
            self._insert(r.digest, k)
        if r.grace_until_ms != 0 and self._find(r.digest2, NULL) != <int64_t>k:
            self._insert(r.digest2, k)
        return 0

    def allocate(self):
        """A free key index (cold; writer). Raises CoreError when the table is full."""
        FG_CROSS(X_KEYTABLE_ALLOCATE)
        self.arena._require_writer()
        cdef uint64_t n, i = self.hdr.alloc_hint % self.cap
        for n in range(self.cap):
            if not (self.records[i].flags & F_LIVE):
                self.hdr.alloc_hint = i + 1
                return i
            i = (i + 1) % self.cap
        raise CoreError(f"key table full: all {self.cap} records are in use (raise key_capacity)")

    def put(self, key_index, bytes digest not None, *, plan_id=0, flags=0, not_before_ms=0, expires_ms=0,
            scopes=None, allow_cidrs=None, deny_cidrs=None, limits=None, meta=b"", where="key",
            bytes prev_digest=None, grace_until_ms=0):
        """Insert or replace the record at key_index (writer only). prev_digest with
        grace_until_ms > 0 keeps a rotated-out digest valid across the replace.

        Every argument is converted and checked before the record's write
        section begins: nothing inside it can raise."""
        FG_CROSS(X_KEYTABLE_PUT)
        self.arena._require_writer()
        cdef uint64_t k = self._k(key_index)
        _py._check_digest(digest)
        nb, ex, gr = _py._check_times(not_before_ms, expires_ms, grace_until_ms)
        cdef int64_t c_nb = nb, c_ex = ex, c_gr = gr
        cdef const uint8_t *p = NULL
        cdef int64_t other2
        if c_gr > 0 and prev_digest is not None:
            _py._check_digest(prev_digest)
            p = <const uint8_t *>PyBytes_AS_STRING(prev_digest)
            other2 = self._find(p, NULL)
            if other2 >= 0 and <uint64_t>other2 != k:
                raise CoreError(f"digest already belongs to key index {other2}")
        else:
            c_gr = 0
        sc = _py.compile_scopes(scopes, f"{where}.scopes")
        al = _py.compile_cidrs(allow_cidrs, f"{where}.allow_cidrs")
        de = _py.compile_cidrs(deny_cidrs, f"{where}.deny_cidrs")
        li = _py.compile_limits(limits, f"{where}.limits")
        if not isinstance(plan_id, int) or not 0 <= plan_id < (1 << 31):
            raise CoreError(f"plan_id must be 0..2**31-1, found {plan_id!r}")
        if not isinstance(flags, int) or flags & ~(F_DISABLED | F_REVOKED):
            raise CoreError(f"flags may only combine FLAG_DISABLED and FLAG_REVOKED, found {flags!r}")
        cdef uint32_t c_plan = plan_id, c_flags = F_LIVE | flags
        cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(digest)
        cdef int64_t other = self._find(d, NULL)
        if other >= 0 and <uint64_t>other != k:
            raise CoreError(f"digest already belongs to key index {other}")
        cdef bytes blob = b""
        if sc or any(li) or al[0] or al[1] or de[0] or de[1] or meta:
            blob = _py.encode_ext(sc, al, de, li, bytes(meta))
        cdef uint64_t eoff = 0, elen = len(blob)
        if elen:
            eoff = self.arena._ext_alloc(elen)
            memcpy(self.ext + eoff, PyBytes_AS_STRING(blob), elen)
        cdef Record *r = &self.records[k]
        cdef bint was_live = (r.flags & F_LIVE) != 0
        cdef uint64_t old_off = r.ext_off, old_len = r.ext_len
        cdef uint8_t old1[32]
        cdef uint8_t old2[32]
        cdef bint had2 = was_live and r.grace_until_ms != 0
        cdef RateEntry *ke
        cdef int j
        memcpy(old1, r.digest, 32)
        memcpy(old2, r.digest2, 32)
        if not was_live and r.gen != 0:
            # the index held another key before: its counters must not carry
            # over. Zeroed before the record turns live (the release in _end
            # orders these stores first); hits of the old key still in flight
            # can only add to the new key's counts, never hide any.
            ke = &self.arena.krates[k]
            for j in range(2 * N_WIN):
                fg_store64_rlx(&ke.b[j], 0)
            fg_store64_rlx(&ke.touched, 0)
        self._begin(k)
        fg_store32_rlx(&r.flags, c_flags)
        fg_store32_rlx(&r.plan_id, c_plan)
        fg_store64_rlx(<uint64_t *>&r.not_before_ms, <uint64_t>c_nb)
        if _crash_hook == 1:
            _exit(70)        # TEST ONLY (see _set_crash_hook)
        fg_store64_rlx(<uint64_t *>&r.expires_ms, <uint64_t>c_ex)
        fg_store64_rlx(<uint64_t *>&r.grace_until_ms, <uint64_t>c_gr)
        fg_store64_rlx(&r.ext_off, eoff)
        fg_store32_rlx(&r.ext_len, <uint32_t>elen)
        # relaxed atomic store: check_key reads gen inside its seqlock snapshot
        fg_store64_rlx(&r.gen, r.gen + 1 if was_live else 1)
        memcpy(r.digest, d, 32)
        if p != NULL:
            memcpy(r.digest2, p, 32)
        else:
            memset(r.digest2, 0, 32)
        self._end(k)
        if not was_live:
            self.hdr.live_keys += 1
            self._insert(d, k)
            if p != NULL:
                self._insert(p, k)
        else:
            if other < 0:
                self._insert(d, k)
            if p != NULL and self._find(p, NULL) < 0:
                self._insert(p, k)
            if not _eq32(old1, d) and (p == NULL or not _eq32(old1, p)):
                self._remove(old1, k)
            if had2 and not _eq32(old2, d) and (p == NULL or not _eq32(old2, p)):
                self._remove(old2, k)
            self._ensure_findable(k)
            self.arena._ext_free(old_off, old_len)
        self._maybe_rebuild()

    def rotate(self, key_index, bytes new_digest not None, grace_until_ms):
        """New digest for a live key; the old one stays valid while now_ms < grace_until_ms (0: not at all)."""
        FG_CROSS(X_KEYTABLE_ROTATE)
        self.arena._require_writer()
        cdef uint64_t k = self._k(key_index)
        cdef Record *r = &self.records[k]
        if not (r.flags & F_LIVE):
            raise CoreError(f"key index {key_index} is not in use")
        _py._check_digest(new_digest)
        cdef int64_t c_gr = _py._check_i64("grace_until_ms", grace_until_ms)
        cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(new_digest)
        cdef int64_t other = self._find(d, NULL)
        if other >= 0:
            raise CoreError(f"digest already belongs to key index {other}")
        cdef uint8_t old1[32]
        cdef uint8_t old2[32]
        cdef bint had2 = r.grace_until_ms != 0
        memcpy(old1, r.digest, 32)
        memcpy(old2, r.digest2, 32)
        self._insert(d, k)
        self._begin(k)
        memcpy(r.digest, d, 32)
        if c_gr > 0:
            memcpy(r.digest2, old1, 32)
            fg_store64_rlx(<uint64_t *>&r.grace_until_ms, <uint64_t>c_gr)
        else:
            memset(r.digest2, 0, 32)
            fg_store64_rlx(<uint64_t *>&r.grace_until_ms, 0)
        fg_store64_rlx(&r.gen, r.gen + 1)
        self._end(k)
        if had2:
            self._remove(old2, k)
        if c_gr <= 0:
            self._remove(old1, k)
        self._ensure_findable(k)
        self._maybe_rebuild()

    cdef bint _set_flags(self, key_index, uint32_t setm, uint32_t clearm) except -1:
        self.arena._require_writer()
        cdef uint64_t k = self._k(key_index)
        cdef Record *r = &self.records[k]
        if not (r.flags & F_LIVE):
            return False
        self._begin(k)
        fg_store32_rlx(&r.flags, (r.flags | setm) & ~clearm)
        fg_store64_rlx(&r.gen, r.gen + 1)
        self._end(k)
        return True

    def revoke(self, key_index):
        """Every worker sees KEY_REVOKED from its next lookup on. False if the index is free."""
        FG_CROSS(X_KEYTABLE_REVOKE)
        return self._set_flags(key_index, F_REVOKED, 0)

    def set_disabled(self, key_index, disabled):
        FG_CROSS(X_KEYTABLE_SET_DISABLED)
        return self._set_flags(key_index, F_DISABLED if disabled else 0, 0 if disabled else F_DISABLED)

    def delete(self, key_index):
        FG_CROSS(X_KEYTABLE_DELETE)
        self.arena._require_writer()
        cdef uint64_t k = self._k(key_index)
        cdef Record *r = &self.records[k]
        if not (r.flags & F_LIVE):
            return False
        cdef bint had2 = r.grace_until_ms != 0
        cdef uint64_t old_off = r.ext_off, old_len = r.ext_len
        cdef uint8_t old1[32]
        cdef uint8_t old2[32]
        memcpy(old1, r.digest, 32)
        memcpy(old2, r.digest2, 32)
        # one section: the record stops being live; its slots and extension
        # block are released only after it, so a reader that saw it live
        # either finished first or fails its seq re-check
        self._begin(k)
        fg_store32_rlx(&r.flags, 0)
        fg_store64_rlx(&r.ext_off, 0)
        fg_store32_rlx(&r.ext_len, 0)
        fg_store64_rlx(<uint64_t *>&r.grace_until_ms, 0)
        fg_store64_rlx(&r.gen, r.gen + 1)
        self._end(k)
        self._remove(old1, k)
        if had2:
            self._remove(old2, k)
        self.arena._ext_free(old_off, old_len)
        self.hdr.live_keys -= 1
        self._maybe_rebuild()
        return True

    def sweep(self, int64_t now_ms):
        """Forget rotated-out digests whose grace has ended; returns how many."""
        FG_CROSS(X_KEYTABLE_SWEEP)
        self.arena._require_writer()
        cdef uint64_t k
        cdef Record *r
        cdef uint8_t old2[32]
        cdef int n = 0
        for k in range(self.cap):
            r = &self.records[k]
            if (r.flags & F_LIVE) and r.grace_until_ms != 0 and now_ms >= r.grace_until_ms:
                memcpy(old2, r.digest2, 32)
                self._begin(k)
                fg_store64_rlx(<uint64_t *>&r.grace_until_ms, 0)
                memset(r.digest2, 0, 32)
                fg_store64_rlx(&r.gen, r.gen + 1)
                self._end(k)
                self._remove(old2, k)
                self._ensure_findable(k)
                n += 1
        self._maybe_rebuild()
        return n

    # ---------------------------------------------------------- readers (cold)

    cdef int _snapshot(self, uint64_t k, Record *out) except -1:
        cdef Record *r = &self.records[k]
        cdef uint32_t s1
        cdef int64_t deadline = fg_mono_ns() + SNAP_WAIT_NS
        while True:
            s1 = fg_load32_acq(&r.seq)
            if not (s1 & 1):
                memcpy(out, r, sizeof(Record))
                fg_fence_acq()
                if fg_load32_rlx(&r.seq) == s1:
                    return 0
            if fg_mono_ns() > deadline:
                raise CoreError(f"key record {k} stayed locked by the writer (writer died mid-write?)")
            fg_cpu_relax()

    cdef object _ext_copy(self, uint64_t k):
        """(record snapshot fields, bytes of its extension), consistent with each other."""
        cdef Record *r = &self.records[k]
        cdef Record snap
        cdef uint32_t s1
        cdef int64_t deadline = fg_mono_ns() + SNAP_WAIT_NS
        cdef bytes blob
        while True:
            s1 = fg_load32_acq(&r.seq)
            if not (s1 & 1):
                memcpy(&snap, r, sizeof(Record))
                if snap.ext_off != 0 and snap.ext_off <= self.ext_bytes and snap.ext_len <= self.ext_bytes - snap.ext_off:
                    blob = PyBytes_FromStringAndSize(<char *>(self.ext + snap.ext_off), snap.ext_len)
                else:
                    blob = b""
                fg_fence_acq()
                if fg_load32_rlx(&r.seq) == s1:
                    return snap, blob
            if fg_mono_ns() > deadline:
                raise CoreError(f"key record {k} stayed locked by the writer (writer died mid-write?)")
            fg_cpu_relax()

    def info(self, key_index):
        FG_CROSS(X_KEYTABLE_INFO)
        cdef uint64_t k = self._k(key_index)
        snap, blob = self._ext_copy(k)
        if not (snap["flags"] & F_LIVE):
            return None
        n_scopes, limits = 0, [0] * N_WIN
        if blob:
            n_scopes = int.from_bytes(blob[4:8], "little")
            limits = [int.from_bytes(blob[32 + 4 * i:36 + 4 * i], "little") for i in range(N_WIN)]
        return dict(
            index=key_index, flags=snap["flags"] & ~F_LIVE, plan_id=snap["plan_id"],
            not_before_ms=snap["not_before_ms"], expires_ms=snap["expires_ms"],
            grace_until_ms=snap["grace_until_ms"], has_old_digest=snap["grace_until_ms"] != 0,
            n_scopes=n_scopes, limits=limits, generation=snap["gen"],
        )

    def meta(self, key_index):
        FG_CROSS(X_KEYTABLE_META)
        cdef uint64_t k = self._k(key_index)
        snap, blob = self._ext_copy(k)
        if not (snap["flags"] & F_LIVE) or not blob:
            return b""
        mlen = int.from_bytes(blob[24:28], "little")
        total = int.from_bytes(blob[0:4], "little")
        return blob[total - mlen:total]

    def generation(self, key_index):
        FG_CROSS(X_KEYTABLE_GENERATION)
        cdef Record snap
        self._snapshot(self._k(key_index), &snap)
        return snap.gen if snap.flags & F_LIVE else 0

    cdef int _load_limits(self, uint64_t k, uint32_t *out) except -1:
        cdef uint64_t i
        memset(out, 0, 4 * N_WIN)
        if k >= self.cap:
            return 0
        snap, blob = self._ext_copy(k)
        if (snap["flags"] & F_LIVE) and blob:
            for i in range(N_WIN):
                out[i] = int.from_bytes(blob[32 + 4 * i:36 + 4 * i], "little")
        return 0

    def probes(self, bytes digest not None):
        """Slots a lookup of digest visits in the live area (cold; for tests and tools)."""
        FG_CROSS(X_KEYTABLE_PROBES)
        if PyBytes_GET_SIZE(digest) != 32:
            raise CoreError("expected a 32-byte digest")
        cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(digest)
        cdef uint64_t *slots = self.arena._slots()
        cdef uint64_t h = _le64(d), i = h & self.slot_mask, v, ref, n
        for n in range(self.nslots):
            v = fg_load64_acq(&slots[i])
            if v == SLOT_EMPTY:
                return n + 1
            ref = v & LO32
            if ref != SLOT_TOMB and (v >> 32) == (h >> 32) and ref - 1 < self.cap and \
                    _eq32(d, self.records[ref - 1].digest):
                return n + 1
            i = (i + 1) & self.slot_mask
        return self.nslots

    def __len__(self):
        FG_CROSS(X_KEYTABLE_LEN)
        return self.hdr.live_keys

    def stats(self):
        FG_CROSS(X_KEYTABLE_STATS)
        return dict(capacity=self.cap, live=self.hdr.live_keys, digests=self.hdr.digests,
                    slots=self.nslots, tombstones=self.hdr.tombstones, rebuilds=self.hdr.rebuilds,
                    ext_used=self.hdr.ext_bump, ext_bytes=self.ext_bytes)

    def indexes_by_meta(self, prefixes):
        """{prefix: key index} for the live records whose meta (put(meta=...)) begins
        with one of prefixes (bytes); a prefix no record has is left out. One pass
        over the records (cold: for catching up after a snapshot, where a key's id
        is all that is left of a deleted key). Writer only."""
        FG_CROSS(X_KEYTABLE_INDEXES_BY_META)
        self.arena._require_writer()
        want = set()
        for x in prefixes:
            if not isinstance(x, bytes) or not x:
                raise CoreError(f"meta prefixes must be non-empty bytes, found {x!r}")
            want.add(x)
        out = {}
        if not want:
            return out
        lens = sorted({len(x) for x in want})
        cdef uint64_t k, total, mlen
        cdef Record *r
        cdef const uint8_t *b
        cdef Py_ssize_t L
        for k in range(self.cap):
            r = &self.records[k]
            if not (r.flags & F_LIVE) or r.ext_off == 0 or r.ext_off > self.ext_bytes or \
                    r.ext_len > self.ext_bytes - r.ext_off or r.ext_len < EXT_HEADER:
                continue
            b = self.ext + r.ext_off
            total = (<const uint32_t *>b)[0]
            mlen = (<const uint32_t *>b)[6]
            if total > r.ext_len or mlen > total or mlen == 0:
                continue
            for L in lens:
                if <uint64_t>L > mlen:
                    break
                pb = PyBytes_FromStringAndSize(<const char *>(b + total - mlen), L)
                if pb in want:
                    out[pb] = <int64_t>k
        return out


cdef inline int64_t _ext_eval(const uint8_t *b, uint64_t blen, int mbit, const uint8_t *pp, Py_ssize_t pn,
                              int pv, uint32_t p4, uint64_t ph, uint64_t pl, uint32_t *lim) noexcept nogil:
    # Reads a block that the writer may be recycling right now. Every count
    # and offset that bounds a memory access is loaded exactly once (relaxed
    # atomic loads: the compiler may not re-read them after the check) and
    # checked so torn data can only produce a wrong answer, which the
    # caller's seq check then throws away.
    cdef const uint32_t *H = <const uint32_t *>b
    cdef uint64_t total = fg_load32_rlx(H), ns = fg_load32_rlx(H + 1), a4 = fg_load32_rlx(H + 2)
    cdef uint64_t a6 = fg_load32_rlx(H + 3), d4 = fg_load32_rlx(H + 4), d6 = fg_load32_rlx(H + 5)
    cdef uint64_t fixed, i, plen, poff, ent
    cdef const uint8_t *s
    cdef const uint32_t *r4
    cdef const uint64_t *r6
    cdef bint ok
    cdef uint16_t methods
    cdef uint8_t kind
    if total > blen:
        return C_KEY_BUSY
    # each term is a u32 count times a small constant: the sum cannot wrap
    fixed = EXT_HEADER + 8 * ns + 8 * (a4 + d4) + 32 * (a6 + d6)
    if fixed > total:
        return C_KEY_BUSY
    for i in range(N_WIN):
        lim[i] = fg_load32_rlx(H + 8 + i)
    if ns:
        ok = False
        s = b + EXT_HEADER
        for i in range(ns):
            # one 8-byte load per scope entry: u16 methods, u8 kind, u8 0, u16 len, u16 off
            ent = fg_load64_rlx(<const uint64_t *>(s + 8 * i))
            methods = <uint16_t>(ent & 0xFFFF)
            kind = <uint8_t>((ent >> 16) & 0xFF)
            plen = (ent >> 32) & 0xFFFF
            poff = ent >> 48
            if poff + plen > total:
                return C_KEY_BUSY
            if not (methods & mbit) or <uint64_t>pn < plen:
                continue
            if plen and memcmp(pp, b + poff, plen):
                continue
            if kind == 0:
                ok = <uint64_t>pn == plen
            elif kind == 2:
                ok = True
            else:
                ok = <uint64_t>pn == plen or pp[plen] == 0x2F
            if ok:
                break
        if not ok:
            return C_SCOPE_DENIED
    if a4 | a6 | d4 | d6:
        r4 = <const uint32_t *>(b + EXT_HEADER + 8 * ns)
        r6 = <const uint64_t *>(b + EXT_HEADER + 8 * ns + 8 * (a4 + d4))
        if pv == 4:
            if d4 and _in4(r4 + 2 * a4, <uint32_t>d4, p4):
                return C_KEY_IP_DENIED
            if (a4 | a6) and not (a4 and _in4(r4, <uint32_t>a4, p4)):
                return C_KEY_IP_DENIED
        elif pv == 6:
            if d6 and _in6(r6 + 4 * a6, <uint32_t>d6, ph, pl):
                return C_KEY_IP_DENIED
            if (a4 | a6) and not (a6 and _in6(r6, <uint32_t>a6, ph, pl)):
                return C_KEY_IP_DENIED
        else:
            # unknown client address (b"": e.g. an unparseable forwarded
            # address) and any per-key rule at all: deny, as the global IP
            # rules do -- a deny list must not be escaped by hiding the address
            return C_KEY_IP_DENIED
    return 0


# ------------------------------------------------------------------ rate table

cdef inline int64_t _days_from_civil(int64_t y, int64_t m) noexcept nogil:
    # H. Hinnant's days_from_civil, day 1 of month m
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468

cdef inline void _civil(int64_t z, int64_t *y, int64_t *m) noexcept nogil:
    cdef int64_t era, doe, yoe, doy, mp
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    m[0] = mp + 3 if mp < 10 else mp - 9
    y[0] = yoe + era * 400 + (1 if m[0] <= 2 else 0)

cdef int64_t _WIN_MS[4]
_WIN_MS[0] = 1000
_WIN_MS[1] = 60000
_WIN_MS[2] = 3600000
_WIN_MS[3] = 86400000

cdef inline void _bounds(int w, int64_t now, int64_t *ep, int64_t *start, int64_t *W, int64_t *W2) noexcept nogil:
    cdef int64_t y, m, s, ns, nns
    if w < 4:
        W[0] = _WIN_MS[w]
        W2[0] = W[0]
        ep[0] = now // W[0]
        start[0] = ep[0] * W[0]
        return
    _civil(now // 86400000, &y, &m)
    s = _days_from_civil(y, m)
    ns = _days_from_civil(y + (m == 12), 1 if m == 12 else m + 1)
    nns = _days_from_civil(y + (m >= 11), (m + 2 - 12) if m >= 11 else m + 2)
    ep[0] = y * 12 + m - 1
    start[0] = s * 86400000
    W[0] = (ns - s) * 86400000
    W2[0] = (nns - ns) * 86400000

cdef inline uint64_t _retry(uint64_t L, uint64_t c, uint64_t prev, uint64_t curr, uint64_t W, uint64_t W2,
                            uint64_t t) noexcept nogil:
    # mirrors _core_py.retry_after
    if c > L:
        return W - t
    if curr + c <= L:
        return W - ((L - curr - c) * W) // prev - t
    return (W - t) + W2 - ((L - c) * W2) // curr




cdef inline void _epochs(int64_t now, uint32_t *ep) noexcept nogil:
    cdef int64_t e, start, W, W2
    cdef int w
    for w in range(N_WIN):
        _bounds(w, now, &e, &start, &W, &W2)
        ep[w] = <uint32_t>e

cdef inline bint _expired(RateEntry *e, const uint32_t *ep) noexcept nogil:
    # mirrors _core_py.entry_expired: no bucket can count any more (each is
    # empty or >= 2 windows old; a bucket "from the future", written by a
    # process whose clock is ahead, counts as live)
    cdef int w, j
    cdef uint64_t v
    cdef uint32_t d
    for w in range(N_WIN):
        for j in range(2):
            v = fg_load64_acq(&e.b[2 * w + j])
            if v & LO32:
                d = ep[w] - <uint32_t>(v >> 32)
                if d < 2 or (d & <uint32_t>0x80000000):
                    return False
    return True


@cython.final
cdef class Admission:
    """What RateTable.admit() decided, filled in place: make one per worker and
    pass it to every admit() (no allocation per request).

    index           key index >= 0 if the key passed steps 5-6 (also when it is
                    then rate-limited), else its negative code (== the status)
    generation      the record's generation, read in the same snapshot as the
                    checks (what generation(index) returns); 0 if the key failed
    plan_id         the record's plan_id; 0 if the key failed
    policy          the policy whose windows the key's own limits replaced
                    (RateTable.set_plans); -1: none, or the key failed
    rate            the rate step as hit_key() answers it: remaining >= 0,
                    RATE_LIMITED or UNLIMITED; the key's code if it failed
    limit, remaining, reset_ms, retry_after_ms
                    as RateTable's fields after hit_key(); 0 if the key failed
    """

    cdef int64_t _index
    cdef uint64_t _generation
    cdef int64_t _plan_id
    cdef int64_t _policy
    cdef int64_t _rate
    cdef int64_t _limit
    cdef int64_t _remaining
    cdef int64_t _reset_ms
    cdef int64_t _retry_after_ms

    def __cinit__(self):
        self._failed(C_NO_SUCH_KEY)

    cdef inline void _failed(self, int64_t code) noexcept:
        self._index = code
        self._rate = code
        self._generation = 0
        self._plan_id = 0
        self._policy = -1
        self._limit = 0
        self._remaining = 0
        self._reset_ms = 0
        self._retry_after_ms = 0

    @property
    def index(self):
        FG_CROSS(X_ADMISSION_INDEX)
        return self._index

    @property
    def generation(self):
        FG_CROSS(X_ADMISSION_GENERATION)
        return self._generation

    @property
    def plan_id(self):
        FG_CROSS(X_ADMISSION_PLAN_ID)
        return self._plan_id

    @property
    def policy(self):
        FG_CROSS(X_ADMISSION_POLICY)
        return self._policy

    @property
    def rate(self):
        FG_CROSS(X_ADMISSION_RATE)
        return self._rate

    @property
    def limit(self):
        FG_CROSS(X_ADMISSION_LIMIT)
        return self._limit

    @property
    def remaining(self):
        FG_CROSS(X_ADMISSION_REMAINING)
        return self._remaining

    @property
    def reset_ms(self):
        FG_CROSS(X_ADMISSION_RESET_MS)
        return self._reset_ms

    @property
    def retry_after_ms(self):
        FG_CROSS(X_ADMISSION_RETRY_AFTER_MS)
        return self._retry_after_ms

    def __repr__(self):
        return (f"Admission(index={self._index}, generation={self._generation}, plan_id={self._plan_id}, "
                f"policy={self._policy}, rate={self._rate}, limit={self._limit}, remaining={self._remaining}, "
                f"reset_ms={self._reset_ms}, retry_after_ms={self._retry_after_ms})")


@cython.final
cdef class RateTable:
    """Sliding-window counters in the arena, shared by every process.

    Estimate per window: ceil(prev * (W - t) / W) + curr, with prev/curr the
    previous and current aligned windows and t the time into the current one.

    Three regions (see _core_py.RateTable): hit_key() counts in the key's own
    entry (indexed by key index: never full, placement not attacker-chosen);
    hit() counts address subjects in a hashed region placed by SipHash-2-4
    under the arena's secret salt, reusing expired entries, and when a
    256-entry probe window has none: "refuse" policies return
    RATE_TABLE_FULL, "evict" policies (own region) take over the stalest.

    admit() is a keyed request's steps 5-7 in one crossing: check_key, then
    hit_key under the policy that a worker-local C table (set_plans) gives
    the record's plan_id, with the result written into a reused Admission.
    """

    cdef Arena arena
    cdef RateEntry *krates
    cdef uint64_t kcap
    cdef RateEntry *reg[2]
    cdef uint64_t mask[2]
    cdef uint64_t probes[2]
    cdef uint64_t *used[2]
    cdef uint64_t k0
    cdef uint64_t k1
    cdef uint64_t *pol_ns
    cdef uint32_t *pol_lim
    cdef uint8_t *pol_mode
    cdef Py_ssize_t npol
    # plan_id -> policy id (set_plans): open addressing, plan_id 0 marks an
    # empty slot; plan_mask + 1 slots (a power of two, at least twice the
    # plans, so every probe chain ends at an empty slot)
    cdef uint32_t *plan_ids
    cdef int32_t *plan_pols
    cdef uint32_t plan_mask
    cdef int64_t plan_fallback
    # the last hit (see the properties below)
    cdef int64_t r_limit
    cdef int64_t r_remaining
    cdef int64_t r_reset_ms
    cdef int64_t r_retry_after_ms

    def __cinit__(self):
        self.pol_ns = NULL
        self.pol_lim = NULL
        self.pol_mode = NULL
        self.npol = 0
        self.plan_ids = NULL
        self.plan_pols = NULL
        self.plan_mask = 0
        self.plan_fallback = -1

    def __dealloc__(self):
        free(self.pol_ns)
        free(self.pol_lim)
        free(self.pol_mode)
        free(self.plan_ids)
        free(self.plan_pols)

    def __init__(self, Arena arena not None):
        self.arena = arena
        self.krates = arena.krates
        self.kcap = arena.key_cap
        self.reg[MODE_REFUSE] = arena.rates
        self.mask[MODE_REFUSE] = arena.rate_mask
        self.probes[MODE_REFUSE] = min(arena.rate_cap, RATE_PROBES)
        self.used[MODE_REFUSE] = &arena.hdr.rate_used
        self.reg[MODE_EVICT] = arena.auths
        self.mask[MODE_EVICT] = arena.auth_mask
        self.probes[MODE_EVICT] = min(arena.auth_cap, RATE_PROBES)
        self.used[MODE_EVICT] = &arena.hdr.auth_used
        self.k0 = arena.hdr.salt[0]
        self.k1 = arena.hdr.salt[1]
        self.plan_ids = <uint32_t *>calloc(1, sizeof(uint32_t))
        self.plan_pols = <int32_t *>calloc(1, sizeof(int32_t))
        if self.plan_ids == NULL or self.plan_pols == NULL:
            raise MemoryError()

    @property
    def limit(self):
        """Of the last hit: the binding window's limit."""
        FG_CROSS(X_RATETABLE_LIMIT)
        return self.r_limit

    @property
    def remaining(self):
        """Of the last hit: requests left in that window after it (0 when refused)."""
        FG_CROSS(X_RATETABLE_REMAINING)
        return self.r_remaining

    @property
    def reset_ms(self):
        """Of the last hit: ms until that window ends."""
        FG_CROSS(X_RATETABLE_RESET_MS)
        return self.r_reset_ms

    @property
    def retry_after_ms(self):
        """Of the last hit, when refused: ms until it would be admitted; else 0."""
        FG_CROSS(X_RATETABLE_RETRY_AFTER_MS)
        return self.r_retry_after_ms

    def policy(self, name, limits, where="limits", *, on_full="refuse"):
        """Compile limits like ["10/second", "1000/day"]; returns a worker-local policy id.

        Counters are keyed by (name, subject), so every worker that compiles the
        same name shares them, whatever order policies are defined in.
        on_full (hit() only; hit_key() is never full): "refuse" -- ip_limits:
        fail closed with RATE_TABLE_FULL; "evict" -- failed-auth throttling, in
        a region of its own: the stalest entry of the probe window is taken.
        """
        FG_CROSS(X_RATETABLE_POLICY)
        if not isinstance(name, str) or not name:
            raise CoreError(f"policy name must be a non-empty string, found {name!r}")
        if on_full not in _py.ON_FULL:
            raise CoreError(f"on_full must be 'refuse' or 'evict', found {on_full!r}")
        li = _py.compile_limits(limits, where)
        cdef uint64_t *ns = <uint64_t *>realloc(self.pol_ns, 8 * (self.npol + 1))
        if ns == NULL:
            raise MemoryError()
        self.pol_ns = ns
        cdef uint32_t *pl = <uint32_t *>realloc(self.pol_lim, 4 * N_WIN * (self.npol + 1))
        if pl == NULL:
            raise MemoryError()
        self.pol_lim = pl
        cdef uint8_t *pm = <uint8_t *>realloc(self.pol_mode, self.npol + 1)
        if pm == NULL:
            raise MemoryError()
        self.pol_mode = pm
        self.pol_ns[self.npol] = _py.name_hash(name)
        self.pol_mode[self.npol] = _py.ON_FULL.index(on_full)
        for i in range(N_WIN):
            self.pol_lim[N_WIN * self.npol + i] = li[i]
        self.npol += 1
        return self.npol - 1

    def set_plans(self, plans, where="plans"):
        """Install which policy admit() applies to a key, by the record's plan_id:
        plans maps plan names (plan_id(name) is what the record carries) to policy
        ids of this table; "" names the fallback for keys without a plan or with
        a plan not listed (absent: their own limits only). Replaces the previous
        table; call once per config. CoreError on a bad id or two names with one
        plan id."""
        FG_CROSS(X_RATETABLE_SET_PLANS)
        table, fallback = _py.compile_plans(plans, self.npol, where)
        cdef uint32_t size = 4, i, pid
        while size < 2 * len(table) + 1:
            size <<= 1
        cdef uint32_t *ids = <uint32_t *>calloc(size, sizeof(uint32_t))
        cdef int32_t *pols = <int32_t *>calloc(size, sizeof(int32_t))
        if ids == NULL or pols == NULL:
            free(ids)
            free(pols)
            raise MemoryError()
        for plan, pol in table.items():
            pid = plan
            i = pid & (size - 1)
            while ids[i] != 0:
                i = (i + 1) & (size - 1)
            ids[i] = pid
            pols[i] = pol
        free(self.plan_ids)
        free(self.plan_pols)
        self.plan_ids = ids
        self.plan_pols = pols
        self.plan_mask = size - 1
        self.plan_fallback = fallback

    cdef inline int64_t _plan_policy(self, uint32_t plan) noexcept:
        cdef uint32_t i = plan & self.plan_mask, v
        if plan == 0:
            return self.plan_fallback
        while True:
            v = self.plan_ids[i]
            if v == plan:
                return self.plan_pols[i]
            if v == 0:
                return self.plan_fallback
            i = (i + 1) & self.plan_mask

    cdef int _pid(self, int64_t policy_id) except -1:
        if policy_id < 0 or policy_id >= self.npol:
            raise CoreError(f"unknown rate policy id {policy_id}")
        return 0

    def hit(self, int64_t policy_id, uint64_t subject, int64_t now_ms, uint32_t cost=1):
        """Count one request of an address subject (see addr_subject); remaining >= 0 if
        admitted, RATE_LIMITED, or RATE_TABLE_FULL (only for "refuse" policies)."""
        FG_CROSS(X_RATETABLE_HIT)
        self._pid(policy_id)
        cdef const uint32_t *lim = &self.pol_lim[N_WIN * policy_id]
        if not _any(lim):
            return self._unlimited()
        cdef int mode = self.pol_mode[policy_id]
        # keyed PRF of (policy, subject): without the salt nobody can tell
        # which subjects share a probe window, so none can be made to collide
        cdef uint64_t key = fg_sip24_2w(self.k0, self.k1, self.pol_ns[policy_id], subject)
        cdef RateEntry *e
        cdef int64_t r = RETRY
        cdef int tries
        if key == 0:
            key = 1
        for tries in range(OWNER_RETRIES):
            e = self._entry(mode, key, now_ms)
            if e == NULL:
                self.r_limit = 0
                self.r_remaining = 0
                self.r_reset_ms = 0
                self.r_retry_after_ms = 1000
                return C_RATE_TABLE_FULL
            if fg_load64_rlx(&e.touched) != <uint64_t>now_ms:
                fg_store64_rlx(&e.touched, <uint64_t>now_ms)
            r = self._count(e, lim, now_ms, cost, key)
            if r != RETRY:
                return r
        # reclaimed under us every time: count where we are (errs towards refusing)
        return self._count(e, lim, now_ms, cost, 0)

    def hit_key(self, int64_t policy_id, KeyTable keys not None, int64_t key_index, int64_t now_ms, uint32_t cost=1):
        """hit() for a key, in the key's own entry: the key's own limits replace the
        policy's, window by window. Never RATE_TABLE_FULL."""
        FG_CROSS(X_RATETABLE_HIT_KEY)
        cdef uint32_t own[N_WIN]
        self._pid(policy_id)
        if key_index < 0 or <uint64_t>key_index >= self.kcap:
            raise CoreError(f"key index must be 0..{self.kcap - 1}, found {key_index}")
        if keys.last_index == key_index:
            memcpy(own, keys.last_limits, sizeof(own))
        else:
            keys._load_limits(<uint64_t>key_index, own)
        return self._hit_key(policy_id, own, <uint64_t>key_index, now_ms, cost)

    cdef inline int64_t _hit_key(self, int64_t policy_id, const uint32_t *own, uint64_t k, int64_t now,
                                 uint32_t cost) noexcept:
        # policy_id: a valid id, or -1 for none (the key's own limits only)
        cdef uint32_t merged[N_WIN]
        cdef int i
        if policy_id < 0:
            memcpy(merged, own, sizeof(merged))
        else:
            for i in range(N_WIN):
                merged[i] = own[i] if own[i] else self.pol_lim[N_WIN * policy_id + i]
        if not _any(merged):
            return self._unlimited()
        return self._count(&self.krates[k], merged, now, cost, 0)

    def admit(self, KeyTable keys not None, bytes key not None, int method_bit, bytes path not None,
              bytes peer not None, int64_t now_ms, Admission out not None, uint32_t cost=1):
        """Steps 5-7 in one call: check_key() (shape, checksum, digest, lookup,
        validity, scope, per-key CIDRs), then hit_key() under the policy that
        set_plans() gives the record's plan_id. Fills out (see Admission) and
        leaves this table's limit/remaining/... as hit_key() would. Returns the
        key index >= 0 if admitted, else the key's negative code or RATE_LIMITED."""
        FG_CROSS(X_RATETABLE_ADMIT)
        cdef int64_t r = keys._check_key(key, method_bit, path, peer, now_ms), pol
        if r < 0:
            out._failed(r)
            return r
        pol = self._plan_policy(<uint32_t>keys._last_plan)
        cdef int64_t rate = self._hit_key(pol, keys.last_limits, <uint64_t>r, now_ms, cost)
        out._index = r
        out._generation = keys.last_gen
        out._plan_id = keys._last_plan
        out._policy = pol
        out._rate = rate
        out._limit = self.r_limit
        out._remaining = self.r_remaining
        out._reset_ms = self.r_reset_ms
        out._retry_after_ms = self.r_retry_after_ms
        return C_RATE_LIMITED if rate == C_RATE_LIMITED else r

    cdef int64_t _unlimited(self) noexcept:
        self.r_limit = C_UNLIMITED
        self.r_remaining = C_UNLIMITED
        self.r_reset_ms = 0
        self.r_retry_after_ms = 0
        return C_UNLIMITED

    cdef RateEntry *_entry(self, int mode, uint64_t key, int64_t now) noexcept:
        """The entry of key in region mode: found, or claimed (empty, expired, or --
        evict mode -- the stalest in the probe window); NULL when a refuse-mode
        window has no room."""
        cdef RateEntry *ents = self.reg[mode]
        cdef uint64_t mask = self.mask[mode], n, cur, exp, i
        cdef uint64_t cand = ALL64, cand_val = 0, stale = ALL64, stale_val = 0, stale_t = ALL64, t
        cdef uint32_t ep[N_WIN]
        cdef bint have_ep = False, evicting
        cdef RateEntry *e
        cdef int tries, j
        for tries in range(OWNER_RETRIES):
            i = key & mask
            cand = ALL64
            stale = ALL64
            stale_t = ALL64
            for n in range(self.probes[mode]):
                e = &ents[i]
                # acquire: pairs with the CAS that claimed the entry
                cur = fg_load64_acq(&e.key)
                if cur == key:
                    return e
                if cur == 0:
                    # entries never return to empty, so key is not further on
                    if cand == ALL64:
                        cand = i
                        cand_val = 0
                    break
                if cand == ALL64:
                    if not have_ep:
                        _epochs(now, ep)
                        have_ep = True
                    if _expired(e, ep):
                        cand = i
                        cand_val = cur
                    elif mode == MODE_EVICT:
                        t = fg_load64_rlx(&e.touched)
                        if t < stale_t:
                            stale, stale_val, stale_t = i, cur, t
                i = (i + 1) & mask
            evicting = False
            if cand == ALL64:
                if mode == MODE_REFUSE or stale == ALL64:
                    return NULL
                cand, cand_val, evicting = stale, stale_val, True
            e = &ents[cand]
            exp = cand_val
            # claim by CAS from exactly what we judged (empty, expired or
            # stalest): if anyone changed the entry meanwhile, look again
            if fg_cas64(&e.key, &exp, key):
                if cand_val == 0:
                    fg_add64(self.used[mode], 1)
                elif evicting:
                    # the victim's counts are live: clear them for the new owner
                    # (a hit of either subject racing this may be lost: at most
                    # one per process, and only at an eviction)
                    for j in range(2 * N_WIN):
                        fg_store64_rlx(&e.b[j], 0)
                    fg_add64(&self.arena.hdr.evicted, 1)
                else:
                    # expired buckets already read as zero: nothing to clear
                    fg_add64(&self.arena.hdr.reclaimed, 1)
                return e
            if exp == key:
                return e     # another process claimed it for the same subject
        return NULL

    cdef int64_t _count(self, RateEntry *e, const uint32_t *lim, int64_t now, uint32_t cost, uint64_t owner) noexcept:
        cdef int w, j
        cdef int64_t ep, start, W, W2, t
        cdef uint32_t ep32, ce
        cdef uint64_t L, pv, cv, nv, prev, curr, pw, rem
        cdef uint64_t *cur
        cdef uint64_t written[N_WIN]
        cdef uint64_t *slot[N_WIN]
        cdef int done = 0
        cdef uint64_t best_rem = ALL64, best_lim = 0
        cdef int64_t best_reset = 0
        for w in range(N_WIN):
            L = lim[w]
            if L == 0:
                continue
            _bounds(w, now, &ep, &start, &W, &W2)
            t = now - start
            ep32 = <uint32_t>ep
            cur = &e.b[2 * w + (ep32 & 1)]
            # acquire loads: other processes CAS these words concurrently
            pv = fg_load64_acq(&e.b[2 * w + ((ep32 & 1) ^ 1)])
            prev = (pv & LO32) if <uint32_t>(pv >> 32) == <uint32_t>(ep32 - 1) else 0
            pw = (prev * <uint64_t>(W - t) + <uint64_t>W - 1) // <uint64_t>W
            cv = fg_load64_acq(cur)
            while True:
                ce = <uint32_t>(cv >> 32)
                if <uint32_t>(ce - ep32) < 0x80000000:
                    curr = cv & LO32
                else:
                    curr = 0
                    ce = ep32
                if curr + cost + pw > L:
                    # refused: give back what earlier windows took, so a hit
                    # is all-or-nothing (others may see the transient count and
                    # refuse too: errs towards refusing, never over-admits)
                    for j in range(w):
                        if done & (1 << j):
                            _undo(slot[j], written[j], cost)
                    self.r_limit = <int64_t>L
                    self.r_remaining = 0
                    self.r_reset_ms = W - t
                    self.r_retry_after_ms = <int64_t>_retry(L, cost, prev, curr, <uint64_t>W, <uint64_t>W2, <uint64_t>t)
                    return C_RATE_LIMITED
                nv = (<uint64_t>ce << 32) | (curr + cost)
                # CAS: the check above and this add are one atomic step, so
                # concurrent hits can never push the count past the limit
                if fg_cas64(cur, &cv, nv):
                    break
            written[w] = nv
            slot[w] = cur
            done |= 1 << w
            rem = L - (curr + cost + pw)
            if rem < best_rem:
                best_rem = rem
                best_lim = L
                best_reset = W - t
        if owner != 0 and fg_load64_acq(&e.key) != owner:
            # the entry went to another subject while we counted (it had
            # expired, or was evicted): take our counts back and look again
            for j in range(N_WIN):
                if done & (1 << j):
                    _undo(slot[j], written[j], cost)
            return RETRY
        self.r_limit = <int64_t>best_lim
        self.r_remaining = <int64_t>best_rem
        self.r_reset_ms = best_reset
        self.r_retry_after_ms = 0
        return <int64_t>best_rem

    def stats(self):
        FG_CROSS(X_RATETABLE_STATS)
        h = self.arena.hdr
        return dict(capacity=self.arena.rate_cap, used=h.rate_used, auth_capacity=self.arena.auth_cap,
                    auth_used=h.auth_used, key_capacity=self.kcap, reclaimed=h.reclaimed, evicted=h.evicted)


cdef inline bint _any(const uint32_t *lim) noexcept nogil:
    return (lim[0] | lim[1] | lim[2] | lim[3] | lim[4]) != 0


def addr_subject(bytes packed not None, int v6_prefix=64):
    """Rate subject of a packed client address; mirrors _core_py.addr_subject."""
    FG_CROSS(X_ADDR_SUBJECT)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(packed)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(packed)
    cdef uint32_t v4 = 0
    cdef uint64_t hi = 0, lo = 0
    if v6_prefix < 1 or v6_prefix > 64:
        raise CoreError(f"v6_prefix must be 1..64, found {v6_prefix!r}")
    cdef int v = _peer(p, n, &v4, &hi, &lo)
    if v == 4:
        return 0xFFFFFFFF00000000ULL | v4
    if v == 6:
        if v6_prefix == 64:
            return hi
        return hi & ~((1ULL << (64 - v6_prefix)) - 1)
    return 0xFFFFFFFE00000000ULL


cdef inline void _undo(uint64_t *p, uint64_t written, uint32_t cost) noexcept nogil:
    cdef uint64_t v = fg_load64_acq(p)
    # CAS loop: only take back from the same epoch we added to; if the bucket
    # has rolled over, our count went with it
    while (v >> 32) == (written >> 32) and (v & LO32) >= cost:
        if fg_cas64(p, &v, v - cost):
            return
