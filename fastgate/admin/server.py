"""The admin API process: the key store's owner and the shared key table's
single writer.

Forked by the master with the admin listening socket; the master hands it the
arena's writer role. Every write is committed to SQLite first (durable), then
applied to shared memory, then answered: when the API says a key is revoked,
every worker already refuses it. (Create is the one exception, see create().)

Routing is the declared table ROUTES (path template -> {method: Op}): it picks
the handler, answers 405 with ``Allow`` for a method a path does not declare,
validates path and query parameters and bodies, and is what GET /openapi.json
renders, so nothing can be served that is not documented. Input never gets a
500: every refusal is a JSON error with a 4xx and the field path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote

import msgspec
import uvloop
from httptools import HttpParserError, HttpRequestParser
from msgspec import Meta

from .. import config as cfg
from .. import core
from ..errors import ERRORS, ConfigError
from ..keys.store import Conflict, InvalidValue, NotFound, StoreUnavailable, unavailable
from ..workers.worker import MessageReader, send_msg
from . import keysync
from .openapi import ANY_JSON, MAX_BODY, PATH_PARAM_TYPES, TEXT, Op, Param, document, pattern_of
from .schemas import (
    METADATA_RULE,
    AuditList,
    ClusterState,
    CreateKey,
    Error,
    Health,
    KeyCreated,
    KeyDeleted,
    KeyId,
    KeyList,
    KeyOut,
    KeyUsage,
    Owner,
    Ready,
    ReloadAccepted,
    RotateKey,
    SeqNo,
    TopUsage,
    UpdateKey,
    UsagePeriod,
    control_problem,
    describe_char,
    expiry_problem,
    rfc3339_ms,
    text_problem,
)

log = logging.getLogger("fastgate.admin")

_json = msgspec.json.Encoder()
_DECODERS = {t: msgspec.json.Decoder(t) for t in (CreateKey, UpdateKey, RotateKey)}

REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}

PageSize = Annotated[int, Meta(ge=1, le=1000)]
_OWNER = Param("owner", Owner, "only this owner's keys")
_LIMIT = Param("limit", PageSize, "page size", 100)

# The admin API, declared once: routing, 405/Allow, validation and /openapi.json.
ROUTES: tuple[Op, ...] = (
    Op("GET", "/healthz", "healthz", "Liveness (no token needed)", 200, Health, auth=False, store=False),
    Op("GET", "/readyz", "readyz", "Readiness: 503 while starting or draining (no token needed)", 200, Ready,
       auth=False, store=False, responses=((503, Ready, "starting or draining"),)),
    Op("GET", "/openapi.json", "openapi", "This document", 200, ANY_JSON, store=False),
    Op("POST", "/keys", "create", "Create a key; the secret is in the reply, once", 201, KeyCreated,
       body=CreateKey, writes=True, responses=((503, None, "key_table_full: the shared key table has no room"),)),
    Op("GET", "/keys", "list_keys", "List keys, ordered by id", 200, KeyList,
       query=(_OWNER, _LIMIT, Param("after", KeyId, "the last id of the previous page (next_after)"))),
    Op("GET", "/keys/{id}", "show", "Show a key", 200, KeyOut),
    Op("PATCH", "/keys/{id}", "update", "Change fields of a key; effective on the next request", 200, KeyOut,
       body=UpdateKey, writes=True, responses=((503, None, "key_table_full: the new record does not fit"),)),
    Op("DELETE", "/keys/{id}", "delete", "Delete a key (its audit history stays)", 204, None, writes=True,
       responses=((200, KeyDeleted, "cluster mode: deleted, with the nodes that acknowledged it"),)),
    Op("POST", "/keys/{id}/rotate", "rotate", "New secret; the old one works until grace_seconds pass", 200,
       KeyCreated, body=RotateKey, body_required=False, writes=True,
       responses=((409, None, "the key is revoked"),)),
    Op("POST", "/keys/{id}/revoke", "revoke",
       "Revoke; refused by every worker (cluster mode: of every node that acked) before this answers", 200, KeyOut,
       writes=True),
    Op("GET", "/keys/{id}/usage", "key_usage", "A key's request counts per minute, hour or day", 200, KeyUsage,
       query=(Param("by", UsagePeriod, "bucket size", "hour"),
              Param("limit", Annotated[int, Meta(ge=1, le=10_000)], "how many buckets (newest)", 48))),
    Op("GET", "/usage/top", "top_usage", "The biggest consumers of the current bucket", 200, TopUsage,
       query=(Param("by", UsagePeriod, "bucket size", "day"), Param("n", PageSize, "how many keys", 10))),
    Op("GET", "/audit", "audit", "Key lifecycle events, hash-chained, oldest first", 200, AuditList,
       query=(Param("after", SeqNo, "events with a larger sequence number", 0), _LIMIT,
              Param("key_id", KeyId, "only this key's events"))),
    Op("GET", "/metrics", "metrics", "Prometheus text exposition, summed over every worker", 200, TEXT,
       store=False),
    Op("POST", "/reload", "reload", "Validate the config file, then reload it (as SIGHUP)", 202, ReloadAccepted,
       store=False, responses=((400, None, "the config file is invalid (the running one stays)"),
                               (409, None, "fastgate runs on its embedded default: no file to reload"))),
)


class _PathEntry:
    def __init__(self, template: str):
        self.template = template
        self.parts = template[1:].split("/")
        self.ops: dict[str, Op] = {}

    @property
    def allow(self) -> str:
        return ", ".join(self.ops)

    def match(self, segs: list[str]) -> dict[str, str] | None:
        if len(segs) != len(self.parts):
            return None
        params = {}
        for want, got in zip(self.parts, segs):
            if want[:1] == "{":
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def _table(ops: tuple[Op, ...]) -> list[_PathEntry]:
    entries: dict[str, _PathEntry] = {}
    for op in ops:
        e = entries.setdefault(op.path, _PathEntry(op.path))
        if op.method in e.ops:
            raise ValueError(f"admin route {op.method} {op.path} is declared twice")
        e.ops[op.method] = op
    # a literal segment is tried before a parameter in the same place
    return sorted(entries.values(), key=lambda e: [p[:1] == "{" for p in e.parts])


_PATHS = _table(ROUTES)


class ApiError(Exception):
    """An answer other than success: status from fastgate.errors.ERRORS unless given."""

    def __init__(self, code: str, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        self.status = status or ERRORS[code][0]
        self.code = code
        self.message = message
        self.headers = headers or {}


def _bad(message: str) -> ApiError:
    return ApiError("bad_request", message)


@dataclass
class Request:
    op: Op
    params: dict[str, Any]
    query: dict[str, Any]
    body: Any
    actor: str


class Incident:
    """One log line when a store becomes unavailable, one when it works again; nothing
    per request in between (a full disk must not turn into a log line per call)."""

    def __init__(self, what: str):
        self.what = what
        self.down_since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("%s unavailable: %s; its writes answer 503 store_unavailable until it recovers "
                      "(the gateway keeps serving traffic)", self.what, exc)

    def ok(self) -> None:
        if self.down_since is not None:
            log.warning("%s available again after %.1fs", self.what, time.monotonic() - self.down_since)
            self.down_since = None


# ---------------------------------------------------------------- input errors

_ULONE = re.compile("[\ud800-\udfff]")
_INT = re.compile(r"-?[0-9]+(?:\.0+)?")


def _validation(exc: msgspec.ValidationError, struct: type) -> ApiError:
    text = str(exc)
    msg, sep, at = text.rpartition(" - at `")
    path = at.rstrip("`") if sep else "$"
    if not sep:
        msg = text
        if all(line.startswith("$") for line in text.split("\n")):  # our __post_init__ problems, located
            return _bad("; ".join(text.split("\n")))
    if "unknown field" in msg:
        msg += f" (known fields: {', '.join(struct.__struct_fields__)})"
    if path.startswith("$.metadata"):
        msg += f" ({METADATA_RULE})"
    return _bad(f"{path}: {msg}")


def _surrogate_path(body: bytes) -> tuple[str, str] | None:
    """Where a lone UTF-16 surrogate escape is (msgspec refuses those as 'truncated');
    the stdlib parser accepts them, so walk its result."""
    if b"\\ud" not in body.lower():
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack = [(doc, "$")]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            m = _ULONE.search(v)
            if m:
                return p, f"U+{ord(m.group()):04X}"
        elif isinstance(v, dict):
            for k, x in v.items():
                m = _ULONE.search(k)
                if m:
                    return p, f"U+{ord(m.group()):04X} (in a member name)"
                stack.append((x, f"{p}.{k}"))
        elif isinstance(v, list):
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
    return None


def _malformed(body: bytes, exc: msgspec.DecodeError) -> ApiError:
    text = str(exc)
    found = _surrogate_path(body)
    if found:
        return _bad(f"{found[0]}: contains a lone UTF-16 surrogate {found[1]}: JSON strings must be valid Unicode")
    if "UTF-8" in text:
        return _bad("$: the body is not valid UTF-8 (JSON must be UTF-8)")
    if "truncated" in text:
        return _bad("$: the JSON body ends before its value is complete (truncated?)")
    m = re.search(r"\(byte (\d+)\)", text)
    if m and int(m.group(1)) < len(body) and (body[int(m.group(1))] < 0x20 or body[int(m.group(1))] == 0x7F):
        text += f": found {describe_char(chr(body[int(m.group(1))]))}"
    return _bad(f"$: not valid JSON: {text}")


def _param(where: str, tp, value: str):
    """A path or query parameter (a string) checked against its declared type."""
    base = getattr(tp, "__origin__", tp)
    if base is Literal:
        if value not in tp.__args__:
            raise _bad(f"{where}: expected {' or '.join(', '.join(tp.__args__).rsplit(', ', 1))}, found {value!r}")
        return value
    if base is int:
        if not _INT.fullmatch(value):
            raise _bad(f"{where}: expected a whole number, found {value!r}")
        value = int(value.split(".")[0])
    try:
        out = msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        raise _bad(f"{where}: {str(exc).split(' - at ')[0]}, found {value!r}") from None
    pattern = pattern_of(tp)
    if pattern is not None:
        why = text_problem(out, pattern)
        if why:
            raise _bad(f"{where}: {why}")
    return out


def status_of(rec, now_ms: int) -> str:
    if rec.revoked_at:
        return "revoked"
    if rec.expires_at and rfc3339_ms(rec.expires_at) <= now_ms:
        return "expired"
    return "active"


# ---------------------------------------------------------------- the application


class AdminApp:
    """The handlers and the write path (store -> shared memory -> answer)."""

    def __init__(self, config: cfg.Config, config_path: str | None, arena, store, token: bytes | None, master_pid: int,
                 stats=None, usage=None):
        self.config = config
        self.config_path = config_path
        self.store = store
        self.keys = core.KeyTable(arena, secret=store.secret)
        self.rates = core.RateTable(arena)
        self.arena = arena
        self.stats = stats
        self.usage = usage
        self.slot_ids = {slot: key_id for key_id, slot in store.id_slots().items()}
        self.token = b"Bearer " + token if token else None
        self.master_pid = master_pid
        self.draining = False
        self.store_health = Incident("key store")
        self.usage_health = Incident("usage store")
        self.cluster = None  # cluster mode: the fan-out (fastgate.cluster.Fanout), set by run_admin
        self._pending_usage: dict[str, list[int]] = {}
        self._rid = 0

    # -- helpers ---------------------------------------------------------------
    def next_rid(self) -> str:
        self._rid += 1
        return f"admin-{os.getpid():x}-{self._rid:x}"

    def out(self, rec, cls=KeyOut, **extra):
        data = rec.public()
        data["status"] = status_of(rec, keysync.now_ms())
        data.update(extra)
        return msgspec.convert(data, cls)

    def _get(self, key_id: str):
        rec = self.store.get(key_id)
        if rec is None:
            raise ApiError("not_found", f"no key with id {key_id!r}")
        return rec

    def _check_refs(self, plan, scopes, limits, allow, deny) -> None:
        if plan is not None and plan not in self.config.plans:
            known = ", ".join(sorted(self.config.plans)) or "none configured"
            raise _bad(f"$.plan: expected one of the configured plans ({known}), found {plan!r}")
        try:
            core.compile_scopes(scopes or None, "$.scopes")
            core.compile_limits(limits or None, "$.limits")
            core.compile_cidrs(allow or None, "$.allow_cidrs")
            core.compile_cidrs(deny or None, "$.deny_cidrs")
        except core.CoreError as exc:
            raise _bad(str(exc)) from None

    def _apply(self, rec) -> None:
        try:
            if self.cluster is not None:
                self.cluster.apply_record(rec)  # also a key made on another node, with no slot here yet
            else:
                keysync.apply(self.keys, rec)
        except core.CoreError as exc:
            raise ApiError("key_table_full", f"{exc} (raise [keys] capacity or ext_bytes)") from None

    # -- routing ---------------------------------------------------------------
    def resolve(self, method: str, path: str) -> tuple[Op, dict[str, str]]:
        if not path.startswith("/"):
            raise ApiError("not_found", f"no admin endpoint {path!r}: see GET /openapi.json")
        segs = [unquote(s, errors="replace") for s in path[1:].split("/")]
        for entry in _PATHS:
            params = entry.match(segs)
            if params is None:
                continue
            op = entry.ops.get(method)
            if op is None:
                raise ApiError("method_not_allowed", f"{method} is not allowed on {entry.template}: use {entry.allow}",
                               headers={"allow": entry.allow})
            return op, params
        raise ApiError("not_found", f"no admin endpoint {path!r}: see GET /openapi.json")

    def _authenticate(self, headers: dict) -> str:
        if self.token is None:
            raise ApiError("unauthorized",
                           f"the admin API is disabled: set {self.config.admin.token_env} for fastgate run")
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.token):
            raise ApiError("unauthorized", "missing or wrong admin token (Authorization: Bearer ...)")
        actor = headers.get(b"x-fastgate-actor", b"admin").decode("utf-8", "replace")[:64] or "admin"
        why = control_problem(actor)
        if why:
            raise _bad(f"header x-fastgate-actor: {why}")
        return actor

    def _body(self, op: Op, body: bytes):
        if op.body is None:
            return None
        if not body.strip():
            if op.body_required:
                raise _bad(f"$: expected a JSON object ({op.body.__name__}), the body is empty")
            body = b"{}"
        try:
            return _DECODERS[op.body].decode(body)
        except msgspec.ValidationError as exc:
            raise _validation(exc, op.body) from None
        except msgspec.DecodeError as exc:
            raise _malformed(body, exc) from None
        except RecursionError:
            raise _bad("$: the JSON nests too deeply") from None

    def request(self, op: Op, params: dict[str, str], qs: str, body: bytes, headers: dict) -> Request:
        actor = self._authenticate(headers) if op.auth else "anonymous"
        path_params = {name: _param(f"path parameter {name!r}", PATH_PARAM_TYPES[name], params[name])
                       for name in op.path_params}
        query: dict[str, Any] = {}
        if op.query:
            raw = parse_qs(qs, keep_blank_values=True)  # "?owner=" is an empty owner: refused
            for p in op.query:
                values = raw.get(p.name)
                query[p.name] = p.default if not values else _param(f"query parameter {p.name!r}", p.type,
                                                                     values[-1])
        return Request(op, path_params, query, self._body(op, body), actor)

    def handle(self, method: str, path: str, qs: str, body: bytes, headers: dict):
        """(status, payload, extra headers); ApiError for every refusal."""
        op, params = self.resolve(method, path)
        try:
            req = self.request(op, params, qs, body, headers)
            status, payload = getattr(self, op.handler)(req)
        except StoreUnavailable as exc:
            self.store_health.failed(exc)
            raise ApiError("store_unavailable", f"the key store cannot be used now: {exc}. Nothing was changed; "
                                                "retry once it has room again") from None
        except NotFound as exc:
            raise ApiError("not_found", str(exc)) from None
        except Conflict as exc:
            raise ApiError("conflict", str(exc)) from None
        except InvalidValue as exc:
            raise _bad(str(exc)) from None
        except (sqlite3.Error, OSError) as exc:
            if not unavailable(exc):
                raise
            self.usage_health.failed(exc)
            raise ApiError("store_unavailable", f"the usage store cannot be used now: {exc}") from None
        if op.writes:
            self.store_health.ok()
        return status, payload

    # -- endpoints -------------------------------------------------------------
    def healthz(self, req: Request):
        return 200, Health(status="ok", admin_pid=os.getpid(), master_pid=self.master_pid)

    def readyz(self, req: Request):
        m = self.stats.read(self.stats.slots) if self.stats is not None else None
        if self.draining or (m and m.get("draining")):
            return 503, Ready(status="draining")
        if m and m.get("workers_ready", 0) < m.get("workers", 0):
            return 503, Ready(status="starting", workers_ready=m["workers_ready"], workers=m["workers"])
        if self.cluster is not None:
            state = msgspec.convert(self.cluster.state(), ClusterState)
            why = self.cluster.unready()
            if why is not None:
                return 503, Ready(status=why[0], reason=why[1], cluster=state)
            return 200, Ready(status="ready", cluster=state)
        return 200, Ready(status="ready")

    def openapi(self, req: Request):
        return 200, document(ROUTES, tuple(sorted(self.config.plans)))

    def _check_expiry(self, expires_at: str | None) -> None:
        why = expiry_problem(expires_at, keysync.now_ms())
        if why:
            raise _bad(why)

    def create(self, req: Request):
        body: CreateKey = req.body
        self._check_refs(body.plan, body.scopes, body.limits, body.allow_cidrs, body.deny_cidrs)
        self._check_expiry(body.expires_at)
        from ..keys.store import KeyRecord

        key_id = self.store.new_key_id()
        key = core.make_key(key_id)
        try:
            slot = self.keys.allocate()
        except core.CoreError as exc:
            raise ApiError("key_table_full", str(exc)) from None
        rec = KeyRecord(
            id=key_id, name=body.name, owner=body.owner, plan=body.plan, scopes=body.scopes,
            allow_cidrs=body.allow_cidrs, deny_cidrs=body.deny_cidrs, limits=body.limits,
            expires_at=body.expires_at, metadata=body.metadata, slot=slot, digest=self.keys.digest(key.encode()),
        )
        # Shared memory first: a record that does not fit (extension heap full) is
        # refused before anything is stored. Nobody can use the key before the store
        # commit below, because its secret is only in our answer; a failed commit
        # (disk full...) takes the slot out again, so nothing is half-applied.
        self._apply(rec)
        try:
            rec = self.store.create(rec, req.actor)
        except BaseException:
            self.keys.delete(slot)
            raise
        self.slot_ids[rec.slot] = rec.id
        if self.cluster is not None:
            self.cluster.noted(rec)
        return 201, self.out(rec, KeyCreated, key=key)

    def show(self, req: Request):
        return 200, self.out(self._get(req.params["id"]))

    def update(self, req: Request):
        key_id = req.params["id"]
        rec = self._get(key_id)
        changes = req.body.changes()
        self._check_refs(
            changes.get("plan"), changes.get("scopes"), changes.get("limits"),
            changes.get("allow_cidrs"), changes.get("deny_cidrs"),
        )
        exp = changes.get("expires_at")
        if exp is not None and (rec.expires_at is None or rfc3339_ms(exp) != rfc3339_ms(rec.expires_at)):
            self._check_expiry(exp)  # a past expiry is refused, unless it is the one already stored
        if not changes:
            return 200, self._acked(self.out(rec), empty=True)
        new = self.store.update(key_id, changes, req.actor)
        try:
            self._apply(new)
        except ApiError:
            # The shared table could not take the new record: put the stored one back.
            self.store.update(key_id, {f: getattr(rec, f) for f in changes}, "system")
            raise
        return 200, self._acked(self.out(new))

    def rotate(self, req: Request):
        key_id = req.params["id"]
        rec = self._get(key_id)
        if rec.revoked_at:
            raise ApiError("conflict", f"key {key_id!r} is revoked; create a new key instead")
        key = core.make_key(key_id)
        digest = self.keys.digest(key.encode())
        grace = int(req.body.grace_seconds)
        grace_until = keysync.now_ms() + grace * 1000 if grace else 0
        rec = self.store.rotate(key_id, digest, grace_until, req.actor)
        if rec.slot < 0 and self.cluster is not None:
            self._apply(rec)  # made on another node and not in this node's table yet: the whole record
        else:
            self.keys.rotate(rec.slot, digest, grace_until)
        return 200, self._acked(self.out(rec, KeyCreated, key=key))

    def revoke(self, req: Request):
        key_id = req.params["id"]
        self._get(key_id)
        rec = self.store.revoke(key_id, req.actor)
        if rec.slot < 0 and self.cluster is not None:
            self._apply(rec)
        else:
            self.keys.revoke(rec.slot)
        return 200, self._acked(self.out(rec))

    def delete(self, req: Request):
        key_id = req.params["id"]
        rec = self._get(key_id)
        self.store.delete(key_id, req.actor)
        if rec.slot < 0 and self.cluster is not None:
            self.cluster.forget(key_id)  # made on another node: its slot here, if this node has one
        else:
            self.keys.delete(rec.slot)
            self.rollup()  # counts still queued for this slot belong to this key
            self.slot_ids.pop(rec.slot, None)
        if self.cluster is None:
            return 204, None
        self.cluster.id_slot.pop(key_id, None)
        return 200, self._acked(KeyDeleted(id=key_id))  # cluster mode: 200, to carry the acks

    def _acked(self, out, empty: bool = False):
        """Cluster mode: the answer waits for the other nodes' acks of the write just made
        (AdminProtocol resolves it); a single node answers at once, without acked/missing.
        ``empty``: nothing was written (a PATCH with no fields): the acks of the store's
        current change number."""
        if self.cluster is None:
            return out
        return self.cluster.pending(out, self.store.change_seq() if empty else None)

    def list_keys(self, req: Request):
        limit = req.query["limit"]
        recs = self.store.list(owner=req.query["owner"], limit=limit + 1, after=req.query["after"])
        nxt = recs[limit - 1].id if len(recs) > limit else None
        return 200, KeyList(keys=[self.out(r) for r in recs[:limit]], next_after=nxt)

    def audit(self, req: Request):
        q = req.query
        events = self.store.audit(after_seq=q["after"], limit=q["limit"], key_id=q["key_id"])
        return 200, msgspec.convert({"events": [msgspec.to_builtins(e) for e in events]}, AuditList)

    def reload(self, req: Request):
        if self.config_path is None:
            raise ApiError("conflict", "fastgate runs on its embedded default: there is no file to reload")
        try:
            cfg.load_config(self.config_path)
        except ConfigError as exc:
            raise _bad(exc.render()) from None
        except OSError as exc:
            raise _bad(f"cannot read {self.config_path}: {exc}") from None
        os.kill(self.master_pid, signal.SIGHUP)
        return 202, ReloadAccepted(status="reload requested", config=self.config_path)

    def rollup(self) -> None:
        """Workers' per-key counts -> minute/hour/day rows (one transaction). Counts that
        cannot be written (usage store unavailable) are kept and written next time."""
        if self.stats is None or self.usage is None:
            return
        counts = self._pending_usage
        for slot, *c in self.stats.drain_usage():
            key_id = self.slot_ids.get(slot)
            if key_id is None:
                continue
            acc = counts.get(key_id)
            if acc is None:
                counts[key_id] = list(c)
            else:
                for i, v in enumerate(c):
                    acc[i] += v
        if not counts:
            return
        try:
            self.usage.add(counts)
        except (sqlite3.Error, OSError) as exc:
            if not unavailable(exc):
                raise
            self._pending_usage = counts
            self.usage_health.failed(exc)
            return
        self._pending_usage = {}
        self.usage_health.ok()

    def key_usage(self, req: Request):
        key_id = req.params["id"]
        self._get(key_id)
        by = req.query["by"]
        self.rollup()
        rows = self.usage.series(key_id, by, req.query["limit"]) if self.usage else []
        totals = {k: sum(r[k] for r in rows) for k in ("requests", "1xx", "2xx", "3xx", "4xx", "5xx",
                                                       "bytes_in", "bytes_out")}
        return 200, msgspec.convert({"key_id": key_id, "by": by, "rows": rows, "totals": totals}, KeyUsage)

    def top_usage(self, req: Request):
        by = req.query["by"]
        self.rollup()
        top = self.usage.top(req.query["n"], by) if self.usage else []
        return 200, msgspec.convert({"by": by, "top": top}, TopUsage)

    def metrics(self, req: Request):
        from .metrics import render

        snaps = []
        master = None
        if self.stats is not None:
            for region in range(self.stats.slots):
                snap = self.stats.read(region)
                if snap is not None:
                    snaps.append(snap)
            master = self.stats.read(self.stats.slots)
        text = render(snaps, master, self.keys.stats(), self.rates.stats(), self.arena.key_capacity,
                      self.arena.rate_capacity)
        return 200, text if self.cluster is None else text + self.cluster.metrics()

    def sweep(self) -> None:
        """Record expiries in the audit trail (once) and drop ended rotation graces.
        Driven by the store (not by memory), so a failed write is retried next tick."""
        now = keysync.now_ms()
        for key_id in self.store.due_expired():
            rec = self.store.get(key_id)
            if rec is not None and not rec.revoked_at:
                self.store.mark_expired(key_id)
                self.store_health.ok()
        self.keys.sweep(now)


def _safe_text(message: str) -> str:
    """An error message is JSON text: never a lone surrogate, whatever it quotes."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class AdminProtocol(asyncio.Protocol):
    """One request at a time per connection; bodies up to MAX_BODY (1 MiB)."""

    def __init__(self, app: AdminApp):
        self.app = app
        self.transport = None
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.refused = False  # answered early (body too large): ignore the rest of the stream
        # Cluster writes answer after the other nodes' acks (an awaitable answer): the answers
        # of requests pipelined behind one wait here, so they leave in request order.
        self.backlog: list[list] = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserError as exc:
            self.refused = True
            rid = self.app.next_rid()
            self.respond(400, self._error("bad_request", f"malformed request: {exc}", rid), rid=rid, close=True)

    def _error(self, code: str, message: str, rid: str) -> Error:
        return Error(error={"code": code, "message": _safe_text(message), "request_id": rid})

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.lower()] = value

    def on_headers_complete(self):
        length = self.headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY:
            self._too_large()

    def _too_large(self):
        self.refused = True
        rid = self.app.next_rid()
        self.respond(413, self._error("body_too_large", f"request body exceeds {MAX_BODY} bytes", rid), rid=rid,
                     close=True)

    def on_body(self, body):
        if self.refused:
            return
        self.size += len(body)
        if self.size > MAX_BODY:
            self._too_large()
            return
        self.body.append(body)

    def on_message_complete(self):
        if self.refused:
            return
        url, headers, body = self.url, self.headers, b"".join(self.body)
        self.url, self.headers, self.body, self.size = b"", {}, [], 0
        rid = self.app.next_rid()
        method = self.parser.get_method().decode("ascii", "replace")
        path, _, qs = url.decode("latin-1").partition("?")
        extra: dict[str, str] = {}
        try:
            status, payload = self.app.handle(method, path, qs, body, headers)
        except ApiError as exc:
            status, payload, extra = exc.status, self._error(exc.code, exc.message, rid), exc.headers
        except Exception as exc:  # a bug, never input: say so, keep serving
            log.exception("admin request %s %s failed", method, path)
            status, payload = 500, self._error("internal_error", f"{type(exc).__name__}: {exc}", rid)
        close = not self.parser.should_keep_alive()
        if self.backlog or hasattr(payload, "resolve"):
            self._defer(status, payload, rid, close, extra, method == "HEAD")
            return
        self.respond(status, payload, rid=rid, close=close, headers=extra, head_only=method == "HEAD")

    def _defer(self, status, payload, rid, close, headers, head_only) -> None:
        item = [status, payload, rid, close, headers, head_only, not hasattr(payload, "resolve")]
        self.backlog.append(item)
        if self.transport is not None and len(self.backlog) == 1:
            self.transport.pause_reading()  # bounded: no more requests read until the answers are out
        if not item[6]:
            task = asyncio.get_running_loop().create_task(payload.resolve())
            task.add_done_callback(lambda t, item=item: self._resolved(item, t))

    def _resolved(self, item, task) -> None:
        try:
            item[1] = task.result()
        except Exception as exc:  # a bug: the write itself committed and was answered as such
            log.exception("waiting for cluster acks failed")
            item[0], item[1] = 500, self._error("internal_error", f"{type(exc).__name__}: {exc}", item[2])
        item[6] = True
        while self.backlog and self.backlog[0][6]:
            status, payload, rid, close, headers, head_only, _ = self.backlog.pop(0)
            self.respond(status, payload, rid=rid, close=close, headers=headers, head_only=head_only)
        if not self.backlog and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def respond(self, status: int, payload, rid: str = "", close: bool = False, headers: dict | None = None,
                head_only: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())
        if isinstance(payload, str):  # Prometheus text exposition
            body = payload.encode()
            head += b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
        else:
            body = b"" if payload is None else _json.encode(payload)
            if payload is not None:
                head += b"content-type: application/json\r\n"
        head += b"content-length: %d\r\ncache-control: no-store\r\n" % len(body)
        for k, v in (headers or {}).items():
            head += b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
        if rid:
            head += b"x-request-id: %s\r\n" % rid.encode()
        if close:
            head += b"connection: close\r\n"
        self.transport.write(head + b"\r\n" + (b"" if head_only else body))
        if close:
            self.transport.close()


def run_admin(sock: socket.socket, ctl: socket.socket, config: cfg.Config, config_path: str | None,
              arena, store_path: str, token: bytes | None, master_pid: int, stats=None, loaded_seq: int = 0) -> None:
    """``loaded_seq``: the store's change number when the master loaded the key table (cluster
    mode catches up from there)."""
    from ..keys import open_config_store
    from ..usage import UsageStore

    # The master hands us the writer role right after the fork: wait for it.
    deadline = time.monotonic() + 10
    while arena.writer_pid != os.getpid():
        if time.monotonic() > deadline:
            raise RuntimeError("the master did not hand the admin process the writer role")
        time.sleep(0.001)
    store = open_config_store(config, store_path)  # [cluster] store (PostgreSQL) if set, else SQLite
    usage = UsageStore(os.path.join(os.path.dirname(os.path.abspath(store_path)), "usage.db"), {
        "minute": config.log.usage_minute_hours * 3600,
        "hour": config.log.usage_hour_days * 86_400,
        "day": config.log.usage_day_days * 86_400 or None,
    })
    app = AdminApp(config, config_path, arena, store, token, master_pid, stats, usage)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    from .snapshot import Snapshotter

    snap = Snapshotter(config, store, app.keys, arena, loop, app.slot_ids)  # fast start (admin/snapshot.py)
    reader = MessageReader()

    def on_ctl():
        try:
            data = ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            loop.stop()
            return
        for kind, payload in reader.feed(data):
            if kind == b"C":
                app.config = cfg.decode(payload)

    def tick():
        try:
            app.sweep()
        except StoreUnavailable as exc:
            app.store_health.failed(exc)
        except Exception:
            log.exception("admin sweep failed")
        try:
            app.rollup()
        except Exception:
            log.exception("admin usage rollup failed")
        loop.call_later(1.0, tick)

    def drain():
        app.draining = True
        server.close()
        loop.call_later(0.2, loop.stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctl.setblocking(False)
    loop.add_reader(ctl.fileno(), on_ctl)
    if config.cluster.store:
        from ..cluster import Fanout

        # Before the first request is served (the listening socket outlives a respawned admin
        # process, so requests may be queued on it already): listen, register, catch up.
        app.cluster = Fanout(app, loop, store.node_id, config.cluster.ack_timeout, loaded_seq)
        app.cluster.start()  # (readyz answers 503 "starting" if the store could not be read)
    server = loop.run_until_complete(loop.create_server(lambda: AdminProtocol(app), sock=sock))
    loop.call_soon(tick)
    snap.start()
    ctl.setblocking(True)
    send_msg(ctl, b"R", str(os.getpid()).encode())
    ctl.setblocking(False)
    try:
        loop.run_forever()
    finally:
        try:
            if app.cluster is not None:
                app.cluster.close(leave=app.draining)  # a clean stop leaves the cluster's node list
            app.rollup()
        except Exception:
            log.exception("admin usage rollup failed at exit")
        finally:
            snap.final()  # the API has stopped: no key write can be in flight
            usage.close()
            store.close()
            loop.close()


__all__ = ["ROUTES", "AdminApp", "AdminProtocol", "ApiError", "run_admin", "status_of"]
