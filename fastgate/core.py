"""Facade over the core: the only module that imports fastgate._core.

``FASTGATE_PURE=1`` selects the pure-Python twin (fastgate._core_py), which
has the same classes and return codes but does not share memory across
processes. Everything else imports from here.
"""

from __future__ import annotations

import os

from fastgate import _core_py

if os.environ.get("FASTGATE_PURE") == "1":
    _impl = _core_py
else:
    from fastgate import _core as _impl  # type: ignore[no-redef]

IMPLEMENTATION = "python" if _impl is _core_py else "cython"

Arena = _impl.Arena
KeyTable = _impl.KeyTable
RateTable = _impl.RateTable
Admission = _impl.Admission
CidrSet = _impl.CidrSet
CoreError = _core_py.CoreError

# Return codes (all negative; a key check returns a key index >= 0 on success,
# a rate hit returns remaining >= 0 when admitted).
NO_SUCH_KEY = _core_py.NO_SUCH_KEY
KEY_REVOKED = _core_py.KEY_REVOKED
KEY_DISABLED = _core_py.KEY_DISABLED
KEY_EXPIRED = _core_py.KEY_EXPIRED
KEY_NOT_YET_VALID = _core_py.KEY_NOT_YET_VALID
SCOPE_DENIED = _core_py.SCOPE_DENIED
KEY_IP_DENIED = _core_py.KEY_IP_DENIED
KEY_BUSY = _core_py.KEY_BUSY
KEY_MALFORMED = _core_py.KEY_MALFORMED
RATE_LIMITED = _core_py.RATE_LIMITED
RATE_TABLE_FULL = _core_py.RATE_TABLE_FULL
UNLIMITED = _core_py.UNLIMITED
SUBJECT_V4 = _core_py.SUBJECT_V4
SUBJECT_UNKNOWN = _core_py.SUBJECT_UNKNOWN
V6_PREFIX_DEFAULT = _core_py.V6_PREFIX_DEFAULT

# Public error code (DESIGN.md "Errors are JSON") for each core return code.
ERROR_CODE = {
    NO_SUCH_KEY: "key_invalid",
    KEY_REVOKED: "key_invalid",
    KEY_DISABLED: "key_invalid",
    KEY_MALFORMED: "key_invalid",
    KEY_EXPIRED: "key_expired",
    KEY_NOT_YET_VALID: "key_expired",
    SCOPE_DENIED: "scope_denied",
    KEY_IP_DENIED: "ip_denied",
    KEY_BUSY: "overloaded",  # the record is being written (or its writer died mid-write): retry
    RATE_LIMITED: "rate_limited",
    RATE_TABLE_FULL: "rate_limited",
}

FLAG_DISABLED = _core_py.FLAG_DISABLED
FLAG_REVOKED = _core_py.FLAG_REVOKED

METHOD_BITS = _core_py.METHOD_BITS
METHOD_OTHER = _core_py.METHOD_OTHER
METHOD_ALL = _core_py.METHOD_ALL
WINDOWS = _core_py.WINDOWS
LAYOUT_VERSION = _core_py.LAYOUT_VERSION

method_bit = _core_py.method_bit
make_key = _core_py.make_key
key_well_formed = _core_py.key_well_formed
key_id_of = _core_py.key_id_of
key_digest = _core_py.key_digest
addr_hash = _core_py.addr_hash
# Rate subject of a packed client address (IPv6 aggregated per prefix); the
# compiled one is ~10x faster and returns the same values.
addr_subject = _impl.addr_subject
# Cold-path validators (the same parsers put() uses), for checking input
# before it is stored.
compile_scopes = _core_py.compile_scopes
compile_cidrs = _core_py.compile_cidrs
compile_limits = _core_py.compile_limits
# The plan_id a key record carries for a plan name (admin: KeyTable.put(plan_id=...));
# RateTable.set_plans() maps the same ids to the worker's policies.
plan_id = _core_py.plan_id

# Python -> core crossings per entry point (names: CROSSINGS). The twin always
# counts; the compiled core only when built with FASTGATE_DEBUG=1, else
# crossings() is always {} (COUNTS_CROSSINGS says which).
CROSSINGS = _core_py.CROSSINGS
COUNTS_CROSSINGS = _impl.COUNTS_CROSSINGS
crossings = _impl.crossings
reset_crossings = _impl.reset_crossings

__all__ = [
    "IMPLEMENTATION", "Arena", "KeyTable", "RateTable", "Admission", "CidrSet", "CoreError",
    "NO_SUCH_KEY", "KEY_REVOKED", "KEY_DISABLED", "KEY_EXPIRED", "KEY_NOT_YET_VALID", "SCOPE_DENIED",
    "KEY_IP_DENIED", "KEY_BUSY", "KEY_MALFORMED", "RATE_LIMITED", "RATE_TABLE_FULL", "UNLIMITED", "ERROR_CODE",
    "FLAG_DISABLED", "FLAG_REVOKED", "METHOD_BITS", "METHOD_OTHER", "METHOD_ALL", "WINDOWS", "LAYOUT_VERSION",
    "method_bit", "make_key", "key_well_formed", "key_id_of", "key_digest", "addr_hash", "addr_subject",
    "SUBJECT_V4", "SUBJECT_UNKNOWN", "V6_PREFIX_DEFAULT",
    "compile_scopes", "compile_cidrs", "compile_limits", "plan_id",
    "CROSSINGS", "COUNTS_CROSSINGS", "crossings", "reset_crossings",
]
