"""`fastgate store migrate --from sqlite:PATH --to postgresql://...`: move a single node's
keys and audit chain into a cluster's PostgreSQL store (see fastgate.keys.migrate).

Exit codes: 0 migrated (or already migrated), 1 refused or failed (nothing changed),
2 usage errors (bad flags, a gateway still running on the source)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    store = subparsers.add_parser("store", help="key store maintenance (cluster migration)")
    ss = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    p = ss.add_parser("migrate", help="copy a single node's SQLite key store (keys, secret, audit chain) into "
                                      "PostgreSQL; stop the gateway first")
    p.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite key store")
    p.add_argument("--to", dest="target", required=True, metavar="postgresql://...",
                   help="the cluster's [cluster] store URL (an empty database, or one this store was migrated to)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_migrate)


def _usage(msg: str) -> int:
    print(f"fastgate store migrate: {msg}", file=sys.stderr)
    return 2


def cmd_migrate(args: argparse.Namespace) -> int:
    from .keys.store import StoreError
    from .urls import check_pg_url, redact

    source = args.source
    if not source.startswith("sqlite:"):
        return _usage(f"--from: expected sqlite:PATH, found {source!r}")
    path = source[len("sqlite:"):]
    if path.startswith("//"):
        path = path[2:]
    try:
        check_pg_url(args.target)
    except ValueError as exc:
        return _usage(f"--to: {exc}")
    from .keys.migrate import migrate_sqlite_to_pg
    from .workers.supervisor import AlreadyRunning, InstanceLock

    try:  # a gateway serving from the source would keep writing to it after the copy
        lock = InstanceLock.acquire(path)
    except AlreadyRunning as exc:
        return _usage(f"{exc}; stop it before migrating its store")
    except OSError as exc:
        return _usage(f"cannot lock {path}: {exc}")
    lines: list[str] = []
    say = lines.append if args.json else (lambda line: print(line))
    try:
        result = migrate_sqlite_to_pg(path, args.target, say=say)
    except StoreError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(f"fastgate store migrate: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    if args.json:
        print(json.dumps({"ok": True, "from": path, "to": redact(args.target), "keys": result.keys,
                          "events": result.events, "head_seq": result.head[0], "head_hash": result.head[1],
                          "already_migrated": result.already, "newer_events": result.newer_events,
                          "replaced_secret": result.replaced_secret, "notes": lines}))
    elif not result.already:
        print(f"migrated {result.keys} keys and {result.events} audit events to {redact(args.target)}; "
              f"audit chain verified on the target (head seq {result.head[0]} hash {result.head[1][:16]}...); "
              "existing keys keep working (the server secret moved with them)")
    return 0
