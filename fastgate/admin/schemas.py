"""Admin API request/response bodies.

One Struct per body, one Decoder each. The OpenAPI document is derived from these
same Structs, so the docs cannot drift from what the API accepts. The field types
(``KeyName``, ``Scope``, ``Cidr``, ``Limit``, ``Timestamp``, ``Metadata``...) are
fastgate.types', the ones the config and the key store use too: their ``Meta`` is
what msgspec checks while decoding and what the document shows, and their Rules
(full-match patterns, canonical CIDRs, the RFC 3339 parser) run in
``__post_init__`` through :func:`fastgate.types.check_fields`, located ``$.field``.

The text rules and the RFC 3339 parser are re-exported from here for the code that
imported them from this module (keysync's ``parse_rfc3339``, the CLI's ``format_ms``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..types import (
    CIDR_PATTERN,
    CONTROL_CLASS,
    CONTROL_RE,
    KEY_ID_PATTERN,
    LIMIT_PATTERN,
    LIMIT_UNITS,
    MAX_CIDRS,
    MAX_META_ITEMS,
    MAX_META_KEY,
    MAX_META_KEYS,
    MAX_META_STR,
    MAX_NAME,
    MAX_SCOPE,
    MAX_SCOPES,
    METADATA_RULE,
    NAME_PATTERN,
    SCOPE_PATTERN,
    SPACE_CLASS,
    TEXT_PATTERN,
    TIMESTAMP_EXAMPLE,
    Cidr,
    Cidrs,
    KeyId,
    KeyName,
    Limit,
    Limits,
    Metadata,
    Owner,
    PlanName,
    Problems,
    Scope,
    Scopes,
    SeqNo,
    Timestamp,
    canonical_cidr,
    check_fields,
    control_problem,
    describe_char,
    format_ms,
    normalize_rfc3339,
    parse_rfc3339,
    rfc3339_ms,
    text_problem,
)

__all__ = [  # the re-exported names as well as this module's own
    "CIDR_PATTERN", "CONTROL_CLASS", "CONTROL_RE", "KEY_ID_PATTERN", "LIMIT_PATTERN", "LIMIT_UNITS", "MAX_CIDRS",
    "MAX_GRACE_SECONDS", "MAX_META_ITEMS", "MAX_META_KEY", "MAX_META_KEYS", "MAX_META_STR", "MAX_NAME", "MAX_SCOPE",
    "MAX_SCOPES", "METADATA_RULE", "NAME_PATTERN", "SCOPE_PATTERN", "SPACE_CLASS", "TEXT_PATTERN",
    "TIMESTAMP_EXAMPLE", "AuditEventOut", "AuditList", "Cidr", "Cidrs", "CreateKey", "Error", "ErrorBody", "Health",
    "KeyCreated", "KeyId", "KeyList", "KeyName", "KeyOut", "KeyUsage", "Limit", "Limits", "Metadata",
    "OutTimestamp", "Owner", "PlanName", "Problems", "Ready", "ReloadAccepted", "RotateKey", "Scope", "Scopes",
    "SeqNo", "Timestamp", "TopRow", "TopUsage", "UpdateKey", "UsagePeriod", "UsageRow", "UsageTotals",
    "canonical_cidr", "control_problem", "describe_char", "expiry_problem", "format_ms", "normalize_rfc3339",
    "parse_rfc3339", "rfc3339_ms", "text_problem",
]

MAX_GRACE_SECONDS = 365 * 86_400

UsagePeriod = Literal["minute", "hour", "day"]


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
        check_fields(self, "$.")


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
        check_fields(self, "$.")

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
    # Cluster mode only (absent on a single node): the answers of revoke, rotate and update
    # list the nodes whose shared memory has the change, and the ones that did not
    # acknowledge it within [cluster] ack_timeout (fastgate.cluster).
    acked: list[str] | msgspec.UnsetType = msgspec.UNSET
    missing: list[str] | msgspec.UnsetType = msgspec.UNSET


class KeyCreated(KeyOut):
    """201 from POST /keys and 200 from rotate: `key` is shown here only, once."""

    key: str = ""


class KeyDeleted(msgspec.Struct):
    """200 from DELETE /keys/{id} in cluster mode (a single node answers 204, no body)."""

    id: str
    status: Literal["deleted"] = "deleted"
    acked: list[str] = []
    missing: list[str] = []


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


class ClusterState(msgspec.Struct):
    """This node in the cluster (cluster mode only), see fastgate.cluster."""

    node_id: str
    applied_seq: int  # the change number its shared memory has applied
    store_seq: int  # the store's change number, as last seen
    peers_live: int  # other nodes with a recent heartbeat
    store: Literal["ok", "unreachable"]


class Ready(msgspec.Struct, omit_defaults=True):
    status: Literal["ready", "draining", "starting", "lagging"]
    workers_ready: int | None = None
    workers: int | None = None
    reason: str | None = None  # why not ready (cluster mode: catching up, lagging)
    cluster: ClusterState | None = None


class ReloadAccepted(msgspec.Struct):
    status: Literal["reload requested"]
    config: str


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    request_id: str


class Error(msgspec.Struct):
    error: ErrorBody
