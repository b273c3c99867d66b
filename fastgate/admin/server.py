"""The admin API process: the key store's owner and the shared key table's
single writer.

Forked by the master with the admin listening socket; the master hands it the
arena's writer role. Every write is committed to SQLite first (durable), then
applied to shared memory, then answered: when the API says a key is revoked,
every worker already refuses it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import time
from urllib.parse import parse_qs, unquote

import msgspec
import uvloop
from httptools import HttpParserError, HttpRequestParser

from .. import config as cfg
from .. import core
from ..errors import ConfigError
from ..workers.worker import MessageReader, send_msg
from . import keysync
from .schemas import (
    AuditList,
    CreateKey,
    Error,
    KeyCreated,
    KeyList,
    KeyOut,
    RotateKey,
    UpdateKey,
)

log = logging.getLogger("fastgate.admin")

MAX_BODY = 1 << 20
_json = msgspec.json.Encoder()
_dec_create = msgspec.json.Decoder(CreateKey)
_dec_update = msgspec.json.Decoder(UpdateKey)
_dec_rotate = msgspec.json.Decoder(RotateKey)

REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status = status
        self.code = code
        self.message = message


def _validation(exc: msgspec.ValidationError) -> ApiError:
    text = str(exc)
    msg, sep, at = text.rpartition(" - at `")
    if sep:
        return ApiError(400, "bad_request", f"{at.rstrip('`')}: {msg}")
    # Our __post_init__ checks say "field[i]: message" per line.
    return ApiError(400, "bad_request", "; ".join(f"$.{line}" for line in text.split("\n")))


def status_of(rec, now_ms: int) -> str:
    if rec.revoked_at:
        return "revoked"
    if rec.expires_at and keysync.expires_ms(rec) <= now_ms:
        return "expired"
    return "active"


class AdminApp:
    """Routes and the write path (store -> shared memory -> answer)."""

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
            raise ApiError(404, "not_found", f"no key with id {key_id!r}")
        return rec

    def _check_refs(self, plan, scopes, limits, allow, deny) -> None:
        if plan is not None and plan not in self.config.plans:
            known = ", ".join(sorted(self.config.plans)) or "none configured"
            raise ApiError(400, "bad_request", f"$.plan: expected one of the configured plans ({known}), found {plan!r}")
        try:
            core.compile_scopes(scopes or None, "$.scopes")
            core.compile_limits(limits or None, "$.limits")
            core.compile_cidrs(allow or None, "$.allow_cidrs")
            core.compile_cidrs(deny or None, "$.deny_cidrs")
        except core.CoreError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    # -- endpoints -------------------------------------------------------------
    def create(self, body: bytes, actor: str):
        try:
            req = _dec_create.decode(body)
        except msgspec.ValidationError as exc:
            raise _validation(exc) from None
        self._check_refs(req.plan, req.scopes, req.limits, req.allow_cidrs, req.deny_cidrs)
        from ..keys.store import KeyRecord

        key_id = self.store.new_key_id()
        key = core.make_key(key_id)
        try:
            slot = self.keys.allocate()
        except core.CoreError as exc:
            raise ApiError(503, "key_table_full", str(exc)) from None
        rec = KeyRecord(
            id=key_id, name=req.name, owner=req.owner, plan=req.plan, scopes=req.scopes,
            allow_cidrs=req.allow_cidrs, deny_cidrs=req.deny_cidrs, limits=req.limits,
            expires_at=req.expires_at, metadata=req.metadata, slot=slot, digest=self.keys.digest(key.encode()),
        )
        # Shared memory first: a record that does not fit (extension heap full)
        # is refused before anything is stored. Nobody can use the key before
        # the store commit below, because its secret is only in our answer.
        self._apply(rec)
        try:
            rec = self.store.create(rec, actor)
        except BaseException:
            self.keys.delete(slot)
            raise
        self.slot_ids[rec.slot] = rec.id
        return 201, self.out(rec, KeyCreated, key=key)

    def _apply(self, rec) -> None:
        try:
            keysync.apply(self.keys, rec)
        except core.CoreError as exc:
            raise ApiError(503, "key_table_full", f"{exc} (raise [keys] capacity or ext_bytes)") from None

    def update(self, key_id: str, body: bytes, actor: str):
        try:
            req = _dec_update.decode(body)
        except msgspec.ValidationError as exc:
            raise _validation(exc) from None
        rec = self._get(key_id)
        changes = req.changes()
        self._check_refs(
            changes.get("plan"), changes.get("scopes"), changes.get("limits"),
            changes.get("allow_cidrs"), changes.get("deny_cidrs"),
        )
        if not changes:
            return 200, self.out(rec)
        new = self.store.update(key_id, changes, actor)
        try:
            self._apply(new)
        except ApiError:
            # The shared table could not take the new record: put the stored one back.
            self.store.update(key_id, {f: getattr(rec, f) for f in changes}, "system")
            raise
        return 200, self.out(new)

    def rotate(self, key_id: str, body: bytes, actor: str):
        try:
            req = _dec_rotate.decode(body or b"{}")
        except msgspec.ValidationError as exc:
            raise _validation(exc) from None
        rec = self._get(key_id)
        if rec.revoked_at:
            raise ApiError(409, "conflict", f"key {key_id!r} is revoked; create a new key instead")
        key = core.make_key(key_id)
        digest = self.keys.digest(key.encode())
        grace_until = keysync.now_ms() + req.grace_seconds * 1000 if req.grace_seconds else 0
        rec = self.store.rotate(key_id, digest, grace_until, actor)
        self.keys.rotate(rec.slot, digest, grace_until)
        extra = {"key": key}
        if grace_until:
            extra["grace_until"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(grace_until / 1000))
        return 200, self.out(rec, KeyCreated, **extra)

    def revoke(self, key_id: str, actor: str):
        self._get(key_id)
        rec = self.store.revoke(key_id, actor)
        self.keys.revoke(rec.slot)
        return 200, self.out(rec)

    def delete(self, key_id: str, actor: str):
        rec = self._get(key_id)
        self.store.delete(key_id, actor)
        self.keys.delete(rec.slot)
        self.rollup()  # counts still queued for this slot belong to this key
        self.slot_ids.pop(rec.slot, None)
        return 204, None

    def list(self, query: dict):
        owner = query.get("owner")
        try:
            limit = min(1000, max(1, int(query.get("limit", "100"))))
        except ValueError:
            raise ApiError(400, "bad_request", "limit: expected a whole number 1..1000") from None
        recs = self.store.list(owner=owner, limit=limit + 1, after=query.get("after"))
        nxt = recs[limit - 1].id if len(recs) > limit else None
        recs = recs[:limit]
        return 200, KeyList(keys=[self.out(r) for r in recs], next_after=nxt)

    def audit(self, query: dict):
        try:
            after = int(query.get("after", "0"))
            limit = min(1000, max(1, int(query.get("limit", "100"))))
        except ValueError:
            raise ApiError(400, "bad_request", "after/limit: expected whole numbers") from None
        events = self.store.audit(after_seq=after, limit=limit, key_id=query.get("key_id"))
        return 200, msgspec.convert({"events": [msgspec.to_builtins(e) for e in events]}, AuditList)

    def reload(self):
        if self.config_path is None:
            raise ApiError(409, "conflict", "fastgate runs on its embedded default: there is no file to reload")
        try:
            cfg.load_config(self.config_path)
        except ConfigError as exc:
            raise ApiError(400, "bad_request", exc.render()) from None
        os.kill(self.master_pid, signal.SIGHUP)
        return 202, {"status": "reload requested", "config": self.config_path}

    def rollup(self) -> None:
        """Workers' per-key counts -> minute/hour/day rows (one transaction)."""
        if self.stats is None or self.usage is None:
            return
        counts: dict[str, list[int]] = {}
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
        self.usage.add(counts)

    def key_usage(self, key_id: str, query: dict):
        self._get(key_id)
        by = query.get("by", "hour")
        if by not in ("minute", "hour", "day"):
            raise ApiError(400, "bad_request", f"by: expected minute, hour or day, found {by!r}")
        try:
            limit = min(10_000, max(1, int(query.get("limit", "48"))))
        except ValueError:
            raise ApiError(400, "bad_request", "limit: expected a whole number") from None
        self.rollup()
        rows = self.usage.series(key_id, by, limit) if self.usage else []
        totals = {k: sum(r[k] for r in rows) for k in ("requests", "1xx", "2xx", "3xx", "4xx", "5xx",
                                                       "bytes_in", "bytes_out")}
        return 200, {"key_id": key_id, "by": by, "rows": rows, "totals": totals}

    def top_usage(self, query: dict):
        by = query.get("by", "day")
        if by not in ("minute", "hour", "day"):
            raise ApiError(400, "bad_request", f"by: expected minute, hour or day, found {by!r}")
        try:
            n = min(1000, max(1, int(query.get("n", "10"))))
        except ValueError:
            raise ApiError(400, "bad_request", "n: expected a whole number") from None
        self.rollup()
        return 200, {"by": by, "top": self.usage.top(n, by) if self.usage else []}

    def metrics(self) -> str:
        from .metrics import render

        snaps = []
        master = None
        if self.stats is not None:
            for region in range(self.stats.slots):
                snap = self.stats.read(region)
                if snap is not None:
                    snaps.append(snap)
            master = self.stats.read(self.stats.slots)
        return render(snaps, master, self.keys.stats(), self.rates.stats(), self.arena.key_capacity,
                      self.arena.rate_capacity)

    def sweep(self) -> None:
        """Record expiries in the audit trail (once) and drop ended rotation graces.
        Driven by the store (not by memory), so a failed write is retried next tick."""
        now = keysync.now_ms()
        for key_id in self.store.due_expired():
            rec = self.store.get(key_id)
            if rec is not None and not rec.revoked_at:
                self.store.mark_expired(key_id)
        self.keys.sweep(now)

    # -- dispatch --------------------------------------------------------------
    def dispatch(self, method: str, path: str, query: dict, body: bytes, headers: dict):
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if parts == ["healthz"] and method == "GET":
            return 200, {"status": "ok", "admin_pid": os.getpid(), "master_pid": self.master_pid}
        if parts == ["readyz"] and method == "GET":
            m = self.stats.read(self.stats.slots) if self.stats is not None else None
            if self.draining or (m and m.get("draining")):
                return 503, {"status": "draining"}
            if m and m.get("workers_ready", 0) < m.get("workers", 0):
                return 503, {"status": "starting", "workers_ready": m["workers_ready"], "workers": m["workers"]}
            return 200, {"status": "ready"}
        auth = headers.get(b"authorization", b"")
        if self.token is None:
            raise ApiError(401, "unauthorized",
                           f"the admin API is disabled: set {self.config.admin.token_env} for fastgate run")
        if not hmac.compare_digest(auth, self.token):
            raise ApiError(401, "unauthorized", "missing or wrong admin token (Authorization: Bearer ...)")
        actor = headers.get(b"x-fastgate-actor", b"admin").decode("utf-8", "replace")[:64] or "admin"
        n = len(parts)
        if n >= 1 and parts[0] == "keys":
            if n == 1:
                if method == "POST":
                    return self.create(body, actor)
                if method == "GET":
                    return self.list(query)
                raise ApiError(405, "method_not_allowed", "use GET or POST on /keys")
            key_id = parts[1]
            if n == 2:
                if method == "GET":
                    return 200, self.out(self._get(key_id))
                if method == "PATCH":
                    return self.update(key_id, body, actor)
                if method == "DELETE":
                    return self.delete(key_id, actor)
                raise ApiError(405, "method_not_allowed", "use GET, PATCH or DELETE on /keys/{id}")
            if n == 3 and parts[2] == "usage" and method == "GET":
                return self.key_usage(key_id, query)
            if n == 3 and parts[2] in ("rotate", "revoke"):
                if method != "POST":
                    raise ApiError(405, "method_not_allowed", f"use POST on /keys/{{id}}/{parts[2]}")
                return self.rotate(key_id, body, actor) if parts[2] == "rotate" else self.revoke(key_id, actor)
        elif parts == ["audit"] and method == "GET":
            return self.audit(query)
        elif parts == ["metrics"] and method == "GET":
            return 200, self.metrics()
        elif parts == ["usage", "top"] and method == "GET":
            return self.top_usage(query)
        elif parts == ["reload"] and method == "POST":
            return self.reload()
        elif parts == ["openapi.json"] and method == "GET":
            from .openapi import document

            return 200, document()
        raise ApiError(404, "not_found", f"no admin endpoint {method} /{'/'.join(parts)}")


class AdminProtocol(asyncio.Protocol):
    """One request at a time per connection; bodies up to 1 MiB."""

    def __init__(self, app: AdminApp):
        self.app = app
        self.transport = None
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except HttpParserError as exc:
            self.respond(400, Error(error={"code": "bad_request", "message": f"malformed request: {exc}",
                                           "request_id": self.app.next_rid()}), close=True)

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.lower()] = value

    def on_body(self, body):
        self.size += len(body)
        if self.size <= MAX_BODY:
            self.body.append(body)

    def on_message_complete(self):
        url, headers, body = self.url, self.headers, b"".join(self.body)
        too_big = self.size > MAX_BODY
        self.url, self.headers, self.body, self.size = b"", {}, [], 0
        rid = self.app.next_rid()
        method = self.parser.get_method().decode()
        path, _, qs = url.decode("latin-1").partition("?")
        query = {k: v[-1] for k, v in parse_qs(qs).items()}
        try:
            if too_big:
                raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY} bytes")
            status, payload = self.app.dispatch(method, path, query, body, headers)
        except ApiError as exc:
            status, payload = exc.status, Error(error={"code": exc.code, "message": exc.message, "request_id": rid})
        except Exception as exc:  # a bug or a store failure: say so, keep serving
            log.exception("admin request %s %s failed", method, path)
            status, payload = 500, Error(error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}",
                                                "request_id": rid})
        self.respond(status, payload, rid=rid, close=not self.parser.should_keep_alive())

    def respond(self, status: int, payload, rid: str = "", close: bool = False) -> None:
        head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())
        if isinstance(payload, str):  # Prometheus text exposition
            body = payload.encode()
            head += b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
        else:
            body = b"" if payload is None else _json.encode(payload)
        if payload is not None and not isinstance(payload, str):
            head += b"content-type: application/json\r\n"
        head += b"content-length: %d\r\n" % len(body)
        if rid:
            head += b"x-request-id: %s\r\n" % rid.encode()
        if close:
            head += b"connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if close:
            self.transport.close()


def run_admin(sock: socket.socket, ctl: socket.socket, config: cfg.Config, config_path: str | None,
              arena, store_path: str, token: bytes | None, master_pid: int, stats=None) -> None:
    from ..keys.store import KeyStore
    from ..usage import UsageStore

    # The master hands us the writer role right after the fork: wait for it.
    deadline = time.monotonic() + 10
    while arena.writer_pid != os.getpid():
        if time.monotonic() > deadline:
            raise RuntimeError("the master did not hand the admin process the writer role")
        time.sleep(0.001)
    store = KeyStore(store_path)
    usage = UsageStore(os.path.join(os.path.dirname(os.path.abspath(store_path)), "usage.db"), {
        "minute": config.log.usage_minute_hours * 3600,
        "hour": config.log.usage_hour_days * 86_400,
        "day": config.log.usage_day_days * 86_400 or None,
    })
    app = AdminApp(config, config_path, arena, store, token, master_pid, stats, usage)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
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
            app.rollup()
        except Exception:
            log.exception("admin sweep failed")
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
    server = loop.run_until_complete(loop.create_server(lambda: AdminProtocol(app), sock=sock))
    loop.call_soon(tick)
    ctl.setblocking(True)
    send_msg(ctl, b"R", str(os.getpid()).encode())
    ctl.setblocking(False)
    try:
        loop.run_forever()
    finally:
        try:
            app.rollup()
        finally:
            usage.close()
            store.close()
            loop.close()
