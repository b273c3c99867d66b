"""Admin API request/response bodies: one Struct per body, one Decoder each.

The OpenAPI document is derived from these same Structs, so the docs cannot
drift from what the API accepts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..config import parse_cidr, parse_limit

KeyName = Annotated[str, Meta(min_length=1, max_length=200)]
Owner = Annotated[str, Meta(min_length=1, max_length=200)]
Scope = Annotated[str, Meta(min_length=1, max_length=1024, examples=["GET /orders/*"])]
Cidr = Annotated[str, Meta(max_length=64, examples=["10.0.0.0/8"])]
Limit = Annotated[str, Meta(pattern=r"^\s*\d+\s*/\s*(second|minute|hour|day|month)\s*$", examples=["5/second"])]
Timestamp = Annotated[str, Meta(description="RFC 3339, e.g. 2027-01-01T00:00:00Z")]


def parse_rfc3339(value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an RFC 3339 timestamp like 2027-01-01T00:00:00Z, found {value!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"expected a timestamp with a timezone (Z or +hh:mm), found {value!r}")
    return dt.astimezone(timezone.utc)


def _check_fields(obj) -> None:
    problems = []
    for field in ("allow_cidrs", "deny_cidrs"):
        for i, c in enumerate(getattr(obj, field) or ()):
            try:
                parse_cidr(c)
            except ValueError as exc:
                problems.append(f"{field}[{i}]: {exc}")
    for i, limit in enumerate(obj.limits or ()):
        try:
            parse_limit(limit)
        except ValueError as exc:
            problems.append(f"limits[{i}]: {exc}")
    if obj.expires_at is not None:
        try:
            parse_rfc3339(obj.expires_at)
        except ValueError as exc:
            problems.append(f"expires_at: {exc}")
    if problems:
        raise ValueError("\n".join(problems))


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """POST /keys"""

    name: KeyName
    owner: Owner | None = None
    plan: str | None = None
    scopes: list[Scope] = []
    allow_cidrs: list[Cidr] = []
    deny_cidrs: list[Cidr] = []
    limits: list[Limit] = []
    expires_at: Timestamp | None = None
    metadata: dict[str, Any] = {}

    def __post_init__(self):
        _check_fields(self)


class UpdateKey(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """PATCH /keys/{id}: only the fields given change; null clears owner/plan/expires_at."""

    name: KeyName | msgspec.UnsetType = msgspec.UNSET
    owner: Owner | None | msgspec.UnsetType = msgspec.UNSET
    plan: str | None | msgspec.UnsetType = msgspec.UNSET
    scopes: list[Scope] | msgspec.UnsetType = msgspec.UNSET
    allow_cidrs: list[Cidr] | msgspec.UnsetType = msgspec.UNSET
    deny_cidrs: list[Cidr] | msgspec.UnsetType = msgspec.UNSET
    limits: list[Limit] | msgspec.UnsetType = msgspec.UNSET
    expires_at: Timestamp | None | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self):
        _check_fields(
            msgspec.structs.replace(
                CreateKey(name="x"),
                **{f: v for f in ("allow_cidrs", "deny_cidrs", "limits", "expires_at")
                   if (v := getattr(self, f)) is not msgspec.UNSET},
            )
        )

    def changes(self) -> dict[str, Any]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not msgspec.UNSET}


class RotateKey(msgspec.Struct, forbid_unknown_fields=True):
    """POST /keys/{id}/rotate"""

    grace_seconds: Annotated[int, Meta(ge=0, le=365 * 86_400)] = 0


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
    expires_at: str | None = None
    metadata: dict[str, Any] = {}
    created_at: str | None = None
    updated_at: str | None = None
    revoked_at: str | None = None
    status: str = "active"


class KeyCreated(KeyOut):
    """201 from POST /keys and 200 from rotate: `key` is shown here only, once."""

    key: str = ""
    grace_until: str | None = None


class KeyList(msgspec.Struct):
    keys: list[KeyOut]
    next_after: str | None = None


class AuditEventOut(msgspec.Struct):
    seq: int
    ts: str
    actor: str
    event: str
    key_id: str
    changes: dict[str, Any]
    hash: str


class AuditList(msgspec.Struct):
    events: list[AuditEventOut]


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    request_id: str


class Error(msgspec.Struct):
    error: ErrorBody
