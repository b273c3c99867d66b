"""`fastgate keys ...` and `fastgate audit ...`: the key-management CLI.

Every `keys` command and `audit list` is a thin client of the admin API (it
mirrors the endpoints one to one); `audit verify` runs locally on the SQLite
store so it works with the gateway stopped and needs no token.

HTTP uses only the stdlib (urllib.request): the CLI must run on a bare install.
Exit codes: 0 ok; 1 the API refused or could not be reached, or the audit trail
failed verification; 2 usage errors (bad flags, no token, unreadable store).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_TOKEN_ENV = "FASTGATE_ADMIN_TOKEN"
HTTP_TIMEOUT = 15.0
SHOWN_ONCE = "shown once, store it now: fastgate keeps only a digest and cannot show this key again"

_DURATION = re.compile(r"^\s*(\d+)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)?\s*$", re.I)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """Bad input on our side: exit 2."""


class CliError(Exception):
    """The API refused, or could not be reached: exit 1."""

    def __init__(self, message: str, payload: dict | None = None):
        super().__init__(message)
        self.payload = payload


# ------------------------------------------------------------------ parsing helpers


def parse_duration(text: str, *, allow_zero: bool = False) -> int:
    """'30d', '12h', '15m', '3600s', '3600' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise UsageError(f"expected a duration like 30d, 12h, 15m or 3600s, found {text!r}")
    n = int(m.group(1))
    unit = (m.group(2) or "s")[0].lower()
    secs = n * _UNIT_SECONDS[unit]
    if secs <= 0 and not allow_zero:
        raise UsageError(f"expected a duration > 0, found {text!r}")
    return secs


def rfc3339(dt: _dt.datetime) -> str:
    """UTC RFC 3339 with milliseconds, as the API stores and shows it."""
    from .admin.schemas import format_ms

    delta = dt.astimezone(_dt.timezone.utc) - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    return format_ms(delta // _dt.timedelta(milliseconds=1))


def clean(value: Any) -> str:
    """Text for the terminal: control and bidirectional-control characters (which the API
    refuses in names, owners and plans, but older records or metadata values may hold)
    are shown escaped, so they can never garble or reorder a table."""
    from .admin.schemas import CONTROL_RE

    text = value if isinstance(value, str) else str(value)
    return CONTROL_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def parse_meta(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--meta: expected KEY=VALUE, found {item!r}")
        out[k] = v
    return out


def _expires(args) -> str | None:
    if getattr(args, "expires_in", None):
        secs = parse_duration(args.expires_in)
        return rfc3339(_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=secs))
    if getattr(args, "expires_at", None):
        return args.expires_at
    return None


# ------------------------------------------------------------------ admin API client


class Client:
    def __init__(self, base: str, token: str, actor: str, timeout: float = HTTP_TIMEOUT):
        self.base = base.rstrip("/")
        self.token = token
        # http.client sends header values as latin-1: pass UTF-8 bytes through untouched.
        self.actor = actor.encode("utf-8", "replace").decode("latin-1")[:64]
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        url = self.base + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        data = None
        headers = {"Authorization": f"Bearer {self.token}", "x-fastgate-actor": self.actor,
                   "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
                err = payload["error"]
                msg = f"{err['message']} ({err['code']}, HTTP {exc.code}, request {err.get('request_id', '?')})"
            except (ValueError, KeyError, TypeError):
                payload = None
                msg = f"HTTP {exc.code} from {method} {url}: {raw[:200].decode('utf-8', 'replace')}"
            raise CliError(msg, payload) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                raise CliError(f"cannot reach the admin API at {self.base}: connection refused. "
                               "Is the gateway running? Start it with `fastgate run --config FILE`, "
                               "or point the CLI at it with --admin URL or --config FILE") from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise CliError(f"the admin API at {self.base} did not answer within {self.timeout:g}s") from None
            raise CliError(f"cannot reach the admin API at {self.base}: {reason}") from None
        except (TimeoutError, socket.timeout):
            raise CliError(f"the admin API at {self.base} did not answer within {self.timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise CliError(f"cannot reach the admin API at {self.base}: {exc}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"the admin API at {self.base} answered with something that is not JSON") from None


def _load_config(path: str):
    from . import config as cfg
    from .errors import ConfigError

    try:
        return cfg.load_config(path)
    except ConfigError as exc:
        raise UsageError(exc.render()) from None
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from None


def _url_from_listen(listen: str) -> str:
    from .config import parse_hostport

    try:
        host, port = parse_hostport(listen, default_host="127.0.0.1")
    except ValueError as exc:
        raise UsageError(f"admin listen address: {exc}") from None
    if port == 0:
        raise UsageError(f"the config's admin listen {listen!r} picks any free port: pass --admin URL "
                         "(the `fastgate run` banner prints it as 'admin API on ...')")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def make_client(args) -> Client:
    config = _load_config(args.config) if getattr(args, "config", None) else None
    if args.admin:
        base = args.admin if "://" in args.admin else "http://" + args.admin
    elif config is not None:
        base = _url_from_listen(config.admin.listen)
    else:
        base = _url_from_listen(DEFAULT_ADMIN)
    env = config.admin.token_env if config is not None else DEFAULT_TOKEN_ENV
    token = os.environ.get(env, "").strip()
    if not token:
        raise UsageError(f"no admin token: set ${env} to the token the gateway was started with "
                         f"(the embedded default keeps it in fastgate-data/admin.token)")
    actor = os.environ.get("USER") or "cli"
    return Client(base, token, actor)


# ------------------------------------------------------------------ output


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fmt_list(v) -> str:
    return ", ".join(clean(x) for x in v) if v else "-"


def record_lines(rec: dict) -> list[str]:
    meta = rec.get("metadata") or {}
    rows = [
        ("id", rec.get("id")),
        ("name", rec.get("name")),
        ("status", rec.get("status", "active")),
        ("owner", rec.get("owner") or "-"),
        ("plan", rec.get("plan") or "-"),
        ("scopes", _fmt_list(rec.get("scopes")) if rec.get("scopes") else "(all)"),
        ("allow_cidrs", _fmt_list(rec.get("allow_cidrs"))),
        ("deny_cidrs", _fmt_list(rec.get("deny_cidrs"))),
        ("limits", _fmt_list(rec.get("limits"))),
        ("expires_at", rec.get("expires_at") or "never"),
        ("metadata", ", ".join(f"{k}={_meta_value(v)}" for k, v in meta.items()) if meta else "-"),
        ("created_at", rec.get("created_at") or "-"),
        ("updated_at", rec.get("updated_at") or "-"),
    ]
    if rec.get("revoked_at"):
        rows.append(("revoked_at", rec["revoked_at"]))
    if rec.get("grace_until"):
        rows.append(("grace_until", rec["grace_until"]))
    return [f"  {k:<12} {clean(v)}" for k, v in rows]


def _meta_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def print_record(rec: dict) -> None:
    print("\n".join(record_lines(rec)))


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    rows = [[clean(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + ("  {}" if len(widths) > 1 else "{}")
    print(fmt.format(*headers).rstrip())
    for r in rows:
        print(fmt.format(*r).rstrip())


def print_secret(key: str) -> None:
    print(f"key: {key}")
    print(f"     ^ {SHOWN_ONCE}")


# ------------------------------------------------------------------ commands


def _key_path(key_id: str, suffix: str = "") -> str:
    return "/keys/" + urllib.parse.quote(key_id, safe="") + suffix


def _fields(args) -> dict[str, Any]:
    """The request body fields common to create and update (only those given)."""
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.owner is not None:
        body["owner"] = args.owner
    if args.plan is not None:
        body["plan"] = args.plan
    for flag, field in (("scope", "scopes"), ("allow_cidr", "allow_cidrs"),
                        ("deny_cidr", "deny_cidrs"), ("limit", "limits")):
        v = getattr(args, flag)
        if v:
            body[field] = list(v)
    exp = _expires(args)
    if exp is not None:
        body["expires_at"] = exp
    if args.meta:
        body["metadata"] = parse_meta(args.meta)
    return body


def cmd_create(args) -> int:
    body = _fields(args)
    client = make_client(args)
    rec = client.call("POST", "/keys", body)
    if args.json:
        _emit_json(rec)
        return 0
    print(f"created key {rec['id']} ({rec['name']})")
    print_secret(rec["key"])
    print_record(rec)
    return 0


def cmd_update(args) -> int:
    body = _fields(args)
    clears = (("clear_owner", "owner", None), ("clear_plan", "plan", None), ("no_expiry", "expires_at", None),
              ("clear_scopes", "scopes", []), ("clear_allow_cidrs", "allow_cidrs", []),
              ("clear_deny_cidrs", "deny_cidrs", []), ("clear_limits", "limits", []))
    for flag, field, empty in clears:
        if getattr(args, flag):
            if field in body:
                raise UsageError(f"--{flag.replace('_', '-')} conflicts with a new value for {field}")
            body[field] = empty
    client = make_client(args)
    if args.clear_meta or args.unset_meta or "metadata" in body:
        # PATCH replaces metadata as a whole: merge into the current one unless told to clear.
        new_meta = {} if args.clear_meta else dict(client.call("GET", _key_path(args.id)).get("metadata") or {})
        for k in args.unset_meta or ():
            new_meta.pop(k, None)
        new_meta.update(body.get("metadata", {}))
        body["metadata"] = new_meta
    if not body:
        raise UsageError("nothing to update: give at least one field flag (see fastgate keys update --help)")
    rec = client.call("PATCH", _key_path(args.id), body)
    if args.json:
        _emit_json(rec)
        return 0
    print(f"updated key {rec['id']} ({', '.join(sorted(body))})")
    print_record(rec)
    return 0


def cmd_list(args) -> int:
    client = make_client(args)
    page = client.call("GET", "/keys", query={"owner": args.owner, "limit": args.limit, "after": args.after})
    if args.json:
        _emit_json(page)
        return 0
    keys = page.get("keys", [])
    if not keys:
        print("no keys" + (f" for owner {args.owner!r}" if args.owner else ""))
    else:
        print_table(
            ["ID", "NAME", "OWNER", "PLAN", "STATUS", "EXPIRES", "CREATED"],
            [[k["id"], k["name"], k.get("owner") or "-", k.get("plan") or "-", k.get("status", "active"),
              k.get("expires_at") or "never", k.get("created_at") or "-"] for k in keys],
        )
    if page.get("next_after"):
        print(f"more keys: fastgate keys list --after {page['next_after']}"
              + (f" --limit {args.limit}" if args.limit else ""))
    return 0


def cmd_show(args) -> int:
    rec = make_client(args).call("GET", _key_path(args.id))
    if args.json:
        _emit_json(rec)
    else:
        print_record(rec)
    return 0


def cmd_rotate(args) -> int:
    grace = parse_duration(args.grace, allow_zero=True) if args.grace else 0
    rec = make_client(args).call("POST", _key_path(args.id, "/rotate"), {"grace_seconds": grace})
    if args.json:
        _emit_json(rec)
        return 0
    print(f"rotated key {rec['id']} ({rec['name']})")
    print_secret(rec["key"])
    if rec.get("grace_until"):
        print(f"the previous key keeps working until {rec['grace_until']}")
    else:
        print("the previous key stopped working now (no grace period)")
    print_record(rec)
    return 0


def cmd_revoke(args) -> int:
    rec = make_client(args).call("POST", _key_path(args.id, "/revoke"))
    if args.json:
        _emit_json(rec)
    else:
        print(f"revoked key {rec['id']} at {rec.get('revoked_at', '?')}: every worker refuses it now")
    return 0


def cmd_delete(args) -> int:
    make_client(args).call("DELETE", _key_path(args.id))
    if args.json:
        _emit_json({"id": args.id, "deleted": True})
    else:
        print(f"deleted key {args.id} (its audit history stays)")
    return 0


def cmd_audit_list(args) -> int:
    page = make_client(args).call("GET", "/audit", query={"key_id": args.key, "after": args.after,
                                                          "limit": args.limit})
    if args.json:
        _emit_json(page)
        return 0
    events = page.get("events", [])
    if not events:
        print("no audit events")
        return 0
    print_table(
        ["SEQ", "TIME", "ACTOR", "EVENT", "KEY", "CHANGES"],
        [[str(e["seq"]), e["ts"], e["actor"], e["event"], e["key_id"],
          json.dumps(e.get("changes") or {}, separators=(",", ":"), sort_keys=True)] for e in events],
    )
    if len(events) == (args.limit or 100):
        print(f"more events: fastgate audit list --after {events[-1]['seq']}")
    return 0


def cmd_usage(args) -> int:
    client = make_client(args)
    if args.top is not None:
        data = client.call("GET", "/usage/top", query={"n": args.top, "by": args.by or "day"})
        if args.json:
            _emit_json(data)
            return 0
        rows = data.get("top", [])
        if not rows:
            print(f"no usage recorded this {data.get('by', 'day')}")
            return 0
        print_table(["KEY", "REQUESTS", "2XX", "4XX", "5XX", "BYTES IN", "BYTES OUT", "SINCE"],
                    [[r["key_id"], str(r["requests"]), str(r["2xx"]), str(r["4xx"]), str(r["5xx"]),
                      str(r["bytes_in"]), str(r["bytes_out"]), r["since"]] for r in rows])
        return 0
    if not args.key:
        raise UsageError("usage needs --key ID or --top N")
    data = client.call("GET", f"/keys/{args.key}/usage", query={"by": args.by or "hour", "limit": args.limit})
    if args.json:
        _emit_json(data)
        return 0
    rows = data.get("rows", [])
    if not rows:
        print(f"no usage recorded for {args.key}")
        return 0
    print_table(["TIME", "REQUESTS", "1XX", "2XX", "3XX", "4XX", "5XX", "BYTES IN", "BYTES OUT"],
                [[r["ts"], str(r["requests"]), str(r["1xx"]), str(r["2xx"]), str(r["3xx"]), str(r["4xx"]),
                  str(r["5xx"]), str(r["bytes_in"]), str(r["bytes_out"])] for r in rows])
    t = data["totals"]
    print(f"total: {t['requests']} requests ({t['2xx']} 2xx, {t['4xx']} 4xx, {t['5xx']} 5xx), "
          f"{t['bytes_in']} bytes in, {t['bytes_out']} bytes out")
    return 0


def _store_path(args) -> str:
    if args.store:
        return args.store
    if args.config:
        # load_config resolves a relative store against the config's folder,
        # exactly as `fastgate run` does; [cluster] store wins, as in `fastgate run`.
        config = _load_config(args.config)
        return config.cluster.store or config.keys.store
    return os.path.join(os.environ.get("FASTGATE_DATA", "fastgate-data"), "keys.db")


def cmd_audit_verify(args) -> int:
    from .keys.audit import verify_store
    from .urls import is_pg_url

    target = _store_path(args)
    if is_pg_url(target):
        from .keys.store_pg import verify_url

        return verify_url(target, as_json=args.json)
    if target.startswith("sqlite:"):
        target = target[len("sqlite:"):]
    return verify_store(target, as_json=args.json)


# ------------------------------------------------------------------ argparse


def _common(admin: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    if admin:
        p.add_argument("--admin", metavar="URL",
                       help=f"admin API base URL (default: [admin] listen of --config, else http://{DEFAULT_ADMIN})")
        p.add_argument("--config", "-c", metavar="FILE",
                       help="gateway config: admin address and admin.token_env come from it")
    return p


def _field_flags(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--name", required=create, help="human name of the key")
    p.add_argument("--owner", help="owner / tenant")
    p.add_argument("--plan", help="a [plans.NAME] of the config")
    p.add_argument("--scope", action="append", metavar="'METHOD /path*'",
                   help="allowed call, repeatable (none = all)" + ("" if create else "; replaces the list"))
    p.add_argument("--allow-cidr", action="append", metavar="CIDR", help="repeatable")
    p.add_argument("--deny-cidr", action="append", metavar="CIDR", help="repeatable")
    p.add_argument("--limit", action="append", metavar="N/UNIT",
                   help="per-key rate limit like 5/second, repeatable")
    exp = p.add_mutually_exclusive_group()
    exp.add_argument("--expires-in", metavar="DURATION", help="30d, 12h, 15m, 3600s from now")
    exp.add_argument("--expires-at", metavar="RFC3339", help="e.g. 2027-01-01T00:00:00Z")
    if not create:
        exp.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE",
                   help="metadata, repeatable" + ("" if create else "; merged into the current metadata"))


def register(subparsers) -> None:
    common = _common()

    keys = subparsers.add_parser("keys", help="create and manage API keys (via the admin API)")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    p = ks.add_parser("create", parents=[common], help="create a key (the key is printed once)")
    _field_flags(p, create=True)
    p.set_defaults(func=cmd_create)

    p = ks.add_parser("list", parents=[common], help="list keys")
    p.add_argument("--owner")
    p.add_argument("--limit", type=int, metavar="N", help="page size (1..1000, default 100)")
    p.add_argument("--after", metavar="ID", help="start after this key id (next page)")
    p.set_defaults(func=cmd_list)

    p = ks.add_parser("show", parents=[common], help="show one key")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)

    p = ks.add_parser("update", parents=[common], help="change a key's fields (PATCH)")
    p.add_argument("id")
    _field_flags(p, create=False)
    p.add_argument("--clear-owner", action="store_true")
    p.add_argument("--clear-plan", action="store_true")
    p.add_argument("--clear-scopes", action="store_true", help="allow every call")
    p.add_argument("--clear-allow-cidrs", action="store_true")
    p.add_argument("--clear-deny-cidrs", action="store_true")
    p.add_argument("--clear-limits", action="store_true")
    p.add_argument("--clear-meta", action="store_true", help="drop all metadata (then apply --meta)")
    p.add_argument("--unset-meta", action="append", metavar="KEY", help="drop one metadata key, repeatable")
    p.set_defaults(func=cmd_update)

    p = ks.add_parser("rotate", parents=[common], help="issue a new secret (printed once)")
    p.add_argument("id")
    p.add_argument("--grace", metavar="DURATION", help="how long the old key keeps working (default 0)")
    p.set_defaults(func=cmd_rotate)

    p = ks.add_parser("revoke", parents=[common], help="revoke a key (effective in every worker at once)")
    p.add_argument("id")
    p.set_defaults(func=cmd_revoke)

    p = ks.add_parser("delete", parents=[common], help="delete a key record (the audit trail keeps its history)")
    p.add_argument("id")
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("usage", parents=[common], help="per-key usage rollups (via the admin API)")
    p.add_argument("--key", metavar="ID", help="one key's usage over time")
    p.add_argument("--top", type=int, metavar="N", help="the N biggest consumers")
    p.add_argument("--by", choices=["minute", "hour", "day"], help="bucket size (default: hour; --top: day)")
    p.add_argument("--limit", type=int, metavar="N", help="how many buckets (default 48)")
    p.set_defaults(func=cmd_usage)

    audit = subparsers.add_parser("audit", help="read and verify the key audit trail")
    au = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = au.add_parser("list", parents=[common], help="list audit events (via the admin API)")
    p.add_argument("--key", metavar="ID", help="only this key's events")
    p.add_argument("--after", type=int, metavar="SEQ", help="events after this sequence number")
    p.add_argument("--limit", type=int, metavar="N", help="page size (1..1000, default 100)")
    p.set_defaults(func=cmd_audit_list)

    p = au.add_parser("verify", parents=[_common(admin=False)],
                      help="check the hash chain of the local key store (no API; exit 1 on tampering)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", "-c", metavar="FILE",
                     help="take the store from [cluster] store if set, else [keys] store")
    src.add_argument("--store", metavar="PATH|URL", help="the SQLite key store file, or a postgresql:// URL")
    p.set_defaults(func=cmd_audit_verify)


def run(args) -> int:
    """Dispatch a parsed `keys`/`audit` command; returns the exit code."""
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        if getattr(args, "json", False) and exc.payload is not None:
            print(json.dumps(exc.payload), file=sys.stderr)
        else:
            print(f"fastgate: {exc}", file=sys.stderr)
        return 1
